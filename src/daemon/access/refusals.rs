//! Rate-limited logging of refused connections, so that no peer can make the log grow faster
//! than a fixed bound: per reason, refusals are logged one line each while a small budget lasts
//! (`BURST` lines, refilled at `LINES_PER_SEC`), and the rest are counted and summed up once per
//! `log.refusal_summary_secs` as `refused 13,342 connections (busy) in the last 10 s, …`.
//!
//! Pure: the caller passes the clock and writes the lines it is given.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Lines a reason may log one by one at once, after a quiet spell.
pub const BURST: f64 = 50.0;
/// Lines a reason may log one by one per second, sustained.
pub const LINES_PER_SEC: f64 = 1.0;
/// Addresses counted per reason and window for the summary's "most from"; beyond it, new
/// addresses are counted in the total only.
const MAX_TRACKED: usize = 1024;

/// Why a connection was refused: each reason has its own budget and summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Every worker busy and the queue full, or the queue wait ran out.
    Busy,
    /// The access rules refuse the address.
    NotAllowed,
    /// The address has `access.max_per_ip` connections open.
    TooMany,
    /// The process is out of descriptors (RLIMIT_NOFILE).
    Descriptors,
    /// `accept` itself failed.
    AcceptError,
    /// With `access.require_token`: no good `AUTH` line, or a frame without a good tag.
    Unauthorized,
    /// A connection from `access.proxy_protocol_from` without a valid PROXY header in time.
    ProxyHeader,
}

const ALL: [Why; 7] = [
    Why::Busy,
    Why::NotAllowed,
    Why::TooMany,
    Why::Descriptors,
    Why::AcceptError,
    Why::Unauthorized,
    Why::ProxyHeader,
];

impl Why {
    /// How the summary names the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Busy => "busy",
            Why::NotAllowed => "not allowed",
            Why::TooMany => "access.max_per_ip",
            Why::Descriptors => "out of file descriptors",
            Why::AcceptError => "accept failed",
            Why::Unauthorized => "unauthorized",
            Why::ProxyHeader => "no PROXY header",
        }
    }

    fn index(self) -> usize {
        match self {
            Why::Busy => 0,
            Why::NotAllowed => 1,
            Why::TooMany => 2,
            Why::Descriptors => 3,
            Why::AcceptError => 4,
            Why::Unauthorized => 5,
            Why::ProxyHeader => 6,
        }
    }
}

/// The refusal counts and line budgets of every reason.
#[derive(Debug)]
pub struct Refusals {
    interval: Duration,
    window_start: Instant,
    tallies: [Tally; ALL.len()],
}

#[derive(Debug)]
struct Tally {
    tokens: f64,
    last_refill: Instant,
    /// Refusals in the current window, and how many of them were not logged on their own line.
    total: u64,
    unlogged: u64,
    by_ip: HashMap<IpAddr, u64>,
}

impl Refusals {
    /// Summaries every `interval`, starting at `now`.
    pub fn new(interval: Duration, now: Instant) -> Refusals {
        let tally = || Tally {
            tokens: BURST,
            last_refill: now,
            total: 0,
            unlogged: 0,
            by_ip: HashMap::new(),
        };
        Refusals {
            interval,
            window_start: now,
            tallies: std::array::from_fn(|_| tally()),
        }
    }

    /// Changes the summary interval (a reload); the current window keeps its start.
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// Counts one refusal (of `ip`, when there is a peer) for `why`; true if it may be logged on
    /// a line of its own.
    pub fn note(&mut self, why: Why, ip: Option<IpAddr>, now: Instant) -> bool {
        let t = &mut self.tallies[why.index()];
        let elapsed = now.saturating_duration_since(t.last_refill).as_secs_f64();
        t.tokens = (t.tokens + elapsed * LINES_PER_SEC).min(BURST);
        t.last_refill = now;
        t.total += 1;
        if let Some(ip) = ip {
            if t.by_ip.len() < MAX_TRACKED || t.by_ip.contains_key(&ip) {
                *t.by_ip.entry(ip).or_insert(0) += 1;
            }
        }
        if t.tokens >= 1.0 {
            t.tokens -= 1.0;
            true
        } else {
            t.unlogged += 1;
            false
        }
    }

    /// The summary lines due at `now`: once per interval, one for each reason some of whose
    /// refusals were not logged one by one. Starts a new window when the interval is over.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < self.interval {
            return Vec::new();
        }
        self.window_start = now;
        let secs = elapsed.as_secs_f64().round() as u64;
        let mut lines = Vec::new();
        for why in ALL {
            let t = &mut self.tallies[why.index()];
            if t.unlogged > 0 {
                let mut line = format!(
                    "refused {} connections ({}) in the last {secs} s, {} not logged one by one",
                    thousands(t.total),
                    why.as_str(),
                    thousands(t.unlogged)
                );
                if let Some((ip, n)) = t.by_ip.iter().max_by_key(|(_, n)| **n) {
                    line.push_str(&format!(", most from {ip} ({})", thousands(*n)));
                }
                lines.push(line);
            }
            t.total = 0;
            t.unlogged = 0;
            t.by_ip = HashMap::new();
        }
        lines
    }
}

/// `13342` as `13,342`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn thousands_separators() {
        let cases = [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (13_342, "13,342"),
            (1_234_567, "1,234,567"),
        ];
        for (n, want) in cases {
            assert_eq!(thousands(n), want);
        }
    }

    #[test]
    fn a_flood_is_logged_within_the_budget_and_summed_up() {
        let t0 = Instant::now();
        let mut r = Refusals::new(Duration::from_secs(10), t0);
        // 13,342 refusals within the first second: the burst is logged, the rest counted.
        let mut logged = 0;
        for i in 0..13_342u64 {
            let now = t0 + Duration::from_micros(i * 70);
            let from = if i % 10 == 0 { "10.0.0.2" } else { "10.0.0.1" };
            logged += usize::from(r.note(Why::Busy, ip(from), now));
        }
        assert_eq!(logged, BURST as usize);
        assert!(r.due(t0 + Duration::from_secs(9)).is_empty(), "too early");
        let lines = r.due(t0 + Duration::from_secs(10));
        assert_eq!(
            lines,
            [
                "refused 13,342 connections (busy) in the last 10 s, 13,292 not logged one by one, most from 10.0.0.1 (12,007)"
            ]
        );
        // The next window is empty: no summary.
        assert!(r.due(t0 + Duration::from_secs(20)).is_empty());
    }

    #[test]
    fn the_budget_refills_at_one_line_a_second_per_reason() {
        let t0 = Instant::now();
        let mut r = Refusals::new(Duration::from_secs(10), t0);
        for _ in 0..BURST as usize {
            assert!(r.note(Why::TooMany, ip("10.0.0.1"), t0));
        }
        assert!(!r.note(Why::TooMany, ip("10.0.0.1"), t0));
        // Another reason has its own budget.
        assert!(r.note(Why::NotAllowed, ip("10.0.0.1"), t0));
        let later = t0 + Duration::from_millis(1000);
        assert!(r.note(Why::TooMany, ip("10.0.0.1"), later));
        assert!(!r.note(Why::TooMany, ip("10.0.0.1"), later));
        // Sustained: over 100 s of continuous refusals, about one line a second gets through.
        let mut logged = 0;
        for ms in 0..100_000u64 {
            let now = later + Duration::from_millis(ms);
            logged += usize::from(r.note(Why::TooMany, ip("10.0.0.1"), now));
        }
        assert!((99..=101).contains(&logged), "{logged}");
    }

    #[test]
    fn the_address_table_is_bounded() {
        let t0 = Instant::now();
        let mut r = Refusals::new(Duration::from_secs(1), t0);
        for n in 0..10_000u32 {
            r.note(Why::Busy, Some(IpAddr::from(n.to_be_bytes())), t0);
        }
        assert!(r.tallies[0].by_ip.len() <= MAX_TRACKED);
        let lines = r.due(t0 + Duration::from_secs(1));
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("refused 10,000 connections (busy) in the last 1 s"),
            "{lines:?}"
        );
    }
}
