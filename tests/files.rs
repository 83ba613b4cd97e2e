//! Integration tests of file transfer: round trips through `ferryd send`, a raw socket and
//! `ferryd pack | nc`; frames mixed with text on one connection; headers and bodies split at
//! every size; refused names and headers; size and space limits; checksum mismatches; dropped
//! and stalled bodies and a killed daemon; the three conflict policies, also under a race; the
//! client's error reports; and the modes of stored files and of the upload directory. Every
//! test drives the real binary over loopback with its own port and temp dirs (see `support`).

mod support;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use support::{
    Daemon, DaemonBuilder, Rng, TempDir, describe, expect_err_then_eof, frame, header_for,
    log_tail, names_in, need, ok_line, parts_in, path_str, read_line, read_until_eof, reserve_port,
    run_ferryd, run_ferryd_for, run_for, send_all, text_of, wait_until, write_file,
};

const MIB: usize = 1 << 20;
/// How long to wait for the answer to a large body (the daemon fsyncs the file first).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for an answer that needs no disk work.
const SHORT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers: random bytes, frames, answers.

/// Splits `OK <name> <size> <hex>` from the right (a stored name may contain spaces). Parsed
/// here rather than with the crate's own parser, so that a bug there cannot hide one here.
fn parse_ok(line: &str) -> Option<(String, u64, String)> {
    let rest = line.trim_end_matches('\n').strip_prefix("OK ")?;
    let (rest, hex) = rest.rsplit_once(' ')?;
    let (name, size) = rest.rsplit_once(' ')?;
    Some((name.to_string(), size.parse().ok()?, hex.to_string()))
}

/// Asserts that `line` is an `OK` line for `body` stored as `stored`.
fn check_ok(d: &Daemon, line: &str, stored: &str, body: &[u8], what: &str) {
    let Some((name, size, hex)) = parse_ok(line) else {
        panic!("{what}: not an OK line: {line:?}{}", log_tail(d));
    };
    let want_hex = blake3::hash(body).to_hex();
    assert!(
        name == stored && size == body.len() as u64 && hex == want_hex.as_str(),
        "{what}: answer {line:?}, want name {stored:?}, size {}, blake3 {want_hex}{}",
        body.len(),
        log_tail(d)
    );
}

/// `None` if equal, else a short description of the first difference (never the bytes: some are
/// 64 MiB).
fn difference(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Some(format!(
        "{} bytes where {} were expected; first difference at offset {at}",
        got.len(),
        want.len()
    ))
}

// ---------------------------------------------------------------------------------------------
// Helpers: the upload directory.

/// Asserts that `dir` holds exactly the files `want` (name, contents): nothing else, in
/// particular no `.part` file.
fn assert_dir_holds(d: &Daemon, dir: &Path, want: &[(&str, &[u8])], what: &str) {
    let mut want_names: Vec<String> = want.iter().map(|(n, _)| n.to_string()).collect();
    want_names.sort();
    let got_names = names_in(dir);
    assert_eq!(
        got_names,
        want_names,
        "{what}: files in {}{}",
        dir.display(),
        log_tail(d)
    );
    for (name, body) in want {
        let path = dir.join(name);
        let got = fs::read(&path).unwrap_or_else(|e| panic!("{what}: reading {name:?}: {e}"));
        if let Some(diff) = difference(&got, body) {
            panic!("{what}: stored {name:?} differs: {diff}{}", log_tail(d));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers: sockets and logs.

/// Writes header, name and body without copying the body into one buffer.
fn send_frame(d: &Daemon, s: &mut TcpStream, name: &str, body: &[u8]) {
    let what = format!("sending {name:?}");
    send_all(d, s, &header_for(name.as_bytes(), body, false), &what);
    send_all(d, s, name.as_bytes(), &what);
    send_all(d, s, body, &what);
}

/// Reads one line, waiting at most `timeout` for each byte.
fn line_within(s: &mut TcpStream, timeout: Duration) -> String {
    s.set_read_timeout(Some(timeout)).unwrap();
    read_line(s)
}

/// Reads exactly `n` bytes within `timeout` in all; on EOF, error or timeout returns what it got
/// and why it stopped.
fn read_n_within(s: &mut TcpStream, n: usize, timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut out = vec![0u8; n];
    let mut have = 0;
    while have < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "timed out after {have} of {n} bytes: {:?}",
                String::from_utf8_lossy(&out[..have])
            ));
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut out[have..]) {
            Ok(0) => {
                return Err(format!(
                    "EOF after {have} of {n} bytes: {:?}",
                    String::from_utf8_lossy(&out[..have])
                ));
            }
            Ok(k) => have += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "{e} after {have} of {n} bytes: {:?}",
                    String::from_utf8_lossy(&out[..have])
                ));
            }
        }
    }
    Ok(out)
}

/// `dir = "<path>"` for `[files]`.
fn dir_line(path: &Path) -> String {
    format!("dir = {:?}", path_str(path))
}

// ---------------------------------------------------------------------------------------------
// 1. Round trips.

/// The sizes every round trip covers: empty, one byte, 1 MiB and 64 MiB.
fn round_trip_files(rng: &mut Rng) -> Vec<(&'static str, Vec<u8>)> {
    [
        ("empty.bin", 0),
        ("one.bin", 1),
        ("mib.bin", MIB),
        ("big.bin", 64 * MIB),
    ]
    .into_iter()
    .map(|(name, n)| (name, rng.bytes(n)))
    .collect()
}

#[test]
fn send_round_trips_0_1_1mib_and_64mib_files() {
    let d = DaemonBuilder::new().start();
    let src = TempDir::new();
    let files = round_trip_files(&mut Rng::new(1));
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, body)| write_file(&src, name, body))
        .collect();
    let to = d.addr().to_string();
    let mut args = vec!["send", "--to", to.as_str()];
    args.extend(paths.iter().map(|p| path_str(p)));
    let started = Instant::now();
    let out = run_ferryd_for(&args, &[], Duration::from_secs(60));
    eprintln!(
        "ferryd send of {} files took {:.2} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "send failed: {}{}",
        describe(&out),
        log_tail(&d)
    );
    let stdout = text_of(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), files.len(), "one line per file: {stdout:?}");
    for ((name, body), (path, line)) in files.iter().zip(paths.iter().zip(&lines)) {
        let prefix = format!("{}: ", path.display());
        let answer = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("line {line:?} does not start with {prefix:?}"));
        check_ok(&d, answer, name, body, &format!("send {name}"));
        let needle = format!(
            "stored \"{name}\" as \"{name}\" ({} B, blake3 {}, ",
            body.len(),
            blake3::hash(body).to_hex()
        );
        let log = d.wait_log(&needle, SHORT_TIMEOUT);
        for l in log.lines().filter(|l| l.contains(&needle)) {
            eprintln!("daemon: {l}");
        }
    }
    let want: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    assert_dir_holds(&d, &d.uploads(), &want, "after send");
}

#[test]
fn raw_socket_round_trips_0_1_1mib_and_64mib_frames_on_one_connection() {
    let d = DaemonBuilder::new().start();
    let files = round_trip_files(&mut Rng::new(101));
    let mut s = d.connect();
    // Frames back to back, no text between them: each starts right after the previous one.
    for (name, body) in &files {
        send_frame(&d, &mut s, name, body);
    }
    for (name, body) in &files {
        let line = line_within(&mut s, ANSWER_TIMEOUT);
        check_ok(&d, &line, name, body, &format!("raw {name}"));
    }
    s.shutdown(Shutdown::Write).unwrap();
    let (rest, err) = read_until_eof(&mut s, SHORT_TIMEOUT);
    assert!(
        rest.is_empty() && err.is_none(),
        "after the answers: {:?}, {err:?}{}",
        text_of(&rest),
        log_tail(&d)
    );
    let want: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    assert_dir_holds(&d, &d.uploads(), &want, "after raw frames");
}

// ---------------------------------------------------------------------------------------------
// 2. Frames and text on one connection.

#[test]
fn twenty_frames_interleaved_with_text_lines_are_answered_in_order() {
    let d = DaemonBuilder::new().start();
    let mut rng = Rng::new(2);
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            let n = rng.between(0, 200 * 1024);
            (format!("file-{i:02}.bin"), rng.bytes(n))
        })
        .collect();
    let mut expected = Vec::new();
    for (i, (name, body)) in files.iter().enumerate() {
        expected.extend_from_slice(format!("line {i}\n").as_bytes());
        expected.extend_from_slice(ok_line(name, body).as_bytes());
    }
    let mut s = d.connect();
    let mut writer = s.try_clone().unwrap();
    let files_ref = &files;
    let (got, read_err, wrote) = thread::scope(|scope| {
        let w = scope.spawn(move || -> io::Result<()> {
            for (i, (name, body)) in files_ref.iter().enumerate() {
                writer.write_all(format!("line {i}\n").as_bytes())?;
                writer.write_all(&frame(name.as_bytes(), body))?;
            }
            writer.shutdown(Shutdown::Write)
        });
        // The daemon answers the last frame, reads our EOF and closes: the reply stream is
        // exactly what arrives before EOF.
        let (got, err) = read_until_eof(&mut s, Duration::from_secs(30));
        (got, err, w.join().expect("writer thread panicked"))
    });
    if let Err(e) = wrote {
        panic!("writer: {e}{}", log_tail(&d));
    }
    if let Some(diff) = difference(&got, &expected) {
        let at = got
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        let from = at.saturating_sub(80);
        panic!(
            "reply stream differs ({diff}; read error: {read_err:?})\n got: {:?}\nwant: {:?}{}",
            text_of(&got[from..(at + 80).min(got.len())]),
            text_of(&expected[from..(at + 80).min(expected.len())]),
            log_tail(&d)
        );
    }
    assert!(read_err.is_none(), "{read_err:?}");
    let want: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    assert_dir_holds(&d, &d.uploads(), &want, "after 20 interleaved frames");
}

// ---------------------------------------------------------------------------------------------
// 3. Split writes.

#[test]
fn header_byte_by_byte_and_body_in_random_splits_is_stored() {
    let d = DaemonBuilder::new().start();
    let mut rng = Rng::new(3);
    let files = [
        ("trickle.bin", rng.bytes(2 * MIB + 12_345)),
        ("small.bin", rng.bytes(100_000)),
    ];
    let mut s = d.connect();
    s.set_nodelay(true).unwrap();
    let mut expected = Vec::new();
    for (name, body) in &files {
        // A text line first, also byte by byte: the frame's 0xF5 then comes in a read of its
        // own, after a read that ended with '\n'.
        let mut head = b"hi\n".to_vec();
        head.extend_from_slice(&header_for(name.as_bytes(), body, false));
        head.extend_from_slice(name.as_bytes());
        for b in &head {
            send_all(&d, &mut s, std::slice::from_ref(b), "header byte");
            s.flush().unwrap();
            thread::sleep(Duration::from_millis(2));
        }
        // Chunk sizes spread evenly over their bit lengths, 1 B to 64 KiB, so that tiny and
        // large splits both occur often.
        let mut at = 0;
        let mut n_chunks = 0;
        while at < body.len() {
            let bits = rng.between(0, 16);
            let n = rng.between(1, 1 << bits).min(body.len() - at);
            send_all(&d, &mut s, &body[at..at + n], "body chunk");
            at += n;
            n_chunks += 1;
        }
        eprintln!("{name}: {} B body in {n_chunks} writes", body.len());
        expected.extend_from_slice(b"hi\n");
        expected.extend_from_slice(ok_line(name, body).as_bytes());
    }
    let got = read_n_within(&mut s, expected.len(), ANSWER_TIMEOUT)
        .unwrap_or_else(|e| panic!("reading the replies: {e}{}", log_tail(&d)));
    assert_eq!(text_of(&got), text_of(&expected), "{}", log_tail(&d));
    let want: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    assert_dir_holds(&d, &d.uploads(), &want, "after split writes");
}

// ---------------------------------------------------------------------------------------------
// 4. Refused names and headers.

#[test]
fn bad_names_and_bad_headers_are_refused_and_close_the_connection() {
    let d = DaemonBuilder::new().start();
    let body: &[u8] = b"0123456789abcdef";
    let long = vec![b'n'; 256];
    let names: [(&str, &[u8]); 11] = [
        ("empty name (name_len 0)", b""),
        ("slash", b"a/b"),
        ("backslash", b"..\\x"),
        ("NUL", b"a\0b"),
        ("newline", b"x\ny"),
        ("escape sequence", b"\x1b[31m"),
        ("dot", b"."),
        ("dot dot", b".."),
        ("256 bytes (name_len 256)", &long),
        ("invalid UTF-8", b"\xff\xfe"),
        ("reserved prefix", b".ferryd-1.part"),
    ];
    let mut cases: Vec<(String, Vec<u8>, &str)> = names
        .iter()
        .map(|(what, name)| (format!("name: {what}"), frame(name, body), "bad-name"))
        .collect();
    let good = frame(b"fine.bin", body);
    for (what, at, byte, code) in [
        ("magic F5 'X' R Y", 1, b'X', "bad-magic"),
        ("version 2", 4, 2, "bad-version"),
        ("version 0", 4, 0, "bad-version"),
        ("flags 0x10", 5, 0x10, "bad-header"),
        ("flags 0x80", 5, 0x80, "bad-header"),
    ] {
        let mut bad = good.clone();
        bad[at] = byte;
        cases.push((what.to_string(), bad, code));
    }
    for (what, bytes, code) in &cases {
        let mut s = d.connect();
        send_all(&d, &mut s, bytes, what);
        let line = expect_err_then_eof(&d, &mut s, code, what);
        eprintln!("{what}: {}", line.trim_end());
        assert_dir_holds(&d, &d.uploads(), &[], what);
    }
    // The daemon is still serving.
    let mut s = d.connect();
    send_all(&d, &mut s, &good, "good frame");
    check_ok(
        &d,
        &line_within(&mut s, SHORT_TIMEOUT),
        "fine.bin",
        body,
        "good frame after the bad ones",
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Size and space limits.

/// Sends only the header and name of a frame announcing `body`, then expects `ERR <code>` to
/// arrive without the body, followed by EOF, and nothing stored.
fn refused_before_body(d: &Daemon, name: &str, body: &[u8], code: &str) {
    let what = format!("{name} ({} B) announced without its body", body.len());
    let mut s = d.connect();
    send_all(d, &mut s, &header_for(name.as_bytes(), body, false), &what);
    send_all(d, &mut s, name.as_bytes(), &what);
    let line = line_within(&mut s, Duration::from_secs(5));
    assert!(
        line.starts_with(&format!("ERR {code} ")),
        "{what}: got {line:?}{}",
        log_tail(d)
    );
    eprintln!("{what}: {}", line.trim_end());
    let (rest, err) = read_until_eof(&mut s, SHORT_TIMEOUT);
    assert!(
        rest.is_empty() && err.is_none(),
        "{what}: after the ERR line: {:?}, {err:?}{}",
        text_of(&rest),
        log_tail(d)
    );
    assert_dir_holds(d, &d.uploads(), &[], &what);
}

#[test]
fn too_large_is_refused_before_the_body_and_the_limit_itself_is_accepted() {
    let d = DaemonBuilder::new()
        .set("files", "max_file_size = 1000")
        .start();
    let mut rng = Rng::new(5);
    refused_before_body(&d, "over.bin", &rng.bytes(1001), "too-large");
    let exact = rng.bytes(1000);
    let mut s = d.connect();
    send_frame(&d, &mut s, "exact.bin", &exact);
    check_ok(
        &d,
        &line_within(&mut s, SHORT_TIMEOUT),
        "exact.bin",
        &exact,
        "1000 B at max_file_size = 1000",
    );
    assert_dir_holds(
        &d,
        &d.uploads(),
        &[("exact.bin", &exact)],
        "after the limit",
    );
}

#[test]
fn no_space_is_refused_before_the_body() {
    let d = DaemonBuilder::new()
        .set("files", "min_free_bytes = 9223372036854775807")
        .start();
    refused_before_body(&d, "nospace.bin", &Rng::new(55).bytes(10), "no-space");
}

// ---------------------------------------------------------------------------------------------
// 6. Checksum mismatch.

#[test]
fn checksum_mismatch_stores_nothing_and_the_connection_goes_on() {
    let d = DaemonBuilder::new().start();
    let mut rng = Rng::new(6);
    let body = rng.bytes(100_000);
    let mut damaged = body.clone();
    let at = rng.between(0, body.len() - 1);
    damaged[at] ^= 0xFF;
    let mut s = d.connect();
    send_all(
        &d,
        &mut s,
        &header_for(b"damaged.bin", &body, false),
        "header",
    );
    send_all(&d, &mut s, b"damaged.bin", "name");
    send_all(&d, &mut s, &damaged, "damaged body");
    let line = line_within(&mut s, SHORT_TIMEOUT);
    assert!(
        line.starts_with("ERR checksum "),
        "byte {at} flipped: got {line:?}{}",
        log_tail(&d)
    );
    eprintln!("{}", line.trim_end());
    assert_dir_holds(&d, &d.uploads(), &[], "after the mismatch");
    // Same connection: a text line is echoed, and the same name with the right body is stored
    // under that name (nothing took it before).
    let text = b"still here\n";
    send_all(&d, &mut s, text, "text after the mismatch");
    let echoed = read_n_within(&mut s, text.len(), SHORT_TIMEOUT)
        .unwrap_or_else(|e| panic!("echo after the mismatch: {e}{}", log_tail(&d)));
    assert_eq!(echoed, text);
    send_frame(&d, &mut s, "damaged.bin", &body);
    check_ok(
        &d,
        &line_within(&mut s, SHORT_TIMEOUT),
        "damaged.bin",
        &body,
        "correct frame after the mismatch",
    );
    assert_dir_holds(
        &d,
        &d.uploads(),
        &[("damaged.bin", &body)],
        "after the correct frame",
    );
}

// ---------------------------------------------------------------------------------------------
// 7. A connection dropped in the middle of the body.

#[test]
fn body_cut_short_by_a_drop_a_half_close_or_a_stall_leaves_nothing() {
    // A stalled body is given up after idle_timeout_secs.
    let d = DaemonBuilder::new()
        .set("server", "idle_timeout_secs = 1")
        .start();
    let body = Rng::new(7).bytes(4 * MIB);
    let uploads = d.uploads();
    for (how, name) in [
        ("dropped", "dropped.bin"),
        ("half-closed", "halfclosed.bin"),
        ("stalled", "stalled.bin"),
    ] {
        let what = format!("connection {how} at 2 of 4 MiB");
        let mut s = d.connect();
        send_all(
            &d,
            &mut s,
            &header_for(name.as_bytes(), &body, false),
            &what,
        );
        send_all(&d, &mut s, name.as_bytes(), &what);
        send_all(&d, &mut s, &body[..2 * MIB], &what);
        match how {
            "dropped" => drop(s),
            "half-closed" => {
                s.shutdown(Shutdown::Write).unwrap();
                expect_err_then_eof(&d, &mut s, "short-body", &what);
            }
            _ => {
                expect_err_then_eof(&d, &mut s, "timeout", &what);
            }
        }
        let needle = format!("file \"{name}\" lost after {} of {} B", 2 * MIB, 4 * MIB);
        let clean = wait_until(Duration::from_secs(3), || {
            names_in(&uploads).is_empty() && d.log().contains(&needle)
        });
        assert!(
            clean,
            "{what}: within 3 s: files {:?}, log should contain {needle:?}{}",
            names_in(&uploads),
            log_tail(&d)
        );
        let log = d.log();
        for l in log.lines().filter(|l| l.contains(name)) {
            eprintln!("daemon: {l}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 8. An existing name under each conflict policy.

#[test]
fn existing_name_under_rename_reject_and_overwrite() {
    let mut rng = Rng::new(8);
    let original = rng.bytes(5000);
    let new1 = rng.bytes(7000);
    let new2 = rng.bytes(3000);
    for policy in ["rename", "reject", "overwrite"] {
        let d = DaemonBuilder::new()
            .set("files", &format!("on_conflict = {policy:?}"))
            .start();
        let uploads = d.uploads();
        let existing = uploads.join("report.txt");
        fs::write(&existing, &original).unwrap();
        let ino = fs::metadata(&existing).unwrap().ino();
        let mut s = d.connect();
        send_frame(&d, &mut s, "report.txt", &new1);
        let what = format!("on_conflict = {policy}");
        match policy {
            "rename" => {
                let line = line_within(&mut s, SHORT_TIMEOUT);
                check_ok(&d, &line, "report (1).txt", &new1, &what);
                send_frame(&d, &mut s, "report.txt", &new2);
                let line = line_within(&mut s, SHORT_TIMEOUT);
                check_ok(&d, &line, "report (2).txt", &new2, &what);
                assert_dir_holds(
                    &d,
                    &uploads,
                    &[
                        ("report.txt", &original),
                        ("report (1).txt", &new1),
                        ("report (2).txt", &new2),
                    ],
                    &what,
                );
            }
            "reject" => {
                expect_err_then_eof(&d, &mut s, "exists", &what);
                assert_dir_holds(&d, &uploads, &[("report.txt", &original)], &what);
            }
            _ => {
                let line = line_within(&mut s, SHORT_TIMEOUT);
                check_ok(&d, &line, "report.txt", &new1, &what);
                assert_dir_holds(&d, &uploads, &[("report.txt", &new1)], &what);
            }
        }
        let ino_after = fs::metadata(&existing).unwrap().ino();
        if policy == "overwrite" {
            // Replaced by a rename over it, not rewritten in place.
            assert_ne!(ino_after, ino, "{what}: the file was rewritten in place");
        } else {
            assert_eq!(ino_after, ino, "{what}: the original was replaced");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Two clients racing for one name.

/// Two clients send 8 MiB each under `same.bin` at the same moment; returns each one's body and
/// answer line, and the daemon.
fn race(policy: &str, seed: u64) -> (Daemon, Vec<(Vec<u8>, String)>) {
    let d = DaemonBuilder::new()
        .set("files", &format!("on_conflict = {policy:?}"))
        .start();
    let mut rng = Rng::new(seed);
    let bodies = [rng.bytes(8 * MIB), rng.bytes(8 * MIB)];
    let barrier = Barrier::new(bodies.len());
    let results = thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|body| {
                let mut s = d.connect();
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut data = header_for(b"same.bin", body, false).to_vec();
                    data.extend_from_slice(b"same.bin");
                    barrier.wait();
                    // A write error is not fatal here: a daemon that refused early answers
                    // before closing, and the answer is what counts.
                    let written = s.write_all(&data).and_then(|()| s.write_all(body));
                    s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while !line.ends_with(b"\n") {
                        match s.read(&mut byte) {
                            Ok(1) => line.push(byte[0]),
                            Ok(_) => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                line.extend_from_slice(format!("<read error: {e}>").as_bytes());
                                break;
                            }
                        }
                    }
                    if let Err(e) = written {
                        eprintln!("{policy}: a client's write failed: {e}");
                    }
                    (body.clone(), text_of(&line))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect::<Vec<_>>()
    });
    for (_, line) in &results {
        eprintln!("{policy}: {}", line.trim_end());
    }
    (d, results)
}

#[test]
fn racing_uploads_of_one_name_under_rename_get_two_whole_files() {
    let (d, results) = race("rename", 9);
    let mut want: Vec<(String, &[u8])> = Vec::new();
    for (body, line) in &results {
        let Some((stored, ..)) = parse_ok(line) else {
            panic!("rename race: not an OK line: {line:?}{}", log_tail(&d));
        };
        check_ok(&d, line, &stored, body, "rename race");
        want.push((stored, body));
    }
    let mut names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["same (1).bin", "same.bin"], "{}", log_tail(&d));
    let want: Vec<(&str, &[u8])> = want.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    assert_dir_holds(&d, &d.uploads(), &want, "after the rename race");
}

#[test]
fn racing_uploads_of_one_name_under_reject_store_exactly_one() {
    let (d, results) = race("reject", 10);
    let winners: Vec<&(Vec<u8>, String)> = results
        .iter()
        .filter(|(_, l)| l.starts_with("OK "))
        .collect();
    let losers: Vec<&(Vec<u8>, String)> = results
        .iter()
        .filter(|(_, l)| l.starts_with("ERR exists "))
        .collect();
    assert!(
        winners.len() == 1 && losers.len() == 1,
        "reject race: want one OK and one `ERR exists`, got {:?}{}",
        results.iter().map(|(_, l)| l).collect::<Vec<_>>(),
        log_tail(&d)
    );
    let (body, line) = winners[0];
    check_ok(&d, line, "same.bin", body, "reject race winner");
    assert_dir_holds(
        &d,
        &d.uploads(),
        &[("same.bin", body)],
        "after the reject race",
    );
}

// ---------------------------------------------------------------------------------------------
// 10. `ferryd pack | nc`.

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: nc (netcat-openbsd); run bash tests/real-peers.sh"
)]
fn pack_piped_into_netcat_stores_files_and_nc_prints_the_ok_lines() {
    need("nc", "netcat-openbsd");
    let d = DaemonBuilder::new().start();
    let src = TempDir::new();
    let mut rng = Rng::new(10);
    let one = ("one.bin", rng.bytes(300_000));
    let two_a = ("two-a.bin", rng.bytes(65_537));
    let two_b = ("two-b.txt", b"plain text\n".to_vec());
    let runs: [&[&(&str, Vec<u8>)]; 2] = [&[&one], &[&two_a, &two_b]];
    for files in runs {
        let paths: Vec<PathBuf> = files.iter().map(|(n, b)| write_file(&src, n, b)).collect();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("\"$0\" pack \"$@\" | nc -N 127.0.0.1 {}", d.port()))
            .arg(support::bin())
            .args(&paths);
        let label = format!(
            "ferryd pack {:?} | nc -N",
            files.iter().map(|f| f.0).collect::<Vec<_>>()
        );
        let out = run_for(cmd, &label, Duration::from_secs(20));
        let want: String = files.iter().map(|(n, b)| ok_line(n, b)).collect();
        assert!(
            out.status.success() && text_of(&out.stdout) == want,
            "{label}: want stdout {want:?}\n{}{}",
            describe(&out),
            log_tail(&d)
        );
    }
    assert_dir_holds(
        &d,
        &d.uploads(),
        &[(one.0, &one.1), (two_a.0, &two_a.1), (two_b.0, &two_b.1)],
        "after pack | nc",
    );
}

// ---------------------------------------------------------------------------------------------
// 11. SIGKILL in the middle of a transfer, then a restart.

#[test]
fn sigkill_mid_transfer_leaves_a_part_that_the_next_start_removes() {
    let files_dir = TempDir::new();
    let uploads = files_dir.path().join("uploads");
    let builder = DaemonBuilder::new().set("files", &dir_line(&uploads));
    let mut d = builder.clone().start();
    let body = Rng::new(11).bytes(32 * MIB);
    let mut s = d.connect();
    send_all(
        &d,
        &mut s,
        &header_for(b"killed.bin", &body, false),
        "header",
    );
    send_all(&d, &mut s, b"killed.bin", "name");
    // Write 1 MiB, wait until it is in the .part, write another MiB and wait for that too: the
    // daemon is then certainly in the middle of the body when it is killed. (It writes whole
    // 1 MiB pieces, each as it is complete.)
    let part_len = |at_least: usize| {
        let mut seen = None;
        let ok = wait_until(SHORT_TIMEOUT, || {
            seen = parts_in(&uploads).first().and_then(|p| {
                fs::metadata(uploads.join(p))
                    .ok()
                    .map(|m| (p.clone(), m.len()))
            });
            seen.as_ref().is_some_and(|(_, n)| *n >= at_least as u64)
        });
        (ok, seen)
    };
    send_all(&d, &mut s, &body[..MIB], "first MiB");
    let (ok, seen) = part_len(MIB);
    assert!(
        ok,
        "no .part of 1 MiB within 10 s: {seen:?}{}",
        log_tail(&d)
    );
    send_all(&d, &mut s, &body[MIB..2 * MIB], "another MiB");
    let (ok, seen) = part_len(2 * MIB);
    assert!(ok, "the .part did not grow: {seen:?}{}", log_tail(&d));
    d.signal("KILL");
    let status = d
        .wait_exit(SHORT_TIMEOUT)
        .expect("ferryd did not die of SIGKILL within 10 s");
    assert_eq!(status.signal(), Some(9), "{status}");
    drop(s);
    let parts = parts_in(&uploads);
    assert_eq!(
        (parts.len(), names_in(&uploads).len()),
        (1, 1),
        "after SIGKILL: want exactly one .part and nothing else, got {:?}",
        names_in(&uploads)
    );
    let d2 = builder.start();
    let log = d2.log();
    let line = log
        .lines()
        .find(|l| l.contains("removed stale partial upload"))
        .unwrap_or_else(|| panic!("no \"removed stale partial upload\" line{}", log_tail(&d2)));
    eprintln!("daemon: {line}");
    assert!(
        line.contains(&parts[0]),
        "{line:?} should name {}",
        parts[0]
    );
    assert_dir_holds(&d2, &uploads, &[], "after the restart");
}

// ---------------------------------------------------------------------------------------------
// 12. How `ferryd send` reports errors.

#[test]
fn send_to_a_closed_port_says_connection_refused() {
    let src = TempDir::new();
    let path = write_file(&src, "a.txt", b"a\n");
    // Held (bound, not listening) until the end of the test: connects there are refused.
    let closed = reserve_port();
    let to = format!("127.0.0.1:{}", closed.port());
    let out = run_ferryd(&["send", "--to", &to, path_str(&path)], &[]);
    let err = text_of(&out.stderr);
    eprintln!("{}", err.trim_end());
    assert!(
        out.status.code() == Some(1) && err.to_lowercase().contains("connection refused"),
        "{}",
        describe(&out)
    );
}

#[test]
fn send_reports_a_refused_file_and_still_stores_the_next_one() {
    let d = DaemonBuilder::new()
        .set("files", "max_file_size = 10")
        .start();
    let src = TempDir::new();
    let mut rng = Rng::new(12);
    let big = write_file(&src, "big.bin", &rng.bytes(100));
    let small_body = rng.bytes(5);
    let small = write_file(&src, "small.bin", &small_body);
    let to = d.addr().to_string();
    let out = run_ferryd(
        &["send", "--to", &to, path_str(&big), path_str(&small)],
        &[],
    );
    let stdout = text_of(&out.stdout);
    eprintln!("{}", describe(&out));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(lines.len(), 2, "{}", describe(&out));
    let big_prefix = format!("{}: ERR too-large ", big.display());
    assert!(
        lines[0].starts_with(&big_prefix),
        "first line: {:?}",
        lines[0]
    );
    let answer = lines[1]
        .strip_prefix(&format!("{}: ", small.display()))
        .unwrap_or_else(|| panic!("second line: {:?}", lines[1]));
    check_ok(&d, answer, "small.bin", &small_body, "second file");
    assert_dir_holds(
        &d,
        &d.uploads(),
        &[("small.bin", &small_body)],
        "after send",
    );
}

#[test]
fn send_reports_a_directory_and_sends_the_other_files() {
    let d = DaemonBuilder::new().start();
    let src = TempDir::new();
    let dir = src.path().join("adir");
    fs::create_dir(&dir).unwrap();
    let file = write_file(&src, "after.txt", b"after\n");
    let to = d.addr().to_string();
    let out = run_ferryd(&["send", "--to", &to, path_str(&dir), path_str(&file)], &[]);
    eprintln!("{}", describe(&out));
    let stdout = text_of(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(lines.len(), 2, "{}", describe(&out));
    let dir_prefix = format!("{}: ", dir.display());
    assert!(
        lines[0].starts_with(&dir_prefix)
            && (lines[0].contains("not a regular file") || lines[0].contains("directory")),
        "first line should say the directory is not a file: {:?}",
        lines[0]
    );
    assert_eq!(
        lines[0].matches(&dir.display().to_string()).count(),
        1,
        "the path is named once: {:?}",
        lines[0]
    );
    let answer = lines[1]
        .strip_prefix(&format!("{}: ", file.display()))
        .unwrap_or_else(|| panic!("second line: {:?}", lines[1]));
    check_ok(
        &d,
        answer,
        "after.txt",
        b"after\n",
        "file after the directory",
    );
    assert_dir_holds(&d, &d.uploads(), &[("after.txt", b"after\n")], "after send");
}

/// A loopback listener whose accept queue is full: Linux drops every further SYN, so a connect
/// to it times out. Unlike an "unroutable" address such as 10.255.255.1, this does not depend on
/// the machine's network (a sandbox may answer such connects through a proxy). Returns the
/// listener, the connections that fill its queue, and its address.
fn full_listener() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    // Backlog 0: the queue holds one connection that is never accepted.
    listener.listen(0).unwrap();
    let addr = listener
        .local_addr()
        .unwrap()
        .as_socket()
        .expect("an IPv4 address");
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return (listener, fillers, addr),
            Err(e) => panic!("filling the accept queue of {addr}: {e}"),
        }
    }
    panic!("the accept queue of {addr} did not fill after 16 connections");
}

#[test]
fn send_connect_timeout_is_reported_promptly() {
    let src = TempDir::new();
    let path = write_file(&src, "a.txt", b"a\n");
    let (_listener, _fillers, addr) = full_listener();
    let to = addr.to_string();
    let started = Instant::now();
    let out = run_ferryd(
        &["send", "--to", &to, "--timeout", "0.2", path_str(&path)],
        &[],
    );
    let took = started.elapsed();
    let err = text_of(&out.stderr);
    eprintln!(
        "send to {to} (accept queue full) with --timeout 0.2 took {took:?}: {}",
        err.trim_end()
    );
    assert!(
        out.status.code() == Some(1)
            && err.contains(&format!("timed out after 0.2 s connecting to {to}")),
        "want a connect timeout: {}",
        describe(&out)
    );
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} with --timeout 0.2"
    );
}

// ---------------------------------------------------------------------------------------------
// 13. File and directory modes.

#[test]
fn stored_files_get_files_file_mode_and_a_missing_dir_is_created_0750() {
    let body = Rng::new(13).bytes(4096);
    // Both modes are exact whatever the umask: the file's is files.file_mode, the directory
    // ferryd creates is 0750.
    let cases = [("umask 022", "0o600", 0o600), ("umask 077", "0o644", 0o644)];
    for (umask, mode_text, mode) in cases {
        let own = TempDir::new();
        let uploads = own.path().join("new").join("uploads");
        let d = DaemonBuilder::new()
            .shell_prefix(umask)
            .set("files", &dir_line(&uploads))
            .set("files", &format!("file_mode = {mode_text}"))
            .start();
        let dir_mode = fs::metadata(&uploads).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o750, "{umask}: upload dir mode {dir_mode:#o}");
        let mut s = d.connect();
        send_frame(&d, &mut s, "mode.bin", &body);
        check_ok(
            &d,
            &line_within(&mut s, SHORT_TIMEOUT),
            "mode.bin",
            &body,
            umask,
        );
        let got = fs::metadata(uploads.join("mode.bin"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(
            got, mode,
            "{umask}, file_mode = {mode_text}: stored mode {got:#o}"
        );
    }
}
