//! The progress line `ferryd send` draws on a terminal while it hashes and sends a file: what,
//! a bar, bytes done of the total, the rate and the time left, redrawn at most ten times a second
//! and cleared when done. Updated from any thread.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::proto::decimal::Fixed;

/// Shortest time between two redraws.
const REDRAW_EVERY: Duration = Duration::from_millis(100);
/// Width of the bar, in cells.
const BAR_WIDTH: usize = 30;
/// Width of the "what" column, in characters.
const WHAT_WIDTH: usize = 24;

/// A progress line on stderr, or nothing when hidden.
pub struct Progress {
    /// None when hidden.
    shown: Option<Shown>,
}

struct Shown {
    what: String,
    len: u64,
    pos: AtomicU64,
    started: Instant,
    /// When the line was last drawn (None: never); the lock also keeps two threads from
    /// drawing at once.
    drawn: Mutex<Option<Instant>>,
}

impl Progress {
    /// A progress line for `len` bytes of `what`, drawn only if `shown`.
    pub fn new(shown: bool, len: u64, what: &str) -> Progress {
        Progress {
            shown: shown.then(|| Shown {
                what: what.to_string(),
                len,
                pos: AtomicU64::new(0),
                started: Instant::now(),
                drawn: Mutex::new(None),
            }),
        }
    }

    /// Adds `n` bytes done.
    pub fn inc(&self, n: u64) {
        if let Some(s) = &self.shown {
            s.pos.fetch_add(n, Ordering::Relaxed);
            s.maybe_draw();
        }
    }

    /// Sets the bytes done to `n`.
    pub fn set_position(&self, n: u64) {
        if let Some(s) = &self.shown {
            s.pos.store(n, Ordering::Relaxed);
            s.maybe_draw();
        }
    }

    /// Erases the line, if it was ever drawn.
    pub fn finish_and_clear(&self) {
        let Some(s) = &self.shown else { return };
        let drawn = s.drawn.lock().unwrap_or_else(PoisonError::into_inner);
        if drawn.is_some() {
            let _ = io::stderr().lock().write_all(b"\r\x1b[2K");
        }
    }
}

impl Shown {
    fn maybe_draw(&self) {
        let Ok(mut drawn) = self.drawn.try_lock() else {
            // Another thread is drawing right now: this update shows in the next draw.
            return;
        };
        let now = Instant::now();
        if drawn.is_some_and(|at| now.duration_since(at) < REDRAW_EVERY) {
            return;
        }
        *drawn = Some(now);
        let pos = self.pos.load(Ordering::Relaxed).min(self.len);
        let line = render(&self.what, pos, self.len, now.duration_since(self.started));
        let _ = io::stderr().lock().write_all(line.as_bytes());
    }
}

/// One frame of the line: `\r`, what, `[bar]`, done/total, rate, time left, clear to the end.
fn render(what: &str, pos: u64, len: u64, elapsed: Duration) -> String {
    let what: String = what.chars().take(WHAT_WIDTH).collect();
    let filled = if len == 0 {
        BAR_WIDTH
    } else {
        (u128::from(pos) * BAR_WIDTH as u128 / u128::from(len)) as usize
    };
    let mut bar = "=".repeat(filled);
    if filled < BAR_WIDTH {
        bar.push('>');
        bar.push_str(&" ".repeat(BAR_WIDTH - filled - 1));
    }
    let secs = elapsed.as_secs_f64();
    let per_sec = if secs > 0.0 { pos as f64 / secs } else { 0.0 };
    let eta = if per_sec > 0.0 {
        format!("{}s", ((len - pos) as f64 / per_sec).ceil() as u64)
    } else {
        "?".to_string()
    };
    // The rate shown is pos / elapsed bytes per second, kept as that exact ratio.
    let nanos = elapsed.as_nanos();
    let rate = if nanos > 0 {
        bytes(u128::from(pos) * NANOS, nanos)
    } else {
        bytes(0, 1)
    };
    format!(
        "\r{what:<WHAT_WIDTH$} [{bar}] {}/{} {rate}/s {eta}\x1b[K",
        bytes(u128::from(pos), 1),
        bytes(u128::from(len), 1),
    )
}

/// Nanoseconds in a second.
const NANOS: u128 = 1_000_000_000;

/// A byte count `num / den` in binary units, e.g. `1.50 MiB`.
fn bytes(num: u128, den: u128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut den = den;
    let mut unit = 0;
    while num >= den * 1024 && unit + 1 < UNITS.len() {
        den *= 1024;
        unit += 1;
    }
    if unit == 0 {
        format!("{} B", Fixed::ratio(num, den, 0))
    } else {
        format!("{} {}", Fixed::ratio(num, den, 2), UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_in_binary_units() {
        for (n, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.00 KiB"),
            (1536, "1.50 KiB"),
            (1048576, "1.00 MiB"),
            (5 * 1024 * 1024 * 1024 * 1024 * 1024, "5120.00 TiB"),
        ] {
            assert_eq!(bytes(n, 1), want, "{n}");
        }
    }

    #[test]
    fn render_shows_bar_counts_rate_and_eta() {
        let half = render("sending a", 512, 1024, Duration::from_secs(1));
        let bar = format!("[{}>{}]", "=".repeat(15), " ".repeat(14));
        for (line, want) in [
            (&half, "sending a"),
            (&half, bar.as_str()),
            (&half, "512 B/1.00 KiB 512 B/s 1s"),
        ] {
            assert!(line.contains(want), "{line:?} lacks {want:?}");
        }
        let table = [
            (0, 0, Duration::ZERO, format!("[{}]", "=".repeat(30))),
            (0, 10, Duration::ZERO, format!("[>{}]", " ".repeat(29))),
            (
                10,
                10,
                Duration::from_secs(2),
                format!("[{}]", "=".repeat(30)),
            ),
        ];
        for (pos, len, elapsed, want) in table {
            let line = render("x", pos, len, elapsed);
            assert!(line.contains(&want), "{line:?} lacks {want:?}");
            assert!(
                line.starts_with('\r') && line.ends_with("\x1b[K"),
                "{line:?}"
            );
        }
    }

    #[test]
    fn long_names_are_cut_to_the_column() {
        let line = render(&"n".repeat(100), 0, 1, Duration::ZERO);
        assert!(
            line.contains(&format!("\r{} [", "n".repeat(WHAT_WIDTH))),
            "{line:?}"
        );
    }

    #[test]
    fn hidden_progress_draws_nothing() {
        let p = Progress::new(false, 10, "x");
        p.inc(5);
        p.set_position(10);
        p.finish_and_clear();
        assert!(p.shown.is_none());
    }
}
