//! The worker pool's threads: starting one for the accept thread (`Hiring`), and the loop each
//! runs (`work`): take a connection from the queue, serve it with panics caught, and end after
//! `WORKER_KEEP` without one, so an idle daemon holds no worker stacks. A connection from a
//! balancer is first admitted by its PROXY header and sorted by its client (`sort`): served, or
//! put back in its client's lane when someone who may be lighter waits.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::access::addrgroup;
use crate::daemon::conn;
use crate::daemon::net::lanes::{self, AddressLoad, Lane};
use crate::daemon::net::queue::{Queue, Waiting, Worker};
use crate::daemon::net::refuse::{refuse, refuse_waiting};
use crate::daemon::registry::State;
use crate::daemon::shared::{Client, Job, Shared, worker_stack_bytes};
use crate::daemon::stats::Stats;
use crate::logger;
use crate::peer::Peer;
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
/// `WORKER_KEEP`.
fn work(shared: &Shared, mut worker: Worker) {
    while let Some(Waiting { since, job }) = worker.next(WORKER_KEEP) {
        if let Some(job) = sort(shared, &worker, since, job) {
            Stats::sub(&shared.stats.queued, 1);
            serve_caught(shared, job);
        }
    }
}

/// What a worker does with a connection it took, before serving it: one taken while the server
/// stops is told so, and one that waited past `queue_timeout_secs` is told `ERR busy`. One from
/// a balancer whose header nobody has read yet is admitted by it (`conn::admit_proxied`), then
/// counted among its client's recent connections and given its client's lane; if someone who
/// may be lighter waits (`lanes::wait_again`), it goes back to wait in that lane with its
/// arrival time, else (or if that lane is full) it is served now. Returns the connection to
/// serve, or `None` when it was answered or put back. Out of line, like `serve_caught`, so that
/// its frame is not kept under the connection being served.
#[inline(never)]
fn sort(shared: &Shared, worker: &Worker, since: Instant, job: Job) -> Option<Job> {
    if shared.is_stopping() {
        Stats::sub(&shared.stats.queued, 1);
        refuse(&job.stream, ERR_SHUTDOWN);
        return None;
    }
    let timeout = shared.config().server.queue_timeout;
    if lanes::expired(since, Instant::now(), timeout) {
        refuse_waiting(
            shared,
            job,
            "no worker freed up within server.queue_timeout_secs",
        );
        return None;
    }
    if !matches!(job.client, Client::Unread) {
        return Some(job);
    }
    let job = match admit_caught(shared, job) {
        Ok(job) => job,
        Err(refused) => {
            Stats::sub(&shared.stats.queued, 1);
            // A refused client counts among its recent connections, as a refused direct
            // connection does: a client that keeps retrying is seen.
            if let Some(client) = refused {
                worker.record(addrgroup::of(client.ip()), Instant::now());
            }
            return None;
        }
    };
    let rank = worker.record(addrgroup::of(job.peer.ip()), Instant::now());
    let lane = lane_of(shared, job.peer, rank);
    if !lanes::wait_again(lane, worker.per_lane()) {
        return Some(job);
    }
    // Listed as queued again until a worker takes it; `conn::serve` sets its mode back.
    job.listed.live().set_base(State::Queued);
    let peer = job.peer;
    match worker.put_back(lane, Waiting { since, job }) {
        Ok(()) => {
            logger::debug!(
                "{peer} waits again, in the {} lane: connections that may be lighter wait",
                lane.as_str()
            );
            None
        }
        // The lane is full or the queue closed: served now rather than dropped, unless the
        // server stops.
        Err(w) if shared.is_stopping() => {
            Stats::sub(&shared.stats.queued, 1);
            refuse(&w.job.stream, ERR_SHUTDOWN);
            None
        }
        Err(w) => Some(w.job),
    }
}

/// The lane of a connection from `peer`, counted against `max_per_ip` already, whose address
/// group has the recent rank `recent`: for a direct connection when it is accepted, for one from
/// a balancer when a worker has read its client's address.
pub fn lane_of(shared: &Shared, peer: Peer, recent: u64) -> Lane {
    // Its own slot is counted already: the others are what the address holds besides.
    let held = shared.per_ip.open_from(peer.ip()).saturating_sub(1);
    lanes::lane(AddressLoad { held, recent })
}

/// Admits a balancer's connection by its PROXY header (`conn::admit_proxied`), with a panic
/// caught and logged like one in serving it.
#[inline(never)]
fn admit_caught(shared: &Shared, job: Job) -> Result<Job, Option<Peer>> {
    let via = job.peer;
    match panic::catch_unwind(AssertUnwindSafe(|| conn::admit_proxied(shared, job))) {
        Ok(admitted) => admitted,
        Err(_) => {
            logger::error!(
                "{via} handler panicked reading its PROXY header; connection closed, worker continues"
            );
            Err(None)
        }
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
