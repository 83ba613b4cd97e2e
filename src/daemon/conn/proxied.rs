//! A connection from a balancer in `access.proxy_protocol_from`: its PROXY header, read whole
//! within `access.header_timeout_secs` and not one byte further, then the access rules and
//! `max_per_ip` for the client address it carries, which the connection then goes by. The
//! accept thread cannot do this (it never reads from a peer), so the worker does it before the
//! connection is registered anywhere under an address.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use crate::config::Config;
use crate::daemon::access::per_ip::{self, Slot};
use crate::daemon::access::refusals::Why;
use crate::daemon::shared::Shared;
use crate::daemon::stats::Stats;
use crate::deadline::{self, Deadline, is_timeout};
use crate::peer::Peer;
use crate::proto::proxy::{self, MAX_LEN, ProxyError, Step};
use crate::proto::wire::{self, Code, ERR_NOT_ALLOWED, ERR_SHUTDOWN, ERR_TOO_MANY};

/// At most this many reads of 4 KiB drop what a refused peer already sent.
const DRAIN_READS: usize = 16;

/// A proxied connection let in: the client's address (or the balancer's own, for its health
/// checks), its count against `max_per_ip`, and the header's version for the `online` line.
pub(super) struct Admitted {
    pub peer: Peer,
    pub slot: Slot,
    pub version: u8,
}

/// How reading the header failed.
enum HeadEnd {
    Eof,
    Timeout,
    Error(io::Error),
    Bad(ProxyError),
}

/// Reads the PROXY header of a connection from the balancer `via` and lets its client in, or
/// tells it why not (one `ERR` line). Every refusal is logged through `Shared::refused`, under
/// the client's address when it is known; the error carries that address when the client itself
/// was refused (access rules, `max_per_ip`), so that the queue counts the attempt as it counts a
/// refused direct connection.
// Not inlined, so that its header buffer takes stack only while it runs, never under a worker
// that waits for an idle peer's next line.
#[inline(never)]
pub(super) fn admit(
    shared: &Shared,
    cfg: &Config,
    stream: &TcpStream,
    via: Peer,
) -> Result<Admitted, Option<Peer>> {
    let limit = cfg.access.header_timeout;
    let header = match read_header(stream, Deadline::after(limit, deadline::Why::Header)) {
        Ok(h) => h,
        Err(end) => {
            refuse_header(shared, stream, via, limit, &end);
            return Err(None);
        }
    };
    let peer = header.source.map_or(via, Peer::new);
    // The session's reads start from the idle timeout (`Conn::read_timeout` says so).
    if stream
        .set_read_timeout(Some(cfg.server.idle_timeout))
        .is_err()
    {
        return Err(None);
    }
    if shared.is_stopping() {
        say(stream, ERR_SHUTDOWN);
        return Err(None);
    }
    if let Err(refusal) = cfg.access.rules.check(peer.ip()) {
        Stats::add(&shared.stats.refused_access, 1);
        say(stream, ERR_NOT_ALLOWED);
        shared.refused(Why::NotAllowed, Some(peer.ip()), || {
            format!("{peer} refused: not allowed: the address {refusal} (through {via})")
        });
        return Err(Some(peer));
    }
    match shared
        .per_ip
        .acquire(peer.ip(), per_ip::cap(cfg, peer.ip()))
    {
        Ok(slot) => Ok(Admitted {
            peer,
            slot,
            version: header.version,
        }),
        Err(open) => {
            Stats::add(&shared.stats.refused_access, 1);
            say(stream, ERR_TOO_MANY);
            shared.refused(Why::TooMany, Some(peer.ip()), || {
                format!(
                    "{peer} refused: {open} connections from this address are open, the limit of access.max_per_ip (through {via})"
                )
            });
            Err(Some(peer))
        }
    }
}

/// Reads exactly the header's bytes by `deadline`.
fn read_header(stream: &TcpStream, deadline: Deadline) -> Result<proxy::Proxied, HeadEnd> {
    let mut buf = [0u8; MAX_LEN];
    let mut have = 0;
    loop {
        let want = match proxy::step(&buf[..have]).map_err(HeadEnd::Bad)? {
            Step::Done(header) => return Ok(header),
            Step::Need(n) => n,
        };
        // `step` never asks past MAX_LEN; the `min` keeps the slice in bounds regardless.
        let end = (have + want).min(MAX_LEN);
        have += read_by(stream, &mut buf[have..end], deadline)?;
    }
}

/// One read of at most `buf.len()` bytes by `deadline`.
fn read_by(stream: &TcpStream, buf: &mut [u8], deadline: Deadline) -> Result<usize, HeadEnd> {
    let mut reader: &TcpStream = stream;
    loop {
        let left = deadline.left();
        if left.is_zero() {
            return Err(HeadEnd::Timeout);
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(HeadEnd::Error)?;
        match reader.read(buf) {
            Ok(0) => return Err(HeadEnd::Eof),
            Ok(n) => return Ok(n),
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeadEnd::Error(e)),
        }
    }
}

/// Tells the balancer's connection why it is closed, and logs it.
#[inline(never)]
fn refuse_header(shared: &Shared, stream: &TcpStream, via: Peer, limit: Duration, end: &HeadEnd) {
    let secs = limit.as_secs();
    let why = match end {
        HeadEnd::Eof => "closed before a whole PROXY header".to_string(),
        HeadEnd::Error(e) => format!("read failed before a whole PROXY header: {e}"),
        HeadEnd::Timeout => {
            say(
                stream,
                wire::err_line(
                    Code::Timeout,
                    &format_args!("no PROXY header within {secs} s"),
                )
                .as_bytes(),
            );
            format!("no whole PROXY header within {secs} s, access.header_timeout_secs")
        }
        HeadEnd::Bad(e) => {
            say(
                stream,
                wire::err_line(Code::BadHeader, &format_args!("PROXY header expected: {e}"))
                    .as_bytes(),
            );
            format!("{e} (access.proxy_protocol_from expects one)")
        }
    };
    Stats::add(&shared.stats.refused_access, 1);
    shared.refused(Why::ProxyHeader, Some(via.ip()), || {
        format!("{via} refused: {why}")
    });
}

/// Writes a refusal line (the socket's write timeout bounds it), ends the sending side and drops
/// what the peer already sent without waiting, so that the close is not a reset that could
/// destroy the line.
fn say(stream: &TcpStream, line: &[u8]) {
    let mut peer: &TcpStream = stream;
    let _ = peer.write_all(line);
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_nonblocking(true);
    let mut scratch = [0u8; 4096];
    for _ in 0..DRAIN_READS {
        match peer.read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}
