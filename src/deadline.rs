//! Time limits on socket I/O: recognising a read or write that hit its socket timeout.

use std::io;

/// A read, write or accept that hit its socket timeout (SO_RCVTIMEO/SO_SNDTIMEO report EAGAIN).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
