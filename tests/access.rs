//! Integration tests of access control and abuse resistance: allow and deny rules for IPv4, IPv6
//! and IPv4-mapped peers (over TCP and UDP), `access.max_per_ip`, upload keys (tags bound to the
//! nonce, the frame and its place in the connection, so that replays fail) and
//! `access.require_token`, `access.max_files_per_connection`, slow peers (slowloris headers, a
//! stalled name or tag, trickled and stalled bodies), and a flood of garbage connections after
//! which the daemon must be as it was. Every test drives the real binary over loopback with its
//! own port and temp dirs (see `support`); a client picks its source address in 127.0.0.0/8 (or
//! ::1) by binding before it connects.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ferryd::auth::{Key, NONCE_LEN};
use ferryd::proto::{HEADER_LEN, Header, MAGIC};

use support::{
    Daemon, DaemonBuilder, Rng, TempDir, connect_from, describe, echo_round_trip,
    expect_err_then_eof, expect_then_eof, header_for, heavy, ip, is_timeout, label, log_tail,
    names_in, ok_line, parts_in, path_str, peer_label, read_line, read_until_eof, retry_eintr,
    run_ferryd, send_all, target, try_connect_from, wait_until, write_file,
};

const ERR_NOT_ALLOWED: &[u8] = b"ERR not-allowed not allowed\n";
const ERR_TOO_MANY: &[u8] = b"ERR too-many-connections too many connections from your address\n";
const OK_AUTH: &str = "OK authenticated\n";
/// Connect, read and write timeouts of the test's own sockets, and how long to wait for a log
/// line or an answer that needs no disk work.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The upload key the daemons under test hold, and another one that is just as well-formed.
const UPLOAD_KEY: &str = "ferryd-test-upload-key-0123456789";
const OTHER_KEY: &str = "another-key-also-long-enough-9876";

// ---------------------------------------------------------------------------------------------
// Helpers: random bytes.

// ---------------------------------------------------------------------------------------------
// Helpers: addresses, sockets, logs.

/// Waits up to 10 s for a log line containing `needle`; panics naming `what` otherwise.
fn expect_log(d: &Daemon, needle: &str, what: &str) {
    let found = wait_until(IO_TIMEOUT, || d.log().contains(needle));
    assert!(
        found,
        "{what}: the log never showed {needle:?}{}",
        log_tail(d)
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers: files, frames, keys.

/// Writes a key file, mode 0600, with a trailing newline (which the key does not include).
fn write_key(dir: &TempDir, name: &str, key: &str) -> PathBuf {
    let path = write_file(dir, name, format!("{key}\n").as_bytes());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Header, name, tag (if any) and body in one buffer.
fn assemble(header: &[u8; HEADER_LEN], name: &str, tag: Option<&[u8]>, body: &[u8]) -> Vec<u8> {
    let mut out = header.to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(tag.unwrap_or_default());
    out.extend_from_slice(body);
    out
}

/// An authenticated frame: its tag binds the key, the connection's nonce, `seq`, the header
/// and the name.
fn signed_frame(key: &Key, nonce: &[u8; NONCE_LEN], seq: u64, name: &str, body: &[u8]) -> Vec<u8> {
    let header = header_for(name, body, true);
    let tag = key.upload_tag(nonce, seq, &header, name.as_bytes());
    assemble(&header, name, Some(&tag), body)
}

/// Reads the `NONCE <64 lowercase hex>` line a keyed daemon opens every connection with.
fn read_nonce(d: &Daemon, s: &mut TcpStream, what: &str) -> [u8; NONCE_LEN] {
    let line = read_line(s);
    let hex = line
        .strip_prefix("NONCE ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .filter(|h| h.len() == 2 * NONCE_LEN)
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    let Some(hex) = hex else {
        panic!(
            "{what}: the first line should be NONCE <64 lowercase hex>, got {line:?}{}",
            log_tail(d)
        );
    };
    ferryd::auth::from_hex(hex)
        .and_then(|v| <[u8; NONCE_LEN]>::try_from(v).ok())
        .expect("64 hex digits are 32 bytes")
}

/// Makes a test case's bytes from the connection's nonce.
type Make<'a, T> = Box<dyn Fn(&[u8; NONCE_LEN]) -> T + 'a>;

fn key(text: &str) -> Key {
    Key::from_bytes(text.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Allow and deny rules, through the real daemon.

/// What a client should meet.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Served,
    /// Refused by this deny rule, as the daemon prints it.
    Denied(&'static str),
    /// Refused: there is an allow list and no rule in it matches.
    NotAllowed,
}

/// One daemon's rules and the clients tried against them.
struct Table {
    what: &'static str,
    bind: &'static str,
    allow: &'static [&'static str],
    deny: &'static [&'static str],
    /// Source address of a client, and what it should meet.
    rows: &'static [(&'static str, Expect)],
}

/// With `bind = "::"`, IPv4 clients reach the daemon as IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`)
/// and must match the IPv4 rules; `::1` is a real IPv6 peer.
const TABLES: &[Table] = &[
    Table {
        what: "deny wins over allow; a /8 allow and a /32 deny",
        bind: "::",
        allow: &["127.0.0.0/8", "::1"],
        deny: &["127.0.0.3"],
        rows: &[
            ("127.0.0.1", Expect::Served),
            ("127.0.0.3", Expect::Denied("127.0.0.3/32")),
            ("127.1.2.3", Expect::Served),
            ("::1", Expect::Served),
        ],
    },
    Table {
        what: "an allow list excludes everyone else",
        bind: "::",
        allow: &["127.0.0.1/32"],
        deny: &[],
        rows: &[
            ("127.0.0.1", Expect::Served),
            ("127.0.0.2", Expect::NotAllowed),
            ("127.9.9.9", Expect::NotAllowed),
            ("::1", Expect::NotAllowed),
        ],
    },
    Table {
        what: "::1 denied by \"::1\"",
        bind: "::",
        allow: &[],
        deny: &["::1"],
        rows: &[
            ("::1", Expect::Denied("::1/128")),
            ("127.0.0.1", Expect::Served),
        ],
    },
    Table {
        what: "::1 allowed by \"::1\" (and the IPv4 range next to it)",
        bind: "::",
        allow: &["::1", "127.0.0.0/8"],
        deny: &[],
        rows: &[("::1", Expect::Served), ("127.0.0.4", Expect::Served)],
    },
    Table {
        what: "::1 allowed by \"::/0\"; IPv4 peers match only IPv4 rules",
        bind: "::",
        allow: &["::/0"],
        deny: &[],
        rows: &[("::1", Expect::Served), ("127.0.0.1", Expect::NotAllowed)],
    },
    Table {
        what: "::1 denied by \"::/0\"; IPv4 peers match only IPv4 rules",
        bind: "::",
        allow: &[],
        deny: &["::/0"],
        rows: &[
            ("::1", Expect::Denied("::/0")),
            ("127.0.0.1", Expect::Served),
        ],
    },
    Table {
        what: "an IPv4 peer of a dual-stack socket denied by an IPv4-mapped range",
        bind: "::",
        allow: &[],
        deny: &["::ffff:127.0.0.0/104"],
        rows: &[
            ("127.0.0.5", Expect::Denied("127.0.0.0/8")),
            ("127.0.0.1", Expect::Denied("127.0.0.0/8")),
            ("::1", Expect::Served),
        ],
    },
    Table {
        what: "empty lists let everyone in",
        bind: "::",
        allow: &[],
        deny: &[],
        rows: &[
            ("127.0.0.1", Expect::Served),
            ("127.0.0.9", Expect::Served),
            ("127.200.1.1", Expect::Served),
            ("::1", Expect::Served),
        ],
    },
    Table {
        what: "IPv4-mapped rules on a plain IPv4 socket",
        bind: "127.0.0.1",
        allow: &["::ffff:127.0.0.0/104"],
        deny: &["::ffff:127.0.0.2"],
        rows: &[
            ("127.0.0.1", Expect::Served),
            ("127.0.0.2", Expect::Denied("127.0.0.2/32")),
            ("127.0.0.6", Expect::Served),
        ],
    },
];

fn rules_daemon(table: &Table) -> Daemon {
    DaemonBuilder::new()
        .set("server", &format!("bind = {:?}", table.bind))
        .set("access", &format!("allow = {:?}", table.allow))
        .set("access", &format!("deny = {:?}", table.deny))
        .set("log", "level = \"debug\"")
        .start()
}

/// Connects from `from` and checks that the client is served (echo) or refused (exactly the
/// refusal line, then EOF, and the log line naming the rule).
fn check_row(d: &Daemon, table: &Table, from: &str, expect: Expect) {
    let what = format!(
        "{}: allow {:?}, deny {:?}, client {from}",
        table.what, table.allow, table.deny
    );
    let mut s = connect_from(d, ip(from));
    let peer = peer_label(&s);
    let reason = match expect {
        Expect::Served => {
            echo_round_trip(&mut s, format!("hello from {from}\n").as_bytes());
            s.shutdown(Shutdown::Write).unwrap();
            expect_then_eof(d, &mut s, b"", IO_TIMEOUT, &what);
            // An IPv4-mapped peer is named as plain IPv4.
            expect_log(d, &format!("{peer} online"), &what);
            return;
        }
        Expect::Denied(rule) => format!("matches access.deny rule {rule}"),
        Expect::NotAllowed => "matches no access.allow rule".to_string(),
    };
    expect_then_eof(d, &mut s, ERR_NOT_ALLOWED, IO_TIMEOUT, &what);
    expect_log(
        d,
        &format!("{peer} refused: not allowed: the address {reason}"),
        &what,
    );
    assert!(
        !d.log().contains(&format!("{peer} online")),
        "{what}: a refused client must not reach a worker{}",
        log_tail(d)
    );
}

/// Sends a datagram from `denied` (which the rule `rule` refuses), then one from `allowed`: the
/// allowed one is echoed, the denied one gets no answer and is logged (at debug) as dropped.
fn check_udp(d: &Daemon, denied: &str, rule: &str, allowed: &str) {
    let what = format!("UDP from {denied} (denied by {rule}) and from {allowed}");
    let bind = |from: &str| {
        UdpSocket::bind(SocketAddr::new(ip(from), 0))
            .unwrap_or_else(|e| panic!("{what}: cannot bind UDP on {from}: {e}"))
    };
    let (denied_sock, allowed_sock) = (bind(denied), bind(allowed));
    let (denied_msg, allowed_msg) = (&b"from a denied address"[..], &b"from an allowed one"[..]);
    denied_sock
        .send_to(denied_msg, target(d, ip(denied)))
        .unwrap();
    allowed_sock
        .send_to(allowed_msg, target(d, ip(allowed)))
        .unwrap();
    let mut buf = [0u8; 512];
    allowed_sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    match retry_eintr(|| allowed_sock.recv_from(&mut buf)) {
        Ok((n, _)) => assert_eq!(&buf[..n], allowed_msg, "{what}: the allowed echo"),
        Err(e) => panic!(
            "{what}: no echo for the allowed address: {e}{}",
            log_tail(d)
        ),
    }
    // One thread takes the datagrams in arrival order, so the denied one, sent first, has been
    // dealt with by now; the short wait is only for an answer already on its way.
    denied_sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    match retry_eintr(|| denied_sock.recv_from(&mut buf)) {
        Ok((n, from)) => panic!(
            "{what}: the denied address got an answer from {from}: {:?}{}",
            String::from_utf8_lossy(&buf[..n]),
            log_tail(d)
        ),
        Err(e) if is_timeout(&e) => {}
        Err(e) => panic!("{what}: receiving on the denied socket: {e}"),
    }
    let peer = label(denied_sock.local_addr().unwrap());
    expect_log(
        d,
        &format!(
            "{peer} udp {} B dropped: not allowed: the address matches access.deny rule {rule}",
            denied_msg.len()
        ),
        &what,
    );
}

#[test]
fn allow_and_deny_rules_for_ipv4_ipv6_and_mapped_peers() {
    for table in TABLES {
        let d = rules_daemon(table);
        for &(from, expect) in table.rows {
            check_row(&d, table, from, expect);
        }
        match table.deny {
            ["127.0.0.3"] => check_udp(&d, "127.0.0.3", "127.0.0.3/32", "127.0.0.1"),
            ["::1"] => check_udp(&d, "::1", "::1/128", "127.0.0.1"),
            ["::ffff:127.0.0.0/104"] => check_udp(&d, "127.0.0.5", "127.0.0.0/8", "::1"),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Connections per address.

/// Connects from `from`, sends a line and reads: `Ok` if it came back (served), `Err` with what
/// arrived instead if the daemon refused with `ERR too many connections ...`.
fn try_served(d: &Daemon, from: IpAddr, what: &str) -> Result<TcpStream, String> {
    let mut s = connect_from(d, from);
    let msg = b"am I in?\n";
    // A refused connection may be closed before the line is written.
    let _ = s.write_all(msg);
    let (mut got, mut chunk) = (Vec::new(), [0u8; 64]);
    while got.len() < msg.len() {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => panic!(
                "{what}: neither an echo nor a refusal within {IO_TIMEOUT:?}; got {:?}{}",
                String::from_utf8_lossy(&got),
                log_tail(d)
            ),
            Err(_) => break,
        }
    }
    if got == msg {
        return Ok(s);
    }
    let (rest, _) = read_until_eof(&mut s, IO_TIMEOUT);
    got.extend_from_slice(&rest);
    assert!(
        ERR_TOO_MANY.starts_with(&got),
        "{what}: expected an echo or {:?}, got {:?}{}",
        String::from_utf8_lossy(ERR_TOO_MANY),
        String::from_utf8_lossy(&got),
        log_tail(d)
    );
    Err(String::from_utf8_lossy(&got).into_owned())
}

#[test]
fn max_per_ip_refuses_the_ninth_connection_from_one_address_only() {
    // Loopback peers are exempt by default; this test's peers stand in for remote ones.
    let d = DaemonBuilder::new()
        .set("access", "max_per_ip = 8")
        .set("access", "exempt_loopback = false")
        .start();
    let one = ip("127.0.0.1");
    let mut open: Vec<TcpStream> = (0..8)
        .map(|i| {
            let mut s = connect_from(&d, one);
            echo_round_trip(&mut s, format!("connection {i}\n").as_bytes());
            s
        })
        .collect();

    let mut ninth = connect_from(&d, one);
    let ninth_peer = peer_label(&ninth);
    expect_then_eof(
        &d,
        &mut ninth,
        ERR_TOO_MANY,
        IO_TIMEOUT,
        "the 9th connection from 127.0.0.1",
    );
    expect_log(
        &d,
        &format!(
            "{ninth_peer} refused: 8 connections from this address are open, the limit of access.max_per_ip"
        ),
        "the 9th connection from 127.0.0.1",
    );

    // Another address has its own count, and the eight are untouched.
    let mut other = connect_from(&d, ip("127.0.0.2"));
    echo_round_trip(
        &mut other,
        b"from 127.0.0.2 while 127.0.0.1 is at its limit\n",
    );
    for (i, s) in open.iter_mut().enumerate() {
        echo_round_trip(s, format!("connection {i} still served\n").as_bytes());
    }

    // Closing one frees its place. The count drops when the worker has seen the EOF, a moment
    // after the close, so the first attempts may still be refused.
    let closed = open.remove(0);
    let closed_peer = peer_label(&closed);
    drop(closed);
    expect_log(
        &d,
        &format!("{closed_peer} offline"),
        "closing one of the eight",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refusals = Vec::new();
    let mut again = loop {
        match try_served(&d, one, "a new connection after one of the eight closed") {
            Ok(s) => break s,
            Err(got) => refusals.push(got),
        }
        assert!(
            Instant::now() < deadline,
            "a new connection from 127.0.0.1 was still refused 5 s after one of the eight \
             closed: {refusals:?}{}",
            log_tail(&d)
        );
        thread::sleep(Duration::from_millis(50));
    };
    echo_round_trip(&mut again, b"back in\n");
    if !refusals.is_empty() {
        eprintln!(
            "note: {} attempt(s) refused in the moment after the close",
            refusals.len()
        );
    }
    // Full again: the next one is refused.
    let mut over = connect_from(&d, one);
    expect_then_eof(
        &d,
        &mut over,
        ERR_TOO_MANY,
        IO_TIMEOUT,
        "a 9th connection again",
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Upload keys and require_token.

fn keyed_daemon(key_path: &Path, require_token: bool) -> Daemon {
    let mut b =
        DaemonBuilder::new().set("files", &format!("token_file = {:?}", path_str(key_path)));
    if require_token {
        b = b.set("access", "require_token = true");
    }
    b.start()
}

/// `ferryd send --to <daemon> [--key-file KEY] FILE...`, run to completion.
fn send_files(d: &Daemon, key_file: Option<&Path>, files: &[&Path]) -> Output {
    let to = d.addr().to_string();
    let mut args = vec!["send", "--to", &to];
    if let Some(k) = key_file {
        args.extend(["--key-file", path_str(k)]);
    }
    args.extend(files.iter().map(|f| path_str(f)));
    run_ferryd(&args, &[])
}

fn send_file(d: &Daemon, key_file: Option<&Path>, file: &Path) -> Output {
    send_files(d, key_file, &[file])
}

/// Sends `frame` on `s`, half-closes (so the daemon's drain of a refused frame ends at once) and
/// expects `ERR unauthorized ...` then EOF.
fn expect_unauthorized(d: &Daemon, s: &mut TcpStream, frame: &[u8], what: &str) {
    send_all(d, s, frame, what);
    s.shutdown(Shutdown::Write).unwrap();
    expect_err_then_eof(d, s, "unauthorized", what);
}

#[test]
fn uploads_need_the_right_key_and_a_fresh_tag() {
    let keys = TempDir::new();
    let key_path = write_key(&keys, "upload.key", UPLOAD_KEY);
    let other_path = write_key(&keys, "other.key", OTHER_KEY);
    let d = keyed_daemon(&key_path, false);
    let uploads = d.uploads();
    let src = TempDir::new();
    let mut rng = Rng::new(3);
    let (right, other) = (key(UPLOAD_KEY), key(OTHER_KEY));

    // `ferryd send --key-file` with the right key: two files on one connection (tags for seq 0
    // and 1), stored byte for byte.
    let sent = [
        ("right.bin", rng.bytes(100_000)),
        ("right2.bin", rng.bytes(7)),
    ];
    let paths: Vec<PathBuf> = sent.iter().map(|(n, b)| write_file(&src, n, b)).collect();
    let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let out = send_files(&d, Some(&key_path), &paths);
    for (name, body) in &sent {
        let want = ok_line(name, body);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(want.trim_end()),
            "send with the right key: want {want:?}\n{}{}",
            describe(&out),
            log_tail(&d)
        );
        assert!(
            fs::read(uploads.join(name)).ok().as_ref() == Some(body),
            "{name} is not stored byte for byte"
        );
    }

    // A different key, and no key at all: refused, exit 1, nothing stored.
    let body = rng.bytes(5_000);
    let out = send_file(&d, Some(&other_path), &write_file(&src, "wrong.bin", &body));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.code() == Some(1) && stdout.contains("ERR unauthorized"),
        "send with another key: want exit 1 and ERR unauthorized\n{}{}",
        describe(&out),
        log_tail(&d)
    );
    let out = send_file(&d, None, &write_file(&src, "nokey.bin", &body));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.code() == Some(1)
            && said.contains("unauthorized")
            && said.contains("--key-file"),
        "send without a key: want exit 1 and a message naming unauthorized and --key-file\n{}{}",
        describe(&out),
        log_tail(&d)
    );

    // Raw frames: two good ones on one connection (seq 0, then 1).
    let mut s = d.connect();
    let nonce = read_nonce(&d, &mut s, "raw connection");
    let (a, b) = (rng.bytes(3000), rng.bytes(40));
    send_all(
        &d,
        &mut s,
        &signed_frame(&right, &nonce, 0, "raw-a.bin", &a),
        "raw-a",
    );
    assert_eq!(read_line(&mut s), ok_line("raw-a.bin", &a), "raw-a, seq 0");
    send_all(
        &d,
        &mut s,
        &signed_frame(&right, &nonce, 1, "raw-b.bin", &b),
        "raw-b",
    );
    assert_eq!(read_line(&mut s), ok_line("raw-b.bin", &b), "raw-b, seq 1");
    drop(s);

    // Bad raw frames, each on a fresh connection.
    let body = rng.bytes(2000);
    let name = "bad.bin";
    let cases: Vec<(&str, Make<Vec<u8>>)> = vec![
        (
            "no tag (flag bit 0 clear)",
            Box::new(|_| assemble(&header_for(name, &body, false), name, None, &body)),
        ),
        (
            "tagged with another key",
            Box::new(|n| signed_frame(&other, n, 0, name, &body)),
        ),
        (
            "tag computed for another name",
            Box::new(|n| {
                let header = header_for(name, &body, true);
                let tag = right.upload_tag(n, 0, &header, b"other.bin");
                assemble(&header, name, Some(&tag), &body)
            }),
        ),
        (
            "tag computed for another header (size)",
            Box::new(|n| {
                let mut bigger = body.clone();
                bigger.push(0);
                let tag = right.upload_tag(n, 0, &header_for(name, &bigger, true), name.as_bytes());
                assemble(&header_for(name, &body, true), name, Some(&tag), &body)
            }),
        ),
        (
            "tag computed for another header (checksum)",
            Box::new(|n| {
                let mut header = header_for(name, &body, true);
                header[HEADER_LEN - 1] ^= 1;
                let tag = right.upload_tag(n, 0, &header, name.as_bytes());
                assemble(&header_for(name, &body, true), name, Some(&tag), &body)
            }),
        ),
        (
            "tag for seq 1 on a first frame",
            Box::new(|n| signed_frame(&right, n, 1, name, &body)),
        ),
        (
            "tag for another nonce",
            Box::new(|n| {
                let mut other_nonce = *n;
                other_nonce[0] ^= 1;
                signed_frame(&right, &other_nonce, 0, name, &body)
            }),
        ),
        (
            "tag cut short (31 bytes, then the body)",
            Box::new(|n| {
                let header = header_for(name, &body, true);
                let tag = right.upload_tag(n, 0, &header, name.as_bytes());
                assemble(&header, name, Some(&tag[..31]), &body)
            }),
        ),
    ];
    for (what, make) in &cases {
        let mut s = d.connect();
        let nonce = read_nonce(&d, &mut s, what);
        expect_unauthorized(&d, &mut s, &make(&nonce), what);
    }

    // Replays. Connection 1 sends a good frame (its nonce, seq 0) and then the same bytes
    // again, which would need seq 1; connection 2 replays them under its own nonce.
    let body = rng.bytes(1234);
    let mut c1 = d.connect();
    let nonce1 = read_nonce(&d, &mut c1, "replay connection 1");
    let recorded = signed_frame(&right, &nonce1, 0, "replay.bin", &body);
    send_all(&d, &mut c1, &recorded, "the recorded frame");
    assert_eq!(
        read_line(&mut c1),
        ok_line("replay.bin", &body),
        "the recorded frame, first time"
    );
    let mut c2 = d.connect();
    let nonce2 = read_nonce(&d, &mut c2, "replay connection 2");
    assert_ne!(nonce1, nonce2, "two connections got the same nonce");
    expect_unauthorized(
        &d,
        &mut c1,
        &recorded,
        "the same frame again on connection 1 (seq 0 again)",
    );
    expect_unauthorized(&d, &mut c2, &recorded, "the frame replayed on connection 2");

    // Only the good uploads are there: no refused file, no .part.
    let mut want = vec![
        "raw-a.bin",
        "raw-b.bin",
        "replay.bin",
        "right.bin",
        "right2.bin",
    ];
    want.sort();
    assert_eq!(
        names_in(&uploads),
        want,
        "files in the upload dir{}",
        log_tail(&d)
    );
}

#[test]
fn require_token_locks_text_until_a_good_auth_line() {
    let keys = TempDir::new();
    let key_path = write_key(&keys, "upload.key", UPLOAD_KEY);
    let d = keyed_daemon(&key_path, true);
    let right = key(UPLOAD_KEY);

    // Text first: refused.
    let mut s = d.connect();
    read_nonce(&d, &mut s, "text before AUTH");
    expect_unauthorized(&d, &mut s, b"hello\n", "text before AUTH");

    // The right AUTH line, then text (in separate writes, then in one).
    let mut s = d.connect();
    let nonce = read_nonce(&d, &mut s, "AUTH then text");
    let auth_line = format!("AUTH {}\n", hex(&right.auth_tag(&nonce)));
    send_all(&d, &mut s, auth_line.as_bytes(), "the AUTH line");
    assert_eq!(read_line(&mut s), OK_AUTH, "the answer to a good AUTH line");
    echo_round_trip(&mut s, b"hello after AUTH\n");
    echo_round_trip(&mut s, b"and again\n");
    let old_nonce = nonce;

    let mut s = d.connect();
    let nonce = read_nonce(&d, &mut s, "AUTH and text in one write");
    let both = format!(
        "AUTH {}\nsame write\n",
        hex(&right.auth_tag(&nonce)).to_uppercase()
    );
    send_all(&d, &mut s, both.as_bytes(), "AUTH and text in one write");
    assert_eq!(read_line(&mut s), OK_AUTH, "AUTH and text in one write");
    assert_eq!(
        read_line(&mut s),
        "same write\n",
        "text after AUTH in one write"
    );

    // Wrong AUTH lines: another key, another connection's nonce, not hex, no tag.
    let cases: Vec<(&str, Make<String>)> = vec![
        (
            "AUTH with another key",
            Box::new(|n| format!("AUTH {}\n", hex(&key(OTHER_KEY).auth_tag(n)))),
        ),
        (
            "AUTH replayed from an earlier connection",
            Box::new(|_| format!("AUTH {}\n", hex(&right.auth_tag(&old_nonce)))),
        ),
        ("AUTH that is not hex", Box::new(|_| "AUTH xyz\n".into())),
        ("AUTH without a tag", Box::new(|_| "AUTH\n".into())),
    ];
    for (what, make) in &cases {
        let mut s = d.connect();
        let nonce = read_nonce(&d, &mut s, what);
        expect_unauthorized(&d, &mut s, make(&nonce).as_bytes(), what);
    }
}

#[test]
fn a_connection_carries_at_most_max_files_per_connection_frames() {
    let d = DaemonBuilder::new()
        .set("access", "max_files_per_connection = 3")
        .start();
    let mut rng = Rng::new(7);
    let mut s = d.connect();
    for i in 0..3 {
        let (name, body) = (format!("f{i}.bin"), rng.bytes(1000 + i));
        send_all(
            &d,
            &mut s,
            &assemble(&header_for(&name, &body, false), &name, None, &body),
            &name,
        );
        assert_eq!(read_line(&mut s), ok_line(&name, &body), "frame {i} of 3");
    }
    // Text between frames is not a frame and does not count.
    echo_round_trip(&mut s, b"text is not a file\n");
    let body = rng.bytes(500);
    send_all(
        &d,
        &mut s,
        &assemble(&header_for("f3.bin", &body, false), "f3.bin", None, &body),
        "f3.bin",
    );
    s.shutdown(Shutdown::Write).unwrap();
    expect_err_then_eof(
        &d,
        &mut s,
        "too-many-files",
        "the 4th frame on a connection",
    );
    assert_eq!(
        names_in(&d.uploads()),
        ["f0.bin", "f1.bin", "f2.bin"],
        "the 4th file must not be stored{}",
        log_tail(&d)
    );
    // A new connection starts a new count.
    let mut s = d.connect();
    send_all(
        &d,
        &mut s,
        &assemble(&header_for("f3.bin", &body, false), "f3.bin", None, &body),
        "f3.bin again",
    );
    assert_eq!(
        read_line(&mut s),
        ok_line("f3.bin", &body),
        "f3.bin on a new connection"
    );
}

#[test]
fn header_timeout_covers_the_name_and_the_tag() {
    let keys = TempDir::new();
    let key_path = write_key(&keys, "upload.key", UPLOAD_KEY);
    let d = DaemonBuilder::new()
        .set("files", &format!("token_file = {:?}", path_str(&key_path)))
        .set(
            "access",
            &format!("header_timeout_secs = {HEADER_TIMEOUT_SECS}"),
        )
        .start();
    let right = key(UPLOAD_KEY);
    let body = [1u8; 10];
    let name = "withaname.bin";
    let want = format!("ERR timeout header not complete within {HEADER_TIMEOUT_SECS} s\n");
    let limit = Duration::from_secs(HEADER_TIMEOUT_SECS) + Duration::from_millis(1500);
    // The header and part of the name; the header, the name and part of the tag.
    let mut conns: Vec<(&str, TcpStream, Instant)> = Vec::new();
    for (what, keep) in [
        ("half the name", HEADER_LEN + 4),
        ("half the tag", HEADER_LEN + name.len() + 16),
    ] {
        let mut s = d.connect();
        let nonce = read_nonce(&d, &mut s, what);
        let frame = signed_frame(&right, &nonce, 0, name, &body);
        let started = Instant::now();
        send_all(&d, &mut s, &frame[..keep], what);
        conns.push((what, s, started));
    }
    for (what, mut s, started) in conns {
        let (got, err) = read_until_eof(&mut s, IO_TIMEOUT);
        let took = started.elapsed();
        assert!(
            err.is_none() && got == want.as_bytes() && took <= limit,
            "{what}: want {want:?} then EOF within {limit:?}, got {:?} and {} after {took:?}{}",
            String::from_utf8_lossy(&got),
            err.map_or("EOF".to_string(), |e| format!("error {e}")),
            log_tail(&d)
        );
        assert!(
            took >= Duration::from_millis(HEADER_TIMEOUT_SECS * 1000 - 50),
            "{what}: cut after {took:?}, before header_timeout_secs"
        );
    }
    assert_eq!(
        names_in(&d.uploads()),
        Vec::<String>::new(),
        "nothing is stored"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Slow peers.

const SLOW_CONNS: usize = 100;
const SLOW_THREADS: usize = 4;
const HEADER_TIMEOUT_SECS: u64 = 2;

/// One slowloris connection as its thread sees it.
struct Slow {
    stream: TcpStream,
    first_byte: Instant,
    sent: usize,
    got: Vec<u8>,
    /// When the stream ended, and the error if it did not end with EOF.
    end: Option<(Instant, Option<io::ErrorKind>)>,
}

/// What became of one slowloris connection.
struct SlowResult {
    took: Option<Duration>,
    got: String,
    error: Option<io::ErrorKind>,
}

/// Counters the slowloris threads share with the test.
#[derive(Default)]
struct SlowCounts {
    /// Connections refused `ERR busy` (and replaced) while the slow ones were being opened.
    busy: AtomicUsize,
    /// Threads that have sent the first byte on each of their connections.
    started: AtomicUsize,
    /// Connections that have ended.
    finished: AtomicUsize,
}

/// Connects from 127.0.0.1 and waits until a worker has taken the connection (its `online` log
/// line). One refused `ERR busy` is replaced and counted in `busy`: when dozens arrive at once
/// on a loaded machine, the accept thread can fill the queue before idle workers wake to empty
/// it, and this test is about connections that hold a worker.
fn connect_served(d: &Daemon, busy: &AtomicUsize) -> TcpStream {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let s = connect_from(d, ip("127.0.0.1"));
        let peer = peer_label(&s);
        let online = format!("{peer} online");
        let refused = format!("{peer} refused: busy");
        let mut was_busy = false;
        let seen = wait_until(IO_TIMEOUT, || {
            let log = d.log();
            was_busy = log.contains(&refused);
            was_busy || log.contains(&online)
        });
        assert!(
            seen,
            "{peer}: neither `online` nor `refused: busy` in the log within {IO_TIMEOUT:?}{}",
            log_tail(d)
        );
        if !was_busy {
            return s;
        }
        busy.fetch_add(1, Ordering::SeqCst);
        assert!(
            Instant::now() < deadline,
            "still refused busy after {IO_TIMEOUT:?} of retries{}",
            log_tail(d)
        );
    }
}

/// Opens `n` connections and sends each one byte of `header` per second, never finishing it,
/// until the daemon answers and closes (or 15 s pass).
fn slowloris(
    d: &Daemon,
    n: usize,
    header: &[u8],
    connected: &Barrier,
    counts: &SlowCounts,
) -> Vec<SlowResult> {
    let SlowCounts {
        busy,
        started,
        finished,
    } = counts;
    let mut conns: Vec<Slow> = (0..n)
        .map(|_| {
            let stream = connect_served(d, busy);
            stream.set_nonblocking(true).unwrap();
            Slow {
                stream,
                first_byte: Instant::now(),
                sent: 0,
                got: Vec::new(),
                end: None,
            }
        })
        .collect();
    connected.wait();
    for c in &mut conns {
        c.first_byte = Instant::now();
        (&c.stream).write_all(&header[..1]).expect("first byte");
        c.sent = 1;
    }
    started.fetch_add(1, Ordering::SeqCst);
    let give_up = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 256];
    while conns.iter().any(|c| c.end.is_none()) && Instant::now() < give_up {
        for c in conns.iter_mut().filter(|c| c.end.is_none()) {
            loop {
                match (&c.stream).read(&mut buf) {
                    Ok(0) => c.end = Some((Instant::now(), None)),
                    Ok(k) => {
                        c.got.extend_from_slice(&buf[..k]);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => c.end = Some((Instant::now(), Some(e.kind()))),
                }
                break;
            }
            if c.end.is_some() {
                finished.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let due = c.first_byte + Duration::from_secs(c.sent as u64);
            if c.got.is_empty() && c.sent < header.len() && Instant::now() >= due {
                // The daemon may close between our read and this write; the read sees it.
                if let Ok(1) = (&c.stream).write(&header[c.sent..c.sent + 1]) {
                    c.sent += 1;
                }
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    conns
        .into_iter()
        .map(|c| SlowResult {
            took: c.end.map(|(at, _)| at - c.first_byte),
            got: String::from_utf8_lossy(&c.got).into_owned(),
            error: c.end.and_then(|(_, e)| e),
        })
        .collect()
}

#[test]
fn slowloris_headers_are_cut_after_header_timeout_and_others_are_served_meanwhile() {
    let _heavy = heavy();
    let d = DaemonBuilder::new()
        .set("server", "max_connections = 128")
        .set("server", "queue_depth = 64")
        .set(
            "access",
            &format!("header_timeout_secs = {HEADER_TIMEOUT_SECS}"),
        )
        .start();
    let name = "slow.bin";
    let mut header = header_for(name, &[7u8; 100], false).to_vec();
    header.extend_from_slice(name.as_bytes());
    let src = TempDir::new();
    let small = Rng::new(4).bytes(10_000);
    let small_path = write_file(&src, "small.bin", &small);

    let connected = Barrier::new(SLOW_THREADS + 1);
    let counts = SlowCounts::default();
    let (results, echo_took, send_took, finished_meanwhile) = thread::scope(|scope| {
        let threads: Vec<_> = (0..SLOW_THREADS)
            .map(|_| {
                let (d, header, connected, counts) = (&d, &header, &connected, &counts);
                scope.spawn(move || {
                    slowloris(d, SLOW_CONNS / SLOW_THREADS, header, connected, counts)
                })
            })
            .collect();
        connected.wait();
        let all_started = wait_until(IO_TIMEOUT, || {
            counts.started.load(Ordering::SeqCst) == SLOW_THREADS
        });
        assert!(all_started, "the slowloris threads did not start");
        // Nothing more to wait for: every slow connection holds a worker (`connect_served` saw
        // it `online`) and has sent its first byte (before its thread counted as started).

        // A normal client while all the slow ones hang.
        let t = Instant::now();
        let mut s = d.connect();
        echo_round_trip(&mut s, b"a normal client\n");
        let echo_took = t.elapsed();
        drop(s);
        let t = Instant::now();
        let out = send_file(&d, None, &small_path);
        let send_took = t.elapsed();
        assert!(
            out.status.success(),
            "ferryd send during the slowloris\n{}{}",
            describe(&out),
            log_tail(&d)
        );
        let finished_meanwhile = counts.finished.load(Ordering::SeqCst);

        let results: Vec<SlowResult> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("slowloris thread"))
            .collect();
        (results, echo_took, send_took, finished_meanwhile)
    });

    let want = format!("ERR timeout header not complete within {HEADER_TIMEOUT_SECS} s\n");
    let limit = Duration::from_secs(HEADER_TIMEOUT_SECS) + Duration::from_millis(1500);
    let mut times = Vec::new();
    for (i, r) in results.iter().enumerate() {
        assert!(
            r.got == want && r.error.is_none() && r.took.is_some(),
            "slowloris connection {i}: want {want:?} then EOF, got {:?}, ended {}{}",
            r.got,
            match (r.took, r.error) {
                (None, _) => "never (15 s)".to_string(),
                (Some(t), None) => format!("with EOF after {t:?}"),
                (Some(t), Some(e)) => format!("with {e:?} after {t:?}"),
            },
            log_tail(&d)
        );
        times.extend(r.took);
    }
    times.sort();
    let (min, max) = (times[0], times[times.len() - 1]);
    println!(
        "slowloris: {} connections cut after {min:?} (min), {:?} (median), {max:?} (max) from \
         their first byte; meanwhile an echo took {echo_took:?} and ferryd send {send_took:?}; \
         {} connection(s) refused ERR busy while they were opened (and replaced)",
        times.len(),
        times[times.len() / 2],
        counts.busy.load(Ordering::SeqCst)
    );
    assert_eq!(times.len(), SLOW_CONNS);
    assert!(
        max <= limit,
        "the slowest slowloris connection was cut after {max:?}, over {limit:?}"
    );
    assert!(
        min >= Duration::from_millis(HEADER_TIMEOUT_SECS * 1000 - 50),
        "a slowloris connection was cut after {min:?}, before header_timeout_secs"
    );
    assert!(
        echo_took < Duration::from_millis(500) && send_took < Duration::from_millis(500),
        "a normal client was slow during the slowloris: echo {echo_took:?}, send {send_took:?}"
    );
    assert_eq!(
        finished_meanwhile, 0,
        "slowloris connections ended before the normal client was done: it was not tested \
         against hanging ones"
    );
    assert_eq!(
        fs::read(d.uploads().join("small.bin")).ok(),
        Some(small),
        "small.bin"
    );
    let needle = format!(
        "frame header not complete within access.header_timeout_secs = {HEADER_TIMEOUT_SECS}"
    );
    let all_logged = wait_until(Duration::from_secs(5), || {
        d.log().lines().filter(|l| l.contains(&needle)).count() == SLOW_CONNS
    });
    assert!(
        all_logged,
        "want {SLOW_CONNS} log lines with {needle:?}, got {}{}",
        d.log().lines().filter(|l| l.contains(&needle)).count(),
        log_tail(&d)
    );
}

/// Reads one line within `timeout` in all and returns it with the time it took to arrive,
/// measured from `since`.
fn timed_line(s: &mut TcpStream, since: Instant, timeout: Duration) -> (String, Duration) {
    let deadline = since + timeout;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (String::from_utf8_lossy(&line).into_owned(), since.elapsed());
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut byte) {
            Ok(1) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    return (String::from_utf8_lossy(&line).into_owned(), since.elapsed());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            _ => return (String::from_utf8_lossy(&line).into_owned(), since.elapsed()),
        }
    }
}

#[test]
fn bodies_slower_than_min_upload_rate_are_cut_and_their_part_files_removed() {
    const MIN_RATE: u64 = 100_000;
    // The window over which the daemon measures a body's rate (access.upload_rate_window_secs,
    // 10 s by default): the shortest, so that the test waits about 1 s, not 10.
    const WINDOW: Duration = Duration::from_secs(1);
    let d = DaemonBuilder::new()
        .set("access", &format!("min_upload_bytes_per_sec = {MIN_RATE}"))
        .set(
            "access",
            &format!("upload_rate_window_secs = {}", WINDOW.as_secs()),
        )
        .start();
    let uploads = d.uploads();
    let body = Rng::new(5).bytes(1 << 20);
    let want =
        format!("ERR timeout body slower than access.min_upload_bytes_per_sec = {MIN_RATE} B/s\n");
    let open_frame = |name: &str| {
        let mut s = d.connect();
        let head = assemble(&header_for(name, &body, false), name, None, &[]);
        send_all(&d, &mut s, &head, name);
        s
    };

    // A fast upload is not affected.
    let mut s = d.connect();
    send_all(
        &d,
        &mut s,
        &assemble(
            &header_for("fast.bin", &body, false),
            "fast.bin",
            None,
            &body,
        ),
        "fast.bin",
    );
    assert_eq!(
        read_line(&mut s),
        ok_line("fast.bin", &body),
        "a fast upload"
    );
    drop(s);

    let trickle = open_frame("trickle.bin");
    let mut stall = open_frame("stall.bin");
    let (trickle_line, trickle_took, stall_line, stall_took, parts_midway) =
        thread::scope(|scope| {
            // About 1 KB/s, 100 bytes every 100 ms, until the answer comes.
            let trickler = scope.spawn(|| {
                let mut writer = trickle.try_clone().unwrap();
                let start = Instant::now();
                let reader = scope.spawn(move || {
                    let mut r = trickle;
                    timed_line(&mut r, start, Duration::from_secs(20))
                });
                let mut sent = 0;
                while !reader.is_finished() && sent + 100 <= body.len() {
                    if writer.write_all(&body[sent..sent + 100]).is_err() {
                        break;
                    }
                    sent += 100;
                    thread::sleep(Duration::from_millis(100));
                }
                reader.join().expect("trickle reader")
            });
            // 1000 bytes, then nothing at all.
            send_all(&d, &mut stall, &body[..1000], "stall.bin");
            let stalled_at = Instant::now();
            let staller =
                scope.spawn(move || timed_line(&mut stall, stalled_at, Duration::from_secs(20)));
            // Both uploads have a .part file while neither has been answered yet.
            let mut parts_midway = Vec::new();
            wait_until(WINDOW, || {
                parts_midway = parts_in(&uploads);
                parts_midway.len() == 2 || trickler.is_finished() || staller.is_finished()
            });
            let answered_midway = trickler.is_finished() || staller.is_finished();
            let (tl, tt) = trickler.join().expect("trickle thread");
            let (sl, st) = staller.join().expect("stall thread");
            assert!(
                !answered_midway,
                "an upload was answered before both .part files were seen: {parts_midway:?}{}",
                log_tail(&d)
            );
            (tl, tt, sl, st, parts_midway)
        });
    println!(
        "min_upload_bytes_per_sec = {MIN_RATE}: a 1 KB/s body cut after {trickle_took:?} \
         ({trickle_line:?}); a stalled one {stall_took:?} after its last byte ({stall_line:?})"
    );
    assert_eq!(
        parts_midway.len(),
        2,
        "while both uploads are open, both should have a .part file: {parts_midway:?}{}",
        log_tail(&d)
    );
    assert!(
        trickle_line == want
            && trickle_took >= WINDOW - Duration::from_millis(500)
            && trickle_took <= WINDOW + Duration::from_secs(2),
        "a 1 KB/s body: want {want:?} {WINDOW:?} (+2 s) after its first byte, got \
         {trickle_line:?} after {trickle_took:?}{}",
        log_tail(&d)
    );
    assert!(
        stall_line == want && stall_took <= WINDOW + Duration::from_millis(1500),
        "a stalled body (idle_timeout_secs = 300): want {want:?} within {WINDOW:?} + 1.5 s of its \
         last byte, got {stall_line:?} after {stall_took:?}{}",
        log_tail(&d)
    );
    let clean = wait_until(Duration::from_secs(3), || {
        names_in(&uploads) == ["fast.bin"]
    });
    assert!(
        clean,
        "the partial files should be gone: {:?}{}",
        names_in(&uploads),
        log_tail(&d)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Garbage.

const GARBAGE_CONNS: usize = 10_000;
const GARBAGE_THREADS: usize = 8;

/// Random bytes, 0–2047 of them, of one of several shapes: plain noise, text lines with 0xF5 at
/// line starts, the prefix of a plausible header, or a whole header and name with part of the
/// body (so that the daemon creates a .part file and must remove it).
fn garbage(rng: &mut Rng) -> Vec<u8> {
    let len = rng.between(0, 2047);
    let mut out = Vec::with_capacity(len + 400);
    match rng.between(0, 4) {
        0 => out = rng.bytes(len),
        1 | 2 => {
            while out.len() < len {
                let line_len = rng.between(0, 80);
                if rng.between(0, 1) == 0 {
                    out.push(0xF5);
                    if rng.between(0, 1) == 0 {
                        out.extend_from_slice(&MAGIC[1..]);
                        out.push(rng.between(0, 2) as u8);
                    }
                }
                let noise = rng.bytes(line_len);
                out.extend(noise.into_iter().map(|b| b' ' + b % 95));
                out.push(b'\n');
            }
        }
        _ => {
            let name_len = rng.between(1, 12);
            let name: String = (0..name_len)
                .map(|_| char::from(b'a' + rng.between(0, 25) as u8))
                .collect();
            let header = Header {
                authenticated: rng.between(0, 1) == 0,
                name_len: name_len as u16,
                size: rng.between(1, 1 << 16) as u64,
                checksum: rng.bytes(32).try_into().expect("32 bytes"),
                ..Header::default()
            };
            if rng.between(0, 1) == 0 {
                out.extend_from_slice(b"some text first\n");
            }
            out.extend_from_slice(&header.encode());
            out.extend_from_slice(name.as_bytes());
            out.extend(rng.bytes(len));
        }
    }
    out.truncate(len);
    out
}

/// What one garbage thread saw.
#[derive(Default)]
struct Tally {
    connect_failed: BTreeMap<String, usize>,
    write_failed: usize,
    closed_unread: usize,
    read_to_eof: usize,
    /// `ERR <code>` lines seen, by code.
    answers: BTreeMap<String, usize>,
    /// Readers that got no `ERR` line (only their echo, or nothing).
    no_err_line: usize,
    /// Readers whose stream ended in an error instead of EOF, by kind.
    read_errors: BTreeMap<String, usize>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (k, v) in other.connect_failed {
            *self.connect_failed.entry(k).or_default() += v;
        }
        self.write_failed += other.write_failed;
        self.closed_unread += other.closed_unread;
        self.read_to_eof += other.read_to_eof;
        for (k, v) in other.answers {
            *self.answers.entry(k).or_default() += v;
        }
        self.no_err_line += other.no_err_line;
        for (k, v) in other.read_errors {
            *self.read_errors.entry(k).or_default() += v;
        }
    }
}

fn garbage_thread(to: SocketAddr, from: IpAddr, n: usize, seed: u64) -> Tally {
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    for i in 0..n {
        let payload = garbage(&mut rng);
        let mut s = match try_connect_from(from, to) {
            Ok(s) => s,
            Err(e) => {
                *tally
                    .connect_failed
                    .entry(format!("{:?}", e.kind()))
                    .or_default() += 1;
                continue;
            }
        };
        if s.write_all(&payload).is_err() {
            tally.write_failed += 1;
        }
        if i % 2 == 0 {
            tally.closed_unread += 1;
            continue;
        }
        tally.read_to_eof += 1;
        let _ = s.shutdown(Shutdown::Write);
        let (got, err) = read_until_eof(&mut s, IO_TIMEOUT);
        let mut saw_err = false;
        for line in got.split(|&b| b == b'\n') {
            if let Some(rest) = line.strip_prefix(b"ERR ") {
                let code = rest.split(|&b| b == b' ').next().unwrap_or_default();
                let code = String::from_utf8_lossy(code).into_owned();
                *tally.answers.entry(code).or_default() += 1;
                saw_err = true;
            }
        }
        if !saw_err {
            tally.no_err_line += 1;
        }
        if let Some(e) = err {
            *tally
                .read_errors
                .entry(format!("{:?}", e.kind()))
                .or_default() += 1;
        }
    }
    tally
}

#[test]
fn ten_thousand_garbage_connections_leave_the_daemon_as_it_was() {
    let _heavy = heavy();
    let mut d = DaemonBuilder::new()
        .set("server", "max_connections = 64")
        .set("server", "queue_depth = 256")
        .start();
    let uploads = d.uploads();
    // Warm up: one echo and one upload, so lazily set-up state is not counted as growth.
    let mut s = d.connect();
    echo_round_trip(&mut s, b"warm-up\n");
    let warm = b"warm-up body".to_vec();
    send_all(
        &d,
        &mut s,
        &assemble(
            &header_for("warm.bin", &warm, false),
            "warm.bin",
            None,
            &warm,
        ),
        "warm-up",
    );
    assert_eq!(
        read_line(&mut s),
        ok_line("warm.bin", &warm),
        "warm-up upload"
    );
    drop(s);
    let _ = wait_until(Duration::from_secs(2), || {
        d.log().matches(" offline ").count() == 1
    });
    let (fd_base, rss_base) = (d.fd_count(), d.rss_kib());

    let t = Instant::now();
    let to = d.addr();
    let mut tally = Tally::default();
    thread::scope(|scope| {
        let threads: Vec<_> = (0..GARBAGE_THREADS)
            .map(|i| {
                // Each thread has its own source address, so no one address runs out of ports.
                let from = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 10 + i as u8));
                scope.spawn(move || {
                    garbage_thread(to, from, GARBAGE_CONNS / GARBAGE_THREADS, 100 + i as u64)
                })
            })
            .collect();
        for t in threads {
            tally.merge(t.join().expect("garbage thread"));
        }
    });
    let took = t.elapsed();

    let fd_back = wait_until(Duration::from_secs(5), || d.fd_count() <= fd_base);
    let (fd_after, rss_after) = (d.fd_count(), d.rss_kib());
    let parts_gone = wait_until(Duration::from_secs(5), || parts_in(&uploads).is_empty());
    println!(
        "garbage: {GARBAGE_CONNS} connections in {took:?}: {} closed unread, {} read to EOF; \
         ERR lines seen by code: {:?}; readers with no ERR line: {}; read errors: {:?}; \
         failed writes: {}; failed connects: {:?}; descriptors {fd_base} -> {fd_after}; \
         RSS {rss_base} -> {rss_after} KiB; files left in the upload dir: {:?}",
        tally.closed_unread,
        tally.read_to_eof,
        tally.answers,
        tally.no_err_line,
        tally.read_errors,
        tally.write_failed,
        tally.connect_failed,
        names_in(&uploads)
    );

    assert!(
        d.wait_exit(Duration::ZERO).is_none(),
        "ferryd exited during the garbage flood{}",
        log_tail(&d)
    );
    let log = d.log();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "panics in the log: {panics:#?}");
    assert!(
        tally.connect_failed.is_empty(),
        "connects failed: {:?}",
        tally.connect_failed
    );
    assert!(
        !tally.read_errors.contains_key("TimedOut")
            && !tally.read_errors.contains_key("WouldBlock"),
        "some half-closed readers got no EOF within {IO_TIMEOUT:?}: {:?}",
        tally.read_errors
    );
    assert!(
        fd_back,
        "descriptors: {fd_base} before, still {fd_after} 5 s after the flood{}",
        log_tail(&d)
    );
    assert!(
        rss_after <= rss_base + 8 * 1024,
        "RSS grew from {rss_base} KiB to {rss_after} KiB (more than 8 MiB)"
    );
    assert!(
        parts_gone,
        ".part files left after the flood: {:?}{}",
        parts_in(&uploads),
        log_tail(&d)
    );

    // Still serving: an echo and an upload.
    let mut s = d.connect();
    echo_round_trip(&mut s, b"after the flood\n");
    let body = Rng::new(6).bytes(50_000);
    send_all(
        &d,
        &mut s,
        &assemble(
            &header_for("after.bin", &body, false),
            "after.bin",
            None,
            &body,
        ),
        "after.bin",
    );
    assert_eq!(
        read_line(&mut s),
        ok_line("after.bin", &body),
        "an upload after the flood"
    );
    assert_eq!(
        fs::read(uploads.join("after.bin")).ok(),
        Some(body),
        "after.bin"
    );
}
