//! Footprint benchmark (run with `cargo bench --bench footprint`; `-- --no-build` skips the timed
//! clean build; `-- --ferryd PATH` measures that ferryd binary instead of this build's, e.g. an
//! earlier build kept for a before/after comparison).
//!
//! Prints, for ferryd and, measured the same way in the same run, for `busybox nc`, `socat` and
//! `ncat` (the anchors of README's footprint table):
//!   1. the binary's size, stripped (`strip -o`): ferryd's board build (`cargo build --profile
//!      embedded`, which this bench runs: the release build with panics that abort), and the
//!      aarch64 and armv7 board builds of `bash .ci/cross` (Debian's toolchain; stripped with the
//!      cross binutils; run it first); the memory figures below are the release build's;
//!   2. the private memory of an idle server (Private_Clean + Private_Dirty of
//!      `/proc/PID/smaps_rollup`, after it listens and settles): ferryd on the shipped
//!      config/config.toml (only the port and upload directory changed), the others as listening
//!      echo servers;
//!   3. the whole-process RSS per idle connection: RSS of the server's processes holding N
//!      connections that each sent one line and got it back, divided by N. ferryd with
//!      `max_connections = 2000` and N = 2,000; `ncat --keep-open` (one process, select(2), so N
//!      = 1,000); `socat fork` (a process per connection, so N = 100); busybox nc serves one
//!      connection and has no figure;
//!   4. the time of a clean `cargo build --release` with `CC=false CXX=false` (no C compiler) in a
//!      fresh target directory, so the figure includes every dependency.
//!
//! ferryd's figures are checked against the goals of issue 12; the run fails if one is missed.
//! Each memory figure is the median of `ROUNDS` runs, servers alternated.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::{Server, free_port, median, stat_cpu_secs};

const ROUNDS: usize = 3;
const LINE: &[u8; 32] = b"0123456789abcdefghijklmnopqrst\r\n";
/// How long a freshly listening server is left alone before its memory is read.
const SETTLE: Duration = Duration::from_millis(500);

/// Goals (issue 12), in KiB or seconds.
const GOAL_BINARY_KIB: f64 = 1024.0;
const GOAL_IDLE_PRIVATE_KIB: f64 = 1536.0;
const GOAL_PER_CONN_KIB: f64 = 12.0;
const GOAL_BUILD_SECS: f64 = 60.0;

/// Connections held for the per-connection figure.
const FERRYD_CONNS: usize = 2000;
const NCAT_CONNS: usize = 1000;
const SOCAT_CONNS: usize = 100;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let build = !args.iter().any(|a| a == "--no-build");
    for (tool, package) in [
        ("busybox", "busybox"),
        ("socat", "socat"),
        ("ncat", "ncat"),
        ("strip", "binutils"),
        ("aarch64-linux-gnu-strip", "binutils-aarch64-linux-gnu"),
        ("arm-linux-gnueabihf-strip", "binutils-arm-linux-gnueabihf"),
    ] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is missing: apt-get install -y --no-install-recommends {package}"
        );
    }
    let given = args
        .iter()
        .position(|a| a == "--ferryd")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    // The size is the board build's; the memory, the release build's (the same code, unwinding).
    let sized = given.clone().unwrap_or_else(embedded_binary);
    let ferryd = given.unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ferryd")));
    println!("ferryd footprint benchmark: {ROUNDS} rounds per memory figure, servers alternated");

    let mut rows: Vec<Row> = Vec::new();
    for (name, path) in [
        ("ferryd", ferryd.clone()),
        ("busybox nc", which("busybox")),
        ("socat", which("socat")),
        ("ncat", which("ncat")),
    ] {
        let sized = if name == "ferryd" { &sized } else { &path };
        rows.push(Row {
            name,
            binary_kib: stripped_kib(sized, "strip"),
            idle_kib: Vec::new(),
            per_conn_kib: Vec::new(),
        });
    }

    for round in 0..ROUNDS {
        // Alternate the order of the servers from round to round.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let idle = private_kib(&start(rows[i].name, &ferryd, 64));
            rows[i].idle_kib.push(idle);
            let per_conn = match rows[i].name {
                "ferryd" => Some(per_conn_kib(rows[i].name, &ferryd, FERRYD_CONNS)),
                "ncat" => Some(per_conn_kib(rows[i].name, &ferryd, NCAT_CONNS)),
                "socat" => Some(per_conn_kib(rows[i].name, &ferryd, SOCAT_CONNS)),
                _ => None,
            };
            if let Some(k) = per_conn {
                rows[i].per_conn_kib.push(k);
            }
        }
    }

    let build_secs = build.then(clean_build_secs);

    println!();
    println!(
        "{:<12} {:>16} {:>22} {:>26}",
        "", "binary stripped", "idle private memory", "RSS per idle connection"
    );
    for r in &rows {
        let per_conn = if r.per_conn_kib.is_empty() {
            "n/a (one connection)".to_string()
        } else {
            format!("{:.1} KiB", median(&r.per_conn_kib))
        };
        println!(
            "{:<12} {:>12.0} KiB {:>18.0} KiB {:>26}   (idle runs {:?}, per-connection runs {:?})",
            r.name,
            r.binary_kib,
            median(&r.idle_kib),
            per_conn,
            r.idle_kib,
            r.per_conn_kib
                .iter()
                .map(|x| (x * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
    let ours = &rows[0];
    let mut checks = vec![
        (
            "binary stripped (x86-64), KiB",
            ours.binary_kib,
            GOAL_BINARY_KIB,
        ),
        (
            "idle private memory, KiB",
            median(&ours.idle_kib),
            GOAL_IDLE_PRIVATE_KIB,
        ),
        (
            "RSS per idle connection (2,000), KiB",
            median(&ours.per_conn_kib),
            GOAL_PER_CONN_KIB,
        ),
    ];
    for (what, triple, strip) in CROSS {
        checks.push((
            what,
            stripped_kib(&cross_binary(triple), strip),
            GOAL_BINARY_KIB,
        ));
    }
    if let Some(secs) = build_secs {
        checks.push((
            "clean release build (CC=false CXX=false), s",
            secs,
            GOAL_BUILD_SECS,
        ));
    }
    println!();
    let mut missed = 0;
    for (what, got, goal) in &checks {
        let ok = got <= goal;
        missed += usize::from(!ok);
        println!(
            "ferryd {what:<46} {got:>8.1}  goal ≤ {goal:<6}  {}",
            if ok { "ok" } else { "MISSED" }
        );
    }
    assert!(missed == 0, "{missed} footprint goal(s) missed");
}

struct Row {
    name: &'static str,
    binary_kib: f64,
    idle_kib: Vec<f64>,
    per_conn_kib: Vec<f64>,
}

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The ARM targets `.ci/cross` builds: what the check is called, the Rust target, the strip of
/// its cross binutils.
const CROSS: [(&str, &str, &str); 2] = [
    (
        "binary stripped (aarch64), KiB",
        "aarch64-unknown-linux-gnu",
        "aarch64-linux-gnu-strip",
    ),
    (
        "binary stripped (armv7), KiB",
        "armv7-unknown-linux-gnueabihf",
        "arm-linux-gnueabihf-strip",
    ),
];

/// The board binary `.ci/cross` built for `triple` (in target/cross, or `$FERRYD_CROSS_DIR`).
fn cross_binary(triple: &str) -> PathBuf {
    let dir = std::env::var_os("FERRYD_CROSS_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cross"),
        PathBuf::from,
    );
    let bin = dir.join(triple).join("embedded/ferryd");
    assert!(
        bin.is_file(),
        "no {triple} build at {}: run `bash .ci/cross` first",
        bin.display()
    );
    bin
}

/// Builds the board binary for this machine (`cargo build --profile embedded`, no C compiler) and
/// returns its path.
fn embedded_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let status = Command::new(env!("CARGO"))
        .args(["build", "--profile", "embedded", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CC", "false")
        .env("CXX", "false")
        .status()
        .unwrap();
    assert!(status.success(), "cargo build --profile embedded failed");
    target.join("embedded/ferryd")
}

/// Size of `path` once stripped by `strip`, in KiB (a copy is stripped; the original is left
/// alone).
fn stripped_kib(path: &Path, strip: &str) -> f64 {
    let out = std::env::temp_dir().join(format!("ferryd-footprint-{}", std::process::id()));
    let status = Command::new(strip)
        .arg("-o")
        .arg(&out)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "{strip} {}", path.display());
    let len = std::fs::metadata(&out).unwrap().len();
    let _ = std::fs::remove_file(&out);
    len as f64 / 1024.0
}

/// A server under test, and the directory of its config and uploads (removed on drop).
struct Running {
    server: Server,
    dir: Option<PathBuf>,
}

impl Running {
    fn pid(&self) -> u32 {
        self.server.pid()
    }

    fn port(&self) -> u16 {
        self.server.port
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Starts the server called `name` as an echo server (ferryd: the binary `ferryd`, with
/// `max_connections` workers at most), and lets it settle.
fn start(name: &str, ferryd: &Path, max_connections: usize) -> Running {
    let running = match name {
        "ferryd" => {
            let port = free_port();
            let dir = std::env::temp_dir()
                .join(format!("ferryd-footprint-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let config = dir.join("config.toml");
            let text = shipped_config(port, &dir.join("uploads"), max_connections);
            std::fs::write(&config, text).unwrap();
            let mut cmd = Command::new(ferryd);
            cmd.arg("--config").arg(&config).stdout(Stdio::null());
            Running {
                server: Server::spawn(cmd, port, true),
                dir: Some(dir),
            }
        }
        other => {
            let port = free_port();
            let p = port.to_string();
            let mut cmd = match other {
                // -ll: keep listening after the first connection ends.
                "busybox nc" => command("busybox", &["nc", "-ll", "-p", &p, "-e", "cat"]),
                "socat" => command(
                    "socat",
                    &[
                        &format!("TCP-LISTEN:{p},bind=127.0.0.1,reuseaddr,fork"),
                        "PIPE",
                    ],
                ),
                // One process for every client (select(2)); it reads, and has no echo.
                "ncat" => command(
                    "ncat",
                    &[
                        "--listen",
                        "--keep-open",
                        "--recv-only",
                        "--max-conns",
                        "1010",
                        "127.0.0.1",
                        &p,
                    ],
                ),
                _ => unreachable!("unknown server {other}"),
            };
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Running {
                server: Server::spawn(cmd, port, true),
                dir: None,
            }
        }
    };
    thread::sleep(SETTLE);
    running
}

fn command(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// config/config.toml as shipped, with only the port, the upload directory and (for the
/// per-connection figure) `max_connections` and the access limits changed.
fn shipped_config(port: u16, uploads: &Path, max_connections: usize) -> String {
    let shipped = include_str!("../config/config.toml");
    let mut out = String::new();
    for line in shipped.lines() {
        let line = if line.starts_with("port = ") {
            format!("port = {port}")
        } else if line.starts_with("dir = ") {
            format!("dir = {:?}", uploads.display().to_string())
        } else if max_connections != 64 && line.starts_with("max_connections = ") {
            format!("max_connections = {max_connections}")
        } else if max_connections != 64 && line.starts_with("max_per_ip = ") {
            "max_per_ip = 65535".to_string()
        } else if max_connections != 64 && line.starts_with("queue_depth = ") {
            "queue_depth = 64".to_string()
        } else if max_connections != 64 && line.starts_with("backlog = ") {
            "backlog = 4096".to_string()
        } else if line.starts_with("level = ") {
            // Two thousand "online" lines would only slow the run down.
            "level = \"warn\"".to_string()
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// RSS per idle connection of the server `name` holding `n` connections, in KiB.
fn per_conn_kib(name: &str, ferryd: &Path, n: usize) -> f64 {
    let server = start(name, ferryd, n);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(LINE).unwrap();
        if name != "ncat" {
            let mut buf = [0u8; 32];
            s.read_exact(&mut buf).unwrap();
        }
        conns.push(s);
    }
    thread::sleep(SETTLE);
    let rss = family(server.pid())
        .iter()
        .map(|&p| rss_kib(p))
        .sum::<f64>();
    drop(conns);
    rss / n as f64
}

/// `pid` and its descendants.
fn family(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        all.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        i += 1;
    }
    all
}

fn rss_kib(pid: u32) -> f64 {
    status_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// Private_Clean + Private_Dirty of the process, in KiB.
fn private_kib(server: &Running) -> f64 {
    let path = format!("/proc/{}/smaps_rollup", server.pid());
    status_field(&path, "Private_Clean:") + status_field(&path, "Private_Dirty:")
}

fn status_field(path: &str, key: &str) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) used by this process's waited-for children so far.
fn children_cpu_secs() -> f64 {
    stat_cpu_secs("/proc/self/stat", 13)
}

/// Seconds of a clean release build without a C compiler, in a fresh target directory.
fn clean_build_secs() -> f64 {
    let target =
        std::env::temp_dir().join(format!("ferryd-footprint-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    println!("\ntiming a clean `cargo build --release` with CC=false CXX=false ...");
    let started = Instant::now();
    let cpu_before = children_cpu_secs();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(&target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CC", "false")
        .env("CXX", "false")
        .status()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let cpu = children_cpu_secs() - cpu_before;
    let _ = std::fs::remove_dir_all(&target);
    assert!(status.success(), "the clean release build failed");
    println!(
        "clean release build: {secs:.1} s wall, {cpu:.1} CPU-seconds (on a shared machine the \
         wall time grows with the others' load; the CPU-seconds do not)"
    );
    secs
}
