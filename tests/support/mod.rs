//! Shared helpers for the integration tests: temp directories, starting the real `ferryd` binary
//! with a generated config on sockets the test hands it (see `ports`) and capturing its log,
//! small socket helpers whose every read has a time limit, and the small helpers every test file
//! needs (labels, paths, frames, medians).

// Each test binary (`tests/*.rs`) includes this module and uses a different subset of it; without
// this, every helper one binary does not call would be a dead-code warning there.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use socket2::{Domain, Protocol, Socket, Type};

mod ports;
mod proxy;
mod upload;

// Like the dead-code allowance above: each test binary uses a different subset.
#[allow(unused_imports)]
pub use ports::{Handoff, Reservation, reserve_port};
#[allow(unused_imports)]
pub use proxy::{AtLimit, Proxy};
#[allow(unused_imports)]
pub use upload::{frame, header_for, is_part, ok_line, parts_in, resumable_head};

/// How long `DaemonBuilder::start` waits for the daemon to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The daemon's `server.backlog` when the test does not set it.
const DEFAULT_BACKLOG: u32 = 128;
/// The read and write timeouts of `Daemon::connect` streams, and `run_ferryd`'s watchdog.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the polling helpers look again.
const POLL: Duration = Duration::from_millis(10);

/// The path of the `ferryd` binary cargo built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferryd")
}

// ---------------------------------------------------------------------------------------------
// Temp directories.

/// A fresh directory under the system temp dir, removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos();
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("ferryd-test-{}-{n}-{nanos}", std::process::id());
            let path = std::env::temp_dir().join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temp dir {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The path as a `&str`, for command lines and config values.
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Writes `contents` to `name` in `dir` and returns its path.
pub fn write_file(dir: &TempDir, name: &str, contents: &(impl AsRef<[u8]> + ?Sized)) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

// ---------------------------------------------------------------------------------------------
// Real peers: outside programs that some tests drive, and root.

/// Where Debian puts daemons such as `mosquitto`: outside an ordinary user's `PATH`.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

/// The path of the program `name` on `PATH` (or in /usr/sbin or /sbin), for a test whose point is
/// that real program. Panics when it is missing, naming the Debian `packages` that provide it: a
/// test of a real peer never skips. Such a test is ignored unless the `real-peers` feature is on
/// (`bash tests/real-peers.sh` installs the packages and runs them). For `nc`, also checks that
/// it is OpenBSD's netcat, whose `-N` the tests use.
pub fn need(name: &str, packages: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    let Some(found) = found else {
        panic!(
            "`{name}` not found on PATH or in /usr/sbin: install the Debian package(s) {packages} \
             (as root: `apt-get install --no-install-recommends {packages}`), or run \
             `bash tests/real-peers.sh`, which installs every real peer's package"
        );
    };
    if name == "nc" {
        need_openbsd_nc(&found);
    }
    found
}

/// Panics unless `nc` (at `path`) is OpenBSD's netcat: its help lists `-N` (shut the socket down
/// at EOF on stdin), which other netcats lack.
fn need_openbsd_nc(path: &Path) {
    let out = Command::new(path)
        .arg("-h")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} -h: {e}", path.display()));
    let help = format!("{}{}", text_of(&out.stdout), text_of(&out.stderr));
    assert!(
        help.lines().any(|l| l.trim_start().starts_with("-N")),
        "{} is not OpenBSD's netcat (its help lists no -N): install the Debian package \
         netcat-openbsd (as root: `apt-get install --no-install-recommends netcat-openbsd`)\n\
         --- {} -h ---\n{help}",
        path.display(),
        path.display()
    );
}

/// Panics unless the test runs as root, saying that `what` needs it.
pub fn need_root(what: &str) {
    assert!(
        rustix::process::geteuid().is_root(),
        "{what} needs root: run it as root, e.g. `sudo bash tests/real-peers.sh`"
    );
}

// ---------------------------------------------------------------------------------------------
// Starting the daemon.

/// The daemon's threads besides its workers (and chat writers): the accept/main thread, ctrlc's
/// signal thread, the SIGHUP thread, the UDP thread and the hash pool (one per core, at most 4).
pub fn constant_threads() -> usize {
    4 + std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(4)
}

/// Builds a config for one daemon and starts it; see `config_text` for the file it writes.
#[derive(Debug, Clone, Default)]
pub struct DaemonBuilder {
    /// `[table]` name and its lines, in the order first set; `server` is always written first.
    tables: Vec<(String, Vec<String>)>,
    env: Vec<(String, String)>,
    shell_prefix: Option<String>,
    /// The daemon binds `server.port` itself instead of taking sockets the test passes.
    own_port: bool,
}

impl DaemonBuilder {
    pub fn new() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// Adds `line` (e.g. `max_connections = 2`) under `[table]`.
    pub fn set(mut self, table: &str, line: &str) -> Self {
        match self.tables.iter_mut().find(|(t, _)| t == table) {
            Some((_, lines)) => lines.push(line.to_string()),
            None => self
                .tables
                .push((table.to_string(), vec![line.to_string()])),
        }
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: &str, val: &str) -> Self {
        self.env.push((key.to_string(), val.to_string()));
        self
    }

    /// Runs `commands` in the shell that starts the daemon (`sh -c '<commands>; exec "$0"
    /// --config "$1"' BIN CONFIG`), e.g. `.shell_prefix("ulimit -n 40")` to run it with a low
    /// descriptor limit. Thanks to `exec` the shell's pid becomes the daemon's, so `pid`, `signal`
    /// and the `/proc` readings all apply to the daemon itself.
    pub fn shell_prefix(mut self, commands: &str) -> Self {
        self.shell_prefix = Some(commands.to_string());
        self
    }

    /// Lets the daemon bind its own port (`server.bind`, and a port the builder holds for it
    /// until the daemon listens, see `Reservation`) instead of taking the sockets the test
    /// passes, for tests of binding itself: the port stops listening at shutdown, a reload keeps
    /// it, a READY=1 comes only once it listens. The daemon runs with `udp.enabled = false`
    /// unless the test sets `udp.enabled`: its UDP port cannot be held for it.
    pub fn bind_own_port(mut self) -> Self {
        self.own_port = true;
        self
    }

    /// The TOML `start` writes: `[server]` with `bind = "127.0.0.1"` and `port = N` (each only
    /// if the caller did not set it) followed by the caller's lines, then every other table that
    /// has lines.
    pub fn config_text(&self, port: u16) -> String {
        let mut out = String::from("[server]\n");
        if self.server_value("bind").is_none() {
            out.push_str("bind = \"127.0.0.1\"\n");
        }
        if self.server_value("port").is_none() {
            out.push_str(&format!("port = {port}\n"));
        }
        for line in self.lines("server") {
            out.push_str(line);
            out.push('\n');
        }
        for (table, lines) in &self.tables {
            if table == "server" || lines.is_empty() {
                continue;
            }
            out.push_str(&format!("\n[{table}]\n"));
            for line in lines {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Starts the daemon in a new temp dir and waits (at most 10 s) until it listens: its log
    /// shows `listening on`, or, when the log level hides that line, a TCP connect succeeds (that
    /// probe connection then shows in the daemon's log). An early exit panics with the log.
    ///
    /// By default the test binds the sockets (TCP on `server.bind` or 127.0.0.1 and a port the
    /// kernel picks, and UDP on the same port unless `udp.enabled = false`) and passes them as
    /// systemd does, so no other process can take the port first; the daemon then logs "serving
    /// on the socket passed by systemd". With a `port` set under `[server]`, or after
    /// `bind_own_port`, the daemon binds its own.
    pub fn start(mut self) -> Daemon {
        let dir = TempDir::new();
        // Many tests open more than access.max_per_ip = 8 connections from 127.0.0.1; only the
        // tests of that limit keep it.
        if !self
            .lines("access")
            .any(|l| l.trim_start().starts_with("max_per_ip"))
        {
            self = self.set("access", "max_per_ip = 60000");
        }
        // Uploads go to <tempdir>/uploads unless the test chose a directory.
        if !self
            .lines("files")
            .any(|l| l.trim_start().starts_with("dir"))
        {
            let uploads = dir.path().join("uploads");
            self = self.set(
                "files",
                &format!("dir = {:?}", uploads.display().to_string()),
            );
        }
        let config_path = dir.path().join("config.toml");
        let fixed_port: Option<u16> = self.server_value("port").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("DaemonBuilder: cannot use port = {v} with start()"))
        });
        let bind_ip: IpAddr = self
            .server_value("bind")
            .map_or(Ipv4Addr::LOCALHOST.into(), |v| {
                let v = v.trim_matches('"');
                v.parse()
                    .unwrap_or_else(|_| panic!("DaemonBuilder: bind = {v:?} is not an address"))
            });
        let connect_ip: IpAddr = match bind_ip {
            IpAddr::V6(ip) if !ip.is_unspecified() => ip.into(),
            ip if !ip.is_unspecified() => ip,
            _ => Ipv4Addr::LOCALHOST.into(),
        };
        // "listening on" is an INFO line: at a quieter level, probe with a connect instead.
        let quiet = self.lines("log").any(|l| {
            let l = l.replace(' ', "");
            l.starts_with("level=\"warn\"") || l.starts_with("level=\"error\"")
        });
        let (handoff, reservation) = if fixed_port.is_some() {
            (None, None)
        } else if self.own_port {
            if !self
                .lines("udp")
                .any(|l| l.trim_start().starts_with("enabled"))
            {
                self = self.set("udp", "enabled = false");
            }
            (None, Some(Reservation::new(bind_ip)))
        } else {
            // The test's sockets, made as the daemon would make its own (see `Handoff`).
            let backlog = self.server_value("backlog").map_or(DEFAULT_BACKLOG, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("DaemonBuilder: backlog = {v} is not a number"))
            });
            let udp_off = self
                .lines("udp")
                .any(|l| l.replace(' ', "") == "enabled=false");
            (Some(Handoff::bind(bind_ip, backlog, !udp_off)), None)
        };
        let port = match (&handoff, &reservation, fixed_port) {
            (Some(h), _, _) => h.port(),
            (_, Some(r), _) => r.port(),
            (_, _, Some(p)) => p,
            _ => unreachable!("one of the three is set"),
        };
        let config = self.config_text(port);
        std::fs::write(&config_path, &config).unwrap_or_else(|e| {
            panic!("cannot write {}: {e}", config_path.display());
        });
        // Through `sh -c '...; exec ferryd'`: thanks to `exec` the shell's pid becomes the
        // daemon's, which is what `$LISTEN_PID` must name (and what `pid`, `signal` and the
        // `/proc` readings use).
        let mut script = String::new();
        if let Some(prefix) = &self.shell_prefix {
            script.push_str(prefix);
            script.push_str("; ");
        }
        if let Some(h) = &handoff {
            assert!(
                !self.env.iter().any(|(k, _)| k.starts_with("LISTEN_")),
                "DaemonBuilder: a test that sets $LISTEN_* itself needs bind_own_port()"
            );
            script.push_str(&format!(
                "LISTEN_PID=$$; LISTEN_FDS={}; export LISTEN_PID LISTEN_FDS; ",
                h.n_fds()
            ));
        }
        script.push_str("exec \"$0\" --config \"$1\"");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).arg(bin()).arg(&config_path);
        cmd.env_remove("FERRYD_CONFIG")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(h) = &handoff {
            h.pass_to(&mut cmd);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin()));
        // The daemon has its own copies now; ours would keep the port open after it exits.
        drop(cmd);
        let passed = handoff.is_some();
        drop(handoff);
        let log = Captured::capture(child.stderr.take().expect("stderr is piped"));
        let daemon_addr = SocketAddr::new(connect_ip, port);
        let mut daemon = Daemon {
            child,
            exited: None,
            port,
            addr: daemon_addr,
            passed,
            log,
            dir: None,
        };
        // A passed socket accepts connects before the daemon runs: there the probe is ready
        // once the daemon has taken it off the listener's accept queue.
        let listener = SocketAddr::new(bind_ip, port);
        let mut probe: Option<TcpStream> = None;
        let mut probe_ready = || {
            if !quiet {
                return false;
            }
            if probe.is_none() {
                probe = TcpStream::connect_timeout(&daemon_addr, POLL * 10).ok();
            }
            probe.is_some()
                && (!passed || accept_queue(listener).is_some_and(|waiting| waiting == 0))
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if daemon.log.text().contains("listening on") || probe_ready() {
                drop(reservation);
                daemon.dir = Some(dir);
                return daemon;
            }
            if let Some(status) = daemon.try_wait() {
                daemon.log.wait_eof(Duration::from_secs(2));
                panic!(
                    "ferryd exited ({status}) before listening on port {port}\n\
                     --- config ---\n{config}--- ferryd log ---\n{}",
                    daemon.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "ferryd did not listen on port {port} within {START_TIMEOUT:?}\n\
                     --- ferryd log ---\n{}",
                    daemon.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    fn lines<'a>(&'a self, table: &str) -> impl Iterator<Item = &'a str> + 'a {
        let table = table.to_string();
        self.tables
            .iter()
            .filter(move |(t, _)| *t == table)
            .flat_map(|(_, lines)| lines.iter().map(String::as_str))
    }

    /// The value text of `key = value` under `[server]`, if the caller set it.
    fn server_value(&self, key: &str) -> Option<String> {
        self.lines("server").find_map(|line| {
            let (k, v) = line.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    }
}

/// A child's output stream (the daemon's stderr), collected by a background thread as it is
/// written.
#[derive(Debug, Default)]
pub struct Captured {
    bytes: Mutex<Vec<u8>>,
    eof: AtomicBool,
}

impl Captured {
    pub fn capture(mut stderr: impl Read + Send + 'static) -> Arc<Captured> {
        let buf = Arc::new(Captured::default());
        let sink = Arc::clone(&buf);
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match stderr.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => sink.lock().extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            sink.eof.store(true, Ordering::SeqCst);
        });
        buf
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    /// Waits until the pipe has been read to its end (the process exited), at most `timeout`.
    pub fn wait_eof(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.eof.load(Ordering::SeqCst) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
    }
}

/// A running `ferryd`, killed (SIGKILL) and reaped on drop if still running. If the test is
/// panicking, the drop also prints the daemon's log, so that every failure shows it.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    exited: Option<ExitStatus>,
    port: u16,
    addr: SocketAddr,
    /// Whether the daemon serves sockets the test passed (else it bound its own).
    passed: bool,
    log: Arc<Captured>,
    /// Set once started; dropped (removed) after the process is gone.
    dir: Option<TempDir>,
}

impl Daemon {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where clients connect: 127.0.0.1 (also for a wildcard bind), or ::1 if bound there.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log line (without its timestamp) that announces the UDP echo on the daemon's port.
    pub fn udp_echo_line(&self) -> String {
        let addr = SocketAddr::new(self.addr.ip(), self.port);
        if self.passed {
            format!("udp echo on the socket passed by systemd ({addr})")
        } else {
            format!("udp echo on {addr}")
        }
    }

    /// The daemon's temp dir (holding its `config.toml`).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("a started daemon has a dir")
            .path()
    }

    /// The default upload directory, `<dir>/uploads` (unless the test set `files.dir`).
    pub fn uploads(&self) -> PathBuf {
        self.dir().join("uploads")
    }

    /// A new client connection with 10 s read and write timeouts.
    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "cannot connect to ferryd at {}: {e}\n--- ferryd log ---\n{}",
                self.addr,
                self.log()
            )
        });
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    /// Everything the daemon has written to stderr so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until the log contains `needle` and returns it; panics with the log on timeout.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() > deadline {
                panic!(
                    "ferryd's log did not show {needle:?} within {timeout:?}\n--- ferryd log ---\n{log}"
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Sends signal `sig` (e.g. "TERM", "INT") with kill(2).
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Waits up to `timeout` for the process to exit; once it has, its log is complete.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                self.log.wait_eof(Duration::from_secs(2));
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// Open descriptors of the daemon (entries in /proc/PID/fd).
    pub fn fd_count(&self) -> usize {
        self.proc_entries("fd")
    }

    /// Threads of the daemon (entries in /proc/PID/task).
    pub fn thread_count(&self) -> usize {
        self.proc_entries("task")
    }

    /// The daemon's resident set size (VmRSS in /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS line in {path}:\n{status}"))
    }

    fn proc_entries(&self, what: &str) -> usize {
        let path = format!("/proc/{}/{what}", self.pid());
        std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("cannot list {path}: {e}"))
            .count()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait on ferryd");
        }
        self.exited
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            self.log.wait_eof(Duration::from_secs(1));
            eprintln!(
                "--- ferryd log (pid {}, port {}) ---\n{}--- end of ferryd log ---",
                self.child.id(),
                self.port,
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// Sends signal `sig` (e.g. "TERM", "INT", "KILL": a name without `SIG`) to `pid`, with
/// kill(2) rather than the `kill` program, which a minimal system may lack (procps).
pub fn signal(pid: u32, sig: &str) {
    let signal: Signal = format!("SIG{sig}")
        .parse()
        .unwrap_or_else(|e| panic!("SIG{sig} is no signal: {e}"));
    let pid = i32::try_from(pid).unwrap_or_else(|_| panic!("pid {pid} out of range"));
    if let Err(e) = kill(Pid::from_raw(pid), signal) {
        panic!("kill({pid}, {signal}) failed: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Socket helpers.

/// How the daemon names an address in its log and in chat lines: `[127.0.0.1:PORT]` or
/// `[::1]:PORT`.
pub fn label(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("[{a}]"),
        SocketAddr::V6(a) => a.to_string(),
    }
}

/// The daemon's name for the client end of `stream`.
pub fn peer_label(stream: &TcpStream) -> String {
    label(stream.local_addr().expect("local_addr"))
}

/// Whether a read or write error is its timeout running out.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Where a client at `from` reaches `d`: `[::1]:PORT` from an IPv6 source, `127.0.0.1:PORT`
/// from an IPv4 one.
pub fn target(d: &Daemon, from: IpAddr) -> SocketAddr {
    let to: IpAddr = if from.is_ipv6() {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    SocketAddr::new(to, d.port())
}

/// A TCP connection to `to` from the local address `from` (any port), with 10 s timeouts.
/// std cannot bind before connecting, hence socket2.
///
/// The socket has SO_REUSEADDR. A client that closes first leaves its port in TIME_WAIT for a
/// minute, and one without SO_REUSEADDR there keeps any socket of this or another test binary
/// from binding that port on a wildcard address such as "::", even with SO_REUSEADDR: after
/// access.rs's garbage flood that is thousands of ports.
pub fn try_connect_from(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), IO_TIMEOUT)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// `try_connect_from` to the daemon, panicking with its log on failure.
/// An address written in a test.
pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} is not an address: {e}"))
}

/// Held by the tests of one test binary that load the machine or measure latencies, so that
/// they never run at once on a small machine.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn connect_from(d: &Daemon, from: IpAddr) -> TcpStream {
    let to = target(d, from);
    try_connect_from(from, to)
        .unwrap_or_else(|e| panic!("connecting from {from} to {to}: {e}{}", log_tail(d)))
}

/// Runs a socket call again while it fails with EINTR. A read or receive on a socket with a
/// timeout fails so when the process is stopped and continued, even without a signal handler
/// (signal(7)), and that is no answer.
pub fn retry_eintr<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Writes all of `data`, panicking with the daemon's log on failure.
pub fn send_all(d: &Daemon, s: &mut TcpStream, data: &[u8], what: &str) {
    if let Err(e) = s.write_all(data) {
        panic!("{what}: writing {} bytes: {e}{}", data.len(), log_tail(d));
    }
}

/// Writes `msg` and reads exactly `msg.len()` bytes back, asserting they are equal.
pub fn echo_round_trip(stream: &mut TcpStream, msg: &[u8]) {
    ensure_read_timeout(stream);
    stream
        .write_all(msg)
        .unwrap_or_else(|e| panic!("writing {:?}: {e}", String::from_utf8_lossy(msg)));
    let mut got = vec![0u8; msg.len()];
    let mut n = 0;
    while n < got.len() {
        match stream.read(&mut got[n..]) {
            Ok(0) => panic!(
                "EOF after {n} of {} echoed bytes; got {:?}",
                msg.len(),
                String::from_utf8_lossy(&got[..n])
            ),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "reading the echo of {:?}: {e} after {n} bytes: {:?}",
                String::from_utf8_lossy(msg),
                String::from_utf8_lossy(&got[..n])
            ),
        }
    }
    assert!(
        got == msg,
        "echo differs: sent {:?}, got {:?}",
        String::from_utf8_lossy(msg),
        String::from_utf8_lossy(&got)
    );
}

/// Reads until EOF, at most `timeout` in all; returns the bytes and, if the read stopped on an
/// error or the time ran out, that error. For tests that want to report failures themselves.
pub fn read_until_eof(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, Option<io::Error>) {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let err = io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no EOF within {timeout:?}"),
            );
            return (out, Some(err));
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Reads until EOF, at most `timeout` in all; panics with what it got on an error or timeout.
pub fn read_to_eof(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    match read_until_eof(stream, timeout) {
        (out, None) => out,
        (out, Some(e)) => panic!(
            "reading to EOF: {e} after {} bytes: {:?}",
            out.len(),
            String::from_utf8_lossy(&out)
        ),
    }
}

/// Reads byte by byte up to and including `\n`; panics with what it got on EOF or timeout. Uses
/// the stream's read timeout, or 10 s if it has none.
pub fn read_line(stream: &mut TcpStream) -> String {
    ensure_read_timeout(stream);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "EOF before the end of a line; got {:?}",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    return String::from_utf8_lossy(&line).into_owned();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "reading a line: {e}; got {:?}",
                String::from_utf8_lossy(&line)
            ),
        }
    }
}

fn ensure_read_timeout(stream: &TcpStream) {
    if stream.read_timeout().ok().flatten().is_none() {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// One-shot runs.

/// Runs `ferryd ARGS` to completion with `env` added and `FERRYD_CONFIG` removed (unless `env`
/// sets it). A 10 s watchdog kills a run that does not finish, and the call then panics with
/// what it printed.
pub fn run_ferryd(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_ferryd_for(args, env, IO_TIMEOUT)
}

/// `run_ferryd` with a watchdog of `timeout` instead of 10 s, for runs that move a lot of data.
pub fn run_ferryd_for(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("FERRYD_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_for(cmd, &format!("ferryd {}", args.join(" ")), timeout)
}

/// Runs `cmd` to completion with stdin empty and stdout and stderr captured. A watchdog kills a
/// run that takes longer than `timeout`, and the call then panics with what it printed, naming
/// the run `label`.
pub fn run_for(mut cmd: Command, label: &str, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{label}`: {e}"));
    let stdout = Captured::capture(child.stdout.take().expect("stdout is piped"));
    let stderr = Captured::capture(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            stdout.wait_eof(Duration::from_secs(1));
            stderr.wait_eof(Duration::from_secs(1));
            panic!(
                "`{label}` did not finish within {timeout:?}; killed it\n\
                 --- stdout ---\n{}--- stderr ---\n{}",
                stdout.text(),
                stderr.text()
            );
        }
        thread::sleep(POLL);
    };
    stdout.wait_eof(Duration::from_secs(2));
    stderr.wait_eof(Duration::from_secs(2));
    let take = |b: &Captured| std::mem::take(&mut *b.lock());
    Output {
        status,
        stdout: take(&stdout),
        stderr: take(&stderr),
    }
}

/// The kernel's send and receive queues, in bytes, of the IPv4 TCP socket at `local` connected
/// to `remote` (from /proc/net/tcp): bytes written but not yet acknowledged, and bytes received
/// but not yet read. `None` if there is no such socket.
pub fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => panic!("tcp_queues reads IPv4 sockets only, not {a}"),
    };
    let (want_local, want_remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("cannot read /proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&want_local.as_str())
            || fields.get(2) != Some(&want_remote.as_str())
        {
            return None;
        }
        let (tx, rx) = fields.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// Whether process `pid` holds a UDP socket bound to `port` (any address): its descriptors in
/// /proc/PID/fd against the socket inodes in /proc/net/udp and udp6. Unlike a probe bind, this
/// does not care who else holds the port.
pub fn holds_udp_port(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    let inodes: Vec<String> = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let inode = f.get(9)?;
                    f.get(1)?
                        .ends_with(&want)
                        .then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|link| inodes.iter().any(|i| link.as_os_str() == i.as_str()))
}

/// Output bytes as text, invalid UTF-8 replaced.
pub fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn stdout_of(out: &Output) -> String {
    text_of(&out.stdout)
}

pub fn stderr_of(out: &Output) -> String {
    text_of(&out.stderr)
}

/// A finished run's status and output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        stdout_of(out),
        stderr_of(out)
    )
}

/// How many connections wait in the accept queue of the IPv4 TCP listener at `local` (from
/// /proc/net/tcp, where a listener's receive queue is that count). `None` if nothing listens.
pub fn accept_queue(local: SocketAddr) -> Option<u64> {
    tcp_queues(local, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).map(|(_, rx)| rx)
}

/// Polls `cond` every 10 ms until it holds or `timeout` has passed; returns whether it held.
/// The last look is taken after the deadline, so a condition that became true just in time
/// counts.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return cond();
        }
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Test data.

/// The median of `samples` (the upper one of an even count).
pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// A tiny xorshift64 generator. Every test seeds it with a constant, so file contents and split
/// points are the same on every run and a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Zero is xorshift's one fixed point; the odd multiplier also spreads small seeds.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        for chunk in out.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Assertions.

/// The last 40 lines of the daemon's log, for assertion messages.
pub fn log_tail(d: &Daemon) -> String {
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(40);
    format!(
        "\n--- ferryd log (last {} lines) ---\n{}",
        lines.len() - start,
        lines[start..].join("\n")
    )
}

/// Reads to EOF (10 s at most) and asserts the stream carried exactly one line,
/// `ERR <code> ...`, and then ended. Returns the line.
pub fn expect_err_then_eof(d: &Daemon, s: &mut TcpStream, code: &str, what: &str) -> String {
    let (got, err) = read_until_eof(s, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&got).into_owned();
    let one_line = text.ends_with('\n') && text.matches('\n').count() == 1;
    assert!(
        err.is_none() && one_line && text.starts_with(&format!("ERR {code} ")),
        "{what}: want one `ERR {code} ...` line then EOF, got {text:?} and {}{}",
        err.map_or("EOF".to_string(), |e| format!("error {e}")),
        log_tail(d)
    );
    text
}

/// Reads until EOF and asserts the bytes are exactly `want`.
pub fn expect_then_eof(
    d: &Daemon,
    stream: &mut TcpStream,
    want: &[u8],
    timeout: Duration,
    what: &str,
) {
    let (got, err) = read_until_eof(stream, timeout);
    assert!(
        err.is_none() && got == want,
        "{what}: expected exactly {:?} then EOF, got {:?} and {}{}",
        String::from_utf8_lossy(want),
        String::from_utf8_lossy(&got),
        err.map_or("EOF".to_string(), |e| format!("error {e}")),
        log_tail(d)
    );
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// The regular files under `root`, at any depth, as paths relative to it.
pub fn files_under(root: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    out
}
