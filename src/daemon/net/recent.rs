//! How many connections each address group (`access::addrgroup`) made recently, for the queue's order:
//! a bounded table of decaying counts (pure: the caller passes the time). A group that
//! reconnects as fast as it can weighs much; a newcomer weighs nothing, so it is preferred in
//! the queue (its own lane, `net::lanes::Lane::Fresh`, taken first by a worker and kept when the
//! queue is full in place of a heavier lane's oldest) instead of being lost among 200 addresses
//! that churn.
//!
//! Each connection adds 1 to its group's weight, which halves every `HALF_LIFE`. The table holds
//! at most `CAPACITY` groups; when full, the groups whose weight decayed below `FORGET` go, and
//! if none has, the lightest one, so an attacker with many addresses cannot grow it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Groups the table remembers, at most.
pub const CAPACITY: usize = 4096;
/// The time a weight takes to halve.
pub const HALF_LIFE: Duration = Duration::from_secs(10);
/// Below this, a weight is forgotten when room is needed.
const FORGET: f64 = 0.5;

/// Recent connections per address group, decaying.
#[derive(Debug, Default)]
pub struct Recent {
    groups: HashMap<IpAddr, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    weight: f64,
    at: Instant,
}

impl Entry {
    fn now(&self, now: Instant) -> f64 {
        let age = now.saturating_duration_since(self.at).as_secs_f64();
        self.weight * 0.5f64.powf(age / HALF_LIFE.as_secs_f64())
    }
}

impl Recent {
    /// Counts a connection from `group` at `now`.
    pub fn record(&mut self, group: IpAddr, now: Instant) {
        if !self.groups.contains_key(&group) && self.groups.len() >= CAPACITY {
            self.make_room(now);
        }
        let entry = self.groups.entry(group).or_insert(Entry {
            weight: 0.0,
            at: now,
        });
        entry.weight = entry.now(now) + 1.0;
        entry.at = now;
    }

    /// The recent connections of `group` at `now` (0 for one not in the table).
    pub fn weight(&self, group: IpAddr, now: Instant) -> f64 {
        self.groups.get(&group).map_or(0.0, |e| e.now(now))
    }

    /// `weight` in quarters of a connection, for ordering.
    pub fn rank(&self, group: IpAddr, now: Instant) -> u64 {
        (self.weight(group, now) * 4.0) as u64
    }

    /// Groups remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.groups.len()
    }

    fn make_room(&mut self, now: Instant) {
        self.groups.retain(|_, e| e.now(now) >= FORGET);
        if self.groups.len() < CAPACITY {
            return;
        }
        let lightest = self
            .groups
            .iter()
            .min_by(|a, b| a.1.now(now).total_cmp(&b.1.now(now)))
            .map(|(g, _)| *g);
        if let Some(g) = lightest {
            self.groups.remove(&g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(i.into())
    }

    #[test]
    fn weights_grow_with_connections_and_halve_with_time() {
        let t0 = Instant::now();
        let mut r = Recent::default();
        for _ in 0..8 {
            r.record(ip(1), t0);
        }
        r.record(ip(2), t0);
        let cases = [
            (ip(1), Duration::ZERO, 8.0),
            (ip(1), HALF_LIFE, 4.0),
            (ip(1), HALF_LIFE * 3, 1.0),
            (ip(2), Duration::ZERO, 1.0),
            (ip(3), Duration::ZERO, 0.0),
        ];
        for (g, after, want) in cases {
            let got = r.weight(g, t0 + after);
            assert!((got - want).abs() < 1e-9, "{g} after {after:?}: {got}");
        }
        r.record(ip(2), t0 + HALF_LIFE);
        assert!((r.weight(ip(2), t0 + HALF_LIFE) - 1.5).abs() < 1e-9);
        assert_eq!(r.rank(ip(1), t0), 32);
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_the_heavy() {
        let t0 = Instant::now();
        let mut r = Recent::default();
        for _ in 0..50 {
            r.record(ip(0), t0);
        }
        for i in 1..(3 * CAPACITY as u32) {
            r.record(ip(i), t0);
            assert!(r.len() <= CAPACITY);
        }
        assert_eq!(r.len(), CAPACITY);
        assert!(r.weight(ip(0), t0) >= 50.0, "the heaviest group is kept");
        // Old entries are forgotten first once they decayed.
        let later = t0 + HALF_LIFE * 10;
        r.record(ip(u32::MAX), later);
        assert!(r.len() <= 2, "{}", r.len());
    }
}
