//! The command run for each stored file (`files.on_stored`): a bounded queue and a fixed number
//! of hook threads (`files.hook_workers`, started when the first hook is queued), each running
//! one command at a time in its own process group, killed at `files.hook_timeout_secs`, with its
//! exit status and the first lines of its output logged, escaped.
//!
//! A stored file is queued after its `OK` has been sent, with `try_send`: a full queue skips the
//! hook for that file (logged), so no client ever waits for a hook, and nothing a hook does can
//! change or remove the stored file.

use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::pipe::{PipeFlags, pipe_with};

use crate::config::Config;
use crate::escape::escaped;
use crate::hookargs::{self, Stored};
use crate::proto::wire;

/// Bytes of a hook's output (stdout and stderr together) kept for the log; the rest is read
/// and counted, never stored.
pub const OUTPUT_BYTES: usize = 2048;
/// Lines of a hook's output logged, at most.
pub const OUTPUT_LINES: usize = 5;
/// Widest output line logged, in bytes before escaping.
const LINE_WIDTH: usize = 300;
/// How long a hook thread waits on the output pipe before it looks at the process again.
const WAKE: Duration = Duration::from_millis(50);
/// After the program exits, how long its output pipe may stay open (held by something it left
/// running in the background) before the thread stops reading.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// One stored file's hook, waiting in the queue.
struct Run {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
    /// The stored name, escaped, for the log.
    label: String,
}

/// The hook queue and its threads.
#[derive(Debug)]
pub struct Hooks {
    tx: Sender<Run>,
    rx: Receiver<Run>,
    workers: usize,
    depth: usize,
    stack: usize,
    started: Mutex<bool>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Run({})", self.label)
    }
}

impl Hooks {
    /// A queue of `files.hook_queue_depth` for `files.hook_workers` threads of `stack` bytes;
    /// no thread starts until the first hook is queued.
    pub fn new(cfg: &Config, stack: usize) -> Hooks {
        let depth = cfg.files.hook_queue_depth.max(1);
        let (tx, rx) = crossbeam_channel::bounded(depth);
        Hooks {
            tx,
            rx,
            workers: cfg.files.hook_workers.max(1),
            depth,
            stack,
            started: Mutex::new(false),
        }
    }

    /// Queues the hook of `cfg` (the connection's settings) for a file just stored in `dir`;
    /// never blocks. Does nothing when `files.on_stored` is empty.
    pub fn stored(
        &self,
        cfg: &Config,
        dir: &Path,
        stored_name: &str,
        size: u64,
        checksum: &[u8; 32],
        peer: SocketAddr,
    ) {
        let template = &cfg.files.on_stored;
        if template.is_empty() {
            return;
        }
        let path = dir.join(stored_name);
        let path = std::path::absolute(&path).unwrap_or(path);
        let stored = Stored {
            path: path.to_string_lossy().into_owned(),
            name: stored_name.to_string(),
            size,
            checksum: wire::hex(checksum),
            peer: peer.to_string(),
        };
        let run = Run {
            argv: hookargs::fill(template, &stored),
            env: stored.env(),
            timeout: cfg.files.hook_timeout,
            label: escaped(stored_name.as_bytes(), 255).to_string(),
        };
        self.start();
        match self.tx.try_send(run) {
            Ok(()) => {}
            Err(TrySendError::Full(run)) => log::warn!(
                "hook for \"{}\" not run: {} files already wait for a hook (files.hook_queue_depth); the file stays stored",
                run.label,
                self.depth
            ),
            Err(TrySendError::Disconnected(run)) => {
                log::warn!("hook for \"{}\" not run: no hook thread", run.label)
            }
        }
    }

    /// Starts the hook threads, once.
    fn start(&self) {
        let mut started = self.started.lock().unwrap_or_else(PoisonError::into_inner);
        if *started {
            return;
        }
        *started = true;
        let mut running = 0;
        for index in 0..self.workers {
            let rx = self.rx.clone();
            let spawned = thread::Builder::new()
                .name(format!("hook-{index}"))
                .stack_size(self.stack)
                .spawn(move || {
                    for run in rx.iter() {
                        execute(&run);
                    }
                });
            match spawned {
                Ok(_) => running += 1,
                Err(e) => log::error!("cannot start hook thread {}: {e}", index + 1),
            }
        }
        log::info!(
            "started {running} hook thread(s) (files.hook_workers = {})",
            self.workers
        );
    }
}

/// What a hook's output pipe gave.
#[derive(Default)]
struct Output {
    kept: Vec<u8>,
    total: u64,
    eof: bool,
}

impl Output {
    /// Reads what is ready on `pipe`, waiting at most `wait`.
    fn read_ready(&mut self, pipe: &mut File, wait: Duration) {
        let ts = Timespec {
            tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&*pipe, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => return,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return,
            Err(_) => {
                self.eof = true;
                return;
            }
        }
        let mut buf = [0u8; 4096];
        match pipe.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.total += n as u64;
                let room = OUTPUT_BYTES.saturating_sub(self.kept.len());
                self.kept
                    .extend_from_slice(buf.get(..n.min(room)).unwrap_or(&[]));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.eof = true,
        }
    }
}

/// How a hook ended.
enum End {
    Exited(ExitStatus),
    Killed,
    /// Its status could not be read.
    Lost(io::Error),
}

/// Runs one hook to its end or its time limit, and logs how it went.
fn execute(run: &Run) {
    let started = Instant::now();
    let Some((program, args)) = run.argv.split_first() else {
        return;
    };
    let label = &run.label;
    let shown_program = escaped(program.as_bytes(), 255);
    let (mut pipe, mut child) = match spawn(program, args, &run.env) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("hook for \"{label}\": cannot run {shown_program}: {e}");
            return;
        }
    };
    let deadline = started + run.timeout;
    let mut out = Output::default();
    let mut exited_at: Option<Instant> = None;
    let end = loop {
        let now = Instant::now();
        match child.try_wait() {
            Ok(Some(status)) => {
                let at = *exited_at.get_or_insert(now);
                if out.eof || now >= at + DRAIN_AFTER_EXIT {
                    break End::Exited(status);
                }
            }
            Ok(None) if now >= deadline => {
                kill_group(&child);
                let _ = child.wait();
                break End::Killed;
            }
            Ok(None) => {}
            Err(e) => {
                kill_group(&child);
                let _ = child.wait();
                break End::Lost(e);
            }
        }
        let wait = WAKE.min(deadline.saturating_duration_since(now));
        if out.eof {
            thread::sleep(wait.min(Duration::from_millis(5)));
        } else {
            out.read_ready(&mut pipe, wait);
        }
    };
    let took = started.elapsed().as_secs_f64();
    let failed = match &end {
        End::Exited(status) if status.success() => {
            log::info!("hook for \"{label}\": {shown_program} exited 0 in {took:.2} s");
            false
        }
        End::Exited(status) => {
            log::warn!(
                "hook for \"{label}\": {shown_program} {} in {took:.2} s; the file stays stored",
                describe(*status)
            );
            true
        }
        End::Killed => {
            log::warn!(
                "hook for \"{label}\": {shown_program} still running after files.hook_timeout_secs = {} s; killed its process group; the file stays stored",
                run.timeout.as_secs()
            );
            true
        }
        End::Lost(e) => {
            log::warn!("hook for \"{label}\": cannot wait for {shown_program}: {e}; killed it");
            true
        }
    };
    log_output(label, &out, failed);
}

/// Starts the program in its own process group, stdin from /dev/null and stdout and stderr into
/// one pipe whose read end is returned.
fn spawn(program: &str, args: &[String], env: &[(String, String)]) -> io::Result<(File, Child)> {
    let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC)?;
    let write_err = write_end.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_err))
        .process_group(0);
    let child = cmd.spawn();
    // Our copies of the write end go with the command, so the pipe ends when the hook's do.
    drop(cmd);
    Ok((File::from(read_end), child?))
}

/// Kills the hook's whole process group: the program and whatever it started.
fn kill_group(child: &Child) {
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    if let Err(e) = killpg(Pid::from_raw(pid), Signal::SIGKILL) {
        log::warn!("cannot kill hook process group {pid}: {e}");
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("ended ({status})"),
    }
}

/// Logs the first `OUTPUT_LINES` lines of a hook's output, escaped, and how much was left out.
fn log_output(label: &str, out: &Output, failed: bool) {
    let level = if failed {
        log::Level::Warn
    } else {
        log::Level::Info
    };
    let mut lines = out.kept.split(|&b| b == b'\n').filter(|l| !l.is_empty());
    let mut shown_bytes = 0u64;
    for line in lines.by_ref().take(OUTPUT_LINES) {
        shown_bytes += line.len() as u64 + 1;
        log::log!(
            level,
            "hook for \"{label}\" output: {}",
            escaped(line, LINE_WIDTH)
        );
    }
    let left = out.total.saturating_sub(shown_bytes);
    if lines.next().is_some() || out.total > out.kept.len() as u64 {
        log::log!(
            level,
            "hook for \"{label}\" output: … ({left} more bytes not logged)"
        );
    }
}
