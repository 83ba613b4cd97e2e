//! Telling a connection no without ever blocking: the one-line refusal (`refuse`), and `ERR busy`
//! for a connection that waited in the queue (`refuse_waiting`), counted and logged.

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::daemon::access::refusals::Why;
use crate::daemon::shared::{Job, Shared};
use crate::daemon::stats::Stats;
use crate::proto::wire::ERR_BUSY;

/// At most this many reads of 4 KiB drop what a refused peer already sent (without waiting).
const REFUSE_DRAIN_READS: usize = 16;

/// Writes a one-line refusal without ever blocking the caller, then ends the sending side and
/// drops what the peer already sent, so that the close that follows is a clean end of stream
/// rather than a reset that could destroy the line.
pub fn refuse(stream: &TcpStream, line: &[u8]) {
    // A fresh socket's send buffer is empty, so a non-blocking write of a short line succeeds; if
    // it does not, the peer is gone and there is nobody to tell.
    let _ = stream.set_nonblocking(true);
    // `Read` and `Write` are implemented for `&TcpStream`: a named reference, not `&*stream`,
    // which older clippy takes for a needless reborrow (`borrow_deref_ref`).
    let mut peer: &TcpStream = stream;
    let _ = peer.write_all(line);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut scratch = [0u8; 4096];
    for _ in 0..REFUSE_DRAIN_READS {
        match peer.read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Tells a queued connection `ERR busy` and ends it.
pub fn refuse_waiting(shared: &Shared, w: Job, why: &str) {
    Stats::sub(&shared.stats.queued, 1);
    Stats::add(&shared.stats.refused_busy, 1);
    refuse(&w.stream, ERR_BUSY);
    let peer = w.peer;
    shared.refused(Why::Busy, Some(peer.ip()), || {
        format!("{peer} refused: busy (waited in the queue: {why})")
    });
}
