//! When `send` tries a file again (pure): which endings call for a new connection at once (the
//! server asked for one), which for a retry after a pause (the link failed, or the server was
//! busy or stopping), and how long the pauses are.

use std::time::Duration;

use crate::client::connection::Fate;
#[cfg(test)]
use crate::client::options::DEFAULT_RETRIES;
use crate::proto::wire::Code;

/// New connections for one file on the server's word ("reconnect") before giving up: one is
/// what the server asks for; more would mean it refuses every connection's first frame.
pub const MAX_RECONNECTS: u32 = 3;

/// The first pause, doubled for each retry up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(8);

/// What to do after an upload ended so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Report it: stored, or refused for a reason sending again cannot change.
    Done,
    /// Send it again on a new connection now: the server served this connection its share.
    Reconnect,
    /// Send it again on a new connection after a pause (`backoff`), counted against `--retry`.
    Retry,
}

/// What follows an upload that ended with `fate`.
pub fn next(fate: Fate) -> Next {
    match fate {
        Fate::Stored => Next::Done,
        Fate::Cut => Next::Retry,
        Fate::Refused(Some(Code::TooManyFiles)) => Next::Reconnect,
        // Passing conditions on the server or on the link: worth a later try.
        Fate::Refused(Some(
            Code::Busy
            | Code::Shutdown
            | Code::Idle
            | Code::TooManyConnections
            | Code::ShortBody
            | Code::Timeout,
        )) => Next::Retry,
        Fate::Refused(_) => Next::Done,
    }
}

/// The pause before retry number `n` (from 1): 0.5 s, 1 s, 2 s, 4 s, then 8 s each.
pub fn backoff(n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(16);
    (FIRST_PAUSE * (1 << doublings)).min(MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ending_has_its_next_step() {
        let table = [
            (Fate::Stored, Next::Done),
            (Fate::Cut, Next::Retry),
            (Fate::Refused(Some(Code::TooManyFiles)), Next::Reconnect),
            (Fate::Refused(Some(Code::Busy)), Next::Retry),
            (Fate::Refused(Some(Code::Shutdown)), Next::Retry),
            (Fate::Refused(Some(Code::ShortBody)), Next::Retry),
            (Fate::Refused(Some(Code::Timeout)), Next::Retry),
            (Fate::Refused(Some(Code::Checksum)), Next::Done),
            (Fate::Refused(Some(Code::TooLarge)), Next::Done),
            (Fate::Refused(Some(Code::Exists)), Next::Done),
            (Fate::Refused(Some(Code::Unauthorized)), Next::Done),
            (Fate::Refused(None), Next::Done),
        ];
        for (fate, want) in table {
            assert_eq!(next(fate), want, "{fate:?}");
        }
    }

    #[test]
    fn pauses_double_up_to_the_cap() {
        let ms: Vec<u128> = (1..=7).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(backoff(u32::MAX), MAX_PAUSE);
        let total: Duration = (1..=DEFAULT_RETRIES).map(backoff).sum();
        assert_eq!(total, Duration::from_millis(39_500));
    }
}
