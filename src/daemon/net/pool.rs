//! The worker pool's threads: starting one for the accept thread (`Hiring`), and the loop each
//! runs (`work`): take a connection from the queue, serve it with panics caught, and end after
//! `WORKER_KEEP` without one, so an idle daemon holds no worker stacks.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::conn;
use crate::daemon::net::lanes;
use crate::daemon::net::queue::{Queue, Waiting, Worker};
use crate::daemon::net::refuse::{refuse, refuse_waiting};
use crate::daemon::shared::{Job, Shared, worker_stack_bytes};
use crate::daemon::stats::Stats;
use crate::logger;
use crate::proto::wire::ERR_SHUTDOWN;
use crate::threads;

/// How long a worker without a connection waits for one before its thread ends. Long enough
/// that a steady trickle of connections reuses threads; short enough that the stacks of a
/// burst's workers are given back soon after it.
const WORKER_KEEP: Duration = Duration::from_secs(5);
/// At most one warning per this interval when a worker thread cannot be started.
const SPAWN_WARN_EVERY: Duration = Duration::from_secs(10);

/// Starting worker threads for the accept thread.
#[derive(Default)]
pub struct Hiring {
    /// Threads started so far, for their names.
    n_started: u64,
    /// When a failure to start one was last logged.
    last_warning: Option<Instant>,
}

impl Hiring {
    /// Starts `worker` on its own thread. If the thread cannot start, the worker is dropped (its
    /// counts given back) and the connection waits for a busy worker, or its queue timeout.
    pub fn start(&mut self, shared: &Arc<Shared>, queue: &Queue, worker: Worker) {
        let stack = worker_stack_bytes(&shared.config());
        let thread_shared = Arc::clone(shared);
        let spawned = threads::spawn(
            format!("worker-{}", self.n_started),
            Some(stack),
            Box::new(move || work(&thread_shared, worker)),
        );
        match spawned {
            Ok(_) => self.n_started += 1,
            Err(e) => {
                if self
                    .last_warning
                    .is_none_or(|t| t.elapsed() >= SPAWN_WARN_EVERY)
                {
                    self.last_warning = Some(Instant::now());
                    logger::warn!(
                        "cannot start a worker thread: {e}; {} worker(s) serve, the connection waits (lower server.max_connections or raise the process/thread limits)",
                        queue.live_workers()
                    );
                }
            }
        }
    }
}

/// A worker thread: serves connections from the queue until it closes, or until none came for
/// `WORKER_KEEP`. A connection that waited past `queue_timeout_secs` is told `ERR busy` at once,
/// and one taken while the server stops is told it is shutting down.
fn work(shared: &Shared, mut worker: Worker) {
    while let Some(Waiting { since, job }) = worker.next(WORKER_KEEP) {
        if shared.is_stopping() {
            Stats::sub(&shared.stats.queued, 1);
            refuse(&job.stream, ERR_SHUTDOWN);
            continue;
        }
        let timeout = shared.config().server.queue_timeout;
        if lanes::expired(since, Instant::now(), timeout) {
            refuse_waiting(
                shared,
                job,
                "no worker freed up within server.queue_timeout_secs",
            );
            continue;
        }
        Stats::sub(&shared.stats.queued, 1);
        serve_caught(shared, job);
    }
}

/// Serves one connection; a panic in its handling is caught and logged, so that a bug in one
/// connection's handling does not cost the daemon a worker. Not inlined: the handler's large
/// stack frame exists only while a connection is served, never under an idle worker.
#[inline(never)]
fn serve_caught(shared: &Shared, job: Job) {
    let peer = job.peer;
    if panic::catch_unwind(AssertUnwindSafe(|| conn::serve(shared, job))).is_err() {
        logger::error!("{peer} handler panicked; connection closed, worker continues");
    }
}
