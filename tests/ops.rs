//! Integration tests of what an admin runs into: `check-config` runs the daemon's own start-up
//! checks and both exit 78 on the same problems; no panic on a closed stdout; command-line
//! mistakes exit 64; the upload directory removed or replaced while running; a reload that keeps
//! the space reserved by uploads in flight; stale temp entries that cannot be removed; `rename`
//! running out of names before the body; ports no other process can share; the minimum Rust
//! version on README's first screen. (The units and the package under a real systemd are in
//! `systemd_real.rs`.)

mod support;

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ferryd::proto::{HEADER_LEN, Header};
use socket2::{Domain, Protocol, Socket, Type};

use support::{
    Daemon, DaemonBuilder, TempDir, bin, log_tail, read_line, read_until_eof, run_ferryd, run_for,
    wait_until,
};

const SHORT: Duration = Duration::from_secs(10);

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A header announcing `size` bytes with the given checksum.
fn header(name: &str, size: u64, checksum: [u8; 32]) -> [u8; HEADER_LEN] {
    Header {
        authenticated: false,
        name_len: u16::try_from(name.len()).unwrap(),
        size,
        checksum,
        ..Header::default()
    }
    .encode()
}

/// Uploads `body` as `name` on a new connection; returns the answer line.
fn upload(d: &Daemon, name: &str, body: &[u8]) -> String {
    let mut s = d.connect();
    let mut frame = header(name, body.len() as u64, *blake3::hash(body).as_bytes()).to_vec();
    frame.extend_from_slice(name.as_bytes());
    frame.extend_from_slice(body);
    s.write_all(&frame).unwrap();
    read_line(&mut s)
}

/// Writes a config for a daemon on 127.0.0.1 with `files` lines (and `dir` in `tmp` unless
/// given) and returns its path.
fn config(tmp: &TempDir, extra: &str) -> PathBuf {
    let path = tmp.path().join("config.toml");
    let dir_line = if extra.contains("dir =") {
        String::new()
    } else {
        format!(
            "dir = {:?}\n",
            tmp.path().join("uploads").display().to_string()
        )
    };
    // Never bound: the daemon refuses these configs (and check-config binds nothing).
    let port = support::reserve_port().port();
    fs::write(
        &path,
        format!("[server]\nbind = \"127.0.0.1\"\nport = {port}\n\n[files]\n{dir_line}{extra}\n"),
    )
    .unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// check-config and the daemon refuse the same things, with 78.

/// `check-config` and the daemon on the same file: both exit 78 and name `needle`.
fn both_refuse(tmp: &TempDir, extra: &str, needle: &str) {
    let path = config(tmp, extra);
    let p = path.to_str().unwrap();
    let check = run_ferryd(&["check-config", "--config", p], &[]);
    let daemon = run_ferryd(&["--config", p], &[]);
    for (what, out) in [("check-config", &check), ("the daemon", &daemon)] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{what} with {extra:?}: {}",
            text(out)
        );
        assert!(
            err.contains(needle),
            "{what} names {needle:?}: {}",
            text(out)
        );
        assert!(!err.contains("File exists"), "{what}: {}", text(out));
        assert!(!err.contains("panicked"), "{what}: {}", text(out));
    }
}

#[test]
fn check_config_and_the_daemon_refuse_a_bad_key_file_with_78() {
    let tmp = TempDir::new();
    let missing = tmp.path().join("missing.key");
    both_refuse(
        &tmp,
        &format!("token_file = {:?}", missing.display().to_string()),
        "files.token_file",
    );
    let short = tmp.path().join("short.key");
    fs::write(&short, "0123456789").unwrap();
    fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
    both_refuse(
        &tmp,
        &format!("token_file = {:?}", short.display().to_string()),
        "files.token_file",
    );
}

#[test]
fn check_config_and_the_daemon_refuse_an_unusable_upload_dir_with_78() {
    let tmp = TempDir::new();
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let shown = file.display().to_string();
    both_refuse(
        &tmp,
        &format!("dir = {shown:?}"),
        "exists and is not a directory",
    );
    let below = file.join("uploads");
    both_refuse(
        &tmp,
        &format!("dir = {:?}", below.display().to_string()),
        &format!("{shown} is not a directory"),
    );
}

#[test]
fn check_config_and_the_daemon_refuse_an_address_of_no_interface_with_78() {
    let tmp = TempDir::new();
    let path = tmp.path().join("config.toml");
    // 192.0.2.1 (TEST-NET-1) is no address of this machine; the bind fails, nothing is sent.
    fs::write(
        &path,
        "[server]\nbind = \"192.0.2.1\"\nport = 7878\n\n[files]\ndir = \"up\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    for args in [&["check-config", "--config", p][..], &["--config", p][..]] {
        let out = run_ferryd(args, &[]);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("server.bind = 192.0.2.1"),
            "{args:?}: {}",
            text(&out)
        );
    }
}

#[test]
fn check_config_accepts_what_the_daemon_accepts_and_quiet_prints_nothing() {
    let tmp = TempDir::new();
    let key = tmp.path().join("ok.key");
    fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    // files.dir does not exist yet: it can be created, so it passes (check-config creates
    // nothing).
    let path = config(
        &tmp,
        &format!("token_file = {:?}", key.display().to_string()),
    );
    let p = path.to_str().unwrap();
    let out = run_ferryd(&["check-config", "--config", p], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("effective configuration"));
    let out = run_ferryd(&["check-config", "--quiet", "--config", p], &[]);
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{}",
        text(&out)
    );
    assert!(
        !tmp.path().join("uploads").exists(),
        "check-config created the directory"
    );
}

/// The lines of `out`'s stderr.
fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn check_config_and_the_daemon_report_every_error_in_the_file_with_78() {
    let tmp = TempDir::new();
    let path = tmp.path().join("three.toml");
    fs::write(
        &path,
        "[server]\nport = 70000\nprot = 1\n\n[access]\nrequire_token = true\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let want = [
        format!(
            "ferryd: config error: {p}:2: server.port = 70000: out of range; allowed: an integer in 1–65535"
        ),
        format!(
            "ferryd: config error: {p}:3: server.prot = 1: unknown field `prot`, expected one of `bind`, `port`, "
        ),
        format!(
            "ferryd: config error: {p}:6: access.require_token = true: needs files.token_file, the key to check; allowed: "
        ),
        format!("ferryd: 3 errors in {p}"),
    ];
    for args in [&["check-config", "--config", p][..], &["--config", p][..]] {
        let out = run_ferryd(args, &[]);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {}", text(&out));
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out));
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), want.len(), "{args:?}: {}", text(&out));
        for (line, want) in lines.iter().zip(&want) {
            assert!(
                line.starts_with(want.as_str()),
                "{args:?}: {line:?} should start with {want:?}\n{}",
                text(&out)
            );
        }
    }
}

#[test]
fn check_config_and_the_daemon_report_every_unusable_thing_the_file_names_with_78() {
    let tmp = TempDir::new();
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let missing = tmp.path().join("missing.key");
    let path = config(
        &tmp,
        &format!(
            "dir = {:?}\ntoken_file = {:?}",
            file.display().to_string(),
            missing.display().to_string()
        ),
    );
    let p = path.to_str().unwrap();
    let needles = ["files.token_file: ", "exists and is not a directory"];
    for args in [&["check-config", "--config", p][..], &["--config", p][..]] {
        let out = run_ferryd(args, &[]);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        for needle in needles {
            assert!(
                err.contains(needle),
                "{args:?} names {needle:?}: {}",
                text(&out)
            );
        }
    }
    // check-config: one line each, then the count.
    let out = run_ferryd(&["check-config", "--config", p], &[]);
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 3, "{}", text(&out));
    for (line, needle) in lines.iter().zip(needles) {
        assert!(
            line.starts_with(&format!("ferryd: config error: {p} (from --config): "))
                && line.contains(needle),
            "{line:?} should name {needle:?}\n{}",
            text(&out)
        );
    }
    assert_eq!(lines[2], format!("ferryd: 2 errors in {p} (from --config)"));
}

// ---------------------------------------------------------------------------------------------
// Closed stdout, command-line mistakes.

/// Runs ferryd with stdout connected to a socket whose other end is already closed, so every
/// write fails with EPIPE at once.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (ours, theirs) = UnixStream::pair().unwrap();
    drop(ours);
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("FERRYD_CONFIG");
    cmd.stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    cmd.spawn().unwrap().wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_is_no_panic() {
    let tmp = TempDir::new();
    let path = config(&tmp, "");
    let src = tmp.path().join("src.txt");
    fs::write(&src, "hello").unwrap();
    let cases: [(&[&str], Option<i32>); 4] = [
        (
            &["check-config", "--config", path.to_str().unwrap()],
            Some(0),
        ),
        (&["--help"], Some(0)),
        (&["--version"], Some(0)),
        (&["pack", src.to_str().unwrap()], Some(1)),
    ];
    for (args, code) in cases {
        let out = with_closed_stdout(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {}", text(&out));
        assert_eq!(out.status.code(), code, "{args:?}: {}", text(&out));
    }
    // The same through a shell pipe, as an admin types it (head may read everything first, so
    // this one only shows nothing panics; the socket above makes the write fail for sure).
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("\"$0\" check-config --config \"$1\" | head -1 >/dev/null")
        .arg(bin())
        .arg(&path);
    let out = run_for(cmd, "check-config | head -1", SHORT);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        text(&out)
    );
}

#[test]
fn send_to_an_address_without_a_port_is_a_command_line_error() {
    let tmp = TempDir::new();
    let src = tmp.path().join("a.txt");
    fs::write(&src, "a").unwrap();
    for to in [
        "127.0.0.1",
        "127.0.0.1:",
        ":7878",
        "::1",
        "localhost:0",
        "h:99999",
    ] {
        let out = run_ferryd(&["send", "--to", to, src.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(64), "--to {to}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("expected HOST:PORT"),
            "--to {to}: {}",
            text(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The upload directory.

#[test]
fn uploads_go_on_after_the_directory_is_removed_or_replaced() {
    let d = DaemonBuilder::new().start();
    let up = d.uploads();
    assert!(upload(&d, "one.txt", b"one").starts_with("OK one.txt "));

    // rm -rf uploads && mkdir uploads
    fs::remove_dir_all(&up).unwrap();
    fs::create_dir(&up).unwrap();
    let line = upload(&d, "two.txt", b"two");
    assert!(line.starts_with("OK two.txt "), "{line}{}", log_tail(&d));
    assert_eq!(fs::read(up.join("two.txt")).unwrap(), b"two");

    // Moved away and replaced: files go to the directory now at the path.
    let old = d.dir().join("old-uploads");
    fs::rename(&up, &old).unwrap();
    fs::create_dir(&up).unwrap();
    let line = upload(&d, "three.txt", b"three");
    assert!(line.starts_with("OK three.txt "), "{line}{}", log_tail(&d));
    assert!(up.join("three.txt").is_file() && !old.join("three.txt").exists());

    // Removed and not recreated: the daemon creates it again, as at start-up.
    fs::remove_dir_all(&up).unwrap();
    let line = upload(&d, "four.txt", b"four");
    assert!(line.starts_with("OK four.txt "), "{line}{}", log_tail(&d));
    assert!(up.join("four.txt").is_file());
    assert!(d.log().contains("was removed or replaced while running"));

    // A reload does not need to recover anything either.
    d.signal("HUP");
    d.wait_log("reloaded: ", SHORT);
    assert!(upload(&d, "five.txt", b"five").starts_with("OK five.txt "));
}

/// Sends the header and name of a `size`-byte upload and the first bytes of its body, so that
/// it holds its reservation; the stream is returned to keep it open.
fn start_upload(d: &Daemon, name: &str, size: u64) -> TcpStream {
    let mut s = d.connect();
    s.write_all(&header(name, size, [0; 32])).unwrap();
    s.write_all(name.as_bytes()).unwrap();
    s.write_all(&[0u8; 1024]).unwrap();
    s
}

/// Announces a `size`-byte upload without its body and returns the answer line.
fn announce(d: &Daemon, name: &str, size: u64) -> String {
    let mut s = d.connect();
    s.write_all(&header(name, size, [0; 32])).unwrap();
    s.write_all(name.as_bytes()).unwrap();
    read_line(&mut s)
}

#[test]
fn a_reload_that_changes_files_keeps_the_space_of_uploads_in_flight() {
    const MB: u64 = 1_000_000;
    let tmp = TempDir::new();
    let vfs = rustix::fs::statvfs(tmp.path()).unwrap();
    let free = vfs.f_bavail * vfs.f_frsize;
    // The daemon's directory is in the same temp dir, which may be a small tmpfs (a container's
    // /tmp): the test scales to what is free, up to 4 GB usable.
    assert!(
        free > 400 * MB,
        "needs 400 MB free in {}",
        tmp.path().display()
    );
    let usable = (free / 2).min(4_000 * MB);
    // One upload of 5/8 of the usable space fits, a second does not. The margins (3/8 and 1/4
    // of it) absorb what other processes write or delete meanwhile. Nothing of that size is
    // written: the first upload sends 1 KiB and waits.
    const SIZE_EIGHTHS: u64 = 5;
    let size = usable / 8 * SIZE_EIGHTHS;
    let min_free = free - usable;
    let d = DaemonBuilder::new()
        .set("files", &format!("min_free_bytes = {min_free}"))
        .set("files", &format!("max_file_size = {}", 4 * usable))
        .set("server", "idle_timeout_secs = 60")
        .set("access", "min_upload_bytes_per_sec = 0")
        .start();
    let first = start_upload(&d, "first.bin", size);
    // Its temp file exists once its space is reserved.
    let up = d.uploads();
    assert!(
        wait_until(SHORT, || fs::read_dir(&up)
            .is_ok_and(|mut r| r.next().is_some())),
        "the first upload did not start{}",
        log_tail(&d)
    );
    let line = announce(&d, "second.bin", size);
    assert!(
        line.starts_with("ERR no-space "),
        "before the reload: {line}"
    );

    // Any [files] change makes a new store.
    let cfg = d.dir().join("config.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(
        &cfg,
        text.replace("[files]\n", "[files]\nfile_mode = 0o600\n"),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_log("reloaded: files.file_mode", SHORT);
    assert!(!d.log().contains("reload refused"), "{}", log_tail(&d));
    let line = announce(&d, "third.bin", size);
    assert!(
        line.starts_with("ERR no-space "),
        "after the reload: {line}{}",
        log_tail(&d)
    );
    drop(first);
}

#[test]
fn stale_entries_that_cannot_be_removed_are_logged_and_left() {
    let tmp = TempDir::new();
    let up = tmp.path().join("uploads");
    fs::create_dir(&up).unwrap();
    let stale_dir = up.join(".ferryd-00000000000000aa.part");
    fs::create_dir(&stale_dir).unwrap();
    fs::write(stale_dir.join("inside"), "x").unwrap();
    let stale_file = up.join(".ferryd-00000000000000bb.part");
    fs::write(&stale_file, "partial").unwrap();
    let d = DaemonBuilder::new()
        .set("files", &format!("dir = {:?}", up.display().to_string()))
        .start();
    let log = d.log();
    assert!(
        log.contains("cannot remove stale entry") && log.contains(".ferryd-00000000000000aa.part"),
        "{log}"
    );
    assert!(log.contains("removed stale partial upload"), "{log}");
    assert!(stale_dir.join("inside").is_file() && !stale_file.exists());
    assert!(upload(&d, "ok.txt", b"ok").starts_with("OK ok.txt "));
}

#[test]
fn rename_without_a_free_name_is_refused_before_the_body() {
    let d = DaemonBuilder::new().start();
    let up = d.uploads();
    fs::create_dir_all(&up).unwrap();
    fs::write(up.join("full.txt"), "").unwrap();
    for n in 1..=9999 {
        fs::write(up.join(format!("full ({n}).txt")), "").unwrap();
    }
    // Only the header and the name: the answer must come without the body.
    let body = vec![7u8; 1 << 20];
    let mut s = d.connect();
    s.write_all(&header(
        "full.txt",
        body.len() as u64,
        *blake3::hash(&body).as_bytes(),
    ))
    .unwrap();
    s.write_all(b"full.txt").unwrap();
    let line = read_line(&mut s);
    assert!(line.starts_with("ERR exists "), "{line}{}", log_tail(&d));
    let (_, err) = read_until_eof(&mut s, SHORT);
    assert!(err.is_none(), "{err:?}");
    // One name freed: the next upload takes it.
    fs::remove_file(up.join("full (17).txt")).unwrap();
    let line = upload(&d, "full.txt", &body);
    assert!(line.starts_with("OK full (17).txt "), "{line}");
}

// ---------------------------------------------------------------------------------------------
// Ports nobody else can share.

#[test]
fn no_other_socket_can_take_the_udp_port_and_a_second_ferryd_fails_at_start() {
    let d = DaemonBuilder::new().start();
    let port = d.port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // Another program binding with SO_REUSEADDR (and SO_REUSEPORT) is refused.
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    let err = s
        .bind(&addr.into())
        .expect_err("a second UDP socket bound ferryd's port");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_port(true).unwrap();
    assert!(
        s.bind(&addr.into()).is_err(),
        "SO_REUSEPORT shared the port"
    );
    // The echo still answers.
    let c = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    c.set_read_timeout(Some(SHORT)).unwrap();
    c.send_to(b"ping", addr).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = support::retry_eintr(|| c.recv_from(&mut buf)).unwrap();
    assert_eq!(&buf[..n], b"ping");

    // A second ferryd on the same port exits 1 with a clear line.
    let tmp = TempDir::new();
    let path = tmp.path().join("config.toml");
    fs::write(
        &path,
        format!(
            "[server]\nbind = \"127.0.0.1\"\nport = {port}\n\n[files]\ndir = {:?}\n",
            tmp.path().join("up").display().to_string()
        ),
    )
    .unwrap();
    let out = run_ferryd(&["--config", path.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        err.contains(&format!("cannot listen on udp 127.0.0.1:{port}"))
            && err.contains("another ferryd"),
        "{}",
        text(&out)
    );
    assert!(wait_until(SHORT, || TcpStream::connect(addr).is_ok()));
}

// ---------------------------------------------------------------------------------------------
// README.

#[test]
fn readme_names_the_minimum_rust_version_on_its_first_screen() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("Cargo.toml has rust-version");
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let first_screen: String = readme.lines().take(30).collect::<Vec<_>>().join("\n");
    assert!(
        first_screen.contains(&format!("Rust {msrv}")),
        "README's first 30 lines do not name Rust {msrv}"
    );
}
