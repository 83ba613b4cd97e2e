//! The room's join and leave notices, rate-limited: a share shown per window, the rest counted
//! and summed up in one line when the window is over.

use std::time::{Duration, Instant};

use crate::proto::wire;

/// Join and leave notices shown one by one per `NOTICE_WINDOW`; beyond, they are counted and a
/// single summary line follows the window.
pub(super) const NOTICES_PER_WINDOW: u32 = 10;
const NOTICE_WINDOW: Duration = Duration::from_secs(1);

/// What a notice announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Notice {
    Joined,
    Left,
}

/// Rate limit of join and leave notices: `NOTICES_PER_WINDOW` shown per window, the rest counted
/// and summed up in one line once the window is over, so a client connecting and disconnecting in
/// a loop costs the room about 11 lines a second.
#[derive(Debug)]
pub(super) struct NoticeGate {
    window_start: Instant,
    shown: u32,
    joined: u64,
    left: u64,
}

impl Default for NoticeGate {
    fn default() -> NoticeGate {
        NoticeGate {
            window_start: Instant::now(),
            shown: 0,
            joined: 0,
            left: 0,
        }
    }
}

impl NoticeGate {
    /// Whether a notice may be shown now; if not, it is counted.
    pub(super) fn admit(&mut self, now: Instant, kind: Notice) -> bool {
        if now.saturating_duration_since(self.window_start) >= NOTICE_WINDOW
            && self.joined + self.left == 0
        {
            self.window_start = now;
            self.shown = 0;
        }
        if self.shown < NOTICES_PER_WINDOW {
            self.shown += 1;
            return true;
        }
        match kind {
            Notice::Joined => self.joined += 1,
            Notice::Left => self.left += 1,
        }
        false
    }

    pub(super) fn summary_due(&self, now: Instant) -> bool {
        self.joined + self.left > 0
            && now.saturating_duration_since(self.window_start) >= NOTICE_WINDOW
    }

    /// Once the window is over, the line that sums up what it did not show, and a new window.
    pub(super) fn summary(&mut self, now: Instant) -> Option<String> {
        if !self.summary_due(now) {
            return None;
        }
        let window = now.saturating_duration_since(self.window_start);
        let line = wire::chat_summary(self.joined, self.left, window);
        self.window_start = now;
        self.shown = 0;
        self.joined = 0;
        self.left = 0;
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_gate_shows_a_share_per_window_then_sums_up() {
        let t0 = Instant::now();
        let mut gate = NoticeGate {
            window_start: t0,
            ..NoticeGate::default()
        };
        let shown = (0..25)
            .filter(|i| {
                let kind = if i % 2 == 0 {
                    Notice::Joined
                } else {
                    Notice::Left
                };
                gate.admit(t0 + Duration::from_millis(*i), kind)
            })
            .count();
        assert_eq!(shown, NOTICES_PER_WINDOW as usize);
        assert_eq!((gate.joined, gate.left), (8, 7));
        let cases = [
            (Duration::from_millis(500), None),
            (
                Duration::from_millis(1500),
                Some("* 8 more joined and 7 more left in the last 1.5 s (too many to list)\n"),
            ),
            (Duration::from_millis(3000), None),
        ];
        for (at, want) in cases {
            assert_eq!(gate.summary(t0 + at).as_deref(), want, "at {at:?}");
        }
        // A new window shows its share again.
        assert!(gate.admit(t0 + Duration::from_millis(3100), Notice::Joined));
    }
}
