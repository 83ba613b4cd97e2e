//! Issue 20, the third hardening round, against the real binary: peer names with control, bidi
//! and zero-width characters in every log line and refusal that can carry one (point 1),
//! `NAME**SIZE` heads split anywhere (point 3), heads and lines that trickle (point 4). Hooks are
//! in `hardening_hooks.rs`, many addresses and IPv6 prefixes in `hardening_peers.rs`.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::symlink;
use std::thread;
use std::time::{Duration, Instant};

use support::{
    Daemon, DaemonBuilder, expect_err_then_eof, frame, log_tail, ok_line, read_line, read_until_eof,
};

const WAIT: Duration = Duration::from_secs(10);
/// The characters a name must never bring raw into the log: a right-to-left override, a
/// zero-width space, an ESC (a terminal escape's start), a BEL, a byte-order mark.
const HOSTILE: [char; 5] = ['\u{202e}', '\u{200b}', '\u{1b}', '\u{7}', '\u{feff}'];

/// The log holds none of `HOSTILE` raw, and shows each line `want` names (escaped).
fn assert_log_escaped(d: &Daemon, wants: &[&str]) {
    for want in wants {
        d.wait_log(want, WAIT);
    }
    let log = d.log();
    for c in HOSTILE {
        let raw = log.matches(c).count();
        assert_eq!(raw, 0, "{} raw U+{:04X} in the log:\n{log}", raw, c as u32);
    }
}

/// Sends `bytes` on a new connection, half-closes, and returns all it got back.
fn exchange(d: &Daemon, bytes: &[u8]) -> String {
    let mut s = d.connect();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(Shutdown::Write);
    let (got, _) = read_until_eof(&mut s, WAIT);
    String::from_utf8_lossy(&got).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Point 1: every refusal reason and log line that can carry a peer's name, with hostile names.
// From the source: upload.rs (bad-name, the store's refusals: exists, a directory, not a
// directory, a symbolic link, no free name; receiving, stored, lost), conn/compat.rs
// (legacy-header, NAME**SIZE upload, bad-header), conn.rs (req/resp, offline reason), hooks.rs
// (hook label, program, output). Each is driven here and the whole log is checked.

#[test]
fn names_with_control_bidi_and_zero_width_characters_reach_the_log_escaped() {
    let d = DaemonBuilder::new()
        .set("log", "level = \"debug\"")
        .set("files", "on_conflict = \"reject\"")
        .set("files", "allow_subdirs = true")
        .set("files", "on_stored = [\"/bin/echo\", \"{name}\"]")
        .set("compat", "starstar_uploads = true")
        .start();
    let body = b"payload";
    // Stored (stored, receiving, hook label and output lines), then exists, twice over.
    let bidi = "inv\u{202e}gpj\u{200b}.exe";
    assert_eq!(exchange(&d, &frame(bidi, body)), ok_line(bidi, body));
    let second = exchange(&d, &frame(bidi, body));
    assert!(second.starts_with("ERR exists "), "{second}");
    assert!(
        !second.contains('\u{202e}'),
        "the answer is escaped too: {second:?}"
    );
    // A file where a directory is wanted, and a planted symbolic link.
    let dir = "d\u{202e}ir\u{feff}";
    assert!(exchange(&d, &frame(dir, body)).starts_with("OK "));
    let under = format!("{dir}/x");
    assert!(exchange(&d, &frame(&under, body)).starts_with("ERR exists "));
    symlink("/tmp", d.uploads().join("l\u{202e}nk")).unwrap();
    let via_link = exchange(&d, &frame("l\u{202e}nk/x", body));
    assert!(via_link.starts_with("ERR bad-name "), "{via_link}");
    // Control characters: the name is refused, and shown escaped.
    let ctl = "t\u{1b}[31mred\u{7}";
    assert!(exchange(&d, &frame(ctl, body)).starts_with("ERR bad-name "));
    // A body cut short: the `lost` line.
    let cut = frame("cu\u{202e}t", b"0123456789");
    assert!(exchange(&d, &cut[..cut.len() - 3]).starts_with("ERR short-body "));
    // NAME**SIZE: stored, and refused when the stream does not fit its head.
    let star = "s\u{202e}\u{200b}.bin**3abc";
    assert!(exchange(&d, star.as_bytes()).starts_with("OK "));
    let wrong = exchange(&d, "w\u{202e}.bin**52".as_bytes());
    assert!(wrong.starts_with("ERR bad-header "), "{wrong}");
    // Text that carries the same characters: the req/resp debug lines.
    let echoed = exchange(&d, "hi \u{202e}\u{1b}[2J\n".as_bytes());
    assert_eq!(echoed, "hi \u{202e}\u{1b}[2J\n", "echo is byte for byte");
    assert_log_escaped(
        &d,
        &[
            "stored \"inv\\u{202e}gpj\\u{200b}.exe\" as \"inv\\u{202e}gpj\\u{200b}.exe\"",
            "receiving \"inv\\u{202e}gpj\\u{200b}.exe\"",
            "hook for \"inv\\u{202e}gpj\\u{200b}.exe\" output: inv\\u{202e}gpj\\u{200b}.exe",
            "refused: exists: inv\\u{202e}gpj\\u{200b}.exe already exists",
            "reason: refused: ERR exists inv\\u{202e}gpj\\u{200b}.exe already exists)",
            "d\\u{202e}ir\\u{feff} exists and is not a directory",
            "l\\u{202e}nk is a symbolic link in the upload directory",
            "file \"t\\x1b[31mred\\x07\" refused: bad-name",
            "file \"cu\\u{202e}t\" lost after 7 of 10 B",
            "NAME**SIZE upload \"s\\u{202e}\\u{200b}.bin\" (3 B)",
            "NAME**SIZE upload \"w\\u{202e}.bin\": the 2 bytes after **",
            "req hi \\u{202e}\\x1b[2J\\n",
        ],
    );
}

/// The store's other refusals with a name: no free name among the renamed variants (rename),
/// a directory in the way, and the legacy-header line (compat off).
#[test]
fn the_other_name_refusals_reach_the_log_escaped() {
    let d = DaemonBuilder::new()
        .set("files", "on_conflict = \"rename\"")
        .start();
    let name = "n\u{202e}.txt";
    let up = d.uploads();
    fs::write(up.join(name), b"x").unwrap();
    for n in 1..=9999 {
        fs::write(up.join(format!("n\u{202e} ({n}).txt")), b"").unwrap();
    }
    let full = exchange(&d, &frame(name, b"body"));
    assert!(full.starts_with("ERR exists "), "{full}");
    fs::create_dir(up.join("d\u{200b}")).unwrap();
    let _ = exchange(&d, &frame("d\u{200b}", b"body"));
    let legacy = exchange(&d, "le\u{202e}gacy.bin**5".as_bytes());
    assert!(legacy.starts_with("ERR legacy-header "), "{legacy}");
    assert_log_escaped(
        &d,
        &[
            "n\\u{202e}.txt and its first 9999 renamed variants all exist",
            "NAME**SIZE upload (\"le\\u{202e}gacy.bin\", 5 B)",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Point 3: NAME**SIZE heads split anywhere: parsed right or refused, never echoed or relayed.

fn compat_daemon(mode: &str) -> Daemon {
    DaemonBuilder::new()
        .set("server", &format!("mode = \"{mode}\""))
        .set("compat", "starstar_uploads = true")
        .start()
}

/// Writes `pieces` with a pause between them, half-closes, and returns what came back.
fn send_split(d: &Daemon, pieces: &[&[u8]], pause: Duration) -> String {
    let mut s = d.connect();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            thread::sleep(pause);
        }
        s.write_all(p).unwrap();
    }
    let _ = s.shutdown(Shutdown::Write);
    let (got, err) = read_until_eof(&mut s, WAIT);
    assert!(err.is_none(), "{err:?}{}", log_tail(d));
    String::from_utf8_lossy(&got).into_owned()
}

fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| b"abcdefghij"[i % 10]).collect()
}

#[test]
fn a_head_split_after_part_of_its_size_is_stored_right() {
    let d = compat_daemon("echo");
    let b = body(12_345);
    let rest = [b"345".as_slice(), &b].concat();
    let got = send_split(&d, &[b"s3.bin**12", &rest], Duration::from_millis(30));
    assert_eq!(got, ok_line("s3.bin", &b), "{}", log_tail(&d));
    assert_eq!(fs::read(d.uploads().join("s3.bin")).unwrap(), b);
}

#[test]
fn a_head_split_inside_its_name_is_stored_not_echoed() {
    let d = compat_daemon("echo");
    let b = body(12_345);
    let rest = [b"bin**12345".as_slice(), &b].concat();
    let got = send_split(&d, &[b"s4.", &rest], Duration::from_millis(30));
    assert_eq!(got, ok_line("s4.bin", &b), "{}", log_tail(&d));
    assert_eq!(fs::read(d.uploads().join("s4.bin")).unwrap(), b);
}

/// Chat mode: a split upload is stored, and no member sees a byte of it.
#[test]
fn a_split_upload_is_never_relayed_to_the_chat() {
    let d = compat_daemon("chat");
    let mut member = d.connect();
    let welcome = read_line(&mut member);
    assert!(welcome.starts_with("* welcome"), "{welcome}");
    let b = body(5_000);
    let rest = [b"bin**5000".as_slice(), &b].concat();
    let got = send_split(&d, &[b"c5.", &rest], Duration::from_millis(30));
    // The uploader is a member too: its welcome, then the answer.
    let answer = got.lines().last().map(|l| format!("{l}\n"));
    assert_eq!(answer, Some(ok_line("c5.bin", &b)), "{got}{}", log_tail(&d));
    assert!(got.starts_with("* welcome"), "{got}");
    // What the member saw: notices only, never the body.
    member
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = member.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let seen = String::from_utf8_lossy(&seen);
    assert!(!seen.contains("abcdefghij"), "body relayed: {seen}");
    assert!(seen.contains("c5.bin"), "the upload notice: {seen}");
}

/// A small head and body cut at every byte, with a pause at the cut: each one is stored right
/// (or refused with ERR), never echoed; and a body with a digit first, read in one piece.
#[test]
fn every_split_point_of_a_head_and_body() {
    let d = compat_daemon("echo");
    let b = b"2024 figures".to_vec();
    let stream = [b"f.txt**12".as_slice(), &b].concat();
    for cut in 1..stream.len() {
        let got = send_split(
            &d,
            &[&stream[..cut], &stream[cut..]],
            Duration::from_millis(30),
        );
        let right = ok_line("f.txt", &b);
        assert!(
            got == right || (got.starts_with("ERR ") && got.matches('\n').count() == 1),
            "cut at {cut}: {got:?}{}",
            log_tail(&d)
        );
        assert!(!got.contains("figures"), "cut at {cut}: echoed {got:?}");
        if got == right {
            assert_eq!(fs::read(d.uploads().join("f.txt")).unwrap(), b, "cut {cut}");
            fs::remove_file(d.uploads().join("f.txt")).unwrap();
        }
    }
    // Head and a digit-first body in one write: resolved by the end of the stream.
    let got = send_split(&d, &[&stream], Duration::ZERO);
    assert_eq!(got, ok_line("f.txt", &b), "{}", log_tail(&d));
}

/// More bytes than the head announced, or none after a size it cannot be: `ERR bad-header`,
/// nothing stored, nothing echoed.
#[test]
fn a_stream_that_does_not_fit_its_head_is_refused() {
    let d = compat_daemon("echo");
    let mut s = d.connect();
    s.write_all(b"x.bin**5hello").unwrap();
    thread::sleep(Duration::from_millis(100));
    s.write_all(b" and more").unwrap();
    let _ = s.shutdown(Shutdown::Write);
    let got = expect_err_then_eof(&d, &mut s, "bad-header", "bytes after the body");
    assert!(!got.contains("hello"), "{got}");
    let got = send_split(&d, &[b"y.bin**52"], Duration::ZERO);
    assert!(got.starts_with("ERR bad-header "), "{got}");
    assert!(support::names_in(&d.uploads()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Point 4: a head or line that trickles is cut at line_timeout_secs, compat on and off.

/// Sends `pattern` every 150 ms (each write a read of its own on the server: `a*` keeps a head
/// "partial" for ever) until the daemon answers; returns the answer and when it came.
fn trickle(d: &Daemon, pattern: &[u8]) -> (String, Duration) {
    let mut s: TcpStream = d.connect();
    s.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never cut{}",
            log_tail(d)
        );
        if s.write_all(pattern).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.ends_with(b"\n") && got.starts_with(b"ERR") {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_trickled_head_or_line_is_cut_at_line_timeout() {
    for compat in [true, false] {
        let d = DaemonBuilder::new()
            .set("server", "line_timeout_secs = 2")
            .set("compat", &format!("starstar_uploads = {compat}"))
            .start();
        for pattern in [b"a*".as_slice(), b"ab", b"a**", b"name*"] {
            let (got, took) = trickle(&d, pattern);
            let what = format!("{:?} compat {compat}", String::from_utf8_lossy(pattern));
            assert!(
                took < Duration::from_millis(3500),
                "{what}: held {took:?}{}",
                log_tail(&d)
            );
            assert!(
                got.contains("ERR idle line not complete within 2 s"),
                "{what}: {got:?}{}",
                log_tail(&d)
            );
        }
    }
}
