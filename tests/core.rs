//! Integration tests of ferryd's core: the command line and config errors, echo over real
//! sockets, the bounded worker pool, idle timeouts, shutdown on signals, descriptor and thread
//! bounds, and the log lines an operator relies on. Every test drives the real binary over
//! loopback with its own port and temp dir (see `support`).

mod support;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use support::{
    Daemon, DaemonBuilder, TempDir, constant_threads, echo_round_trip, expect_then_eof, log_tail,
    median, need, path_str, peer_label, read_line, read_to_eof, retry_eintr, run_ferryd, stderr_of,
    stdout_of, tcp_queues, wait_until, write_file,
};

const VERSION: &str = "0.1.0";
const ERR_BUSY: &[u8] = b"ERR busy server busy, try again later\n";
/// With `idle_timeout_secs = 1`.
const ERR_IDLE: &[u8] = b"ERR idle timeout: nothing received for 1 s\n";
const ERR_SHUTDOWN: &[u8] = b"ERR shutdown server shutting down\n";

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Echoes `msg` on a fresh connection, then half-closes and checks that nothing more arrives:
/// the connection got back exactly its own bytes, once.
fn echo_exactly(d: &Daemon, msg: &[u8], what: &str) {
    let mut s = d.connect();
    echo_round_trip(&mut s, msg);
    s.shutdown(Shutdown::Write).unwrap();
    expect_then_eof(d, &mut s, b"", Duration::from_secs(10), what);
}

/// Reads exactly `n` bytes (each read bounded by the stream's timeout).
fn read_exactly(d: &Daemon, stream: &mut TcpStream, n: usize, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    if let Err(e) = stream.read_exact(&mut buf) {
        panic!("{what}: reading {n} bytes: {e}{}", log_tail(d));
    }
    buf
}

/// Counts the log lines containing `needle`.
fn count_lines(d: &Daemon, needle: &str) -> usize {
    d.log().lines().filter(|l| l.contains(needle)).count()
}

/// The first log line containing `needle`, waiting for it at most 10 s.
fn log_line(d: &Daemon, needle: &str) -> String {
    let log = d.wait_log(needle, Duration::from_secs(10));
    log.lines()
        .find(|l| l.contains(needle))
        .expect("wait_log found it")
        .to_string()
}

/// Whether `s` starts with an RFC 3339 UTC timestamp with milliseconds and a space.
fn starts_with_timestamp(s: &str) -> bool {
    let pattern = b"dddd-dd-ddTdd:dd:dd.dddZ ";
    s.len() >= pattern.len()
        && s.bytes().zip(pattern).all(|(c, &p)| match p {
            b'd' => c.is_ascii_digit(),
            _ => c == p,
        })
}

// ---------------------------------------------------------------------------------------------
// 1. Configuration errors.

#[test]
fn bad_ports_exit_78_naming_file_line_key_value_and_range() {
    let dir = TempDir::new();
    let values = ["0", "00", "\"0000\"", "70000", "-1", "\"abc\"", "7878.5"];
    for value in values {
        let path = write_file(
            &dir,
            "bad-port.toml",
            &format!("# ferryd test config\n[server]\nport = {value}\n"),
        );
        let p = path_str(&path);
        for args in [&["--config", p][..], &["check-config", "--config", p]] {
            let out = run_ferryd(args, &[]);
            let err = stderr_of(&out);
            let want = format!("ferryd: config error: {p}:3: server.port = {value}: ");
            assert_eq!(
                out.status.code(),
                Some(78),
                "port = {value} with {args:?}: want exit 78\n{err}"
            );
            assert!(
                err.contains(&want),
                "port = {value}: stderr should contain {want:?}\n{err}"
            );
            assert!(
                err.contains("allowed: ") && err.contains("1–65535"),
                "port = {value}: stderr should name the range 1–65535\n{err}"
            );
            assert!(
                !err.contains("listening on"),
                "port = {value}: the daemon must not start\n{err}"
            );
            assert!(out.stdout.is_empty(), "port = {value}: {}", stdout_of(&out));
        }
    }
}

#[test]
fn unknown_key_exits_78_naming_line_and_key() {
    let dir = TempDir::new();
    let path = write_file(&dir, "typo.toml", "[server]\nport = 7878\nprot = 1\n");
    let p = path_str(&path);
    let out = run_ferryd(&["--config", p], &[]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    let want = format!("ferryd: config error: {p}:3: server.prot = 1: ");
    assert!(err.contains(&want), "stderr should contain {want:?}\n{err}");
    assert!(!err.contains("listening on"), "{err}");
}

#[test]
fn absurd_limits_exit_78_naming_the_key() {
    let dir = TempDir::new();
    let cases = [
        ("max_connections = 0", "server.max_connections = 0"),
        ("queue_depth = 0", "server.queue_depth = 0"),
        ("queue_depth = 1000001", "server.queue_depth = 1000001"),
        ("thread_stack_kib = 8", "server.thread_stack_kib = 8"),
        ("max_line_bytes = 0", "server.max_line_bytes = 0"),
    ];
    for (line, key_value) in cases {
        let path = write_file(&dir, "limits.toml", &format!("[server]\n{line}\n"));
        let p = path_str(&path);
        let out = run_ferryd(&["--config", p], &[]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(78), "{line}: want exit 78\n{err}");
        let want = format!("ferryd: config error: {p}:2: {key_value}: ");
        assert!(err.contains(&want), "{line}: want {want:?}\n{err}");
        assert!(
            err.contains("allowed: an integer in "),
            "{line}: the allowed range\n{err}"
        );
        assert!(!err.contains("listening on"), "{line}: {err}");
    }
}

#[test]
fn toml_syntax_error_names_the_line() {
    let dir = TempDir::new();
    let cases = [
        ("[server]\nport = 7878\nbind = \"127.0.0.1\n", 3),
        ("[server\nport = 7878\n", 1),
        ("[server]\nport = 7878\n\nmax_connections = = 2\n", 4),
    ];
    for (text, line) in cases {
        let path = write_file(&dir, "syntax.toml", text);
        let p = path_str(&path);
        let out = run_ferryd(&["--config", p], &[]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(78), "{text:?}\n{err}");
        let want = format!("ferryd: config error: {p}:{line}: ");
        assert!(err.contains(&want), "{text:?}: want {want:?}\n{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The command line and where the config comes from.

/// Splits check-config output into its header line and the TOML after it.
fn header_and_body(out: &Output) -> (String, String) {
    let text = stdout_of(out);
    let (header, body) = text.split_once('\n').unwrap_or((&text, ""));
    (header.to_string(), body.to_string())
}

#[test]
fn check_config_prints_toml_that_reads_back_the_same() {
    let dir = TempDir::new();
    let path = write_file(
        &dir,
        "in.toml",
        "[server]\nbind = \"::\"\nport = 9000\nidle_timeout_secs = 7\nqueue_depth = 3\n\n[log]\nlevel = \"debug\"\n",
    );
    let p = path_str(&path);
    let first = run_ferryd(&["check-config", "--config", p], &[]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr_of(&first));
    let (header, body) = header_and_body(&first);
    assert_eq!(
        header,
        format!("# ferryd {VERSION}: effective configuration from {p} (from --config)")
    );
    for want in [
        "bind = \"::\"",
        "port = 9000",
        "idle_timeout_secs = 7",
        "queue_depth = 3",
        "level = \"debug\"",
    ] {
        assert!(body.lines().any(|l| l == want), "{want:?} in\n{body}");
    }

    // The whole output, header comment included, is a config file giving the same settings.
    let again = write_file(&dir, "again.toml", &stdout_of(&first));
    let second = run_ferryd(&["check-config", "--config", path_str(&again)], &[]);
    assert_eq!(second.status.code(), Some(0), "{}", stderr_of(&second));
    let (header2, body2) = header_and_body(&second);
    assert_eq!(
        header2,
        format!(
            "# ferryd {VERSION}: effective configuration from {} (from --config)",
            again.display()
        )
    );
    assert_eq!(body2, body, "check-config of its own output differs");
}

#[test]
fn help_version_and_bad_arguments() {
    for flag in ["--help", "-h"] {
        let out = run_ferryd(&[flag], &[]);
        let text = stdout_of(&out);
        assert_eq!(out.status.code(), Some(0), "{flag}: {}", stderr_of(&out));
        assert!(
            text.contains("Usage:") && text.contains("check-config") && text.contains("--config"),
            "{flag} prints usage:\n{text}"
        );
    }
    for flag in ["--version", "-V"] {
        let out = run_ferryd(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0), "{flag}: {}", stderr_of(&out));
        assert_eq!(stdout_of(&out), format!("ferryd {VERSION}\n"), "{flag}");
    }
    let bad: [&[&str]; 4] = [
        &["--nope"],
        &["frobnicate"],
        &["--config"],
        &["run", "extra"],
    ];
    for args in bad {
        let out = run_ferryd(args, &[]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: want exit 64\n{err}");
        assert!(err.starts_with("ferryd: "), "{args:?}: {err}");
        assert!(!err.contains("listening on"), "{args:?}: {err}");
    }
}

#[test]
fn config_comes_from_flag_then_env_then_system_then_defaults() {
    let dir = TempDir::new();
    let env_cfg = write_file(&dir, "env.toml", "[server]\nport = 12345\n");
    let flag_cfg = write_file(&dir, "flag.toml", "[server]\nport = 23456\n");
    let (env_p, flag_p) = (path_str(&env_cfg), path_str(&flag_cfg));

    let out = run_ferryd(&["check-config"], &[("FERRYD_CONFIG", env_p)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let (header, body) = header_and_body(&out);
    assert_eq!(
        header,
        format!("# ferryd {VERSION}: effective configuration from {env_p} (from $FERRYD_CONFIG)")
    );
    assert!(body.contains("port = 12345\n"), "{body}");

    let out = run_ferryd(
        &["check-config", "--config", flag_p],
        &[("FERRYD_CONFIG", env_p)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let (header, body) = header_and_body(&out);
    assert_eq!(
        header,
        format!("# ferryd {VERSION}: effective configuration from {flag_p} (from --config)")
    );
    assert!(body.contains("port = 23456\n"), "{body}");

    // Neither: /etc/ferryd/config.toml if this machine has one, else the built-in defaults, which
    // equal the shipped config/config.toml.
    let out = run_ferryd(&["check-config"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let (header, body) = header_and_body(&out);
    let system = Path::new("/etc/ferryd/config.toml");
    if system.exists() {
        assert_eq!(
            header,
            format!("# ferryd {VERSION}: effective configuration from /etc/ferryd/config.toml")
        );
    } else {
        assert_eq!(
            header,
            format!(
                "# ferryd {VERSION}: effective configuration from built-in defaults (same as the shipped config/config.toml)"
            )
        );
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/config.toml");
        let out = run_ferryd(&["check-config", "--config", path_str(&shipped)], &[]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        assert_eq!(
            header_and_body(&out).1,
            body,
            "the built-in defaults differ from the shipped config/config.toml"
        );
    }
}

#[test]
fn log_lines_name_config_listener_and_connections() {
    let d = DaemonBuilder::new()
        .set("server", "max_connections = 3")
        .set("server", "queue_depth = 5")
        .set("server", "idle_timeout_secs = 42")
        .start();
    let config = d.dir().join("config.toml");
    let log = d.log();
    let first = log.lines().next().unwrap_or("");
    assert!(starts_with_timestamp(first), "{first:?}{}", log_tail(&d));
    let want = format!(
        "Z INFO  ferryd {VERSION} using config: {} (from --config)",
        config.display()
    );
    assert!(
        first.contains(&want),
        "first line {first:?} should contain {want:?}"
    );
    let listening = log_line(&d, "listening on");
    let want = format!(
        "INFO  listening on 127.0.0.1:{} (mode echo, up to 3 workers, queue 5, idle timeout 42 s)",
        d.port()
    );
    assert!(
        listening.contains(&want),
        "{listening:?} should contain {want:?}"
    );

    let mut s = d.connect();
    let peer = peer_label(&s);
    echo_round_trip(&mut s, b"hello\n");
    drop(s);
    let online = log_line(&d, &format!("{peer} online"));
    assert!(starts_with_timestamp(&online), "{online:?}");
    let offline = log_line(&d, &format!("{peer} offline"));
    assert!(
        offline.contains(&format!("{peer} offline (in 6 B, out 6 B, "))
            && offline.ends_with(" s, reason: eof)"),
        "{offline:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3–6. Echo.

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: nc (netcat-openbsd); run bash tests/real-peers.sh"
)]
fn netcat_gets_its_line_back() {
    let nc = need("nc", "netcat-openbsd");
    let d = DaemonBuilder::new().start();
    let mut nc = Command::new(nc)
        .args(["127.0.0.1", &d.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start nc");
    let mut out = nc.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stdin = nc.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 6 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => got.extend_from_slice(&chunk),
            Err(_) => break,
        }
    }
    let _ = nc.kill();
    let _ = nc.wait();
    let mut nc_err = String::new();
    if let Some(mut e) = nc.stderr.take() {
        let _ = e.read_to_string(&mut nc_err);
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        "hello\n",
        "nc's output (nc stderr: {nc_err:?}){}",
        log_tail(&d)
    );
}

#[test]
fn bytes_without_newline_come_back_at_once() {
    let d = DaemonBuilder::new().start();
    let mut s = d.connect();
    s.set_nodelay(true).unwrap();
    let mut samples = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        s.write_all(b"hello").unwrap();
        let got = read_exactly(&d, &mut s, 5, "echo of \"hello\" without newline");
        samples.push(t.elapsed());
        assert_eq!(got, b"hello");
    }
    let med = median(&samples);
    println!("echo latency without newline: median {med:?}, samples {samples:?}");
    assert!(
        med < Duration::from_millis(100),
        "median echo latency {med:?} (samples {samples:?}): bytes wait for a newline?{}",
        log_tail(&d)
    );
    let worst = samples.iter().max().unwrap();
    assert!(
        *worst < Duration::from_secs(2),
        "slowest echo {worst:?} (samples {samples:?}){}",
        log_tail(&d)
    );
}

/// `n` bytes of printable ASCII with a newline about every 100 bytes.
fn ascii_payload(n: usize) -> Vec<u8> {
    let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_!?";
    (0..n)
        .map(|i| {
            if i % 101 == 100 {
                b'\n'
            } else {
                alphabet[(i * 7 + i / 101) % alphabet.len()]
            }
        })
        .collect()
}

#[test]
fn split_and_merged_writes_echo_byte_for_byte() {
    let d = DaemonBuilder::new().start();

    // (a) One byte per write, CRLF included.
    let msg = b"line one\nline two\r\n";
    let mut s = d.connect();
    s.set_nodelay(true).unwrap();
    for b in msg {
        s.write_all(&[*b]).unwrap();
    }
    let got = read_exactly(&d, &mut s, msg.len(), "1-byte writes");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(msg),
        "1-byte writes{}",
        log_tail(&d)
    );
    s.shutdown(Shutdown::Write).unwrap();
    expect_then_eof(
        &d,
        &mut s,
        b"",
        Duration::from_secs(10),
        "after 1-byte writes",
    );

    // (b) 1 MiB in one write from another thread while this one reads.
    let payload = ascii_payload(1 << 20);
    assert!(!payload.contains(&0xF5));
    let mut s = d.connect();
    let mut w = s.try_clone().unwrap();
    let sent = payload.clone();
    let writer = thread::spawn(move || w.write_all(&sent));
    let got = read_exactly(&d, &mut s, payload.len(), "1 MiB echo");
    writer.join().unwrap().expect("writing 1 MiB");
    let first_diff = got.iter().zip(&payload).position(|(a, b)| a != b);
    assert!(
        first_diff.is_none(),
        "1 MiB echo differs at byte {first_diff:?}{}",
        log_tail(&d)
    );
    s.shutdown(Shutdown::Write).unwrap();
    expect_then_eof(&d, &mut s, b"", Duration::from_secs(10), "after 1 MiB");

    // (c) 500 lines in one write.
    let lines: String = (0..500)
        .map(|i| format!("line {i} of 500\n"))
        .collect::<Vec<_>>()
        .concat();
    echo_exactly(&d, lines.as_bytes(), "500 lines in one write");

    // (d) Five connections in turn, each getting exactly its own bytes once.
    for i in 0..5 {
        let msg = format!("connection {i} says {}\r\n", "x".repeat(i * 10));
        echo_exactly(&d, msg.as_bytes(), &format!("connection {i}"));
    }
}

#[test]
fn long_line_streams_without_buffering() {
    const TOTAL: usize = 8 << 20;
    let d = DaemonBuilder::new()
        .set("server", "max_line_bytes = 1024")
        .start();
    let mut warm = d.connect();
    echo_round_trip(&mut warm, b"warm-up\n");
    let rss_before = d.rss_kib();

    let mut s = d.connect();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..TOTAL / chunk.len() {
            w.write_all(&chunk)?;
        }
        io::Result::Ok(())
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    while n < TOTAL {
        let k = match retry_eintr(|| s.read(&mut buf)) {
            Ok(0) => panic!("EOF after {n} of {TOTAL} bytes{}", log_tail(&d)),
            Ok(k) => k,
            Err(e) => panic!(
                "reading the echo after {n} of {TOTAL} bytes: {e}{}",
                log_tail(&d)
            ),
        };
        assert!(
            buf[..k].iter().all(|&b| b == b'a'),
            "echo has a byte other than 'a' near offset {n}{}",
            log_tail(&d)
        );
        n += k;
    }
    writer.join().unwrap().expect("writing 8 MiB");
    let rss_after = d.rss_kib();
    s.shutdown(Shutdown::Write).unwrap();
    expect_then_eof(&d, &mut s, b"", Duration::from_secs(10), "after 8 MiB");
    println!("RSS before {rss_before} KiB, after 8 MiB line {rss_after} KiB");
    assert!(
        rss_after <= rss_before + 2048,
        "RSS grew from {rss_before} KiB to {rss_after} KiB while echoing one 8 MiB line{}",
        log_tail(&d)
    );
}

// ---------------------------------------------------------------------------------------------
// 7–8. The worker pool and idle timeouts.

#[test]
fn full_queue_refuses_with_busy_and_queued_client_is_served_later() {
    let d = DaemonBuilder::new()
        .set("server", "max_connections = 2")
        .set("server", "queue_depth = 1")
        .start();
    let mut a = d.connect();
    echo_round_trip(&mut a, b"first\n");
    let mut b = d.connect();
    echo_round_trip(&mut b, b"second\n");

    // The third waits in the queue: accepted, but no worker reads it yet.
    let mut c = d.connect();
    c.write_all(b"queued\n").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    match retry_eintr(|| c.read(&mut buf)) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!(
            "the third connection should wait in the queue, but its read gave {other:?} ({:?}){}",
            String::from_utf8_lossy(&buf),
            log_tail(&d)
        ),
    }
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    // The fourth finds the queue full.
    let mut e = d.connect();
    let peer = peer_label(&e);
    expect_then_eof(
        &d,
        &mut e,
        ERR_BUSY,
        Duration::from_secs(10),
        "fourth connection",
    );
    let line = log_line(&d, &format!("{peer} refused: busy"));
    assert!(
        line.contains(" WARN ")
            && line.contains("server.max_connections")
            && line.contains("server.queue_depth"),
        "refusal line should be a WARN naming both limits: {line:?}"
    );

    // A worker frees up: the queued connection's pending bytes are echoed.
    drop(a);
    let got = read_exactly(&d, &mut c, 7, "queued connection after a worker freed up");
    assert_eq!(got, b"queued\n");
    echo_round_trip(&mut b, b"still served\n");
}

#[test]
fn idle_client_is_told_and_closed_and_its_worker_freed() {
    let d = DaemonBuilder::new()
        .set("server", "idle_timeout_secs = 1")
        .set("server", "max_connections = 1")
        .start();
    let t = Instant::now();
    let mut s = d.connect();
    let peer = peer_label(&s);
    expect_then_eof(
        &d,
        &mut s,
        ERR_IDLE,
        Duration::from_secs(5),
        "silent client",
    );
    let elapsed = t.elapsed();
    // The lower bound allows for the kernel's timer granularity (one jiffy) only.
    assert!(
        elapsed >= Duration::from_millis(950) && elapsed <= Duration::from_secs(3),
        "idle timeout of 1 s took {elapsed:?}{}",
        log_tail(&d)
    );
    let offline = log_line(&d, &format!("{peer} offline"));
    assert!(offline.contains("reason: idle)"), "{offline:?}");

    // The only worker is free again.
    let mut next = d.connect();
    echo_round_trip(&mut next, b"after the idle one\n");
}

#[test]
fn stalled_half_line_does_not_delay_others() {
    let d = DaemonBuilder::new()
        .set("server", "max_connections = 4")
        .start();
    let mut stalled = d.connect();
    echo_round_trip(&mut stalled, b"half a li");
    let mut other = d.connect();
    other.set_nodelay(true).unwrap();
    let mut samples = Vec::new();
    for i in 0..5 {
        let msg = format!("other {i}\n");
        let t = Instant::now();
        echo_round_trip(&mut other, msg.as_bytes());
        samples.push(t.elapsed());
    }
    let med = median(&samples);
    assert!(
        med < Duration::from_millis(100),
        "echo beside a stalled half line: median {med:?} (samples {samples:?}){}",
        log_tail(&d)
    );
    echo_round_trip(&mut stalled, b"ne\n");
}

// ---------------------------------------------------------------------------------------------
// 9–10. Shutdown.

#[test]
fn sigterm_tells_every_client_and_exits_0() {
    // The daemon binds its own port: a socket systemd passed would stay listening by design.
    let mut d = DaemonBuilder::new()
        .set("server", "shutdown_grace_secs = 3")
        .bind_own_port()
        .start();
    let mut clients: Vec<TcpStream> = (0..10)
        .map(|i| {
            let mut s = d.connect();
            echo_round_trip(&mut s, format!("client {i}\n").as_bytes());
            s
        })
        .collect();
    let signalled = Instant::now();
    d.signal("TERM");
    for (i, s) in clients.iter_mut().enumerate() {
        expect_then_eof(
            &d,
            s,
            ERR_SHUTDOWN,
            Duration::from_secs(5),
            &format!("client {i} after SIGTERM"),
        );
        if i == 0 {
            match TcpStream::connect_timeout(&d.addr(), Duration::from_secs(2)) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                other => panic!(
                    "a connect after SIGTERM should be refused, got {other:?}{}",
                    log_tail(&d)
                ),
            }
        }
    }
    let limit = Duration::from_secs(3 + 1);
    let status = d.wait_exit(limit.saturating_sub(signalled.elapsed()));
    let took = signalled.elapsed();
    assert!(
        status.is_some(),
        "ferryd still running {took:?} after SIGTERM (grace 3 s){}",
        log_tail(&d)
    );
    assert_eq!(
        status.unwrap().code(),
        Some(0),
        "exit status after SIGTERM{}",
        log_tail(&d)
    );
    let log = d.log();
    assert!(
        log.contains("stopped: "),
        "no `stopped:` line{}",
        log_tail(&d)
    );
    assert_eq!(
        count_lines(&d, "reason: shutdown)"),
        10,
        "each of the 10 clients should go offline with reason shutdown{}",
        log_tail(&d)
    );
}

#[test]
fn second_signal_during_shutdown_exits_130_at_once() {
    // A shutdown that cannot finish by itself: in chat mode, a client that never reads has a
    // writer thread blocked on its full socket with megabytes still queued for it (the drain
    // timeout is made long enough that it is not dropped as too slow, and the room's log large
    // enough to take the whole burst). The first signal shuts every read
    // side, which cannot help that writer: the daemon waits out shutdown_grace_secs, and the
    // second signal must end it at once.
    let mut d = DaemonBuilder::new()
        .set("server", "mode = \"chat\"")
        .set("server", "chat_drain_timeout_secs = 3600")
        // Room for the whole burst in the room's log, so that the talker is never held back.
        .set("server", "chat_queue_bytes = 67108864")
        .set("server", "shutdown_grace_secs = 30")
        .start();
    let silent = d.connect();
    d.wait_log(
        &format!("{} online", peer_label(&silent)),
        Duration::from_secs(10),
    );
    let mut talker = d.connect();
    d.wait_log(
        &format!("{} online", peer_label(&talker)),
        Duration::from_secs(10),
    );
    // 4 MiB of lines for the silent client: far more than the kernel buffers between it and
    // its writer (a fixed 64 KiB send buffer and a receive window that never grows, since it
    // never reads).
    let line = [b'x'; 127];
    let mut burst = Vec::new();
    for _ in 0..32_768 {
        burst.extend_from_slice(&line);
        burst.push(b'\n');
    }
    talker.write_all(&burst).unwrap();
    // Wait until the daemon has read it all (and so relayed it into the silent client's queue):
    // nothing of it is left in the kernel, neither unsent at the talker nor unread at ferryd.
    let talker_end = (talker.local_addr().unwrap(), talker.peer_addr().unwrap());
    let drained = wait_until(Duration::from_secs(10), || {
        tcp_queues(talker_end.0, talker_end.1).is_some_and(|(tx, _)| tx == 0)
            && tcp_queues(talker_end.1, talker_end.0).is_some_and(|(_, rx)| rx == 0)
    });
    assert!(
        drained,
        "ferryd did not read the burst: queues {:?} at the talker, {:?} at ferryd{}",
        tcp_queues(talker_end.0, talker_end.1),
        tcp_queues(talker_end.1, talker_end.0),
        log_tail(&d)
    );

    d.signal("TERM");
    // The shutdown has begun once the talker is closed; the silent client's writer holds it up.
    d.wait_log(
        &format!("{} offline", peer_label(&talker)),
        Duration::from_secs(10),
    );
    assert!(
        d.wait_exit(Duration::ZERO).is_none(),
        "ferryd exited after the first signal although a writer was blocked with data queued{}",
        log_tail(&d)
    );
    let second = Instant::now();
    d.signal("INT");
    let status = d.wait_exit(Duration::from_secs(2));
    let took = second.elapsed();
    drop(silent);
    assert!(
        status.is_some(),
        "ferryd still running {took:?} after the second signal{}",
        log_tail(&d)
    );
    assert_eq!(
        status.unwrap().code(),
        Some(130),
        "exit status after a second signal{}",
        log_tail(&d)
    );
}

// ---------------------------------------------------------------------------------------------
// 11–12. Resource bounds.

#[test]
fn two_thousand_connections_leak_no_descriptors() {
    let d = DaemonBuilder::new().start();
    let mut warm = d.connect();
    let peer = peer_label(&warm);
    echo_round_trip(&mut warm, b"warm-up\n");
    let open_with = d.fd_count();
    drop(warm);
    d.wait_log(&format!("{peer} offline"), Duration::from_secs(10));
    // The worker logs `offline` just before it drops the socket: the baseline is the count
    // once that socket is gone, one less than while the connection was open.
    let baseline = open_with - 1;
    let closed = wait_until(Duration::from_secs(10), || d.fd_count() == baseline);
    assert!(
        closed,
        "the warm-up connection's descriptor: {open_with} while open, {} after{}",
        d.fd_count(),
        log_tail(&d)
    );

    for _ in 0..2000 {
        let mut s = d.connect();
        echo_round_trip(&mut s, b"x\n");
    }
    wait_until(Duration::from_secs(3), || d.fd_count() == baseline);
    let now = d.fd_count();
    println!("descriptors: {baseline} before, {now} after 2000 connections");
    assert_eq!(
        now,
        baseline,
        "open descriptors before and 3 s after 2000 connect/echo/close cycles{}",
        log_tail(&d)
    );
}

#[test]
fn threads_stay_bounded_under_a_connection_flood() {
    let d = DaemonBuilder::new()
        .set("server", "max_connections = 4")
        .set("server", "queue_depth = 4")
        .start();
    let idle_threads = d.thread_count();
    let conns: Vec<TcpStream> = (0..40).map(|_| d.connect()).collect();
    // At most 4 are served and 4 queued at a time; the rest are refused busy (and, when every
    // worker is busy, a silent client may be ended to make room for a queued one, which is then
    // served). The thread count is sampled all the while, until the daemon has dealt with every
    // one of the 40: each was refused or went online.
    let mut observed = 0;
    let settled = wait_until(Duration::from_secs(10), || {
        observed = observed.max(d.thread_count());
        let (busy, online) = (count_lines(&d, "refused: busy"), count_lines(&d, " online"));
        busy >= 24 && online >= 4 && busy + online >= 40
    });
    assert!(
        settled,
        "expected each of the 40 connections refused busy or served (at least 24 refused){}",
        log_tail(&d)
    );
    observed = observed.max(d.thread_count());
    println!(
        "threads: {idle_threads} idle, at most {observed} with 40 connections (4 workers, queue 4)"
    );
    assert!(
        observed <= 4 + constant_threads(),
        "{observed} threads with max_connections = 4 (allowed 4 workers + {}){}",
        constant_threads(),
        log_tail(&d)
    );
    drop(conns);
    // Once every one of the 40 has been refused or served and gone, a new client is served.
    let all_gone = wait_until(Duration::from_secs(10), || {
        let online = count_lines(&d, " online");
        count_lines(&d, "refused: busy") + online == 40 && count_lines(&d, " offline") == online
    });
    assert!(
        all_gone,
        "the 40 connections did not all end{}",
        log_tail(&d)
    );
    let mut s = d.connect();
    echo_round_trip(&mut s, b"after the flood\n");
    drop(s);
    // Workers are started on demand and retire after 5 s without a connection: the daemon
    // goes back to the threads it had before the flood, none of them a worker (main, ctrlc's,
    // the SIGHUP thread and UDP's).
    assert!(
        idle_threads <= 4,
        "{idle_threads} threads before any connection: a worker started up front?"
    );
    let retired = wait_until(Duration::from_secs(15), || d.thread_count() == idle_threads);
    assert!(
        retired,
        "{} threads 15 s after the last connection ended, {idle_threads} before the flood{}",
        d.thread_count(),
        log_tail(&d)
    );
}

// ---------------------------------------------------------------------------------------------
// 13–16. Binding, addresses, debug log and accept errors.

#[test]
fn port_in_use_is_one_error_line_and_exit_1() {
    // The test listens on a port the kernel picks and keeps it until ferryd has tried it.
    let holder = TcpListener::bind(("127.0.0.1", 0)).expect("listening on 127.0.0.1:0");
    let port = holder.local_addr().expect("local_addr").port();
    let dir = TempDir::new();
    let path = write_file(
        &dir,
        "taken.toml",
        &format!("[server]\nbind = \"127.0.0.1\"\nport = {port}\n"),
    );
    let out = run_ferryd(&["--config", path_str(&path)], &[]);
    drop(holder);
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "port in use: want exit 1\n{err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "want exactly one ERROR line\n{err}");
    assert!(
        errors[0].contains(&format!("127.0.0.1:{port}")) && errors[0].contains("in use"),
        "the ERROR line should name 127.0.0.1:{port} and say it is in use: {:?}",
        errors[0]
    );
    assert!(!err.contains("listening on"), "{err}");
}

#[test]
fn dual_stack_bind_serves_ipv4_and_ipv6() {
    if let Err(e) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
        panic!(
            "this test needs an IPv6 loopback (::1), but binding [::1]:0 failed: {e}; \
             enable it with `sysctl -w net.ipv6.conf.lo.disable_ipv6=0`"
        );
    }
    let d = DaemonBuilder::new().set("server", "bind = \"::\"").start();
    let listening = log_line(&d, "listening on");
    assert!(
        listening.contains(&format!("listening on [::]:{} ", d.port())),
        "{listening:?}"
    );

    let mut v4 = d.connect();
    echo_round_trip(&mut v4, b"over IPv4\n");
    let v6_addr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), d.port());
    let mut v6 = TcpStream::connect_timeout(&v6_addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to {v6_addr}: {e}{}", log_tail(&d)));
    v6.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    v6.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    echo_round_trip(&mut v6, b"over IPv6\n");

    let v4_port = v4.local_addr().unwrap().port();
    let v6_port = v6.local_addr().unwrap().port();
    d.wait_log(
        &format!("[127.0.0.1:{v4_port}] online"),
        Duration::from_secs(10),
    );
    d.wait_log(&format!("[::1]:{v6_port} online"), Duration::from_secs(10));
}

#[test]
fn debug_log_shows_escaped_requests_and_responses() {
    let d = DaemonBuilder::new().set("log", "level = \"debug\"").start();
    let mut s = d.connect();
    let peer = peer_label(&s);
    echo_round_trip(&mut s, b"hi\n");
    let req = log_line(&d, &format!("{peer} req "));
    let resp = log_line(&d, &format!("{peer} resp "));
    assert!(
        req.contains(" DEBUG ") && req.ends_with(&format!("{peer} req hi\\n")),
        "{req:?}"
    );
    assert!(
        resp.contains(" DEBUG ") && resp.ends_with(&format!("{peer} resp hi\\n")),
        "{resp:?}"
    );
}

#[test]
fn accept_errors_back_off_and_the_loop_survives() {
    let d = DaemonBuilder::new()
        .set("server", "max_connections = 100")
        .set("server", "queue_depth = 100")
        .shell_prefix("ulimit -n 40")
        .start();
    let limits = fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    assert!(
        nofile.split_whitespace().nth(3) == Some("40"),
        "the daemon should run with 40 descriptors: {nofile:?}"
    );

    let conns: Vec<TcpStream> = (0..60).map(|_| d.connect()).collect();
    // Out of descriptors, the accept loop uses its spare one to tell newcomers ERR busy.
    let line = log_line(&d, "refused: busy (out of file descriptors:");
    assert!(
        line.contains(" WARN ") && line.contains("Too many open files"),
        "{line:?}"
    );
    drop(conns);
    // Until the workers have seen those clients go (some still wait in the backlog), a
    // newcomer may be told ERR busy: retry until one is served.
    let mut served = None;
    let back = support::wait_until(Duration::from_secs(10), || {
        let mut s = d.connect();
        let msg = b"the accept loop survived\n";
        let mut got = [0u8; 25];
        let ok = s.write_all(msg).is_ok() && s.read_exact(&mut got).is_ok() && &got == msg;
        if ok {
            served = Some(s);
        }
        ok
    });
    assert!(
        back,
        "nobody served after the descriptors came back{}",
        log_tail(&d)
    );
    let mut s = served.expect("served");
    let reply = {
        s.write_all(b"one more line\n").unwrap();
        read_line(&mut s)
    };
    assert_eq!(reply, "one more line\n");
    // Everything still works after the descriptors came back.
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s, Duration::from_secs(10)), b"");
}
