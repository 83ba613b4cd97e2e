//! The work queue: accepted connections waiting for a worker. The accept thread puts connections
//! in and may take waiting ones back out to tell them `ERR busy`: those that waited longer than
//! `server.queue_timeout_secs` (never silence), and, when the queue is full, one from the address
//! holding the most connections if the newcomer's address holds fewer, so that a few addresses
//! cannot keep everyone else out of the queue. A worker takes the connection whose address holds
//! the fewest connections, the oldest among equals: a client from a quiet address does not wait
//! behind a crowd from a busy one.
//!
//! A mutex and a condition variable rather than a channel, because a channel cannot give back a
//! connection from its middle. Every critical section is a push, a pop or a short scan: nobody
//! holds the lock while doing I/O, so the accept thread never waits on a worker's work.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::daemon::shared::Job;

/// Connections waiting for a worker.
#[derive(Default)]
pub struct Queue {
    state: Mutex<State>,
    ready: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<(Instant, Job)>,
    closed: bool,
}

impl Queue {
    /// A worker's wait for the next connection: the one whose address holds the fewest
    /// connections (`held`), the oldest among equals. `None` once the queue is closed.
    pub fn pop(&self, held: impl Fn(IpAddr) -> u32) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            let lightest = state
                .jobs
                .iter()
                .enumerate()
                .min_by_key(|&(i, (_, job))| (held(job.peer.ip()), i))
                .map(|(i, _)| i);
            if let Some((_, job)) = lightest.and_then(|i| state.jobs.remove(i)) {
                return Some(job);
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Adds a connection at the back and wakes a worker.
    pub fn push(&self, job: Job, now: Instant) {
        self.lock().jobs.push_back((now, job));
        self.ready.notify_one();
    }

    /// How many connections wait.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
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
    /// that the newcomer can wait in its place.
    pub fn displace(&self, held: impl Fn(IpAddr) -> u32, newcomer: u32) -> Option<Job> {
        let mut state = self.lock();
        let (i, _) = state
            .jobs
            .iter()
            .enumerate()
            .map(|(i, (_, job))| (i, held(job.peer.ip())))
            .filter(|&(_, n)| n > newcomer)
            // The heaviest address; among its connections the newest (the last index).
            .max_by_key(|&(i, n)| (n, i))?;
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

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;

    use super::*;
    use crate::daemon::access::PerIp;
    use crate::peer::Peer;

    #[test]
    fn expiry_displacement_and_closing() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let per_ip = Arc::new(PerIp::default());
        let q = Queue::default();
        let t0 = Instant::now();
        let mut keep = Vec::new();
        for (i, ip) in ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.1"]
            .into_iter()
            .enumerate()
        {
            keep.push(TcpStream::connect(l.local_addr().unwrap()).unwrap());
            let (stream, _) = l.accept().unwrap();
            let ip: IpAddr = ip.parse().unwrap();
            let job = Job {
                stream,
                peer: Peer::new(SocketAddr::new(ip, 1000 + i as u16)),
                slot: per_ip.acquire(ip, 100).unwrap(),
            };
            q.push(job, t0 + Duration::from_secs(i as u64));
        }
        // A worker takes the lightest address's: 10.0.0.2 holds one, 10.0.0.1 four.
        let held = |ip: IpAddr| per_ip.open_from(ip);
        assert_eq!(q.pop(held).unwrap().peer.to_string(), "[10.0.0.2:1002]");
        // Among equals, the oldest.
        assert_eq!(q.pop(|_| 1).unwrap().peer.to_string(), "[10.0.0.1:1000]");
        assert_eq!(q.len(), 3);
        // 10.0.0.1 now holds 3 (the popped jobs are gone), 10.0.0.2 none: a newcomer holding
        // one displaces 10.0.0.1's newest waiting (port 1004).
        let gone = q.displace(held, 1).unwrap();
        assert_eq!(gone.peer.to_string(), "[10.0.0.1:1004]");
        // A newcomer holding as much as the heaviest displaces nobody.
        assert!(q.displace(held, 4).is_none());
        // Those that waited 2 s or more by t0 + 3 s: the one queued at t0 + 1 (not t0 + 3).
        let expired = q.expired(t0 + Duration::from_secs(3), Duration::from_secs(2));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].peer.to_string(), "[10.0.0.1:1001]");
        let left = q.close();
        assert_eq!(left.len(), 1);
        assert!(q.pop(held).is_none(), "closed");
    }
}
