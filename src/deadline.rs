//! Time limits on socket I/O, each carrying its reason (ureq's "next timeout"): a read is given
//! the `Deadline` that applies to it, and when it times out the caller is told which limit it
//! was, instead of guessing afterwards.

use std::io;
use std::time::{Duration, Instant};

/// Which time limit a deadline is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// `server.idle_timeout_secs`: the peer sent nothing for that long.
    Idle,
    /// `access.header_timeout_secs`: a frame's head did not arrive whole in time.
    Header,
    /// The end of a rate window: time to check a body's rate (not an error by itself).
    RateWindow,
    /// The short drain after a refusal, so the `ERR` line is not destroyed by a reset.
    Linger,
    /// `server.line_timeout_secs`: a text line was not complete that long after its first byte.
    Line,
    /// `access.auth_timeout_secs`: no good `AUTH` line that long after connecting.
    Auth,
    /// `server.chat_flush_ms`: a chat client's unterminated text is delivered after this
    /// silence (not an error).
    ChatFlush,
}

/// A point in time and the reason it is a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    pub why: Why,
}

impl Deadline {
    /// `after` from now.
    pub fn after(after: Duration, why: Why) -> Deadline {
        Deadline {
            at: Instant::now() + after,
            why,
        }
    }

    /// Whichever of the two comes first (`self` on a tie).
    pub fn earliest(self, other: Deadline) -> Deadline {
        if other.at < self.at { other } else { self }
    }

    /// The time left, zero once passed.
    pub fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// A read, write or accept that hit its socket timeout (SO_RCVTIMEO/SO_SNDTIMEO report EAGAIN).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_wins_with_its_reason() {
        let idle = Deadline::after(Duration::from_secs(300), Why::Idle);
        let header = Deadline::after(Duration::from_secs(10), Why::Header);
        assert_eq!(idle.earliest(header).why, Why::Header);
        assert_eq!(header.earliest(idle).why, Why::Header);
        assert_eq!(idle.earliest(idle).why, Why::Idle);
        let past = Deadline {
            at: Instant::now() - Duration::from_secs(1),
            why: Why::Linger,
        };
        assert!(past.left().is_zero());
    }
}
