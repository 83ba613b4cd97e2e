//! Load benchmark for the core daemon (run with `cargo bench --bench load`).
//!
//! Measures, against ferryd and, in the same run, against a minimal `std::net`
//! thread-per-connection echo server written below (the ceiling of this architecture):
//!   1. echo round trips per second with 1 and with 64 concurrent clients (32-byte lines);
//!   2. short connections per second (connect, one line, close) from 4 client threads;
//!   3. RSS holding 2,000 idle connections (ferryd with `max_connections = 2000`).
//!
//! The two servers are measured alternately, `ROUNDS` times each, and the medians and their
//! ratio are printed. The machine is shared and noisy: only compare figures from one run.
//!
//! The bench re-executes itself with `--minimal-server PORT` to run the minimal server in its
//! own process, so that its RSS and CPU are measured the same way as ferryd's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const MEASURE: Duration = Duration::from_secs(2);
const LINE: &[u8; 32] = b"0123456789abcdefghijklmnopqrst\r\n";
const IDLE_CONNS: usize = 2000;

mod common;

use common::{Server, free_port, median};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--minimal-server") {
        let port: u16 = args[i + 1].parse().expect("port");
        minimal_server(port);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = if quick { 1 } else { ROUNDS };
    let measure = if quick {
        Duration::from_millis(300)
    } else {
        MEASURE
    };

    println!(
        "ferryd load benchmark: {rounds} rounds of {} ms per figure, alternating servers",
        measure.as_millis()
    );
    let mut table: Vec<(&str, Vec<f64>, Vec<f64>)> = Vec::new();
    for (name, f) in [
        (
            "round trips/s, 1 client",
            (|p, m| round_trips(p, 1, m)) as fn(u16, Duration) -> f64,
        ),
        ("round trips/s, 64 clients", |p, m| round_trips(p, 64, m)),
        ("short connections/s, 4 threads", |p, m| {
            short_connections(p, 4, m)
        }),
    ] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which server goes first.
            for first in [round % 2 == 0, round % 2 == 1] {
                if first {
                    let s = ferryd(128, &[]);
                    ours.push(f(s.port, measure));
                } else {
                    let s = minimal();
                    theirs.push(f(s.port, measure));
                }
            }
        }
        report(name, &ours, &theirs, true);
        table.push((name, ours, theirs));
    }

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds.min(3) {
        for first in [round % 2 == 0, round % 2 == 1] {
            if first {
                let s = ferryd(IDLE_CONNS, &["queue_depth = 64", "backlog = 4096"]);
                ours.push(idle_rss_per_conn(&s, IDLE_CONNS));
            } else {
                let s = minimal();
                theirs.push(idle_rss_per_conn(&s, IDLE_CONNS));
            }
        }
    }
    report(
        &format!("KiB RSS per idle connection ({IDLE_CONNS})"),
        &ours,
        &theirs,
        false,
    );
}

fn report(name: &str, ours: &[f64], theirs: &[f64], higher_is_better: bool) {
    let (a, b) = (median(ours), median(theirs));
    let ratio = if higher_is_better { a / b } else { b / a };
    println!(
        "{name:<42} ferryd {a:>10.1}  minimal {b:>10.1}  ratio {ratio:.2}{}   (ferryd runs {:?}, minimal runs {:?})",
        if higher_is_better {
            "×"
        } else {
            "× (minimal/ferryd)"
        },
        ours.iter().map(|x| x.round()).collect::<Vec<_>>(),
        theirs.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
}

/// ferryd with `max_connections` workers and `extra` lines under `[server]`.
fn ferryd(max_connections: usize, extra: &[&str]) -> Server {
    Server::ferryd(|port, uploads| {
        format!(
            "[server]\nport = {port}\nmax_connections = {max_connections}\n{}\n[access]\nmax_per_ip = 65535\n[files]\ndir = {:?}\n[log]\nlevel = \"warn\"\n",
            extra.join("\n"),
            uploads.display().to_string()
        )
    })
}

/// The minimal server below, in a process of its own.
fn minimal() -> Server {
    let port = free_port();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg("--minimal-server")
        .arg(port.to_string())
        .stdout(Stdio::null());
    Server::spawn(cmd, port, true)
}

/// Echo round trips per second with `clients` connections, each doing write-line/read-line in
/// a loop.
fn round_trips(port: u16, clients: usize, measure: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let streams: Vec<TcpStream> = (0..clients)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
            thread::spawn(move || {
                let mut buf = [0u8; 32];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(LINE).unwrap();
                    s.read_exact(&mut buf).unwrap();
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    thread::sleep(measure);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Connections per second, each: connect, write a line, read it back, close.
fn short_connections(port: u16, threads: usize, measure: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
            thread::spawn(move || {
                let mut buf = [0u8; 32];
                let mut n = 0;
                let mut failed = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let ok = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect(("127.0.0.1", port))?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        s.write_all(LINE)?;
                        s.read_exact(&mut buf)?;
                        if &buf != LINE {
                            return Err(std::io::Error::other("wrong echo"));
                        }
                        Ok(())
                    })();
                    match ok {
                        Ok(()) => n += 1,
                        Err(e) => {
                            failed += 1;
                            if failed <= 3 {
                                eprintln!("short connection failed: {e}");
                            }
                        }
                    }
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    thread::sleep(measure);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Opens `n` connections, proves each is being served with one echo, and returns the server's
/// RSS divided by `n`, in KiB (the whole process: threads, stacks, buffers, everything).
fn idle_rss_per_conn(server: &Server, n: usize) -> f64 {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(LINE).unwrap();
        let mut buf = [0u8; 32];
        s.read_exact(&mut buf).unwrap();
        conns.push(s);
    }
    thread::sleep(Duration::from_millis(300));
    let rss = server.rss_kib();
    drop(conns);
    rss / n as f64
}

/// The ceiling of this architecture: std::net, one thread per connection, a line echoed as it
/// arrives. Stack size like ferryd's default (128 KiB), so the thread cost is comparable.
fn minimal_server(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut writer = match stream.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                let mut reader = BufReader::with_capacity(4096, stream);
                loop {
                    let n = match reader.fill_buf() {
                        Ok([]) | Err(_) => return,
                        Ok(buf) => {
                            if writer.write_all(buf).is_err() {
                                return;
                            }
                            buf.len()
                        }
                    };
                    reader.consume(n);
                }
            });
    }
}
