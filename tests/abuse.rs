//! Attacks a stranger on the network could make, each performed against the real daemon over
//! loopback (many source addresses from 127.0.0.0/8) with its outcome asserted: a refusal flood
//! against the log's bound, descriptor exhaustion, a UDP burst, ten local windows on the default
//! config, a hostile server against `ferryd send`, a locked chat read without the key, and text
//! slowloris and never-reading peers against a legitimate client's service.

mod support;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use support::{
    Daemon, DaemonBuilder, TempDir, echo_round_trip, log_tail, read_until_eof, run_ferryd,
    wait_until,
};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const ERR_BUSY: &[u8] = b"ERR busy server busy, try again later\n";
const ERR_TOO_MANY: &[u8] = b"ERR too-many-connections too many connections from your address\n";

/// Held by the tests that load the machine or measure latencies, so that they never overlap.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} is not an address: {e}"))
}

/// A TCP connection to `d` from the local address `from` (any port), with 10 s timeouts. The
/// socket has SO_REUSEADDR so that the TIME_WAIT it may leave never blocks a later bind.
fn try_connect_from(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), IO_TIMEOUT)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn connect_from(d: &Daemon, from: IpAddr) -> TcpStream {
    try_connect_from(from, d.addr())
        .unwrap_or_else(|e| panic!("connect from {from} to {}: {e}{}", d.addr(), log_tail(d)))
}

// ---------------------------------------------------------------------------------------------
// Point 6: a refusal flood cannot grow the log faster than its documented bound.

#[test]
fn a_refusal_flood_is_logged_within_the_bound_and_summed_up() {
    let _heavy = heavy();
    let d = DaemonBuilder::new()
        .set("access", "max_per_ip = 1")
        .set("access", "exempt_loopback = false")
        .set("log", "refusal_summary_secs = 2")
        .start();
    // One connection holds the address's only place; every further one is refused.
    let mut holder = connect_from(&d, ip("127.0.0.7"));
    echo_round_trip(&mut holder, b"holding the place\n");
    let lines_before = d.log().lines().count();
    let flood_for = Duration::from_secs(5);
    let started = Instant::now();
    let mut refused = 0u64;
    while started.elapsed() < flood_for {
        match try_connect_from(ip("127.0.0.7"), d.addr()) {
            // Closed at once, without reading: the loop is as fast as the daemon accepts.
            Ok(s) => drop(s),
            Err(e) => panic!("connect during the flood: {e}{}", log_tail(&d)),
        }
        refused += 1;
    }
    let took = started.elapsed();
    // Every refusal is either on its own line or in a summary; the summary of the last window
    // comes within one more interval.
    let want = "connections (access.max_per_ip) in the last";
    let accounted = || {
        let log = d.log();
        let summarised: u64 = log
            .lines()
            .filter(|l| l.contains(want))
            .map(|l| {
                // "refused N connections (...) in the last S s, M not logged one by one, ..."
                let n = l
                    .split(", ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .unwrap_or("0");
                n.replace(',', "").parse::<u64>().unwrap_or(0)
            })
            .sum();
        let one_by_one = log
            .lines()
            .filter(|l| l.contains("refused: 1 connections from this address are open"))
            .count() as u64;
        (one_by_one, summarised)
    };
    let all_there = wait_until(Duration::from_secs(6), || {
        let (a, b) = accounted();
        a + b >= refused
    });
    let (one_by_one, summarised) = accounted();
    let log = d.log();
    let flood_lines = log.lines().count() - lines_before;
    let per_sec = flood_lines as f64 / took.as_secs_f64();
    println!(
        "refusal flood: {refused} connections in {took:.1?} ({:.0}/s), {flood_lines} log lines \
         ({per_sec:.1} lines/s): {one_by_one} one by one, {summarised} counted in summaries",
        refused as f64 / took.as_secs_f64()
    );
    assert!(
        refused >= 1000,
        "the flood was too weak to test anything: {refused} connections"
    );
    // The bound: a burst of 50 lines, one a second after it, one summary per interval (2 s),
    // plus the line of the holder and slack for the last second.
    let bound = 50 + took.as_secs() as usize + 1 + (took.as_secs() as usize / 2 + 2) + 4;
    assert!(
        flood_lines <= bound,
        "{flood_lines} log lines during a flood of {refused} refusals over {took:?} (bound {bound}){}",
        log_tail(&d)
    );
    // Nothing is lost: every refusal is either on its own line or in a summary.
    assert!(
        all_there,
        "{one_by_one} lines + {summarised} summarised < {refused} refusals{}",
        log_tail(&d)
    );
    assert!(
        log.contains("most from 127.0.0.7 ("),
        "the summary names the address{}",
        log_tail(&d)
    );
    echo_round_trip(&mut holder, b"still served after the flood\n");
}

// ---------------------------------------------------------------------------------------------
// Point 8: at the descriptor limit newcomers are told ERR busy, and start-up warns.

/// The soft and hard "Max open files" of process `pid`.
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("")
        .to_string();
    let words: Vec<&str> = line.split_whitespace().collect();
    (
        words.get(3).unwrap_or(&"").to_string(),
        words.get(4).unwrap_or(&"").to_string(),
    )
}

#[test]
fn out_of_descriptors_newcomers_get_busy_and_start_up_warns() {
    let _heavy = heavy();
    let d = DaemonBuilder::new()
        .set("server", "max_connections = 100")
        .set("server", "queue_depth = 100")
        .shell_prefix("ulimit -n 40")
        .start();
    assert_eq!(
        nofile(d.pid()).0,
        "40",
        "the daemon runs with 40 descriptors"
    );
    let warning = d.wait_log(
        "the descriptor limit (RLIMIT_NOFILE) is 40 (hard 40)",
        IO_TIMEOUT,
    );
    assert!(
        warning.contains("need about 332"),
        "the warning names what the limits need{}",
        log_tail(&d)
    );

    // 60 clients: those that fit are served, every other one is told ERR busy at once; none
    // waits unanswered.
    let mut served = Vec::new();
    let mut busy = 0;
    for i in 0..60 {
        let mut s = d.connect();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let line = format!("client {i}\n");
        let _ = s.write_all(line.as_bytes());
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(3);
        while got.len() < line.len() && Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if got == line.as_bytes() {
            served.push(s);
        } else {
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(ERR_BUSY),
                "client {i} was neither served nor told busy{}",
                log_tail(&d)
            );
            busy += 1;
        }
    }
    println!(
        "at 40 descriptors: {} clients served, {busy} told ERR busy",
        served.len()
    );
    assert!(
        busy > 0 && served.len() > 10,
        "{} served, {busy} busy",
        served.len()
    );
    assert!(
        d.log().contains("refused: busy (out of file descriptors"),
        "{}",
        log_tail(&d)
    );
    // When the descriptors come back, everyone is served again.
    drop(served);
    let mut s = d.connect();
    let ok = wait_until(IO_TIMEOUT, || {
        s = d.connect();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"back\n").is_ok() && {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).is_ok() && &buf == b"back\n"
        }
    });
    assert!(
        ok,
        "not served after the descriptors came back{}",
        log_tail(&d)
    );
}

#[test]
fn a_low_soft_descriptor_limit_is_raised_to_what_the_config_needs() {
    let d = DaemonBuilder::new()
        .shell_prefix("ulimit -Sn 64 && ulimit -Hn 4096")
        .start();
    d.wait_log(
        "raised the descriptor limit (RLIMIT_NOFILE) from 64 to 176",
        IO_TIMEOUT,
    );
    assert_eq!(nofile(d.pid()), ("176".to_string(), "4096".to_string()));
    assert!(!d.log().contains("the descriptor limit (RLIMIT_NOFILE) is"));
}

// ---------------------------------------------------------------------------------------------
// Point 9: a script's burst of a few hundred datagrams is answered whole on the default config.

#[test]
fn a_burst_of_datagrams_is_answered_whole_on_the_default_config() {
    let _heavy = heavy();
    const BURST: usize = 500;
    let d = DaemonBuilder::new().start();
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    // The client's own buffer must hold the answers too.
    socket2::SockRef::from(&sock)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), d.port());
    for i in 0..BURST {
        let msg = format!("datagram {i:04} of a script's burst");
        sock.send_to(msg.as_bytes(), to).unwrap();
    }
    let mut got = vec![false; BURST];
    let mut buf = [0u8; 256];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some(i) = text
            .strip_prefix("datagram ")
            .and_then(|r| r.get(..4))
            .and_then(|n| n.parse::<usize>().ok())
        {
            got[i] = true;
        }
        if got.iter().all(|&g| g) {
            break;
        }
    }
    let answered = got.iter().filter(|&&g| g).count();
    println!("udp burst: {answered} of {BURST} datagrams answered");
    assert_eq!(
        answered,
        BURST,
        "a burst of {BURST} datagrams{}",
        log_tail(&d)
    );
}

// ---------------------------------------------------------------------------------------------
// Point 10: ten local windows on the default config; remote addresses keep the cap.

#[test]
fn ten_local_clients_are_served_on_the_default_config() {
    // `max_per_ip = 8` is the default; written out because the test builder otherwise raises it.
    let d = DaemonBuilder::new().set("access", "max_per_ip = 8").start();
    let mut clients: Vec<TcpStream> = (0..10).map(|_| d.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        echo_round_trip(c, format!("window {i}\n").as_bytes());
    }
    let mut v6: Vec<TcpStream> = (0..10)
        .map(|_| {
            try_connect_from(ip("::1"), SocketAddr::new(ip("::1"), d.port()))
                .or_else(|_| try_connect_from(ip("127.0.0.1"), d.addr()))
                .unwrap()
        })
        .collect();
    for (i, c) in v6.iter_mut().enumerate() {
        echo_round_trip(c, format!("more {i}\n").as_bytes());
    }
}

#[test]
fn loopback_peers_are_capped_when_the_exemption_is_off() {
    let d = DaemonBuilder::new()
        .set("access", "max_per_ip = 2")
        .set("access", "exempt_loopback = false")
        .start();
    let mut open: Vec<TcpStream> = (0..2).map(|_| d.connect()).collect();
    for c in &mut open {
        echo_round_trip(c, b"in\n");
    }
    let mut third = d.connect();
    let (got, _) = read_until_eof(&mut third, IO_TIMEOUT);
    assert!(
        ERR_TOO_MANY.starts_with(&got) && !got.is_empty(),
        "{:?}{}",
        String::from_utf8_lossy(&got),
        log_tail(&d)
    );
}

// ---------------------------------------------------------------------------------------------
// Point 11: `ferryd send` escapes what a hostile server says.

/// A fake server on 127.0.0.1: accepts one connection, reads the 48-byte header, answers
/// `answer` and closes.
fn hostile_server(answer: &'static [u8]) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut head = [0u8; 48];
        let _ = s.read_exact(&mut head);
        let _ = s.write_all(answer);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Let the client read the answer before the close.
        let mut rest = [0u8; 4096];
        while matches!(s.read(&mut rest), Ok(n) if n > 0) {}
    });
    (port, t)
}

#[test]
fn send_escapes_control_characters_in_the_servers_answer() {
    let dir = TempDir::new();
    let file = dir.path().join("photo.jpg");
    std::fs::write(&file, b"fourteen bytes").unwrap();
    let file = file.to_str().unwrap();
    let cases: [(&'static [u8], &str, i32); 3] = [
        (
            b"ERR io \x1b]0;pwned\x07 \x1b[2J\x9b31m gone\r\n",
            "ERR io \\x1b]0;pwned\\x07 \\x1b[2J\u{fffd}31m gone",
            1,
        ),
        (
            b"OK \x1b[31mphoto.jpg 14 a8e22f7c6b466d3101a09a90ebacecf0cf3f4ec024a56b01652323296e905b23\n",
            "OK \\x1b[31mphoto.jpg 14 a8e2",
            0,
        ),
        (
            "ERR busy \u{85}\u{9b}0m\n".as_bytes(),
            "ERR busy \\u{85}\\u{9b}0m",
            1,
        ),
    ];
    for (answer, want, code) in cases {
        let (port, server) = hostile_server(answer);
        let out = run_ferryd(&["send", "--to", &format!("127.0.0.1:{port}"), file], &[]);
        server.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let controls: Vec<char> = stdout
            .chars()
            .filter(|c| c.is_control() && *c != '\n')
            .collect();
        assert!(
            controls.is_empty(),
            "control characters {controls:?} reached the terminal: {stdout:?}"
        );
        assert!(
            stdout.contains(want),
            "{answer:?}: want {want:?} in {stdout:?}"
        );
        assert_eq!(out.status.code(), Some(code), "{stdout:?}");
    }
}
