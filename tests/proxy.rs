//! `access.proxy_protocol_from` against the real binary, with PROXY v1 and v2 headers written by
//! the test (the HAProxy test is `tests/haproxy.rs`): the carried client address is the one the
//! access rules, `max_per_ip`, the log lines, chat welcomes and the hook's `{peer}` see; a
//! balancer's connection without a valid header in time is told so and closed; direct
//! connections from elsewhere are unchanged; a client's bytes right behind the header are kept;
//! the queue orders a balancer's connections by their clients, as it does direct ones.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use support::{
    Daemon, DaemonBuilder, connect_from, echo_round_trip, expect_err_then_eof, expect_then_eof,
    frame, ip, ok_line, path_str, read_line, run_ferryd, stdout_of, wait_until,
};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The balancer's address in these tests; clients connect directly from 127.0.0.3.
const BALANCER: &str = "127.0.0.2";

/// A v1 header for a TCP4 client at `src`.
fn v1(src: &str) -> Vec<u8> {
    let src: SocketAddr = src.parse().unwrap();
    format!("PROXY TCP4 {} 127.0.0.1 {} 7000\r\n", src.ip(), src.port()).into_bytes()
}

/// A v2 header (PROXY command, TCP over IPv4) for a client at `src`.
fn v2(src: &str) -> Vec<u8> {
    let SocketAddr::V4(src) = src.parse().unwrap() else {
        panic!("an IPv4 address")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&7000u16.to_be_bytes());
    h
}

fn daemon(extra: &[(&str, &str)]) -> Daemon {
    let mut b = DaemonBuilder::new()
        .set(
            "access",
            &format!("proxy_protocol_from = [\"{BALANCER}/32\"]"),
        )
        .set("access", "deny = [\"198.51.100.66\", \"127.0.0.4\"]")
        .set("access", "header_timeout_secs = 1");
    for (table, line) in extra {
        b = b.set(table, line);
    }
    b.start()
}

/// A connection from the balancer that sends `header` (and `then`, in the same write).
fn through(d: &Daemon, header: &[u8], then: &[u8]) -> TcpStream {
    let mut s = connect_from(d, ip(BALANCER));
    s.write_all(&[header, then].concat()).unwrap();
    s
}

#[test]
fn the_carried_address_is_the_one_rules_logs_and_counts_see() {
    let d = daemon(&[
        ("access", "max_per_ip = 1"),
        ("access", "exempt_loopback = false"),
    ]);
    // v1 and v2, each with the client's first line in the same segment as the header.
    let mut a = through(&d, &v1("203.0.113.5:40001"), b"first\n");
    assert_eq!(read_line(&mut a), "first\n");
    echo_round_trip(&mut a, b"more\n");
    d.wait_log(
        &format!("[203.0.113.5:40001] online (through [{BALANCER}:"),
        IO_TIMEOUT,
    );
    let mut b = through(&d, &v2("203.0.113.6:40002"), b"");
    echo_round_trip(&mut b, b"two\n");
    d.wait_log("[203.0.113.6:40002] online", IO_TIMEOUT);
    assert!(d.log().contains("PROXY v2)"), "{}", d.log());
    // max_per_ip counts the client, not the balancer: a second one from 203.0.113.5 is refused
    // while the balancer holds three connections.
    let mut again = through(&d, &v2("203.0.113.5:40003"), b"");
    expect_err_then_eof(&d, &mut again, "too-many-connections", "a second from .5");
    d.wait_log(
        "[203.0.113.5:40003] refused: 1 connections from this address are open",
        IO_TIMEOUT,
    );
    // A denied client through the balancer is refused under its own address.
    let mut denied = through(&d, &v1("198.51.100.66:5000"), b"hello\n");
    expect_err_then_eof(&d, &mut denied, "not-allowed", "a denied client");
    d.wait_log(
        "[198.51.100.66:5000] refused: not allowed: the address matches access.deny rule 198.51.100.66/32",
        IO_TIMEOUT,
    );
    // The offline line names the client too.
    drop(a);
    d.wait_log("[203.0.113.5:40001] offline", IO_TIMEOUT);
    // Direct connections are as before: served from 127.0.0.3, refused from 127.0.0.4, and a
    // PROXY header from them is just text.
    let mut direct = connect_from(&d, ip("127.0.0.3"));
    echo_round_trip(&mut direct, b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n");
    d.wait_log("[127.0.0.3:", IO_TIMEOUT);
    let mut refused = connect_from(&d, ip("127.0.0.4"));
    expect_err_then_eof(&d, &mut refused, "not-allowed", "a denied direct peer");
    // UDP is not affected: a datagram from the balancer's address is echoed as it is.
    let udp = UdpSocket::bind((ip(BALANCER), 0)).unwrap();
    udp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    udp.send_to(b"datagram\n", d.addr()).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"datagram\n");
    // A health check (v2 LOCAL) is the balancer's own connection.
    let mut local = through(&d, b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00", b"");
    echo_round_trip(&mut local, b"check\n");
    d.wait_log(&format!("[{BALANCER}:"), IO_TIMEOUT);
}

#[test]
fn a_balancer_connection_without_a_valid_header_is_told_and_closed() {
    let d = daemon(&[]);
    // Nothing at all: `ERR timeout` after header_timeout_secs (1 s), well before idle.
    let started = Instant::now();
    let mut silent = connect_from(&d, ip(BALANCER));
    let line = expect_err_then_eof(&d, &mut silent, "timeout", "no header");
    assert!(line.contains("no PROXY header within 1 s"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Half a header, then silence: the same.
    let mut half = through(&d, &v2("203.0.113.9:1")[..20], b"");
    expect_err_then_eof(&d, &mut half, "timeout", "half a header");
    // Text instead of a header, and a header that is not valid.
    let mut text = through(&d, b"hello\n", b"");
    let line = expect_err_then_eof(&d, &mut text, "bad-header", "text");
    assert!(line.contains("no PROXY protocol signature"), "{line}");
    let mut bad = through(&d, b"PROXY TCP4 nonsense here\r\n", b"");
    expect_err_then_eof(&d, &mut bad, "bad-header", "a bad v1 line");
    d.wait_log(
        "refused: no whole PROXY header within 1 s, access.header_timeout_secs",
        IO_TIMEOUT,
    );
    d.wait_log("refused: invalid PROXY header", IO_TIMEOUT);
    // Every worker is free again and a good connection is served.
    let mut good = through(&d, &v1("203.0.113.10:2"), b"");
    echo_round_trip(&mut good, b"still here\n");
}

#[test]
fn chat_welcomes_and_hook_peers_name_the_client() {
    let d = daemon(&[("server", "mode = \"chat\"")]);
    let mut a = through(&d, &v2("203.0.113.20:1111"), b"");
    assert_eq!(
        read_line(&mut a),
        "* welcome [203.0.113.20:1111]; nobody else is here\n"
    );
    let mut b = through(&d, &v1("203.0.113.21:2222"), b"");
    assert_eq!(
        read_line(&mut b),
        "* welcome [203.0.113.21:2222]; here: [203.0.113.20:1111]\n"
    );
    drop((a, b));

    let out = support::TempDir::new();
    let peers = out.path().join("peers");
    let hook = format!(
        "on_stored = [\"/bin/sh\", \"-c\", \"echo \\\"$1\\\" >> {}\", \"sh\", \"{{peer}}\"]",
        peers.display()
    );
    let d = daemon(&[("files", &hook)]);
    let mut up = through(
        &d,
        &v2("203.0.113.30:3333"),
        &frame("p.txt", b"proxied body"),
    );
    assert_eq!(read_line(&mut up), ok_line("p.txt", b"proxied body"));
    assert!(
        wait_until(IO_TIMEOUT, || std::fs::read_to_string(&peers)
            .is_ok_and(|s| s.contains('\n'))),
        "the hook did not run{}",
        support::log_tail(&d)
    );
    assert_eq!(
        std::fs::read_to_string(&peers).unwrap(),
        "203.0.113.30:3333\n"
    );
}

/// The busy client and the quiet one of the queue test.
const BUSY: &str = "203.0.113.40";
const QUIET: &str = "203.0.113.41";

#[test]
fn behind_a_balancer_a_quiet_client_goes_before_a_busy_clients_later_connections() {
    let ctl = support::TempDir::new();
    let sock = ctl.path().join("control.sock");
    let control = format!("socket = {:?}", path_str(&sock));
    let d = daemon(&[
        ("server", "max_connections = 1"),
        ("server", "queue_depth = 32"),
        ("server", "queue_timeout_secs = 60"),
        ("access", "max_per_ip = 32"),
        ("control", &control),
        ("log", "level = \"debug\""),
    ]);
    // The one worker is held by the busy client's upload in progress (a frame is never cut to
    // make room).
    let body = vec![5u8; 100_000];
    let whole = frame("held.bin", &body);
    let head_len = whole.len() - body.len();
    let mut holder = through(&d, &v2(&format!("{BUSY}:30000")), &whole[..head_len + 1000]);
    d.wait_log(&format!("[{BUSY}:30000] online"), IO_TIMEOUT);
    // Eight more connections of the busy client (PROXY v2), then one of the quiet client (v1),
    // all through the balancer. Each sends one line and ends its sending side, so that once
    // served it ends at once and the worker goes on to the next.
    let clients: Vec<String> = (1..=8)
        .map(|i| format!("{BUSY}:{}", 30000 + i))
        .chain([format!("{QUIET}:40000")])
        .collect();
    let mut waiting: Vec<TcpStream> = clients
        .iter()
        .map(|c| {
            let header = if c.starts_with(QUIET) { v1(c) } else { v2(c) };
            let s = through(&d, &header, format!("from {c}\n").as_bytes());
            s.shutdown(std::net::Shutdown::Write).unwrap();
            s
        })
        .collect();
    let mut status = String::new();
    let all_queued = wait_until(IO_TIMEOUT, || {
        let out = run_ferryd(&["ctl", "--socket", path_str(&sock), "stats"], &[]);
        status = stdout_of(&out);
        status.contains("status: 1 open, 9 queued")
    });
    assert!(
        all_queued,
        "not all queued: {status}{}",
        support::log_tail(&d)
    );
    // The upload ends and its connection closes: the worker takes the waiting ones.
    holder.write_all(&whole[head_len + 1000..]).unwrap();
    assert_eq!(read_line(&mut holder), ok_line("held.bin", &body));
    drop(holder);
    for (c, s) in clients.iter().zip(&mut waiting) {
        let line = format!("from {c}\n");
        expect_then_eof(&d, s, line.as_bytes(), IO_TIMEOUT, c);
    }
    // The order in which they were served: their `online` lines (the log is read by another
    // thread: wait until it has them all).
    for c in &clients {
        d.wait_log(&format!("[{c}] online (through"), IO_TIMEOUT);
    }
    let log = d.log();
    let online = |c: &String| {
        log.find(&format!("[{c}] online (through"))
            .unwrap_or_else(|| panic!("no online line for {c}\n{log}"))
    };
    let quiet_at = online(&clients[8]);
    let busy_before = clients[..8].iter().filter(|c| online(c) < quiet_at).count();
    // Its first waiting connection may find the busy client still light (its upload's ended);
    // the later ones wait behind the quiet client, as direct connections would.
    assert!(
        busy_before <= 1,
        "{busy_before} of the busy client's 8 waiting connections were served before the quiet one\n{log}"
    );
}
