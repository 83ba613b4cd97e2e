//! Integration tests of ferryd under systemd, with the test playing systemd's part: the sd_notify
//! protocol (`READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1`) received on a Unix
//! datagram socket, reload on SIGHUP, socket activation (through `systemd-socket-activate` and by
//! hand-made `$LISTEN_PID`/`$LISTEN_FDS`), the journal and JSON log formats, and the unit files'
//! checks (`systemd/check.sh`). Every test drives the real binary over loopback with its own
//! port and temp dir (see `support`).

mod support;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use support::{
    Captured, Daemon, DaemonBuilder, Reservation, TempDir, echo_round_trip, holds_udp_port, need,
    path_str, peer_label, reserve_port, retry_eintr, signal, wait_until,
};

/// How long any single expected event (a datagram, a log line, an exit) may take.
const WAIT: Duration = Duration::from_secs(10);
/// How often the polling helpers look again.
const POLL: Duration = Duration::from_millis(10);
/// The variables through which systemd talks to a service. The harness running these tests may
/// itself be a systemd service and have some of them, so each daemon gets exactly the ones its
/// test sets and no others.
const SYSTEMD_VARS: [&str; 7] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "JOURNAL_STREAM",
];

// ---------------------------------------------------------------------------------------------
// Playing systemd: the notify socket.

/// One notification as received.
#[derive(Debug, Clone)]
struct Datagram {
    /// When the test received it.
    at: Instant,
    text: String,
    /// For a `READY=1` datagram when probing: whether a TCP connect to the daemon's port
    /// succeeded right after it was received.
    port_open: Option<bool>,
}

impl Datagram {
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    /// A periodic `STATUS=` refresh and nothing else.
    fn is_status_only(&self) -> bool {
        self.text.lines().all(|l| l.starts_with("STATUS="))
    }

    fn status(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("STATUS="))
    }
}

/// A Unix datagram socket standing in for systemd's `$NOTIFY_SOCKET`. A background thread records
/// every datagram with the time it arrived.
struct Notify {
    dir: TempDir,
    got: Arc<Mutex<Vec<Datagram>>>,
    stop: Arc<AtomicBool>,
    /// Markers the reader thread has taken in (see `sync`).
    synced: Arc<AtomicUsize>,
    reader: Option<thread::JoinHandle<()>>,
}

/// The datagram `Notify::sync` sends; not a line sd_notify would ever carry.
const SYNC_MARKER: &str = "X-FERRYD-TEST-SYNC";

impl Notify {
    fn bind() -> Notify {
        Notify::bind_probing(None)
    }

    /// As `bind`; in addition, on each `READY=1` the reader thread at once tries a TCP connect to
    /// `probe` and records whether it succeeded.
    fn bind_probing(probe: Option<SocketAddr>) -> Notify {
        let dir = TempDir::new();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", path.display()));
        // The reader checks its stop flag this often.
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(AtomicUsize::new(0));
        let (sink, done) = (Arc::clone(&got), Arc::clone(&stop));
        let reader_synced = Arc::clone(&synced);
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !done.load(Ordering::SeqCst) {
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        // Shows in the waiting test's list of what was received.
                        let text = format!("(receiving on the notify socket failed: {e})");
                        lock(&sink).push(Datagram {
                            at: Instant::now(),
                            text,
                            port_open: None,
                        });
                        return;
                    }
                };
                let at = Instant::now();
                if &buf[..n] == SYNC_MARKER.as_bytes() {
                    reader_synced.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let port_open = match probe {
                    Some(addr) if text.lines().any(|l| l == "READY=1") => {
                        Some(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
                    }
                    _ => None,
                };
                lock(&sink).push(Datagram {
                    at,
                    text,
                    port_open,
                });
            }
        });
        Notify {
            dir,
            got,
            stop,
            synced,
            reader: Some(reader),
        }
    }

    /// The value for `$NOTIFY_SOCKET`.
    fn path(&self) -> String {
        let path = self.dir.path().join("notify");
        path.to_str().expect("temp paths are UTF-8").to_string()
    }

    fn all(&self) -> Vec<Datagram> {
        lock(&self.got).clone()
    }

    fn len(&self) -> usize {
        lock(&self.got).len()
    }

    /// Waits until a datagram at index `from` or later satisfies `pred`; returns its index and
    /// a copy. Panics with every datagram received on timeout.
    fn wait_for(
        &self,
        from: usize,
        what: &str,
        pred: impl Fn(&Datagram) -> bool,
    ) -> (usize, Datagram) {
        self.wait(from, what, pred, || None)
    }

    /// As `wait_for`, but gives up at once if the daemon `d` sending them exits.
    fn wait_from(
        &self,
        d: &mut Daemon,
        from: usize,
        what: &str,
        pred: impl Fn(&Datagram) -> bool,
    ) -> (usize, Datagram) {
        self.wait(from, what, pred, || d.wait_exit(Duration::ZERO))
    }

    fn wait(
        &self,
        from: usize,
        what: &str,
        pred: impl Fn(&Datagram) -> bool,
        mut exited: impl FnMut() -> Option<ExitStatus>,
    ) -> (usize, Datagram) {
        let deadline = Instant::now() + WAIT;
        let find = || {
            lock(&self.got)
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, d)| pred(d))
                .map(|(i, d)| (i, d.clone()))
        };
        loop {
            if let Some(hit) = find() {
                return hit;
            }
            let gone = exited();
            if let Some(status) = gone {
                // What it sent before exiting is queued at the socket; once the reader thread
                // has taken in a datagram sent after that, it has taken in all of those.
                self.sync();
                if let Some(hit) = find() {
                    return hit;
                }
                panic!(
                    "ferryd exited ({status}) without sending {what} (from #{from} on); \
                     received:\n{}",
                    self.dump()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {what} datagram (from #{from} on) within {WAIT:?}; received:\n{}",
                    self.dump()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Sends a marker datagram to the socket and waits until the reader thread has taken it in
    /// (it is counted, not recorded): every datagram queued before it has been recorded then.
    fn sync(&self) {
        let n = self.synced.load(Ordering::SeqCst);
        let sender = UnixDatagram::unbound().expect("an unbound Unix datagram socket");
        sender
            .send_to(SYNC_MARKER.as_bytes(), self.path())
            .unwrap_or_else(|e| panic!("sending a marker to {}: {e}", self.path()));
        assert!(
            wait_until(WAIT, || self.synced.load(Ordering::SeqCst) > n),
            "the notify reader did not take in a marker within {WAIT:?}"
        );
    }

    /// Every datagram received, one per line, with its arrival time relative to the first.
    fn dump(&self) -> String {
        let all = self.all();
        let Some(first) = all.first().map(|d| d.at) else {
            return "    (nothing)\n".to_string();
        };
        all.iter()
            .enumerate()
            .map(|(i, d)| {
                format!(
                    "    #{i} +{:.3} s {:?}{}\n",
                    (d.at - first).as_secs_f64(),
                    d.text,
                    d.port_open
                        .map_or(String::new(), |ok| format!(" (port open: {ok})"))
                )
            })
            .collect::<Vec<String>>()
            .concat()
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Starting daemons.

/// A builder whose daemon sees exactly the systemd variables in `env`: the shell that execs it
/// (ferryd keeps the shell's pid) unsets all the others, then runs `shell`, if not empty.
fn builder(env: &[(&str, &str)], shell: &str) -> DaemonBuilder {
    let unset: Vec<&str> = SYSTEMD_VARS
        .into_iter()
        .filter(|v| !env.iter().any(|(k, _)| k == v))
        .collect();
    let mut prefix = format!("unset {}", unset.join(" "));
    if !shell.is_empty() {
        prefix = format!("{prefix}; {shell}");
    }
    let mut b = DaemonBuilder::new().shell_prefix(&prefix);
    for (k, v) in env {
        b = b.env(k, v);
    }
    b
}

/// A process the test starts itself, for runs `DaemonBuilder::start` cannot wait for (the daemon
/// is started by `systemd-socket-activate` on the first connection, or must fail at start-up).
/// Its stdout and stderr are captured; it is killed on drop if still running, and a panicking
/// test prints what it wrote.
struct Proc {
    label: String,
    child: Child,
    exited: Option<ExitStatus>,
    out: Arc<Captured>,
    err: Arc<Captured>,
}

impl Proc {
    /// Starts `cmd` with stdin empty and without any of `SYSTEMD_VARS` or `FERRYD_CONFIG`.
    fn start(mut cmd: Command, label: &str) -> Proc {
        cmd.env_remove("FERRYD_CONFIG");
        for v in SYSTEMD_VARS {
            cmd.env_remove(v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{label}`: {e}"));
        let out = Captured::capture(child.stdout.take().expect("stdout is piped"));
        let err = Captured::capture(child.stderr.take().expect("stderr is piped"));
        Proc {
            label: label.to_string(),
            child,
            exited: None,
            out,
            err,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    fn log(&self) -> String {
        self.err.text()
    }

    fn stdout(&self) -> String {
        self.out.text()
    }

    /// Waits until stderr contains `needle` and returns it; panics on timeout or early exit.
    fn wait_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if let Some(status) = self.try_wait() {
                self.err.wait_eof(Duration::from_secs(2));
                let log = self.log();
                if log.contains(needle) {
                    return log;
                }
                panic!(
                    "`{}` exited ({status}) without logging {needle:?}:\n{log}",
                    self.label
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "`{}` did not log {needle:?} within {WAIT:?}:\n{log}",
                    self.label
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits for the process to exit (at most 10 s, else panics); its output is then complete.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.try_wait() {
                self.out.wait_eof(Duration::from_secs(2));
                self.err.wait_eof(Duration::from_secs(2));
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "`{}` did not exit within {WAIT:?}\n--- stderr ---\n{}",
                    self.label,
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            self.out.wait_eof(Duration::from_secs(1));
            self.err.wait_eof(Duration::from_secs(1));
            eprintln!(
                "--- `{}` (pid {}) stdout ---\n{}--- stderr ---\n{}--- end ---",
                self.label,
                self.pid(),
                self.stdout(),
                self.log()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// Echoes `line` on a new connection, closes it and waits until the daemon has logged the
/// connection's end (so every line it logged about it is in the log). Returns the peer label.
fn echo_and_close(d: &Daemon, line: &str) -> String {
    let mut s = d.connect();
    let peer = peer_label(&s);
    echo_round_trip(&mut s, line.as_bytes());
    s.shutdown(Shutdown::Both).unwrap();
    drop(s);
    d.wait_log(&format!("{peer} offline"), WAIT);
    peer
}

/// Whether a TCP connect to 127.0.0.1:`port` is refused (nothing listens there).
fn refused(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
    )
}

/// The daemon's config file.
fn config_path(d: &Daemon) -> PathBuf {
    d.dir().join("config.toml")
}

/// Rewrites the daemon's config file with the line that starts with `key =` replaced by `line`.
fn set_config_line(d: &Daemon, key: &str, line: &str) {
    let path = config_path(d);
    let old =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut found = false;
    let new: String = old
        .lines()
        .map(|l| match l.split_once('=') {
            Some((k, _)) if k.trim() == key && !found => {
                found = true;
                format!("{line}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(found, "no `{key} =` line in {}:\n{old}", path.display());
    fs::write(&path, new).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// CLOCK_MONOTONIC in microseconds, the clock `MONOTONIC_USEC=` is read from. (Through rustix,
/// which ferryd itself uses for this; std's `Instant` reads the same clock but does not show it.)
fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000
}

/// Whether `s` starts with an RFC 3339 UTC timestamp with milliseconds.
fn is_timestamp(s: &str) -> bool {
    let pattern = b"dddd-dd-ddTdd:dd:dd.dddZ";
    s.len() == pattern.len()
        && s.bytes().zip(pattern).all(|(c, &p)| match p {
            b'd' => c.is_ascii_digit(),
            _ => c == p,
        })
}

/// Whether a log line is in the human format: timestamp, space, level.
fn is_human(line: &str) -> bool {
    line.get(..24).is_some_and(is_timestamp) && line[24..].starts_with(' ')
}

/// The journal priority of a line in the journal format (`<6>message`), if it is one.
fn journal_priority(line: &str) -> Option<u8> {
    let rest = line.strip_prefix('<')?;
    let (prio, _) = rest.split_once('>')?;
    prio.parse().ok()
}

/// The first line of `log` containing `needle`.
fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line contains {needle:?}:\n{log}"))
}

/// `KEY=value` of the process's environment, from /proc/PID/environ.
fn environ_var(pid: u32, key: &str) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/environ")).expect("read /proc/PID/environ");
    raw.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(String::from))
}

/// Checks a reload's notifications after index `from`: `RELOADING=1` with `MONOTONIC_USEC=`,
/// then `READY=1` with `STATUS=`, and nothing else but periodic `STATUS=` refreshes. Returns the
/// READY's index and the MONOTONIC_USEC value.
fn expect_reload_cycle(n: &Notify, d: &mut Daemon, from: usize) -> (usize, u64) {
    let (ri, reloading) = n.wait_from(d, from, "RELOADING=1", |x| x.has("RELOADING=1"));
    let (yi, ready) = n.wait_from(d, ri + 1, "READY=1 after RELOADING=1", |x| x.has("READY=1"));
    let all = n.all();
    let events: Vec<&str> = all[from..=yi]
        .iter()
        .filter(|d| !d.is_status_only())
        .map(|d| d.text.as_str())
        .collect();
    assert_eq!(
        events.len(),
        2,
        "want exactly RELOADING=1 then READY=1 (besides STATUS=) after #{from}; received:\n{}",
        n.dump()
    );
    let lines: Vec<&str> = reloading.text.lines().collect();
    let usec = match lines[..] {
        ["RELOADING=1", mono] => mono
            .strip_prefix("MONOTONIC_USEC=")
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok()),
        _ => None,
    };
    let usec = usec.unwrap_or_else(|| {
        panic!(
            "want \"RELOADING=1\\nMONOTONIC_USEC=<digits>\", got {:?}",
            reloading.text
        )
    });
    assert!(
        ready.status().is_some_and(|s| s.contains(" open")),
        "READY=1 after a reload should carry STATUS= with the counts: {:?}",
        ready.text
    );
    (yi, usec)
}

// ---------------------------------------------------------------------------------------------
// 1. Notifications.

#[test]
fn notify_ready_once_listening_then_live_status_and_stopping_on_sigterm() {
    // The daemon binds its own port here (READY=1 must wait for it): the test holds the port
    // until the daemon listens, so nobody else can take it. (Its UDP port could not be held, so
    // the daemon runs without the UDP echo, as `bind_own_port` does.)
    let reserved = reserve_port();
    let port = reserved.port();
    let notify = Notify::bind_probing(Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
    let mut d = builder(&[("NOTIFY_SOCKET", &notify.path())], "")
        .set("server", &format!("port = {port}"))
        .set("udp", "enabled = false")
        .start();
    drop(reserved);

    // READY=1 comes first, with the counts, and only once the port accepts connections.
    let (_, ready) = notify.wait_from(&mut d, 0, "READY=1", |x| x.has("READY=1"));
    let first = &notify.all()[0];
    assert!(
        first.has("READY=1"),
        "the first notification should be READY=1; received:\n{}",
        notify.dump()
    );
    assert!(
        ready.status().is_some_and(|s| s.starts_with("0 open, ")),
        "READY=1 should come with STATUS=<counts> in the same datagram: {:?}",
        ready.text
    );
    assert_eq!(
        ready.port_open,
        Some(true),
        "a TCP connect to port {port} right after READY=1 arrived failed: READY was sent before \
         the port accepted connections"
    );

    // While a client is connected, the periodic STATUS= says so, every ~2 s.
    let mut client = d.connect();
    echo_round_trip(&mut client, b"hello\n");
    let connected = notify.len();
    let is_one_open =
        |d: &Datagram| d.is_status_only() && d.status().unwrap().starts_with("1 open");
    let (i, a) = notify.wait_from(&mut d, connected, "STATUS=1 open", is_one_open);
    let (_, b) = notify.wait_from(&mut d, i + 1, "a second STATUS=", Datagram::is_status_only);
    let gap = b.at - a.at;
    assert!(
        (Duration::from_millis(1500)..=Duration::from_secs(4)).contains(&gap),
        "STATUS= refreshes should come every ~2 s, these came {gap:?} apart; received:\n{}",
        notify.dump()
    );
    assert!(
        b.status().unwrap().starts_with("1 open"),
        "the client is still connected: {:?}",
        b.text
    );
    assert!(
        b.status().unwrap().contains(" accepted"),
        "STATUS= lists the counts: {:?}",
        b.text
    );

    // Once it has gone, the count follows.
    drop(client);
    let gone = notify.len();
    notify.wait_from(&mut d, gone, "STATUS=0 open", |d| {
        d.is_status_only() && d.status().unwrap().starts_with("0 open")
    });

    // SIGTERM: STOPPING=1, then a clean exit.
    let before_stop = notify.len();
    d.signal("TERM");
    notify.wait_from(&mut d, before_stop, "STOPPING=1", |x| x.has("STOPPING=1"));
    let status = d.wait_exit(WAIT).expect("ferryd should exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    let all = notify.all();
    assert_eq!(
        all.iter().filter(|d| d.has("READY=1")).count(),
        1,
        "READY=1 is sent once; received:\n{}",
        notify.dump()
    );
    assert!(
        all.last().unwrap().has("STOPPING=1"),
        "nothing should follow STOPPING=1; received:\n{}",
        notify.dump()
    );
    assert!(
        !all.iter().any(|d| d.has("WATCHDOG=1")),
        "no WATCHDOG=1 without $WATCHDOG_USEC; received:\n{}",
        notify.dump()
    );
}

#[test]
fn watchdog_pings_every_half_period_only_when_meant_for_this_process() {
    const WINDOW: Duration = Duration::from_secs(3);
    const PERIOD: Duration = Duration::from_secs(1);
    // (what, WATCHDOG_PID set in the environment, shell commands, pings expected)
    let cases = [
        ("no $WATCHDOG_PID", None, "", true),
        (
            "$WATCHDOG_PID = its pid, as systemd sets it",
            None,
            "WATCHDOG_PID=$$; export WATCHDOG_PID",
            true,
        ),
        ("$WATCHDOG_PID = 1, another process", Some("1"), "", false),
    ];
    // All three run at once: one 3 s window for all.
    let runs: Vec<(&str, bool, Notify, Daemon)> = cases
        .into_iter()
        .map(|(what, pid, shell, pings)| {
            let notify = Notify::bind();
            let path = notify.path();
            let mut env = vec![
                ("NOTIFY_SOCKET", path.as_str()),
                ("WATCHDOG_USEC", "1000000"),
            ];
            if let Some(pid) = pid {
                env.push(("WATCHDOG_PID", pid));
            }
            let d = builder(&env, shell).start();
            (what, pings, notify, d)
        })
        .collect();
    let readies: Vec<Datagram> = runs
        .iter()
        .map(|(_, _, n, _)| n.wait_for(0, "READY=1", |d| d.has("READY=1")).1)
        .collect();
    // Waiting out the window is the point of this test: until each notify socket has a
    // datagram from after its window (a STATUS= refresh comes every ~2 s, pings or not), so
    // every datagram inside the window has been recorded.
    for ((what, _, notify, _), ready) in runs.iter().zip(&readies) {
        let end = ready.at + WINDOW;
        notify.wait_for(0, &format!("{what}: a datagram after the window"), |x| {
            x.at > end
        });
    }

    for ((what, pings, notify, d), ready) in runs.iter().zip(&readies) {
        let all = notify.all();
        let in_window: Vec<Instant> = all
            .iter()
            .filter(|x| x.has("WATCHDOG=1") && x.at >= ready.at && x.at <= ready.at + WINDOW)
            .map(|x| x.at)
            .collect();
        if *pings {
            assert!(
                in_window.len() >= 4,
                "{what}: WATCHDOG_USEC=1000000 wants WATCHDOG=1 every ~0.5 s, got {} in the {WINDOW:?} after READY=1; received:\n{}",
                in_window.len(),
                notify.dump()
            );
            // From READY=1 to the end of the window, no gap as long as the period systemd
            // allows.
            let mut prev = ready.at;
            for &t in in_window.iter().chain([&(ready.at + WINDOW)]) {
                assert!(
                    t - prev < PERIOD,
                    "{what}: {:?} without a ping, the whole watchdog period {PERIOD:?}; received:\n{}",
                    t - prev,
                    notify.dump()
                );
                prev = t;
            }
        } else {
            assert!(
                !all.iter().any(|x| x.has("WATCHDOG=1")),
                "{what}: the watchdog is another process's, no WATCHDOG=1 should be sent; received:\n{}",
                notify.dump()
            );
            // Not vacuous: the daemon notified, and its accept loop ran its periodic work.
            assert!(
                all.iter()
                    .any(|x| x.is_status_only() && x.at <= ready.at + WINDOW),
                "{what}: a periodic STATUS= should have come in the window; received:\n{}",
                notify.dump()
            );
        }
        assert!(
            !d.log().contains("WARN") && !d.log().contains("ERROR"),
            "{what}: unexpected warnings:\n{}",
            d.log()
        );
    }
}

#[test]
fn without_notify_socket_or_with_a_dead_one_the_daemon_serves_normally() {
    let nowhere = TempDir::new();
    let dead = nowhere.path().join("no-such-socket");
    let dead = path_str(&dead);
    let cases: [(&str, &[(&str, &str)]); 2] = [
        ("no $NOTIFY_SOCKET", &[]),
        (
            "$NOTIFY_SOCKET naming no socket",
            &[("NOTIFY_SOCKET", dead), ("WATCHDOG_USEC", "1000000")],
        ),
    ];
    for (what, env) in cases {
        let mut d = builder(env, "").start();
        echo_and_close(&d, "still here\n");
        d.signal("TERM");
        let status = d.wait_exit(WAIT).expect("ferryd should exit after SIGTERM");
        assert_eq!(status.code(), Some(0), "{what}: exit status\n{}", d.log());
        let log = d.log();
        assert!(
            !log.contains("WARN") && !log.contains("ERROR"),
            "{what}: nothing to warn about:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Reload on SIGHUP.

#[test]
fn sighup_reloads_live_settings_refuses_bad_files_and_keeps_the_port() {
    let notify = Notify::bind();
    // The daemon binds its own port: what a reload keeps is that port.
    let mut d = builder(&[("NOTIFY_SOCKET", &notify.path())], "")
        .set("log", "level = \"info\"")
        .bind_own_port()
        .start();
    let port = d.port();
    let (ready0, _) = notify.wait_from(&mut d, 0, "READY=1", |x| x.has("READY=1"));

    // At info level an echo logs no requests.
    echo_and_close(&d, "before\n");
    assert!(
        !d.log().contains(" req "),
        "no debug lines at info level:\n{}",
        d.log()
    );

    // 1. A valid change: the log level, applied live.
    set_config_line(&d, "level", "level = \"debug\"");
    let from = notify.len().max(ready0 + 1);
    let before = monotonic_usec();
    d.signal("HUP");
    let (ready1, usec) = expect_reload_cycle(&notify, &mut d, from);
    let after = monotonic_usec();
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} should be CLOCK_MONOTONIC at the reload, between {before} and {after}"
    );
    d.wait_log("reloaded: log.level: Info -> Debug", WAIT);
    let peer = echo_and_close(&d, "after\n");
    let log = d.log();
    for want in [
        format!("{peer} req after\\n"),
        format!("{peer} resp after\\n"),
    ] {
        assert!(
            log.contains(&want),
            "the new level should apply at once: want {want:?}\n{log}"
        );
    }

    // 2. An invalid file is refused; the running configuration (debug level) stays.
    set_config_line(&d, "port", "port = 0");
    let from = notify.len().max(ready1 + 1);
    d.signal("HUP");
    expect_reload_cycle(&notify, &mut d, from);
    let log = d.wait_log("reload refused", WAIT);
    let refusal = line_with(&log, "reload refused");
    assert!(
        refusal.contains("ERROR") && refusal.contains("server.port = 0"),
        "the refusal should be an error naming the bad setting: {refusal}"
    );
    let peer = echo_and_close(&d, "still debug\n");
    assert!(
        d.log().contains(&format!("{peer} req still debug\\n")),
        "debug level should stay in force after a refused reload:\n{}",
        d.log()
    );

    // 3. A new port needs a restart: the daemon says so and keeps serving on the old one.
    // Held (bound, not listening) by the test: a connect there is refused unless ferryd listens.
    let new_reserved = reserve_port();
    let new_port = new_reserved.port();
    set_config_line(&d, "port", &format!("port = {new_port}"));
    let from = notify.len();
    d.signal("HUP");
    expect_reload_cycle(&notify, &mut d, from);
    let change = format!("server.port: {port} -> {new_port}");
    let log = d.wait_log(&change, WAIT);
    let warning = line_with(&log, &change);
    assert!(
        warning.contains("WARN") && warning.contains("needs a restart"),
        "the port change should be a warning that it needs a restart: {warning}"
    );
    echo_and_close(&d, "old port\n");
    assert!(
        refused(new_port) && !holds_udp_port(d.pid(), new_port),
        "nothing should listen on the new port {new_port} before a restart"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Socket activation.

/// Writes a config naming `port`, with uploads in `dir` and `log` lines under `[log]`, and
/// returns its path.
fn write_config(dir: &TempDir, port: u16, log: &[&str]) -> PathBuf {
    let path = dir.path().join("config.toml");
    let uploads = dir.path().join("uploads");
    let mut b = DaemonBuilder::new().set("files", &format!("dir = {:?}", path_str(&uploads)));
    for line in log {
        b = b.set("log", line);
    }
    fs::write(&path, b.config_text(port))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Runs ferryd on `cfg` through `sh -c '<pre>; LISTEN_PID=$$ LISTEN_FDS=$FDS exec ferryd …'`
/// (`$$` is the shell's pid, which `exec` hands on to ferryd, so the variables are meant for
/// it), with `FDS` = `fds`, and waits for it to exit. Returns the exit status and the log.
fn start_with_listen_fds(dir: &TempDir, cfg: &Path, pre: &str, fds: &str) -> (ExitStatus, String) {
    let pre = if pre.is_empty() {
        String::new()
    } else {
        format!("{pre}; ")
    };
    let script = format!("{pre}LISTEN_PID=$$ LISTEN_FDS=$FDS exec \"$0\" --config \"$1\"");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&script)
        .arg(support::bin())
        .arg(cfg)
        .env("FDS", fds)
        .current_dir(dir.path());
    let mut p = Proc::start(cmd, &format!("FDS={fds:?} sh -c '{script}'"));
    let status = p.wait_exit();
    (status, p.log())
}

/// A ferryd started by `systemd-socket-activate` on its first connection, which has been served.
struct Activated {
    proc: Proc,
    notify: Notify,
    /// The address systemd-socket-activate listened on and passed as fd 3.
    addr: SocketAddr,
    /// The port the config names.
    cfg_port: u16,
    /// The test's holds on both ports.
    _holds: (Reservation, Reservation),
    _dir: TempDir,
}

/// Runs `systemd-socket-activate -l 127.0.0.1:PORT ferryd --config CFG` (the config names
/// another port, `NOTIFY_SOCKET` is set), connects, which makes the tool exec ferryd, and checks
/// that ferryd echoes on that very connection.
fn start_activated() -> Activated {
    let tool = need("systemd-socket-activate", "systemd");
    let dir = TempDir::new();
    // Both held by the test (TCP, bound, not listening, SO_REUSEADDR): the tool binds the first
    // beside the hold, and a connect to the second is refused unless ferryd listens there.
    let holds = (reserve_port(), reserve_port());
    let (act_port, cfg_port) = (holds.0.port(), holds.1.port());
    let cfg = write_config(&dir, cfg_port, &[]);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, act_port));
    let notify = Notify::bind_probing(Some(addr));
    // The tool passes on only the variables given with --setenv (and TERM, PATH, USER, HOME).
    let mut cmd = Command::new(tool);
    cmd.arg("-l")
        .arg(addr.to_string())
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.path()))
        .arg(support::bin())
        .arg("--config")
        .arg(&cfg)
        .current_dir(dir.path());
    let proc = Proc::start(cmd, "systemd-socket-activate ferryd");
    // The tool listens first; the connection that makes it exec ferryd waits in the backlog.
    let deadline = Instant::now() + WAIT;
    let mut client = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                panic!("systemd-socket-activate did not listen on {addr} within {WAIT:?}: {e}")
            }
            Err(_) => thread::sleep(POLL),
        }
    };
    echo_round_trip(&mut client, b"activated\n");
    Activated {
        proc,
        notify,
        addr,
        cfg_port,
        _holds: holds,
        _dir: dir,
    }
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: systemd-socket-activate (systemd); run bash tests/real-peers.sh"
)]
fn socket_activation_serves_the_listener_systemd_passes() {
    let Activated {
        mut proc,
        notify,
        addr,
        cfg_port,
        ..
    } = start_activated();
    let log = proc.wait_log("listening on");
    for want in [
        format!("socket activation: fd 3: TCP listener on {addr}"),
        format!("serving on the socket passed by systemd ({addr})"),
        format!("listening on {addr} "),
    ] {
        assert!(log.contains(&want), "the log should say {want:?}:\n{log}");
    }
    let pid = proc.pid();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "ferryd", "the tool execs ferryd in its place");
    assert_eq!(environ_var(pid, "LISTEN_PID"), Some(pid.to_string()));
    assert_eq!(environ_var(pid, "LISTEN_FDS").as_deref(), Some("1"));
    assert!(
        refused(cfg_port),
        "no TCP listener on the config's port {cfg_port}:\n{log}"
    );
    let (_, ready) = notify.wait_for(0, "READY=1", |d| d.has("READY=1"));
    assert_eq!(
        ready.port_open,
        Some(true),
        "the passed socket accepts at READY=1"
    );

    proc.signal("TERM");
    let status = proc.wait_exit();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    notify.wait_for(0, "STOPPING=1", |d| d.has("STOPPING=1"));
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: systemd-socket-activate (systemd); run bash tests/real-peers.sh"
)]
fn socket_activation_with_only_a_tcp_listener_opens_no_socket_of_its_own() {
    // Under ferryd-activated.service (PrivateNetwork=yes, RestrictAddressFamilies=AF_UNIX) a
    // socket ferryd opened itself would be unreachable, or could not be opened at all.
    let Activated {
        mut proc,
        cfg_port,
        _holds,
        ..
    } = start_activated();
    let log = proc.wait_log("listening on");
    assert!(
        refused(cfg_port) && !holds_udp_port(proc.pid(), cfg_port),
        "nothing should listen on the config's port {cfg_port}, TCP or UDP, when systemd passed \
         the listening socket:\n{log}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: systemd-socket-activate (systemd); run bash tests/real-peers.sh"
)]
fn socket_activation_with_a_datagram_socket_serves_udp_on_it() {
    // Two nested tools, as a .socket unit with ListenStream= and ListenDatagram= would pass them:
    // the outer one listens for UDP and, on the first datagram, execs the inner one with that
    // socket as fd 3; the inner one adds its TCP listener as fd 4 and, on the first connection,
    // execs ferryd with LISTEN_FDS=2.
    let tool = need("systemd-socket-activate", "systemd");
    let dir = TempDir::new();
    // Held by the test, as in `start_activated` (TCP only: the tool binds the UDP side).
    let _holds = (reserve_port(), reserve_port());
    let (act_port, cfg_port) = (_holds.0.port(), _holds.1.port());
    let cfg = write_config(&dir, cfg_port, &[]);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, act_port));
    let mut cmd = Command::new(&tool);
    cmd.args(["--datagram", "-l", &addr.to_string()])
        .arg(&tool)
        .arg("-l")
        .arg(addr.to_string())
        .arg(support::bin())
        .arg("--config")
        .arg(&cfg)
        .current_dir(dir.path());
    let mut proc = Proc::start(cmd, "systemd-socket-activate (udp, tcp) ferryd");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    // The datagram waits in the passed socket until ferryd reads it.
    let deadline = Instant::now() + WAIT;
    loop {
        if udp_bound(act_port) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outer tool did not bind UDP {addr}"
        );
        thread::sleep(POLL);
    }
    udp.send_to(b"passed datagram\n", addr).unwrap();
    let mut client = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("no TCP listener on {addr}: {e}"),
            Err(_) => thread::sleep(POLL),
        }
    };
    echo_round_trip(&mut client, b"activated\n");
    let mut buf = [0u8; 64];
    let (n, from) = retry_eintr(|| udp.recv_from(&mut buf))
        .expect("the datagram is echoed from the passed socket");
    assert_eq!(&buf[..n], b"passed datagram\n");
    assert_eq!(
        from, addr,
        "the echo comes from the passed socket's address"
    );
    let log = proc.wait_log("listening on");
    for want in [
        format!("socket activation: fd 3: UDP socket on {addr}"),
        format!("socket activation: fd 4: TCP listener on {addr}"),
        format!("udp echo on the socket passed by systemd ({addr})"),
    ] {
        assert!(log.contains(&want), "the log should say {want:?}:\n{log}");
    }
    assert!(
        refused(cfg_port) && !holds_udp_port(proc.pid(), cfg_port),
        "nothing of ferryd's own on the config's port {cfg_port}:\n{log}"
    );
    proc.signal("TERM");
    assert_eq!(
        proc.wait_exit().code(),
        Some(0),
        "exit status after SIGTERM"
    );
}

/// Whether some socket is bound to UDP `port` on 127.0.0.1 (from /proc, without sending).
fn udp_bound(port: u16) -> bool {
    let hex = format!("0100007F:{port:04X} ");
    fs::read_to_string("/proc/net/udp").is_ok_and(|t| t.lines().any(|l| l.contains(&hex)))
}

#[test]
fn listen_pid_of_another_process_is_ignored() {
    let d = builder(&[("LISTEN_PID", "1"), ("LISTEN_FDS", "1")], "")
        .bind_own_port()
        .start();
    echo_and_close(&d, "own socket\n");
    let log = d.log();
    assert!(
        !log.contains("socket activation") && !log.contains("passed by systemd"),
        "LISTEN_PID=1 is not this process: nothing passed to use\n{log}"
    );
    assert!(
        log.contains(&format!("listening on 127.0.0.1:{} ", d.port())),
        "the daemon binds its configured port:\n{log}"
    );
}

#[test]
fn bad_listen_fds_for_this_process_exits_1() {
    let dir = TempDir::new();
    // Held by the test (bound, not listening): refused unless ferryd listens there.
    let cfg_hold = reserve_port();
    let cfg_port = cfg_hold.port();
    let cfg = write_config(&dir, cfg_port, &[]);
    // (shell commands before the exec, LISTEN_FDS, what the error says)
    let cases = [
        (
            "",
            "junk",
            "socket activation: LISTEN_FDS=junk is not a number of descriptors",
        ),
        (
            "",
            "0",
            "socket activation: LISTEN_FDS=0 is not a number of descriptors",
        ),
        (
            "",
            "17",
            "socket activation: LISTEN_FDS=17 is not a number of descriptors",
        ),
        (
            "exec 3<&-",
            "1",
            "socket activation: passed descriptor 3 cannot be used: not open",
        ),
    ];
    for (pre, fds, want) in cases {
        let (status, log) = start_with_listen_fds(&dir, &cfg, pre, fds);
        let what = format!("{pre} LISTEN_FDS={fds}");
        assert_eq!(status.code(), Some(1), "{what}: exit status\n{log}");
        let line = line_with(&log, want);
        assert!(line.contains("ERROR"), "{what}: an error line: {line}");
        assert!(
            !log.contains("listening on"),
            "{what}: must not serve\n{log}"
        );
        assert!(refused(cfg_port), "{what}: nothing listens");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Log formats.

/// Shell commands that set `JOURNAL_STREAM` to the device and inode of the shell's stderr (stat's
/// stderr is the same pipe), as systemd does for a service whose stderr is the journal.
const JOURNAL_STREAM_IS_STDERR: &str =
    "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); export JOURNAL_STREAM";

/// Sends the start of a frame with a bad magic number: ferryd logs a warning and closes.
fn send_bad_frame(d: &Daemon) -> String {
    let mut s = d.connect();
    let peer = peer_label(&s);
    s.write_all(b"\xF5FRX").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    d.wait_log(&format!("{peer} bad frame header"), WAIT);
    peer
}

/// Asserts that every line of `log` is in the journal format.
fn assert_journal_lines(log: &str) {
    for line in log.lines() {
        assert!(
            matches!(journal_priority(line), Some(3 | 4 | 6 | 7)),
            "every line should start with <3>, <4>, <6> or <7>: {line:?}\n{log}"
        );
        let msg = &line[3..];
        assert!(
            !msg.get(..24).is_some_and(is_timestamp),
            "journald adds its own timestamps: {line:?}"
        );
    }
}

#[test]
fn journal_stream_naming_stderr_selects_priority_prefixes() {
    let mut d = builder(&[], JOURNAL_STREAM_IS_STDERR)
        .set("log", "level = \"debug\"")
        .start();
    let pid = d.pid();
    let given = environ_var(pid, "JOURNAL_STREAM").expect("JOURNAL_STREAM in the environment");
    let fd2 = format!("/proc/{pid}/fd/2");
    let meta = fs::metadata(&fd2).unwrap_or_else(|e| panic!("stat {fd2}: {e}"));
    assert_eq!(
        given,
        format!("{}:{}", meta.dev(), meta.ino()),
        "stat's %d:%i and st_dev:st_ino in decimal (what ferryd compares) should agree"
    );
    let link = fs::read_link(&fd2).unwrap();
    assert_eq!(
        link.to_str().unwrap(),
        format!("pipe:[{}]", meta.ino()),
        "stderr is the test's pipe"
    );

    // Debug (an echo), info (connections) and warn (a bad frame) from the running daemon.
    let peer = echo_and_close(&d, "hi\n");
    let bad = send_bad_frame(&d);
    d.signal("TERM");
    let status = d.wait_exit(WAIT).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0));
    let log = d.log();
    assert_journal_lines(&log);
    for (prio, needle) in [
        (7, format!("{peer} req hi\\n")),
        (6, format!("{peer} online")),
        (4, format!("{bad} bad frame header")),
        (6, "stopped: ".to_string()),
    ] {
        let line = line_with(&log, &needle);
        assert!(
            line.starts_with(&format!("<{prio}>")),
            "want <{prio}> on {line:?}"
        );
    }

    // Error: a start that fails, with the same kind of JOURNAL_STREAM.
    let dir = TempDir::new();
    let cfg = write_config(&dir, reserve_port().port(), &[]);
    let (status, log) = start_with_listen_fds(&dir, &cfg, JOURNAL_STREAM_IS_STDERR, "junk");
    assert_eq!(status.code(), Some(1), "{log}");
    assert_journal_lines(&log);
    assert!(
        line_with(&log, "LISTEN_FDS=junk").starts_with("<3>socket activation: "),
        "errors are <3>:\n{log}"
    );
}

#[test]
fn journal_stream_naming_another_stream_keeps_the_human_format() {
    let d = builder(&[("JOURNAL_STREAM", "1:1")], "").start();
    echo_and_close(&d, "human\n");
    let log = d.log();
    assert!(log.lines().count() >= 3, "{log}");
    for line in log.lines() {
        assert!(
            is_human(line),
            "stderr is not the stream JOURNAL_STREAM names: want a timestamp first: {line:?}"
        );
    }
}

#[test]
fn log_format_journal_forces_prefixes_without_journal_stream() {
    let d = builder(&[], "").set("log", "format = \"journal\"").start();
    let peer = echo_and_close(&d, "forced\n");
    let bad = send_bad_frame(&d);
    let log = d.log();
    assert_journal_lines(&log);
    assert!(
        log.contains(&format!("<6>{peer} online")),
        "info lines are <6>:\n{log}"
    );
    assert!(
        log.contains(&format!("<4>{bad} bad frame header")),
        "warnings are <4>:\n{log}"
    );
}

/// The JSON value shapes ferryd writes: one object of string members, no whitespace.
/// Returns the members in order, decoded, or what is wrong.
fn parse_json_object(line: &str) -> Result<Vec<(String, String)>, String> {
    let mut chars = line.chars().peekable();
    let mut members = Vec::new();
    if chars.next() != Some('{') {
        return Err("does not start with {".into());
    }
    loop {
        let key = json_string(&mut chars)?;
        if chars.next() != Some(':') {
            return Err(format!("no ':' after key {key:?}"));
        }
        let value = json_string(&mut chars)?;
        members.push((key, value));
        match chars.next() {
            Some(',') => continue,
            Some('}') => break,
            other => return Err(format!("want ',' or '}}', got {other:?}")),
        }
    }
    match chars.next() {
        None => Ok(members),
        Some(c) => Err(format!("trailing text from {c:?}")),
    }
}

/// Decodes one JSON string literal (RFC 8259) from `chars`.
fn json_string(chars: &mut impl Iterator<Item = char>) -> Result<String, String> {
    if chars.next() != Some('"') {
        return Err("want a string".into());
    }
    let mut out = String::new();
    loop {
        match chars.next().ok_or("unterminated string")? {
            '"' => return Ok(out),
            '\\' => match chars.next().ok_or("unterminated escape")? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                '/' => out.push('/'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let c = u32::from_str_radix(&hex, 16)
                        .ok()
                        .filter(|_| hex.len() == 4)
                        .and_then(char::from_u32)
                        .ok_or(format!("bad \\u{hex}"))?;
                    out.push(c);
                }
                c => return Err(format!("bad escape \\{c}")),
            },
            c if (c as u32) < 0x20 => return Err(format!("raw control character {c:?}")),
            c => out.push(c),
        }
    }
}

/// Parses a JSON log file: every line one object with exactly `ts`, `level` and `msg`, a valid
/// timestamp and level. Returns (level, msg, raw line) per line.
fn parse_json_log(log: &str) -> Vec<(String, String, String)> {
    assert!(!log.is_empty(), "no log at all");
    log.lines()
        .map(|line| {
            let members = parse_json_object(line)
                .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}\n{log}"));
            let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, ["ts", "level", "msg"], "{line:?}");
            let (ts, level, msg) = (&members[0].1, &members[1].1, &members[2].1);
            assert!(is_timestamp(ts), "ts is RFC 3339 UTC: {line:?}");
            assert!(
                ["error", "warn", "info", "debug"].contains(&level.as_str()),
                "level: {line:?}"
            );
            (level.clone(), msg.clone(), line.to_string())
        })
        .collect()
}

/// The (level, msg, raw line) whose msg contains `needle`.
fn json_find<'a>(
    lines: &'a [(String, String, String)],
    needle: &str,
) -> &'a (String, String, String) {
    lines
        .iter()
        .find(|(_, m, _)| m.contains(needle))
        .unwrap_or_else(|| panic!("no msg contains {needle:?}: {lines:#?}"))
}

#[test]
fn log_format_json_writes_one_escaped_object_per_line() {
    let mut d = builder(&[], "")
        .set("log", "level = \"debug\"")
        .set("log", "format = \"json\"")
        .start();
    // A peer's quote and backslash: ferryd's log escaping shows the backslash (and the newline)
    // as `\\` (and `\n`), and JSON then escapes the quote and every backslash.
    let peer = echo_and_close(&d, "a\"b\\\n");
    let bad = send_bad_frame(&d);
    d.signal("TERM");
    let status = d.wait_exit(WAIT).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0));
    let log = d.log();
    let lines = parse_json_log(&log);
    // The decoded message is exactly what the human format would show.
    let (level, msg, raw) = json_find(&lines, &format!("{peer} req "));
    assert_eq!(level, "debug", "{raw}");
    assert_eq!(msg, &format!("{peer} req a\"b\\\\\\n"), "{raw}");
    assert!(
        raw.ends_with(r#"] req a\"b\\\\\\n"}"#),
        "raw escaping: {raw}"
    );
    assert_eq!(json_find(&lines, "listening on").0, "info");
    assert_eq!(json_find(&lines, &format!("{peer} online")).0, "info");
    assert_eq!(
        json_find(&lines, &format!("{bad} bad frame header")).0,
        "warn"
    );

    // An error, whose message holds a quote, a backslash and a newline from the environment
    // (no log escaping of ferryd's own in between): JSON alone escapes them.
    let dir = TempDir::new();
    let cfg = write_config(&dir, reserve_port().port(), &["format = \"json\""]);
    let (status, log) = start_with_listen_fds(&dir, &cfg, "", "a\"b\\\nc");
    assert_eq!(status.code(), Some(1), "{log}");
    let lines = parse_json_log(&log);
    let (level, msg, raw) = json_find(&lines, "socket activation: ");
    assert_eq!(level, "error", "{raw}");
    assert!(
        msg.starts_with("socket activation: LISTEN_FDS=a\"b\\\nc is not a number"),
        "{msg:?}"
    );
    assert!(
        raw.contains(r#"LISTEN_FDS=a\"b\\\nc is not"#),
        "raw escaping: {raw}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The unit files.

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: systemd-analyze (systemd); run bash tests/real-peers.sh"
)]
fn unit_files_pass_check_sh() {
    need("systemd-analyze", "systemd");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/check.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(support::bin());
    let mut p = Proc::start(cmd, "systemd/check.sh");
    let status = p.wait_exit();
    let out = p.stdout();
    assert!(
        status.success(),
        "check.sh failed ({status}):\n{out}\n{}",
        p.log()
    );
    for want in [
        "verify ferryd.service: OK",
        "verify ferryd-activated.service: OK",
        "verify ferryd-activated.socket: OK",
        "security ferryd.service: exposure ",
        "security ferryd-activated.service: exposure ",
        "check.sh: all checks passed",
    ] {
        assert!(out.contains(want), "check.sh should print {want:?}:\n{out}");
    }
}
