//! Chat fan-out and UDP echo benchmark (run with `cargo bench --bench chat`).
//!
//! Chat: 50 clients connect; each sends `LINES` lines (`--lines N`) as fast as it can while reading; every line
//! must reach the 49 others. Measured: deliveries per second (from the first send to the last
//! delivery, both on the clients' clock) and the delivery latency of every line (median and p99), against ferryd in chat mode
//! and, in the same run, `ncat --chat` (Debian package `ncat`). Lines carry a marker and a send
//! timestamp, so the two servers' different prefixes and notices do not matter. The clients read
//! in 64 KiB chunks and take one clock reading per read, so that their own work (the same for
//! both servers) leaves the CPU to the servers; each server's CPU time per million deliveries
//! (user + system, from `/proc/PID/stat`) is printed beside its rate.
//!
//! UDP: `UDP_CLIENTS` clients each send a datagram and wait for its echo, in a loop, against
//! ferryd's UDP echo and against a minimal `std::net` UDP echo written below (re-executed in its
//! own process). Measured: echoed datagrams per second.
//!
//! Contenders alternate, `ROUNDS` times each; medians and ratios are printed.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const CLIENTS: usize = 50;
/// Lines per client by default (`--lines N`).
const LINES: usize = 1000;
const ROUNDS: usize = 5;
const UDP_CLIENTS: usize = 4;
const UDP_MEASURE: Duration = Duration::from_secs(2);

mod common;

use common::{Server, free_port, median, stat_cpu_secs};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--minimal-udp") {
        minimal_udp(args[i + 1].parse().expect("port"));
        return;
    }
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map_or(ROUNDS, |r| r.parse().expect("--rounds N"));
    let lines = args
        .iter()
        .position(|a| a == "--lines")
        .and_then(|i| args.get(i + 1))
        .map_or(LINES, |r| r.parse().expect("--lines N"));
    let have_ncat = Command::new("sh")
        .arg("-c")
        .arg("command -v ncat")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(have_ncat, "ncat not found: apt-get install -y ncat");

    println!(
        "chat fan-out: {CLIENTS} clients × {lines} lines, each to the {} others; {rounds} rounds",
        CLIENTS - 1
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for first in [round % 2 == 0, round % 2 == 1] {
            if first {
                let s = ferryd("chat");
                let r = chat_round(s.port, s.pid(), lines);
                println!("  round {round} ferryd {r}");
                ours.push(r);
            } else {
                let s = ncat_chat();
                let r = chat_round(s.port, s.pid(), lines);
                println!("  round {round} ncat   {r}");
                theirs.push(r);
            }
        }
    }
    let med =
        |v: &[ChatResult], f: fn(&ChatResult) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (a_rate, b_rate) = (med(&ours, |r| r.rate), med(&theirs, |r| r.rate));
    let (a_p50, b_p50) = (med(&ours, |r| r.p50_ms), med(&theirs, |r| r.p50_ms));
    let (a_p99, b_p99) = (med(&ours, |r| r.p99_ms), med(&theirs, |r| r.p99_ms));
    println!(
        "deliveries/s        ferryd {a_rate:>10.0}   ncat --chat {b_rate:>10.0}   ratio {:.2}×",
        a_rate / b_rate
    );
    println!("latency median (ms) ferryd {a_p50:>10.2}   ncat --chat {b_p50:>10.2}");
    let (a_cpu, b_cpu) = (
        med(&ours, |r| r.cpu_ms_per_m),
        med(&theirs, |r| r.cpu_ms_per_m),
    );
    println!(
        "server CPU (ms per million deliveries) ferryd {a_cpu:.0}   ncat --chat {b_cpu:.0}   ratio (ncat/ferryd) {:.2}×",
        b_cpu / a_cpu
    );
    println!(
        "latency p99 (ms)    ferryd {a_p99:>10.2}   ncat --chat {b_p99:>10.2}   ratio (ncat/ferryd) {:.2}×",
        b_p99 / a_p99
    );

    println!(
        "\nudp echo: {UDP_CLIENTS} clients, ping-pong, {} ms per round; {rounds} rounds",
        UDP_MEASURE.as_millis()
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for first in [round % 2 == 0, round % 2 == 1] {
            if first {
                let s = ferryd("echo");
                ours.push(udp_round(s.port));
            } else {
                let s = minimal_udp_server();
                theirs.push(udp_round(s.port));
            }
        }
    }
    let (a, b) = (median(&ours), median(&theirs));
    println!(
        "datagrams/s         ferryd {a:>10.0}   minimal {b:>10.0}   ratio {:.2}×   (ferryd {:?}, minimal {:?})",
        a / b,
        ours.iter().map(|x| x.round()).collect::<Vec<_>>(),
        theirs.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
}

struct ChatResult {
    rate: f64,
    /// The server's CPU time (user + system, all threads) from the first send to the end of
    /// the round, per million deliveries, in ms.
    cpu_ms_per_m: f64,
    p50_ms: f64,
    p99_ms: f64,
    delivered: u64,
}

impl std::fmt::Display for ChatResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} deliveries/s, median {:.2} ms, p99 {:.2} ms ({} delivered), server CPU {:.0} ms per million",
            self.rate, self.p50_ms, self.p99_ms, self.delivered, self.cpu_ms_per_m
        )
    }
}

/// A process's CPU time so far (user + system, all its threads), in ms.
fn cpu_ms(pid: u32) -> f64 {
    stat_cpu_secs(&format!("/proc/{pid}/stat"), 11) * 1000.0
}

/// One chat measurement: connect everyone, let the notices settle, then all send at once.
/// `pid` is the server's, for its CPU time.
fn chat_round(port: u16, pid: u32, lines: usize) -> ChatResult {
    let base = Instant::now();
    let expected = (CLIENTS * (CLIENTS - 1) * lines) as u64;
    let delivered = Arc::new(AtomicU64::new(0));
    let last_delivery = Arc::new(AtomicU64::new(0));
    // The first send, from the senders' own clocks: the main thread may be scheduled late after
    // the barrier, and its own reading would then shorten the span.
    let first_send = Arc::new(AtomicU64::new(u64::MAX));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(expected as usize)));
    let start = Arc::new(Barrier::new(CLIENTS + 1));
    let done = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for _ in 0..CLIENTS {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_nodelay(true).unwrap();
        streams.push(s);
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(500));
    let mut handles = Vec::new();
    for (k, stream) in streams.into_iter().enumerate() {
        let reader = stream.try_clone().unwrap();
        reader
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (delivered, last, lat, done) = (
            Arc::clone(&delivered),
            Arc::clone(&last_delivery),
            Arc::clone(&latencies),
            Arc::clone(&done),
        );
        handles.push(thread::spawn(move || {
            // Cheap on purpose: one clock read and one update of the shared counters per read,
            // not per line, so that the clients' own parsing (which both servers share) does
            // not take the CPU the servers are measured on.
            let mut reader = reader;
            let mut buf = vec![0u8; 64 * 1024];
            let mut carry: Vec<u8> = Vec::new();
            let mut mine = Vec::with_capacity((CLIENTS - 1) * lines);
            while !done.load(Ordering::Relaxed) {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(_) => continue,
                };
                let now = base.elapsed().as_nanos() as u64;
                carry.extend_from_slice(&buf[..n]);
                let mut got = 0;
                let mut at = 0;
                while let Some(end) = carry[at..].iter().position(|&b| b == b'\n') {
                    if let Some(sent) = sent_at(&carry[at..at + end]) {
                        mine.push(now.saturating_sub(sent));
                        got += 1;
                    }
                    at += end + 1;
                }
                carry.drain(..at);
                if got > 0 {
                    delivered.fetch_add(got, Ordering::Relaxed);
                    last.fetch_max(now, Ordering::Relaxed);
                }
            }
            lat.lock().unwrap().extend(mine);
        }));
        let start = Arc::clone(&start);
        let first_send = Arc::clone(&first_send);
        let mut writer = stream;
        handles.push(thread::spawn(move || {
            start.wait();
            for i in 0..lines {
                let t = base.elapsed().as_nanos() as u64;
                if i == 0 {
                    first_send.fetch_min(t, Ordering::Relaxed);
                }
                let line = format!("BENCH {k} {i} {t}\n");
                if writer.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
        }));
    }
    let cpu_before = cpu_ms(pid);
    start.wait();
    // Until everything arrived, or nothing more for 2 s (a server that lost lines), or 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut last_progress) = (0, Instant::now());
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
        let now_seen = delivered.load(Ordering::Relaxed);
        if now_seen != seen {
            (seen, last_progress) = (now_seen, Instant::now());
        } else if last_progress.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    // Give stragglers (or a server that lost lines) a moment, then stop the readers.
    thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    let cpu = cpu_ms(pid) - cpu_before;
    for h in handles {
        let _ = h.join();
    }
    let n = delivered.load(Ordering::Relaxed);
    let t0 = first_send.load(Ordering::Relaxed);
    let span = (last_delivery.load(Ordering::Relaxed).saturating_sub(t0)) as f64 / 1e9;
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q) as usize)
            .map_or(f64::NAN, |&x| x as f64 / 1e6)
    };
    if n < expected {
        eprintln!("  warning: {n} of {expected} deliveries arrived");
    }
    ChatResult {
        rate: n as f64 / span,
        cpu_ms_per_m: cpu / (n.max(1) as f64 / 1e6),
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        delivered: n,
    }
}

/// The send time in a delivered line `<prefix> BENCH <client> <line> <nanoseconds>`, whatever
/// prefix the server put in front.
fn sent_at(line: &[u8]) -> Option<u64> {
    let marker = line.windows(6).position(|w| w == b"BENCH ")?;
    let t = line[marker..].split(|&b| b == b' ').nth(3)?;
    let t = t.strip_suffix(b"\r").unwrap_or(t);
    if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(t).ok()?.parse().ok()
}

/// Echoed datagrams per second with `UDP_CLIENTS` ping-pong clients.
fn udp_round(port: u16) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let handles: Vec<_> = (0..UDP_CLIENTS)
        .map(|k| {
            let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
            thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let msg = format!("datagram from client {k}: 0123456789abcdef");
                let mut buf = [0u8; 128];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    s.send(msg.as_bytes()).unwrap();
                    if s.recv(&mut buf).is_ok() {
                        n += 1;
                    }
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    thread::sleep(UDP_MEASURE);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// ferryd in `mode`, with limits lifted for the benchmark (see the comment inside).
fn ferryd(mode: &str) -> Server {
    // The chat settings are the defaults. The UDP limit is lifted (all bench clients share
    // 127.0.0.1, and this measures throughput, not the limit), and so is max_per_ip (50 chat
    // clients from 127.0.0.1).
    Server::ferryd(|port, uploads| {
        format!(
            "[server]\nport = {port}\nmode = \"{mode}\"\n[udp]\nrate_per_sec = 10000000\nburst = 10000000\n[access]\nmax_per_ip = 1000\n[files]\ndir = {:?}\n[log]\nlevel = \"warn\"\n",
            uploads.display().to_string()
        )
    })
}

fn ncat_chat() -> Server {
    let port = free_port();
    let mut cmd = Command::new("ncat");
    cmd.args(["--chat", "-l", "127.0.0.1", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Server::spawn(cmd, port, true)
}

fn minimal_udp_server() -> Server {
    let port = free_port();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--minimal-udp", &port.to_string()]);
    Server::spawn(cmd, port, false)
}

/// The ceiling for a one-thread UDP echo: std::net, a 64 KiB buffer, recv_from then send_to.
fn minimal_udp(port: u16) {
    let s = UdpSocket::bind(("127.0.0.1", port)).expect("bind");
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}
