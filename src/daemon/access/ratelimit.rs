//! Per-address token buckets for the UDP echo, in a table of bounded size. Pure: the caller
//! passes the clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Token buckets keyed by peer address.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    burst: f64,
    max_peers: usize,
    peers: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Limiter {
    /// `rate` tokens per second, at most `burst` saved up, for at most `max_peers` addresses.
    pub fn new(rate: u32, burst: u32, max_peers: usize) -> Limiter {
        Limiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_peers: max_peers.max(1),
            peers: HashMap::new(),
        }
    }

    /// Changes the limits (a reload), keeping the buckets.
    pub fn set_limits(&mut self, rate: u32, burst: u32, max_peers: usize) {
        self.rate = f64::from(rate);
        self.burst = f64::from(burst.max(1));
        self.max_peers = max_peers.max(1);
    }

    /// Takes one token from `ip`'s bucket; false if it is empty.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.peers.contains_key(&ip) && self.peers.len() >= self.max_peers {
            self.make_room(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.peers.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn tracked(&self) -> usize {
        self.peers.len()
    }

    /// Forgets addresses whose bucket has refilled (forgetting them changes nothing), and if that
    /// is not enough, the least recently seen quarter of the table. Each call frees at least a
    /// quarter of the table, so the cost is amortised to O(1) per new address.
    fn make_room(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.peers.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
        });
        let target = self.max_peers - self.max_peers / 4 - 1;
        if self.peers.len() <= target {
            return;
        }
        let cut = self.peers.len() - target;
        let threshold = nth_oldest(&self.peers, cut);
        let mut to_remove = cut;
        self.peers.retain(|_, b| {
            if to_remove > 0 && b.last <= threshold {
                to_remove -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The `n`th least recent `last` (1-based; `n` at most the table's size): the least time `t`
/// that at least `n` buckets were last seen at or before, found by halving the span between the
/// oldest and the newest (at most 64 passes over the table, and no selection or sorting code in
/// the binary for it).
fn nth_oldest(peers: &HashMap<IpAddr, Bucket>, n: usize) -> Instant {
    let oldest = peers.values().map(|b| b.last).min();
    let Some(oldest) = oldest else {
        return Instant::now();
    };
    let age =
        |b: &Bucket| u64::try_from(b.last.duration_since(oldest).as_nanos()).unwrap_or(u64::MAX);
    let (mut lo, mut hi) = (0u64, peers.values().map(age).max().unwrap_or(0));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if peers.values().filter(|b| age(b) <= mid).count() >= n {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    oldest + std::time::Duration::from_nanos(lo)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn nth_oldest_is_the_nth_in_time_order() {
        let t0 = Instant::now();
        let mut peers = HashMap::new();
        let mut lasts = Vec::new();
        // Ties included: 7 appears twice.
        for (i, ms) in [40u64, 7, 300, 7, 1, 99, 1000, 250].into_iter().enumerate() {
            let last = t0 + Duration::from_millis(ms);
            lasts.push(last);
            peers.insert(ip(i as u32), Bucket { tokens: 0.0, last });
        }
        lasts.sort();
        for n in 1..=lasts.len() {
            assert_eq!(nth_oldest(&peers, n), lasts[n - 1], "n = {n}");
        }
    }

    #[test]
    fn burst_then_rate() {
        let mut l = Limiter::new(10, 5, 100);
        let t0 = Instant::now();
        let allowed = (0..20).filter(|_| l.allow(ip(1), t0)).count();
        assert_eq!(allowed, 5, "the burst");
        assert!(
            !l.allow(ip(1), t0 + Duration::from_millis(50)),
            "half a token is not enough"
        );
        assert!(
            l.allow(ip(1), t0 + Duration::from_millis(100)),
            "one token per 100 ms"
        );
        assert!(!l.allow(ip(1), t0 + Duration::from_millis(100)));
        // Another address has its own bucket.
        assert!(l.allow(ip(2), t0));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| l.allow(ip(1), later)).count(), 5);
    }

    #[test]
    fn table_stays_bounded_and_keeps_the_busy() {
        let mut l = Limiter::new(1, 3, 64);
        let t0 = Instant::now();
        // A flooder, seen at every step, must stay limited while thousands of others pass by.
        for _ in 0..3 {
            l.allow(ip(0), t0);
        }
        for n in 1..5000u32 {
            let now = t0 + Duration::from_micros(u64::from(n));
            l.allow(ip(n), now);
            assert!(!l.allow(ip(0), now), "flooder got a token back at step {n}");
            assert!(l.tracked() <= 64);
        }
    }
}
