//! What the benchmarks share: starting and stopping server processes, free ports, CPU times,
//! medians.

#![allow(dead_code)] // Each bench uses its own subset.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

/// A server process under test, killed (and its temp dir removed) on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    dir: Option<PathBuf>,
}

impl Server {
    /// Starts ferryd on a free port with the config `body(port, uploads_dir)` returns, and waits
    /// until it listens. `$FERRYD_BIN` names another ferryd binary to start instead of this
    /// build's (an older build, to compare daemons with the same bench and clients).
    pub fn ferryd(body: impl FnOnce(u16, &Path) -> String) -> Server {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ferryd-bench-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, body(port, &dir.join("uploads"))).unwrap();
        let bin = std::env::var_os("FERRYD_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_ferryd")),
            PathBuf::from,
        );
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&path).stdout(Stdio::null());
        let mut server = Server::spawn(cmd, port, true);
        server.dir = Some(dir);
        server
    }

    /// Starts `cmd`, which must serve on `port`; waits until it listens on TCP if `tcp`, else a
    /// moment.
    pub fn spawn(mut cmd: Command, port: u16, tcp: bool) -> Server {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        if tcp {
            wait_listening(port);
        } else {
            thread::sleep(Duration::from_millis(200));
        }
        Server {
            child,
            port,
            dir: None,
        }
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A port free for both TCP and UDP on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until something listens on TCP `port`, without connecting (a probe connection would be
/// served, announced or counted by the server under test).
pub fn wait_listening(port: u16) {
    let hex = format!(":{port:04X} ");
    for _ in 0..1000 {
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let tcp6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
        let listening = |l: &&str| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A");
        if tcp.lines().chain(tcp6.lines()).any(|l| listening(&l)) {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("nothing listens on {port}");
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPU seconds summed over two adjacent tick fields of a `/proc/.../stat` file, counted from
/// the first field after the command name (which is in parentheses and may hold spaces): index
/// 11 gives utime and stime (fields 14 and 15 of proc(5)), index 13 cutime and cstime. Zero if
/// the file cannot be read.
pub fn stat_cpu_secs(stat_path: &str, index: usize) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: f64 = rest
        .split_whitespace()
        .skip(index)
        .take(2)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}
