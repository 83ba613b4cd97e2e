//! Integration tests of resumable uploads: `ferryd send` of a large file through a proxy in the
//! test that cuts the connection half way, then again: the second run moves only the missing
//! part plus a small overhead (measured at the proxy) and the file is stored byte for byte; the
//! same after `kill -9` of the daemon and a restart; a changed source file is a fresh upload and
//! its old partial is dropped; a partial damaged on the server (default trailing frame) or a wrong
//! prefix planted there (header-checksum frame) is refused by the final
//! checksum (nothing stored, the partial dropped) and `send` then starts over; and with an
//! upload key, resuming needs the key like any upload.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::{
    AtLimit, Daemon, DaemonBuilder, Proxy, Rng, TempDir, bin, expect_err_then_eof, log_tail,
    read_line, resumable_head, run_ferryd, wait_until,
};

const MIB: usize = 1 << 20;
const SIZE: usize = 8 * MIB;
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Helpers.

fn send_via(addr: SocketAddr, file: &Path, extra: &[&str]) -> (bool, String) {
    let to = addr.to_string();
    let mut args = vec!["send", "--to", &to, "--timeout", "3"];
    args.extend_from_slice(extra);
    args.push(file.to_str().unwrap());
    let out = run_ferryd(&args, &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The partial bodies in `dir`.
fn partials(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".ferryd-resume-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The offset in a `resumed at N bytes` line.
fn resumed_at(text: &str) -> Option<u64> {
    let rest = text.split("resumed at ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

fn source(dir: &Path, name: &str, seed: u64) -> (PathBuf, Vec<u8>) {
    let body = Rng::new(seed).bytes(SIZE);
    let path = dir.join(name);
    fs::write(&path, &body).unwrap();
    (path, body)
}

/// Cuts a `send` of `file` through a proxy after `cut` bytes and waits until the daemon has
/// kept the partial body; returns its length.
fn cut_upload(d: &Daemon, file: &Path, cut: u64, extra: &[&str]) -> u64 {
    let mut proxy = Proxy::start(d.addr(), Some(cut), AtLimit::Cut);
    // The proxy takes one connection: `send` must not retry by itself here.
    let mut args = vec!["--retry", "0"];
    args.extend_from_slice(extra);
    let (ok, text) = send_via(proxy.addr, file, &args);
    proxy.finish();
    assert!(!ok, "the cut upload should fail: {text}");
    d.wait_log("kept for a resume", WAIT);
    let kept = partials(&d.uploads());
    assert_eq!(
        kept.len(),
        1,
        "one partial expected: {kept:?}{}",
        log_tail(d)
    );
    fs::metadata(&kept[0]).unwrap().len()
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// `send`'s default frame (trailing checksum, a resume id in the header: the file is read once)
/// and the header-checksum frame (hashed first) both resume, moving only the missing part.
#[test]
fn a_cut_upload_resumes_moving_only_the_missing_part() {
    for (form, extra, trailer) in [
        ("trailing", &[][..], 32),
        ("header", &["--checksum", "header"][..], 0),
    ] {
        let d = DaemonBuilder::new().start();
        let src = TempDir::new();
        let (file, body) = source(src.path(), "firmware.bin", 1);
        let kept = cut_upload(&d, &file, (SIZE / 2) as u64, extra);
        assert!(
            kept > (SIZE / 4) as u64 && kept <= (SIZE / 2) as u64,
            "{form}: kept {kept} of a cut at {}",
            SIZE / 2
        );
        // Again, straight through a counting proxy.
        let mut proxy = Proxy::start(d.addr(), None, AtLimit::Cut);
        let (ok, text) = send_via(proxy.addr, &file, extra);
        proxy.finish();
        assert!(ok, "{form}: {text}{}", log_tail(&d));
        assert_eq!(resumed_at(&text), Some(kept), "{form}: {text}");
        let missing = SIZE as u64 - kept;
        let (up, down) = (proxy.up(), proxy.down());
        let head = 48 + "firmware.bin".len() as u64;
        println!(
            "resume ({form} checksum): {kept} B kept, {missing} B missing; second run moved {up} B up ({} B over the missing part: the head and {trailer} B of trailing checksum) and {down} B down; 1 extra round trip (RESUME line)",
            up - missing
        );
        assert_eq!(
            up,
            missing + head + trailer,
            "{form}: bytes up on the resumed run"
        );
        assert!(down < 200, "{form}: {down} B of answers");
        assert_eq!(fs::read(d.uploads().join("firmware.bin")).unwrap(), body);
        assert!(
            partials(&d.uploads()).is_empty(),
            "{form}: the partial became the file"
        );
    }
}

/// The default frame finds its partial by a resume id, not by the checksum: a partial whose
/// bytes were damaged on the server after the cut is continued, then refused by the trailing
/// checksum, which covers the whole file; `send` says so and sends the file again from 0.
#[test]
fn a_damaged_partial_of_a_trailing_frame_is_refused_then_sent_again() {
    let d = DaemonBuilder::new().start();
    let src = TempDir::new();
    let (file, body) = source(src.path(), "image.bin", 7);
    let kept = cut_upload(&d, &file, (SIZE / 2) as u64, &[]);
    let partial = partials(&d.uploads()).remove(0);
    let mut damaged = fs::read(&partial).unwrap();
    assert_eq!(damaged.len() as u64, kept);
    damaged[(kept / 2) as usize] ^= 0x40;
    fs::write(&partial, &damaged).unwrap();
    let (ok, text) = send_via(d.addr(), &file, &[]);
    assert!(ok, "{text}{}", log_tail(&d));
    assert!(text.contains(&format!("resumed at {kept} bytes")), "{text}");
    assert!(text.contains("failed its checksum on the server"), "{text}");
    d.wait_log(
        &format!("the partial body it continued ({kept} B) is dropped"),
        WAIT,
    );
    assert_eq!(fs::read(d.uploads().join("image.bin")).unwrap(), body);
    assert!(partials(&d.uploads()).is_empty());
}

#[test]
fn an_upload_resumes_after_kill_9_and_a_restart() {
    let uploads = TempDir::new();
    let dir_line = format!("dir = {:?}", uploads.path().display().to_string());
    let src = TempDir::new();
    let (file, body) = source(src.path(), "bundle.tar", 2);
    let mut d = DaemonBuilder::new().set("files", &dir_line).start();
    // The proxy stalls half way; once the daemon has written that much, it is killed.
    let half = (SIZE / 2) as u64;
    let proxy = Proxy::start(d.addr(), Some(half), AtLimit::Stall);
    let mut client = Command::new(bin())
        .args(["send", "--to", &proxy.addr.to_string(), "--timeout", "2"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The daemon writes whole 1 MiB pieces while the upload runs: up to one piece is still in
    // its memory when it is killed.
    assert!(
        wait_until(WAIT, || partials(uploads.path())
            .first()
            .and_then(|p| fs::metadata(p).ok())
            .is_some_and(|m| m.len() + MIB as u64 >= half)),
        "the daemon did not write half the file{}",
        log_tail(&d)
    );
    d.signal("KILL");
    assert!(
        d.wait_exit(WAIT).is_some(),
        "kill -9 did not end the daemon"
    );
    drop(proxy);
    let _ = client.kill();
    let _ = client.wait();
    drop(d);
    let kept = fs::metadata(&partials(uploads.path())[0]).unwrap().len();
    // A new daemon on the same directory keeps the partial and continues it.
    let d = DaemonBuilder::new().set("files", &dir_line).start();
    d.wait_log("kept 1 partial upload(s) for resuming", WAIT);
    let (ok, text) = send_via(d.addr(), &file, &[]);
    assert!(ok, "{text}{}", log_tail(&d));
    assert_eq!(resumed_at(&text), Some(kept), "{text}");
    assert_eq!(fs::read(uploads.path().join("bundle.tar")).unwrap(), body);
    assert!(partials(uploads.path()).is_empty());
}

#[test]
fn a_changed_source_file_is_a_fresh_upload_and_drops_the_old_partial() {
    let d = DaemonBuilder::new().start();
    let src = TempDir::new();
    let (file, _) = source(src.path(), "log.bin", 3);
    cut_upload(&d, &file, (SIZE / 2) as u64, &[]);
    // The file changes before it is sent again: another resume id (its modification time
    // changed), so nothing to resume.
    let (file, body) = source(src.path(), "log.bin", 4);
    let (ok, text) = send_via(d.addr(), &file, &[]);
    assert!(ok, "{text}{}", log_tail(&d));
    assert_eq!(resumed_at(&text), None, "{text}");
    assert_eq!(fs::read(d.uploads().join("log.bin")).unwrap(), body);
    assert!(
        partials(&d.uploads()).is_empty(),
        "the old partial was dropped"
    );
    d.wait_log("superseded by another version of the file", WAIT);
}

/// The partial body's file name for `body` sent as `name` (see `daemon::resume`).
fn partial_name(name: &str, body: &[u8]) -> String {
    let tag: String = blake3::hash(name.as_bytes())
        .to_hex()
        .chars()
        .take(16)
        .collect();
    format!(
        ".ferryd-resume-{}-{}-{tag}.partial",
        blake3::hash(body).to_hex(),
        body.len()
    )
}

#[test]
fn a_wrong_prefix_planted_on_the_server_is_refused_and_dropped() {
    let d = DaemonBuilder::new().start();
    let body = Rng::new(5).bytes(2 * MIB);
    let planted = d.uploads().join(partial_name("x.bin", &body));
    // Half of it, but not its bytes.
    fs::write(&planted, vec![0xAB; MIB]).unwrap();
    let mut s = d.connect();
    s.write_all(&resumable_head("x.bin", &body)).unwrap();
    assert_eq!(read_line(&mut s), format!("RESUME {MIB}\n"));
    s.write_all(&body[MIB..]).unwrap();
    let line = read_line(&mut s);
    assert!(line.starts_with("ERR checksum "), "{line}{}", log_tail(&d));
    assert!(!d.uploads().join("x.bin").exists(), "nothing stored");
    assert!(!planted.exists(), "the damaged partial is dropped");
    d.wait_log("the partial body it continued (1048576 B) is dropped", WAIT);
    // The same connection goes on: the file again, now from 0.
    s.write_all(&resumable_head("x.bin", &body)).unwrap();
    assert_eq!(read_line(&mut s), "RESUME 0\n");
    s.write_all(&body).unwrap();
    let line = read_line(&mut s);
    assert!(line.starts_with("OK x.bin 2097152 "), "{line}");
    // `ferryd send --checksum header` meets a planted prefix: refused, then sent again from the
    // start by itself.
    let src = TempDir::new();
    let file = src.path().join("y.bin");
    fs::write(&file, &body).unwrap();
    fs::write(
        d.uploads().join(partial_name("y.bin", &body)),
        vec![0xCD; MIB],
    )
    .unwrap();
    let (ok, text) = send_via(d.addr(), &file, &["--checksum", "header"]);
    assert!(ok, "{text}{}", log_tail(&d));
    assert!(text.contains("failed its checksum on the server"), "{text}");
    assert_eq!(fs::read(d.uploads().join("y.bin")).unwrap(), body);
    assert!(partials(&d.uploads()).is_empty());
}

#[test]
fn resuming_needs_the_upload_key_like_any_upload() {
    let keys = TempDir::new();
    let key = keys.path().join("upload.key");
    fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    let mut perms = fs::metadata(&key).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    fs::set_permissions(&key, perms).unwrap();
    let d = DaemonBuilder::new()
        .set(
            "files",
            &format!("token_file = {:?}", key.display().to_string()),
        )
        .start();
    let src = TempDir::new();
    let (file, body) = source(src.path(), "signed.bin", 6);
    let key_arg = ["--key-file", key.to_str().unwrap()];
    let kept = cut_upload(&d, &file, (SIZE / 2) as u64, &key_arg);
    // Without the key a resumable frame is refused before anything is said about the partial.
    let mut s = d.connect();
    let nonce = read_line(&mut s);
    assert!(nonce.starts_with("NONCE "), "{nonce}");
    s.write_all(&resumable_head("signed.bin", &body)).unwrap();
    let line = expect_err_then_eof(&d, &mut s, "unauthorized", "resume without the key");
    assert!(!line.contains("RESUME"), "{line}");
    // With it, the upload continues.
    let (ok, text) = send_via(d.addr(), &file, &key_arg);
    assert!(ok, "{text}{}", log_tail(&d));
    assert_eq!(resumed_at(&text), Some(kept), "{text}");
    assert_eq!(fs::read(d.uploads().join("signed.bin")).unwrap(), body);
}

#[test]
fn expired_partials_go_and_unexpired_ones_stay() {
    let uploads = TempDir::new();
    let dir_line = format!("dir = {:?}", uploads.path().display().to_string());
    let body = Rng::new(7).bytes(2 * MIB);
    let old = uploads.path().join(partial_name("old.bin", &body));
    let fresh = uploads.path().join(partial_name("fresh.bin", &body[..MIB]));
    fs::write(&old, &body[..1000]).unwrap();
    fs::write(&fresh, &body[..1000]).unwrap();
    let aged = Command::new("touch")
        .args(["-d", "@1000000000"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(aged.success());
    // At start-up: the expired one goes, the other stays.
    let d = DaemonBuilder::new()
        .set("files", &dir_line)
        .set("files", "resume_keep_secs = 2")
        .start();
    d.wait_log("kept 1 partial upload(s) for resuming", WAIT);
    assert!(!old.exists() && fresh.exists());
    assert!(
        d.log().contains("removed expired partial upload"),
        "{}",
        d.log()
    );
    // While running: once it has not grown for resume_keep_secs, the next resumable upload
    // removes it.
    let fresh_name = fresh.file_name().unwrap().to_string_lossy().into_owned();
    assert!(wait_until(WAIT, || fs::metadata(&fresh)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t
            .elapsed()
            .is_ok_and(|age| age > Duration::from_secs(3)))));
    let mut s = d.connect();
    s.write_all(&resumable_head("other.bin", &body)).unwrap();
    assert_eq!(read_line(&mut s), "RESUME 0\n");
    s.write_all(&body).unwrap();
    assert!(read_line(&mut s).starts_with("OK other.bin "));
    assert!(!fresh.exists(), "the expired partial is gone");
    d.wait_log(
        &format!("removed partial upload {fresh_name} (expired)"),
        WAIT,
    );
}

/// `ferryd send` against a server from before trailing resumable frames: it refuses flag bits 2
/// and 3 together with `ERR bad-header`, and `send` sends the file again, one-pass and not
/// resumable, on a new connection. The old server is played by the test: it reads each head,
/// refuses the combination as that server did, and otherwise takes the body and its trailing
/// checksum and answers `OK` with the hex of what it received.
#[test]
fn send_falls_back_to_a_plain_trailing_frame_for_an_older_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let mut flags_seen = Vec::new();
        let mut stored = None;
        listener.set_nonblocking(true).unwrap();
        for _ in 0..2 {
            // A client that does not come back must not hang the test.
            let deadline = Instant::now() + WAIT;
            let mut s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return (flags_seen, stored),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut head = [0u8; 48];
            s.read_exact(&mut head).unwrap();
            flags_seen.push(head[5]);
            let name_len = u16::from_be_bytes([head[6], head[7]]) as usize;
            let size = u64::from_be_bytes(head[8..16].try_into().unwrap()) as usize;
            let mut name = vec![0u8; name_len];
            s.read_exact(&mut name).unwrap();
            if head[5] & 0x0C == 0x0C {
                s.write_all(b"ERR bad-header flag bit 3 (resumable) needs the checksum in the header, not after the body (bit 2)\n").unwrap();
                continue;
            }
            let mut body = vec![0u8; size];
            s.read_exact(&mut body).unwrap();
            let mut sum = [0u8; 32];
            s.read_exact(&mut sum).unwrap();
            assert_eq!(
                &sum,
                blake3::hash(&body).as_bytes(),
                "the trailing checksum"
            );
            let line = format!(
                "OK {} {size} {}\n",
                String::from_utf8_lossy(&name),
                blake3::hash(&body).to_hex()
            );
            s.write_all(line.as_bytes()).unwrap();
            stored = Some(body);
        }
        (flags_seen, stored)
    });
    let src = TempDir::new();
    let (file, body) = source(src.path(), "old.bin", 9);
    let (ok, text) = send_via(addr, &file, &[]);
    let (flags_seen, stored) = server.join().unwrap();
    assert!(ok, "{text}");
    assert!(
        text.contains("an older ferryd); sending it without resuming"),
        "{text}"
    );
    assert_eq!(
        flags_seen,
        [0x0C, 0x04],
        "resumable trailing, then plain trailing"
    );
    assert!(stored == Some(body), "the old server got the file whole");
}
