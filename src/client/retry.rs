//! When `send` sends a file again (pure): which endings call for a new connection at once (the
//! server asked for one).

use crate::client::connection::Fate;
use crate::proto::wire::Code;

/// New connections for one file on the server's word ("reconnect") before giving up: one is
/// what the server asks for; more would mean it refuses every connection's first frame.
pub const MAX_RECONNECTS: u32 = 3;

/// What to do after an upload ended so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Report it: stored, or refused for a reason sending again cannot change.
    Done,
    /// Send it again on a new connection now: the server served this connection its share.
    Reconnect,
}

/// What follows an upload that ended with `fate`.
pub fn next(fate: Fate) -> Next {
    match fate {
        Fate::Refused(Some(Code::TooManyFiles)) => Next::Reconnect,
        _ => Next::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ending_has_its_next_step() {
        let table = [
            (Fate::Stored, Next::Done),
            (Fate::Cut, Next::Done),
            (Fate::Refused(Some(Code::TooManyFiles)), Next::Reconnect),
            (Fate::Refused(Some(Code::Checksum)), Next::Done),
            (Fate::Refused(None), Next::Done),
        ];
        for (fate, want) in table {
            assert_eq!(next(fate), want, "{fate:?}");
        }
    }
}
