//! The work queue: accepted connections waiting for a worker, in bounded crossbeam channels, one
//! per lane (`net::lanes`), and the worker pool's counts. The accept thread sends into the lanes
//! and holds receivers too, so that it can take back the connections that waited
//! `server.queue_timeout_secs` (the oldest of each lane is at its head) and, when the queue is
//! full, the oldest of a heavier lane for a newcomer to wait in its place. Workers take with
//! `select_biased!`, the lightest lane first.
//!
//! Workers are started on demand: a connection queued while more connections wait than workers
//! are idle hires one (a `Worker`, up to `max_workers`), which the accept thread starts on its own
//! thread. A worker that waited `keep` without a connection retires; if a connection arrived as
//! it left, it rejoins, so no connection waits for a worker that has gone. The counts are atomics;
//! the only queue is the channels.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, select_biased};

use crate::daemon::net::lanes::{self, LANES, Lane};
use crate::daemon::shared::Job;

/// A connection in the queue, with when it was queued.
pub struct Waiting {
    pub since: Instant,
    pub job: Job,
}

/// The accept thread's side of the queue.
pub struct Queue {
    senders: Option<[Sender<Waiting>; LANES]>,
    lanes: [LaneEnd; LANES],
    pool: Arc<Pool>,
}

/// The accept thread's receiver of one lane, and when each connection still in it was queued,
/// oldest first. Only the accept thread sends, so the connections in a lane are the last
/// `len()` it sent, in order.
struct LaneEnd {
    rx: Receiver<Waiting>,
    queued_at: VecDeque<Instant>,
}

/// What the workers share: the lanes' receivers and the pool's counts.
struct Pool {
    lanes: [Receiver<Waiting>; LANES],
    max_workers: usize,
    /// Workers hired and not yet retired.
    live: AtomicUsize,
    /// Workers without a connection: starting, or waiting for one.
    idle: AtomicUsize,
    /// A worker left the pool (at most one signal pending; the waiter counts `live` again).
    gone_tx: Sender<()>,
    gone_rx: Receiver<()>,
    /// Set by `close`: a worker that retires does not come back.
    closed: AtomicBool,
}

/// A worker's place in the pool, from its hiring to its end: counted live all along, and idle
/// while it has no connection. Dropping it (its thread ends, or could not be started) gives both
/// counts back.
#[must_use = "the worker leaves the pool when dropped"]
pub struct Worker {
    pool: Arc<Pool>,
    live: bool,
    idle: bool,
}

impl Queue {
    /// An empty queue of `depth` places per lane beyond the workers, whose pool holds at most
    /// `max_workers` workers.
    pub fn new(depth: usize, max_workers: usize) -> Queue {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..LANES).map(|_| bounded(depth + max_workers)).unzip();
        let senders: [Sender<Waiting>; LANES] =
            senders.try_into().unwrap_or_else(|_| unreachable!());
        let receivers: [Receiver<Waiting>; LANES] =
            receivers.try_into().unwrap_or_else(|_| unreachable!());
        let (gone_tx, gone_rx) = bounded(1);
        let end = |rx: &Receiver<Waiting>| LaneEnd {
            rx: rx.clone(),
            queued_at: VecDeque::new(),
        };
        Queue {
            lanes: receivers.each_ref().map(end),
            senders: Some(senders),
            pool: Arc::new(Pool {
                lanes: receivers,
                max_workers,
                live: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                gone_tx,
                gone_rx,
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Queues a connection in `lane`; gives it back if the lane is full or the queue closed.
    /// Returns a new worker (counted live and idle) for the caller to start when one is needed.
    pub fn push(&mut self, lane: Lane, job: Job, now: Instant) -> Result<Option<Worker>, Job> {
        let Some(senders) = &self.senders else {
            return Err(job);
        };
        match senders[lane.index()].try_send(Waiting { since: now, job }) {
            Ok(()) => self.lanes[lane.index()].queued_at.push_back(now),
            Err(TrySendError::Full(w) | TrySendError::Disconnected(w)) => return Err(w.job),
        }
        Ok(self.hire())
    }

    /// A new worker if more connections wait than workers are idle and the pool is not full.
    pub fn hire(&self) -> Option<Worker> {
        let pool = &self.pool;
        let idle = pool.idle.load(Ordering::SeqCst);
        let live = pool.live.load(Ordering::SeqCst);
        if !lanes::should_hire(self.len(), idle, live, pool.max_workers) {
            return None;
        }
        pool.join().then(|| Worker {
            pool: Arc::clone(pool),
            live: true,
            idle: true,
        })
    }

    /// How many connections wait.
    pub fn len(&self) -> usize {
        self.pool.waiting()
    }

    /// How many connections wait in each lane.
    pub fn per_lane(&self) -> [usize; LANES] {
        Lane::ALL.map(|l| self.pool.lanes[l.index()].len())
    }

    /// Workers that could take a connection now or soon: the idle ones and those the pool may
    /// still hire.
    pub fn free_workers(&self) -> usize {
        let pool = &self.pool;
        let live = pool.live.load(Ordering::SeqCst);
        pool.idle.load(Ordering::SeqCst) + pool.max_workers.saturating_sub(live)
    }

    /// Workers in the pool now.
    pub fn live_workers(&self) -> usize {
        self.pool.live.load(Ordering::SeqCst)
    }

    /// Waits until every worker has left the pool or `deadline` passes; returns how many are
    /// still in it.
    pub fn wait_workers_gone(&self, deadline: Instant) -> usize {
        loop {
            let live = self.live_workers();
            if live == 0 || self.pool.gone_rx.recv_deadline(deadline).is_err() {
                return self.live_workers();
            }
        }
    }

    /// Takes back the connections that have waited `timeout` or longer: the heads of the lanes.
    pub fn expired(&mut self, now: Instant, timeout: Duration) -> Vec<Job> {
        let mut out = Vec::new();
        for i in 0..LANES {
            while self.lanes[i]
                .oldest()
                .is_some_and(|since| lanes::expired(since, now, timeout))
            {
                let Some(w) = self.lanes[i].take() else {
                    break;
                };
                if lanes::expired(w.since, now, timeout) {
                    out.push(w.job);
                } else {
                    // A worker took the expired head first; this one goes back, behind.
                    if let Err(job) = self.push(Lane::ALL[i], w.job, w.since) {
                        out.push(job);
                    }
                    break;
                }
            }
        }
        out
    }

    /// When the queue is full: takes back the oldest connection of a lane heavier than the
    /// newcomer's (`net::lanes::displace`), so that the newcomer can wait in its place.
    pub fn displace(&mut self, newcomer: Lane) -> Option<Job> {
        let lane = lanes::displace(newcomer, self.per_lane())?;
        self.lanes[lane.index()].take().map(|w| w.job)
    }

    /// Closes the queue: workers waiting or coming back get `None`. Returns what was waiting.
    pub fn close(&mut self) -> Vec<Job> {
        self.pool.closed.store(true, Ordering::SeqCst);
        self.senders = None;
        let mut out = Vec::new();
        for lane in &mut self.lanes {
            while let Some(w) = lane.take() {
                out.push(w.job);
            }
        }
        out
    }
}

impl LaneEnd {
    /// When the connection at the head was queued, as far as the accept thread knows.
    fn oldest(&mut self) -> Option<Instant> {
        // Workers took the ones before: forget their times.
        let len = self.rx.len();
        while self.queued_at.len() > len {
            self.queued_at.pop_front();
        }
        self.queued_at.front().copied()
    }

    /// Takes the connection at the head, if any is left.
    fn take(&mut self) -> Option<Waiting> {
        let w = self.rx.try_recv().ok()?;
        self.queued_at.pop_front();
        Some(w)
    }
}

impl Pool {
    fn waiting(&self) -> usize {
        self.lanes.iter().map(Receiver::len).sum()
    }

    /// Counts one worker more, live and idle, unless the pool is full.
    fn join(&self) -> bool {
        let joined = self
            .live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                (l < self.max_workers).then_some(l + 1)
            })
            .is_ok();
        if joined {
            self.idle.fetch_add(1, Ordering::SeqCst);
        }
        joined
    }

    /// Counts one worker less, live and (if it was) idle, and says so to `wait_workers_gone`.
    fn leave(&self, idle: bool) {
        if idle {
            self.idle.fetch_sub(1, Ordering::SeqCst);
        }
        self.live.fetch_sub(1, Ordering::SeqCst);
        let _ = self.gone_tx.try_send(());
    }
}

impl Worker {
    /// The wait for the next connection, the lightest lane first. `None` once the queue is
    /// closed, or when none came within `keep`: the worker has then retired (it is no longer
    /// counted) and its thread ends.
    // Not inlined: `select_biased!` builds its operations on the stack, which would otherwise
    // stay in the worker's frame under every connection it serves (see `conn::READ_BUF`).
    #[inline(never)]
    pub fn next(&mut self, keep: Duration) -> Option<Waiting> {
        let pool = &*self.pool;
        if !self.idle {
            pool.idle.fetch_add(1, Ordering::SeqCst);
            self.idle = true;
        }
        loop {
            let got = select_biased! {
                recv(pool.lanes[0]) -> w => w.ok(),
                recv(pool.lanes[1]) -> w => w.ok(),
                recv(pool.lanes[2]) -> w => w.ok(),
                default(keep) => None,
            };
            if let Some(w) = got {
                pool.idle.fetch_sub(1, Ordering::SeqCst);
                self.idle = false;
                return Some(w);
            }
            // Retired; then, if a connection came as it left and the queue is open, back in:
            // the accept thread may have counted on it as idle.
            pool.leave(true);
            self.idle = false;
            self.live = false;
            let open = !pool.closed.load(Ordering::SeqCst);
            if !(open && pool.waiting() > 0 && pool.join()) {
                return None;
            }
            self.live = true;
            self.idle = true;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.live {
            self.pool.leave(self.idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};

    use super::*;
    use crate::daemon::access::per_ip::PerIp;
    use crate::daemon::registry::Registry;
    use crate::peer::Peer;

    /// `n` accepted connections from `ips`, and the client ends that keep them open.
    fn jobs(ips: &[&str], per_ip: &Arc<PerIp>) -> (Vec<Job>, Vec<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut keep = Vec::new();
        let mut out = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            keep.push(TcpStream::connect(l.local_addr().unwrap()).unwrap());
            let (stream, _) = l.accept().unwrap();
            let ip: IpAddr = ip.parse().unwrap();
            let peer = Peer::new(SocketAddr::new(ip, 1000 + i as u16));
            out.push(Job {
                stream,
                peer,
                slot: Some(per_ip.acquire(ip, 100).unwrap()),
                listed: Registry::default().register(peer),
            });
        }
        (out, keep)
    }

    fn peer(w: Option<Waiting>) -> String {
        w.map(|w| w.job.peer.to_string()).unwrap_or_default()
    }

    #[test]
    fn lanes_expiry_displacement_and_closing() {
        let per_ip = Arc::new(PerIp::default());
        let mut q = Queue::new(4, 1);
        let t0 = Instant::now();
        let (js, _keep) = jobs(
            &["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.1"],
            &per_ip,
        );
        let lanes = [
            Lane::Heavy,
            Lane::Heavy,
            Lane::Light,
            Lane::Heavy,
            Lane::Heavy,
        ];
        let mut hired = Vec::new();
        for (i, (job, lane)) in js.into_iter().zip(lanes).enumerate() {
            let at = t0 + Duration::from_secs(i as u64);
            hired.extend(q.push(lane, job, at).ok().flatten());
        }
        // One worker at most, hired by the first push.
        assert_eq!(hired.len(), 1);
        let mut w = hired.pop().unwrap();
        let keep = Duration::from_secs(60);
        // A worker takes the light lane first, then the oldest of the heavy one.
        assert_eq!(peer(w.next(keep)), "[10.0.0.2:1002]");
        assert_eq!(peer(w.next(keep)), "[10.0.0.1:1000]");
        assert_eq!((q.len(), q.per_lane()), (3, [0, 0, 3]));
        // A light newcomer displaces the heavy lane's oldest (port 1001); a heavy one nobody.
        assert!(q.displace(Lane::Heavy).is_none());
        let gone = q.displace(Lane::Light).unwrap();
        assert_eq!(gone.peer.to_string(), "[10.0.0.1:1001]");
        // Those that waited 2 s or more by t0 + 5 s: the one queued at t0 + 3 (not t0 + 4).
        let expired = q.expired(t0 + Duration::from_secs(5), Duration::from_secs(2));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].peer.to_string(), "[10.0.0.1:1003]");
        let left = q.close();
        assert_eq!(left.len(), 1);
        assert!(w.next(keep).is_none(), "closed");
        assert_eq!(
            q.live_workers(),
            0,
            "a worker retires when the queue closes"
        );
        drop(w);
        assert_eq!(q.live_workers(), 0);
        // A closed queue gives a newcomer back.
        let (mut js, _keep) = jobs(&["10.0.0.3"], &per_ip);
        assert!(q.push(Lane::Light, js.pop().unwrap(), t0).is_err());
    }

    #[test]
    fn a_worker_that_took_the_expired_head_leaves_the_rest_in_order() {
        let per_ip = Arc::new(PerIp::default());
        let mut q = Queue::new(4, 1);
        let t0 = Instant::now();
        let (js, _keep) = jobs(&["10.0.0.1", "10.0.0.1", "10.0.0.1"], &per_ip);
        let mut hired = Vec::new();
        for (i, job) in js.into_iter().enumerate() {
            let at = t0 + Duration::from_secs(i as u64);
            hired.extend(q.push(Lane::Heavy, job, at).ok().flatten());
        }
        let mut w = hired.pop().unwrap();
        assert_eq!(peer(w.next(Duration::ZERO)), "[10.0.0.1:1000]");
        // At t0 + 2.5 s with a 2 s timeout, only the one queued at t0 + 0 expired, and a worker
        // has it: nothing is taken back.
        let at = t0 + Duration::from_millis(2500);
        assert!(q.expired(at, Duration::from_secs(2)).is_empty());
        assert_eq!(peer(w.next(Duration::ZERO)), "[10.0.0.1:1001]");
        assert_eq!(peer(w.next(Duration::ZERO)), "[10.0.0.1:1002]");
    }

    #[test]
    fn workers_are_hired_on_demand_up_to_the_limit_and_retire_when_idle() {
        let per_ip = Arc::new(PerIp::default());
        let mut q = Queue::new(8, 2);
        assert_eq!(q.free_workers(), 2);
        let (js, _keep) = jobs(&["10.0.0.1"; 5], &per_ip);
        let mut js = js.into_iter();
        let now = Instant::now();
        let mut push = |q: &mut Queue| {
            let job = js.next().unwrap();
            q.push(Lane::Heavy, job, now).ok().flatten()
        };
        // Nobody idle: the first connection hires a worker.
        let mut a = push(&mut q).expect("hired");
        // The second outnumbers the one idle (still starting) worker: another.
        let b = push(&mut q).expect("hired");
        // The pool is full: the third waits.
        assert!(push(&mut q).is_none());
        assert_eq!((q.live_workers(), q.free_workers()), (2, 2));
        // A worker that takes a connection is no longer free.
        let keep = Duration::from_secs(60);
        assert!(a.next(keep).is_some());
        assert_eq!(q.free_workers(), 1);
        // A worker that could not be started gives its counts back when dropped.
        drop(b);
        assert_eq!((q.live_workers(), q.free_workers()), (1, 1));
        // Two connections wait and no worker is idle: the next push hires again.
        assert!(push(&mut q).is_some_and(|w| {
            drop(w);
            true
        }));
        // A worker coming back takes what waits, the oldest first, without retiring.
        for _ in 0..3 {
            assert!(a.next(Duration::ZERO).is_some());
        }
        assert_eq!(q.len(), 0);
        // Nothing waits and its time is up: it retires.
        assert!(a.next(Duration::ZERO).is_none());
        assert_eq!((q.live_workers(), q.free_workers()), (0, 2));
        // Retired, it is not counted twice when dropped.
        drop(a);
        assert_eq!((q.live_workers(), q.free_workers()), (0, 2));
        // With no worker left, a connection hires one again.
        let c = push(&mut q);
        assert!(c.is_some());
        assert_eq!(q.wait_workers_gone(Instant::now()), 1);
        drop(c);
        assert_eq!(q.wait_workers_gone(Instant::now() + keep), 0);
    }

    #[test]
    fn an_idle_worker_takes_a_connection_queued_without_hiring() {
        let per_ip = Arc::new(PerIp::default());
        let mut q = Queue::new(8, 1);
        let (mut js, _keep) = jobs(&["10.0.0.1"], &per_ip);
        let job = js.pop().unwrap();
        let now = Instant::now();
        assert!(q.hire().is_none(), "nothing waits");
        assert!(q.pool.join());
        let mut w = Worker {
            pool: Arc::clone(&q.pool),
            live: true,
            idle: true,
        };
        // The worker counts as idle, so the push hires nobody: it must serve it, even after its
        // wait timed out.
        assert!(q.push(Lane::Light, job, now).ok().flatten().is_none());
        assert!(w.next(Duration::ZERO).is_some());
        assert_eq!(q.live_workers(), 1);
    }
}
