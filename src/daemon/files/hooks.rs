//! The command run for each stored file (`files.on_stored`): a bounded queue and a fixed number
//! of hook threads (`files.hook_workers`, started when the first hook is queued), each running
//! one command at a time in its own process group, killed at `files.hook_timeout_secs`, with its
//! exit status and the first lines of its output logged, escaped.
//!
//! A stored file is queued after its `OK` has been sent, with `try_send`: a full queue skips the
//! hook for that file (logged), so no client ever waits for a hook, and nothing a hook does can
//! change or remove the stored file.
//!
//! A hook never outlives its limit: what it started in the background is waited for (its hook
//! thread stays busy meanwhile, so `files.hook_workers` bounds the process trees too) and
//! killed at `files.hook_timeout_secs`, whether or not the hook itself has exited; what leaves
//! the process group comes back through the subreaper (`hookreap`). At daemon stop, running
//! hooks get `STOP_GRACE` and are killed, and the hooks still queued are counted in the log, not
//! run: a hook is a notification of a file that stays stored, and replaying it after a restart
//! from a journal could run it twice after a crash, so the log line says which files missed it.

use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::pipe::{PipeFlags, pipe_with};

use crate::config::Config;
use crate::daemon::files::hookreap::{self, RUN_ENV, Reaper};
use crate::escape::escaped;
use crate::hookargs::{self, Stored};
use crate::logger;
use crate::proto::decimal::Fixed;
use crate::proto::wire;
use crate::threads::{self, Body};

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
/// At daemon stop, how long running hooks may go on before they are killed.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// Names of queued hooks not run at daemon stop that the log line shows, at most.
const NOT_RUN_SHOWN: usize = 5;

/// One stored file's hook, waiting in the queue.
struct Run {
    /// Ties the processes it starts to it (`hookreap::RUN_ENV`).
    id: u64,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
    /// The stored name, escaped, for the log.
    label: String,
}

/// The hook queue and its threads.
#[derive(Debug)]
pub struct Hooks {
    /// Each queued hook is a job that runs it (`execute`) or, once the daemon stops, only counts
    /// it as not run (`Stop::skip`). Dropped at daemon stop: the hook threads take what is left
    /// and, once the queue is empty, see the disconnection and end.
    tx: Mutex<Option<Sender<Body>>>,
    rx: Receiver<Body>,
    workers: usize,
    depth: usize,
    stack: usize,
    started: Mutex<bool>,
    next_id: AtomicU64,
    reaper: Arc<Reaper>,
    stop: Arc<Stop>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The daemon's stop, as the hook threads see it.
#[derive(Debug, Default)]
struct Stop {
    /// When running hooks are killed; set at daemon stop.
    at: Mutex<Option<Instant>>,
    /// Hooks taken from the queue after the stop began, not run.
    not_run: AtomicUsize,
    /// The first of those not run, by queue order (`Run::id`), with their labels: whichever
    /// takes them from the queue (a hook thread or `Hooks::stop`), the log names them alike.
    skipped: Mutex<Vec<(u64, String)>>,
}

impl Stop {
    /// Counts `run` as not run and keeps its label if it is among the first `NOT_RUN_SHOWN`.
    fn skip(&self, run: Run) {
        self.not_run.fetch_add(1, Ordering::Relaxed);
        let mut skipped = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
        // Kept in id order (ids are unique) by inserting in place: no sort code for this one.
        let at = skipped.partition_point(|&(id, _)| id < run.id);
        skipped.insert(at, (run.id, run.label));
        skipped.truncate(NOT_RUN_SHOWN);
    }

    fn at(&self) -> Option<Instant> {
        *self.at.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
            tx: Mutex::new(Some(tx)),
            rx,
            workers: cfg.files.hook_workers.max(1),
            depth,
            stack,
            started: Mutex::new(false),
            next_id: AtomicU64::new(1),
            reaper: Arc::default(),
            stop: Arc::default(),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// At daemon stop: running hooks get `grace`, then they and what they started are killed;
    /// the hooks still queued are not run, and their number (and first names) is logged.
    /// Returns once every hook thread has ended.
    pub fn stop(&self, grace: Duration) {
        *self.stop.at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + grace);
        drop(
            self.tx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        // Each job left finds the stop set and only counts its hook as not run.
        while let Ok(job) = self.rx.try_recv() {
            job();
        }
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
        let not_run = self.stop.not_run.load(Ordering::Relaxed);
        let names: Vec<String> = (self.stop.skipped.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(_, label)| format!("\"{label}\""))
            .collect();
        if not_run > 0 {
            let more = not_run.saturating_sub(names.len());
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            logger::warn!(
                "daemon stopping: {not_run} queued hook(s) not run (files.on_stored), for {}{more}; the files stay stored",
                names.join(", ")
            );
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut env = stored.env();
        env.push((RUN_ENV.to_string(), id.to_string()));
        let run = Run {
            id,
            argv: hookargs::fill(template, &stored),
            env,
            timeout: cfg.files.hook_timeout,
            label: escaped(stored_name.as_bytes(), 255).to_string(),
        };
        self.start();
        let label = run.label.clone();
        let (stop, reaper) = (Arc::clone(&self.stop), Arc::clone(&self.reaper));
        let job: Body = Box::new(move || {
            if stop.at().is_some() {
                stop.skip(run);
            } else {
                execute(&run, &reaper, &stop);
            }
        });
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        // After the daemon's stop a hook is not queued (nor counted: the count is logged).
        let Some(tx) = tx.as_ref() else {
            return;
        };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => logger::warn!(
                "hook for \"{label}\" not run: {} files already wait for a hook (files.hook_queue_depth); the file stays stored",
                self.depth
            ),
            Err(TrySendError::Disconnected(_)) => {
                logger::warn!("hook for \"{label}\" not run: no hook thread")
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
        Reaper::adopt_orphans();
        let mut running = 0;
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        for index in 0..self.workers {
            let spawned =
                threads::spawn_runner(format!("hook-{index}"), Some(self.stack), self.rx.clone());
            match spawned {
                Ok(t) => {
                    threads.push(t);
                    running += 1;
                }
                Err(e) => logger::error!("cannot start hook thread {}: {e}", index + 1),
            }
        }
        logger::info!(
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
    /// It exited, and nothing it started was left running.
    Exited(ExitStatus),
    /// Killed with all it started at its time limit (or at daemon stop): its exit status if it
    /// had exited and only what it left behind was killed.
    Killed {
        status: Option<ExitStatus>,
        at_stop: bool,
    },
    /// Its status could not be read.
    Lost(io::Error),
}

/// Runs one hook to its end or its time limit, and logs how it went.
fn execute(run: &Run, reaper: &Reaper, stop: &Stop) {
    let started = Instant::now();
    let Some((program, args)) = run.argv.split_first() else {
        return;
    };
    let label = &run.label;
    let shown_program = escaped(program.as_bytes(), 255);
    let (mut pipe, mut child) = match spawn(program, args, &run.env, reaper) {
        Ok(p) => p,
        Err(e) => {
            logger::warn!("hook for \"{label}\": cannot run {shown_program}: {e}");
            return;
        }
    };
    let pgid = child.id();
    let limit = started + run.timeout;
    let mut out = Output::default();
    let mut status: Option<(ExitStatus, Instant)> = None;
    let end = loop {
        let now = Instant::now();
        if status.is_none() {
            match child.try_wait() {
                Ok(Some(st)) => {
                    reaper.leader_done(pgid);
                    status = Some((st, now));
                }
                Ok(None) => {}
                Err(e) => {
                    hookreap::kill_group(pgid);
                    let _ = child.wait();
                    reaper.leader_done(pgid);
                    reaper.kill_all(pgid, run.id);
                    break End::Lost(e);
                }
            }
        }
        let stop_at = stop.at();
        let deadline = stop_at.map_or(limit, |at| at.min(limit));
        if now >= deadline {
            if status.is_none() {
                hookreap::kill_group(pgid);
                let _ = child.wait();
                reaper.leader_done(pgid);
            }
            if reaper.kill_all(pgid, run.id) {
                logger::warn!(
                    "hook for \"{label}\": processes of run {} survive SIGKILL",
                    run.id
                );
            }
            break End::Killed {
                status: status.map(|(st, _)| st),
                at_stop: stop_at.is_some_and(|at| at < limit),
            };
        }
        if let Some((st, at)) = status {
            // Done when its output is over and nothing it started lives on.
            if (out.eof || now >= at + DRAIN_AFTER_EXIT) && !reaper.remains(pgid, run.id) {
                break End::Exited(st);
            }
        }
        let wait = WAKE.min(deadline.saturating_duration_since(now));
        if out.eof || status.is_some_and(|(_, at)| now >= at + DRAIN_AFTER_EXIT) {
            thread::sleep(wait.min(Duration::from_millis(20)));
        } else {
            out.read_ready(&mut pipe, wait);
        }
    };
    log_end(run, &shown_program, started, &end, &out);
}

/// Logs how a hook ended and its output.
fn log_end(run: &Run, program: &dyn std::fmt::Display, started: Instant, end: &End, out: &Output) {
    let label = &run.label;
    let took = Fixed::secs(started.elapsed(), 2);
    let limit = run.timeout.as_secs();
    let failed = match end {
        End::Exited(status) if status.success() => {
            logger::info!("hook for \"{label}\": {program} exited 0 in {took} s");
            false
        }
        End::Exited(status) => {
            logger::warn!(
                "hook for \"{label}\": {program} {} in {took} s; the file stays stored",
                describe(*status)
            );
            true
        }
        End::Killed { status, at_stop } => {
            let when = if *at_stop {
                "at daemon stop".to_string()
            } else {
                format!("after files.hook_timeout_secs = {limit} s")
            };
            match status {
                Some(st) => logger::warn!(
                    "hook for \"{label}\": {program} {} but what it started was still running {when}; killed it all; the file stays stored",
                    describe(*st)
                ),
                None => logger::warn!(
                    "hook for \"{label}\": {program} still running {when}; killed its process group and all it started; the file stays stored"
                ),
            }
            true
        }
        End::Lost(e) => {
            logger::warn!("hook for \"{label}\": cannot wait for {program}: {e}; killed it");
            true
        }
    };
    log_output(label, out, failed);
}

/// Starts the program in its own process group, stdin from /dev/null and stdout and stderr into
/// one pipe whose read end is returned.
fn spawn(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    reaper: &Reaper,
) -> io::Result<(File, Child)> {
    let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC)?;
    let write_err = write_end.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_err))
        .process_group(0);
    let child = reaper.spawn(&mut cmd);
    // Our copies of the write end go with the command, so the pipe ends when the hook's do.
    drop(cmd);
    Ok((File::from(read_end), child?))
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
        logger::log!(
            level,
            "hook for \"{label}\" output: {}",
            escaped(line, LINE_WIDTH)
        );
    }
    let left = out.total.saturating_sub(shown_bytes);
    if lines.next().is_some() || out.total > out.kept.len() as u64 {
        logger::log!(
            level,
            "hook for \"{label}\" output: … ({left} more bytes not logged)"
        );
    }
}
