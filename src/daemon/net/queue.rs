//! The work queue: accepted connections waiting for a worker, in bounded crossbeam channels, one
//! per lane (`net::lanes`), and the worker pool's counts. The accept thread sends into the lanes
//! and holds receivers too, so that it can take back the connections that waited
//! `server.queue_timeout_secs` and, when the queue is full, the oldest of a heavier lane for a
//! newcomer to wait in its place. Workers take with a biased `Select`, the lightest lane first.
//! A worker that has read a balancer connection's PROXY header may put it back, in its client's
//! lane with its arrival time (`Worker::put_back`); every send, the accept thread's and the
//! workers', goes through one lock (`Sending`) that keeps the arrival times in the lanes' order.
//!
//! Workers are started on demand: a connection queued while more connections wait than workers
//! are idle hires one (a `Worker`, up to `max_workers`), which the accept thread starts on its own
//! thread. A worker that waited `keep` without a connection retires; if a connection arrived as
//! it left, it rejoins, so no connection waits for a worker that has gone. The counts are atomics;
//! the only queue is the channels.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, TrySendError, bounded};

use crate::daemon::net::lanes::{self, LANES, Lane};
use crate::daemon::net::recent::Recent;
use crate::daemon::shared::Job;

/// A connection in the queue, with when it arrived (kept when a worker puts it back).
pub struct Waiting {
    pub since: Instant,
    pub job: Job,
}

/// The accept thread's side of the queue.
pub struct Queue {
    pool: Arc<Pool>,
}

/// The sending side of the lanes. Each send happens under its lock together with the entry in
/// `queued_at`, so that the entries stay in each lane's order.
struct Sending {
    /// `None` once the queue is closed.
    tx: Option<[Sender<Waiting>; LANES]>,
    /// When each connection sent into a lane arrived, in the lane's order. Workers take from the
    /// heads without the lock, so the connections still in a lane are its last `len()` entries
    /// (`Pool::trim` drops the others).
    queued_at: [VecDeque<Instant>; LANES],
}

/// What the accept thread and the workers share: the lanes, their sending side, the recent
/// connections that order them and the pool's counts.
struct Pool {
    lanes: [Receiver<Waiting>; LANES],
    sending: Mutex<Sending>,
    /// Recent connections per address group (`net::recent`): the accept thread counts direct
    /// connections, workers the clients of connections from a balancer.
    recent: Mutex<Recent>,
    max_workers: usize,
    /// Workers hired and not yet retired.
    live: AtomicUsize,
    /// Workers without a connection: starting, or waiting for one.
    idle: AtomicUsize,
    /// Notified when a worker leaves the pool (under `gone_lock`, so that `wait_workers_gone`,
    /// which counts `live` under it, never misses one).
    gone: Condvar,
    gone_lock: Mutex<()>,
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
        Queue {
            pool: Arc::new(Pool {
                lanes: receivers,
                sending: Mutex::new(Sending {
                    tx: Some(senders),
                    queued_at: Default::default(),
                }),
                recent: Mutex::new(Recent::default()),
                max_workers,
                live: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                gone: Condvar::new(),
                gone_lock: Mutex::new(()),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Queues a connection in `lane`; gives it back if the lane is full or the queue closed.
    /// Returns a new worker (counted live and idle) for the caller to start when one is needed.
    pub fn push(&mut self, lane: Lane, job: Job, now: Instant) -> Result<Option<Worker>, Job> {
        self.pool
            .lock_sending()
            .send(lane, Waiting { since: now, job })
            .map_err(|w| w.job)?;
        Ok(self.hire())
    }

    /// Counts a connection of address group `group` at `now` among the recent ones, and returns
    /// the group's rank (`net::recent::Recent::rank`) with it.
    pub fn record(&self, group: IpAddr, now: Instant) -> u64 {
        self.pool.record(group, now)
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
        let pool = &self.pool;
        let mut lock = pool
            .gone_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            let live = self.live_workers();
            let left = deadline.saturating_duration_since(Instant::now());
            if live == 0 || left.is_zero() {
                return live;
            }
            lock = (pool.gone.wait_timeout(lock, left))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Takes back the connections that have waited `timeout` or longer. They are at the heads
    /// of the lanes, except one a worker put back (it keeps its arrival time), which may be
    /// behind younger ones: then the whole lane is taken and the others go back in their order.
    pub fn expired(&mut self, now: Instant, timeout: Duration) -> Vec<Job> {
        let pool = &*self.pool;
        let late = |t: &Instant| lanes::expired(*t, now, timeout);
        let mut s = pool.lock_sending();
        let mut out = Vec::new();
        for lane in Lane::ALL {
            let i = lane.index();
            pool.trim(&mut s, i);
            let times = &s.queued_at[i];
            let head = times.iter().take_while(|t| late(t)).count();
            let n = if times.iter().skip(head).any(late) {
                times.len()
            } else {
                head
            };
            let mut keep = Vec::new();
            for _ in 0..n {
                let Some(w) = pool.take(&mut s, i) else {
                    break;
                };
                if late(&w.since) {
                    out.push(w.job);
                } else {
                    // Not expired (or a worker took the expired head first): back, in order.
                    keep.push(w);
                }
            }
            for w in keep {
                if let Err(w) = s.send(lane, w) {
                    out.push(w.job);
                }
            }
        }
        out
    }

    /// When the queue is full: takes back the oldest connection of a lane heavier than the
    /// newcomer's (`net::lanes::displace`), so that the newcomer can wait in its place.
    pub fn displace(&mut self, newcomer: Lane) -> Option<Job> {
        let pool = &*self.pool;
        let lane = lanes::displace(newcomer, pool.per_lane())?;
        let mut s = pool.lock_sending();
        pool.take(&mut s, lane.index()).map(|w| w.job)
    }

    /// Closes the queue: workers waiting or coming back get `None`, and a worker's `put_back`
    /// fails. Returns what was waiting.
    pub fn close(&mut self) -> Vec<Job> {
        let pool = &*self.pool;
        pool.closed.store(true, Ordering::SeqCst);
        let mut s = pool.lock_sending();
        s.tx = None;
        let mut out = Vec::new();
        for i in 0..LANES {
            while let Some(w) = pool.take(&mut s, i) {
                out.push(w.job);
            }
        }
        out
    }
}

impl Sending {
    /// Sends a connection into `lane`, recording its arrival time; gives it back if the lane is
    /// full or the queue closed.
    fn send(&mut self, lane: Lane, w: Waiting) -> Result<(), Waiting> {
        let Some(tx) = &self.tx else {
            return Err(w);
        };
        let since = w.since;
        match tx[lane.index()].try_send(w) {
            Ok(()) => {
                self.queued_at[lane.index()].push_back(since);
                Ok(())
            }
            Err(TrySendError::Full(w) | TrySendError::Disconnected(w)) => Err(w),
        }
    }
}

impl Pool {
    fn waiting(&self) -> usize {
        self.lanes.iter().map(Receiver::len).sum()
    }

    fn per_lane(&self) -> [usize; LANES] {
        Lane::ALL.map(|l| self.lanes[l.index()].len())
    }

    fn lock_sending(&self) -> MutexGuard<'_, Sending> {
        // The state under the lock is consistent between statements; a panic elsewhere
        // does not spoil it.
        self.sending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, group: IpAddr, now: Instant) -> u64 {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.record(group, now);
        recent.rank(group, now)
    }

    /// Forgets the arrival times of the connections workers took from lane `i`.
    fn trim(&self, s: &mut Sending, i: usize) {
        let len = self.lanes[i].len();
        while s.queued_at[i].len() > len {
            s.queued_at[i].pop_front();
        }
    }

    /// Takes the connection at the head of lane `i`, if any is left.
    fn take(&self, s: &mut Sending, i: usize) -> Option<Waiting> {
        let w = self.lanes[i].try_recv().ok()?;
        s.queued_at[i].pop_front();
        Some(w)
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
        let _lock = self
            .gone_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.gone.notify_all();
    }
}

impl Worker {
    /// The wait for the next connection, the lightest lane first. `None` once the queue is
    /// closed, or when none came within `keep`: the worker has then retired (it is no longer
    /// counted) and its thread ends.
    // Not inlined: the selection's state would otherwise stay in the worker's frame under
    // every connection it serves (see `conn::READ_BUF`).
    #[inline(never)]
    pub fn next(&mut self, keep: Duration) -> Option<Waiting> {
        let pool = &*self.pool;
        if !self.idle {
            pool.idle.fetch_add(1, Ordering::SeqCst);
            self.idle = true;
        }
        loop {
            let mut sel = Select::new_biased();
            for lane in &pool.lanes {
                sel.recv(lane);
            }
            let got = match sel.select_timeout(keep) {
                Ok(op) => {
                    let lane = op.index();
                    op.recv(&pool.lanes[lane]).ok()
                }
                Err(_) => None,
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

    /// Puts a connection this worker took back at the end of `lane`, keeping its arrival time;
    /// gives it back if the lane is full or the queue closed.
    pub fn put_back(&self, lane: Lane, w: Waiting) -> Result<(), Waiting> {
        self.pool.lock_sending().send(lane, w)
    }

    /// How many connections wait in each lane.
    pub fn per_lane(&self) -> [usize; LANES] {
        self.pool.per_lane()
    }

    /// `Queue::record`, for the client of a connection from a balancer.
    pub fn record(&self, group: IpAddr, now: Instant) -> u64 {
        self.pool.record(group, now)
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
    use crate::daemon::shared::Client;
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
                stream: Arc::new(stream),
                peer,
                client: Client::Direct(per_ip.acquire(ip, 100).unwrap()),
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
        assert_eq!((q.len(), q.pool.per_lane()), (3, [0, 0, 0, 3]));
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
    fn a_connection_put_back_keeps_its_arrival_time_and_expires_from_behind_younger_ones() {
        let per_ip = Arc::new(PerIp::default());
        let mut q = Queue::new(2, 1);
        let t0 = Instant::now();
        let keep = Duration::from_secs(60);
        let ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"];
        let (js, _keep) = jobs(&ips, &per_ip);
        let mut js = js.into_iter();
        // The first, from a balancer, arrives at t0 and a worker takes it; two more arrive at
        // t0 + 3 s and t0 + 4 s in the heavy lane.
        let first = js.next().unwrap();
        let mut w = q
            .push(Lane::Unread, first, t0)
            .ok()
            .flatten()
            .expect("hired");
        let taken = w.next(keep).unwrap();
        assert_eq!(taken.since, t0);
        for (i, job) in js.by_ref().take(2).enumerate() {
            let at = t0 + Duration::from_secs(3 + i as u64);
            assert!(q.push(Lane::Heavy, job, at).is_ok());
        }
        // The worker puts it back behind them, with its arrival time.
        assert!(w.put_back(Lane::Heavy, taken).is_ok());
        assert_eq!(q.pool.per_lane(), [0, 0, 0, 3]);
        // At t0 + 5 s with a 5 s timeout only it has waited that long: it is taken back from
        // behind the younger ones, which keep their order.
        let expired = q.expired(t0 + Duration::from_secs(5), Duration::from_secs(5));
        let expired: Vec<String> = expired.iter().map(|j| j.peer.to_string()).collect();
        assert_eq!(expired, ["[10.0.0.1:1000]"]);
        assert_eq!(q.pool.per_lane(), [0, 0, 0, 2]);
        let second = w.next(keep).unwrap();
        assert_eq!(second.job.peer.to_string(), "[10.0.0.2:1001]");
        // A full lane (two places beyond the one worker: three) gives it back.
        for job in js {
            assert!(q.push(Lane::Heavy, job, t0).is_ok());
        }
        let second = match w.put_back(Lane::Heavy, second) {
            Err(w) => w,
            Ok(()) => panic!("put back into a full lane"),
        };
        assert_eq!(peer(w.next(keep)), "[10.0.0.3:1002]");
        // So does a closed queue.
        assert_eq!(q.close().len(), 2);
        assert!(w.put_back(Lane::Light, second).is_err());
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
