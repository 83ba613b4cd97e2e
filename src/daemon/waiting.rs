//! The work queue: accepted connections waiting for a worker. The accept thread puts connections
//! in and may take waiting ones back out to tell them `ERR busy`: those that waited longer than
//! `server.queue_timeout_secs` (never silence), and, when the queue is full, one from the address
//! holding the most connections if the newcomer's address holds fewer, so that a few addresses
//! cannot keep everyone else out of the queue. A worker takes the connection whose address holds
//! the fewest connections, the oldest among equals: a client from a quiet address does not wait
//! behind a crowd from a busy one.
//!
//! The queue also keeps the worker pool's counts, so that workers are started on demand: a push
//! that leaves more connections waiting than there are idle workers hires one more (a `Worker`,
//! up to `max_workers`), which the accept thread starts on its own thread. A worker that waited
//! `keep` for a connection without getting one retires. Hiring, taking a connection and retiring
//! each happen under the lock, so no connection ever waits for a worker that is about to leave,
//! and the workers never outnumber `max_workers`.
//!
//! A mutex and a condition variable rather than a channel, because a channel cannot give back a
//! connection from its middle. Every critical section is a push, a pop or a short scan: nobody
//! holds the lock while doing I/O, so the accept thread never waits on a worker's work.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::daemon::addrgroup;
use crate::daemon::recent::Recent;
use crate::daemon::shared::Job;

/// Connections waiting for a worker, and the counts of the workers that serve them.
pub struct Queue {
    state: Mutex<State>,
    /// Signalled when a connection is queued or the queue closes.
    ready: Condvar,
    /// Signalled when a worker leaves the pool.
    gone: Condvar,
    max_workers: usize,
}

struct State {
    jobs: VecDeque<(Instant, Job)>,
    closed: bool,
    /// Workers hired and not yet retired.
    live: usize,
    /// Workers without a connection: starting, or waiting for one.
    idle: usize,
    /// Recent connections per address group: who churns (`recent`).
    recent: Recent,
}

/// A worker's place in the pool, from its hiring to its end: counted live all along, and idle
/// while it has no connection. Dropping it (its thread ends, or could not be started) gives both
/// counts back.
#[must_use = "the worker leaves the pool when dropped"]
pub struct Worker {
    queue: Arc<Queue>,
    live: bool,
    idle: bool,
}

impl Queue {
    /// An empty queue whose pool holds at most `max_workers` workers.
    pub fn new(max_workers: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closed: false,
                live: 0,
                idle: 0,
                recent: Recent::default(),
            }),
            ready: Condvar::new(),
            gone: Condvar::new(),
            max_workers,
        }
    }

    /// Adds a connection at the back and wakes a worker. When the waiting connections outnumber
    /// the idle workers and the pool is not full, returns a new worker (counted live and idle)
    /// for the caller to start.
    pub fn push(self: &Arc<Self>, job: Job, now: Instant) -> Option<Worker> {
        let hired = {
            let mut state = self.lock();
            state.jobs.push_back((now, job));
            let hire = state.jobs.len() > state.idle && state.live < self.max_workers;
            if hire {
                state.live += 1;
                state.idle += 1;
            }
            hire
        };
        self.ready.notify_one();
        hired.then(|| Worker {
            queue: Arc::clone(self),
            live: true,
            idle: true,
        })
    }

    /// Counts a connection accepted from `ip` (queued or not) in the recent weights that order
    /// the queue (`recent`).
    pub fn arrived(&self, ip: IpAddr, now: Instant) {
        self.lock().recent.record(addrgroup::of(ip), now);
    }

    /// How many connections wait.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Workers that could take a connection now or soon: the idle ones and those the pool may
    /// still hire.
    pub fn free_workers(&self) -> usize {
        let state = self.lock();
        state.idle + self.max_workers.saturating_sub(state.live)
    }

    /// Workers in the pool now.
    pub fn live_workers(&self) -> usize {
        self.lock().live
    }

    /// Waits until every worker has left the pool or `deadline` passes; returns how many are
    /// still in it.
    pub fn wait_workers_gone(&self, deadline: Instant) -> usize {
        let mut state = self.lock();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if state.live == 0 || left.is_zero() {
                return state.live;
            }
            state = self
                .gone
                .wait_timeout(state, left)
                .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        }
    }

    /// Takes back the connections that have waited `timeout` or longer.
    pub fn expired(&self, now: Instant, timeout: Duration) -> Vec<Job> {
        let mut state = self.lock();
        let mut out = Vec::new();
        while state
            .jobs
            .front()
            .is_some_and(|(since, _)| now.saturating_duration_since(*since) >= timeout)
        {
            if let Some((_, job)) = state.jobs.pop_front() {
                out.push(job);
            }
        }
        out
    }

    /// When the queue is full: takes back the newest connection of the address holding the most
    /// connections (`held`), if that is more than the newcomer's address holds (`newcomer`), so
    /// that the newcomer can wait in its place; failing that, one of the group that made the
    /// most connections recently, if far more than the newcomer's (`Recent::displaceable`).
    pub fn displace(
        &self,
        held: impl Fn(IpAddr) -> u32,
        newcomer: u32,
        newcomer_ip: IpAddr,
    ) -> Option<Job> {
        let mut state = self.lock();
        let heaviest = state
            .jobs
            .iter()
            .enumerate()
            .map(|(i, (_, job))| (i, held(job.peer.ip())))
            .filter(|&(_, n)| n > newcomer)
            // The heaviest address; among its connections the newest (the last index).
            .max_by_key(|&(i, n)| (n, i))
            .map(|(i, _)| i);
        let now = Instant::now();
        let groups = state.jobs.iter().enumerate();
        let i = heaviest.or_else(|| {
            let groups = groups.map(|(i, (_, job))| (i, addrgroup::of(job.peer.ip())));
            state
                .recent
                .displaceable(groups, addrgroup::of(newcomer_ip), now)
        })?;
        state.jobs.remove(i).map(|(_, job)| job)
    }

    /// Closes the queue: workers waiting or coming back get `None`. Returns what was waiting.
    pub fn close(&self) -> Vec<Job> {
        let jobs = {
            let mut state = self.lock();
            state.closed = true;
            state.jobs.drain(..).map(|(_, job)| job).collect()
        };
        self.ready.notify_all();
        jobs
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the deque whole: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Worker {
    /// The wait for the next connection: the one whose address holds the fewest connections
    /// (`held`), the oldest among equals. `None` once the queue is closed, or when none came
    /// within `keep`: the worker has then retired (it is no longer counted) and its thread ends.
    pub fn next(&mut self, held: impl Fn(IpAddr) -> u32, keep: Duration) -> Option<Job> {
        let queue = &*self.queue;
        let mut state = queue.lock();
        if !self.idle {
            state.idle += 1;
            self.idle = true;
        }
        let until = Instant::now() + keep;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if state.closed || (left.is_zero() && state.jobs.is_empty()) {
                // Retired in the same critical section that found nothing to do, so a push
                // after it hires another worker rather than counting on this one.
                state.idle -= 1;
                state.live -= 1;
                self.idle = false;
                self.live = false;
                drop(state);
                queue.gone.notify_all();
                return None;
            }
            let now = Instant::now();
            let lightest = state
                .jobs
                .iter()
                .enumerate()
                .min_by_key(|&(i, (_, job))| {
                    let ip = job.peer.ip();
                    let recent = state.recent.rank(addrgroup::of(ip), now);
                    (held(ip), recent, i)
                })
                .map(|(i, _)| i);
            if let Some((_, job)) = lightest.and_then(|i| state.jobs.remove(i)) {
                state.idle -= 1;
                self.idle = false;
                return Some(job);
            }
            state = queue
                .ready
                .wait_timeout(state, left)
                .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.live && !self.idle {
            return;
        }
        {
            let mut state = self.queue.lock();
            state.idle -= usize::from(self.idle);
            state.live -= usize::from(self.live);
        }
        self.queue.gone.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};

    use super::*;
    use crate::daemon::access::PerIp;
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
            out.push(Job {
                stream,
                peer: Peer::new(SocketAddr::new(ip, 1000 + i as u16)),
                slot: per_ip.acquire(ip, 100).unwrap(),
            });
        }
        (out, keep)
    }

    #[test]
    fn expiry_displacement_and_closing() {
        let per_ip = Arc::new(PerIp::default());
        let q = Arc::new(Queue::new(1));
        let t0 = Instant::now();
        let (js, _keep) = jobs(
            &["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.1"],
            &per_ip,
        );
        let mut hired = Vec::new();
        for (i, job) in js.into_iter().enumerate() {
            hired.extend(q.push(job, t0 + Duration::from_secs(i as u64)));
        }
        // One worker at most, hired by the first push.
        assert_eq!(hired.len(), 1);
        let mut w = hired.pop().unwrap();
        let keep = Duration::from_secs(60);
        // A worker takes the lightest address's: 10.0.0.2 holds one, 10.0.0.1 four.
        let held = |ip: IpAddr| per_ip.open_from(ip);
        assert_eq!(
            w.next(held, keep).unwrap().peer.to_string(),
            "[10.0.0.2:1002]"
        );
        // Among equals, the oldest.
        assert_eq!(
            w.next(|_| 1, keep).unwrap().peer.to_string(),
            "[10.0.0.1:1000]"
        );
        assert_eq!(q.len(), 3);
        // 10.0.0.1 now holds 3 (the popped jobs are gone), 10.0.0.2 none: a newcomer holding
        // one displaces 10.0.0.1's newest waiting (port 1004).
        let newcomer: IpAddr = "10.0.0.3".parse().unwrap();
        let gone = q.displace(held, 1, newcomer).unwrap();
        assert_eq!(gone.peer.to_string(), "[10.0.0.1:1004]");
        // A newcomer holding as much as the heaviest displaces nobody.
        assert!(q.displace(held, 4, newcomer).is_none());
        // Those that waited 2 s or more by t0 + 3 s: the one queued at t0 + 1 (not t0 + 3).
        let expired = q.expired(t0 + Duration::from_secs(3), Duration::from_secs(2));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].peer.to_string(), "[10.0.0.1:1001]");
        let left = q.close();
        assert_eq!(left.len(), 1);
        assert!(w.next(held, keep).is_none(), "closed");
        assert_eq!(
            q.live_workers(),
            0,
            "a worker retires when the queue closes"
        );
        drop(w);
        assert_eq!(q.live_workers(), 0);
    }

    #[test]
    fn workers_are_hired_on_demand_up_to_the_limit_and_retire_when_idle() {
        let per_ip = Arc::new(PerIp::default());
        let q = Arc::new(Queue::new(2));
        assert_eq!(q.free_workers(), 2);
        let (js, _keep) = jobs(&["10.0.0.1"; 5], &per_ip);
        let mut js = js.into_iter();
        let now = Instant::now();
        // Nobody idle: the first connection hires a worker.
        let mut a = q.push(js.next().unwrap(), now).expect("hired");
        // The second outnumbers the one idle (still starting) worker: another.
        let b = q.push(js.next().unwrap(), now).expect("hired");
        // The pool is full: the third waits.
        assert!(q.push(js.next().unwrap(), now).is_none());
        assert_eq!((q.live_workers(), q.free_workers()), (2, 2));
        // A worker that takes a connection is no longer free.
        let keep = Duration::from_secs(60);
        assert!(a.next(|_| 0, keep).is_some());
        assert_eq!(q.free_workers(), 1);
        // A worker that could not be started gives its counts back when dropped.
        drop(b);
        assert_eq!((q.live_workers(), q.free_workers()), (1, 1));
        // One waiting connection more than idle workers (none): the next push hires again.
        assert!(q.push(js.next().unwrap(), now).is_some_and(|w| {
            drop(w);
            true
        }));
        // A worker coming back takes what waits, the oldest first, without retiring.
        for _ in 0..3 {
            assert!(a.next(|_| 0, Duration::ZERO).is_some());
        }
        assert_eq!(q.len(), 0);
        // Nothing waits and its time is up: it retires, in the same step.
        assert!(a.next(|_| 0, Duration::ZERO).is_none());
        assert_eq!((q.live_workers(), q.free_workers()), (0, 2));
        // Retired, it is not counted twice when dropped.
        drop(a);
        assert_eq!((q.live_workers(), q.free_workers()), (0, 2));
        // With no worker left, a connection hires one again.
        let c = q.push(js.next().unwrap(), now);
        assert!(c.is_some());
        assert_eq!(q.wait_workers_gone(Instant::now()), 1);
        drop(c);
        assert_eq!(q.wait_workers_gone(Instant::now() + keep), 0);
    }
}
