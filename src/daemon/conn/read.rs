//! The connection's one read path: `read_by`, the only read from the socket, under a `Deadline`
//! that says which limit fired; filling the input buffer by the idle, line or chat-flush deadline;
//! what a read that ended without bytes means (`ended`); the socket options each connection
//! gets; and the eviction board's view of a connection waiting on its peer.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rustix::net::RecvFlags;
use socket2::{SockRef, TcpKeepalive};

use crate::daemon::stats::Stats;
use crate::deadline::{Deadline, Why, is_timeout};
use crate::logger;
use crate::proto::wire::{self, ERR_EVICTED, ERR_KICKED, ERR_SHUTDOWN};
use crate::proto::{Code, MAGIC};

use super::{Conn, Input, Reason};

/// A socket's read timeout is set again only when the time left differs from it by more than
/// this, so that a stream of reads under one deadline costs no system call each; a deadline is
/// overshot by at most this much.
const TIMEOUT_SLACK: Duration = Duration::from_millis(10);

/// How a read under a deadline ended without bytes.
#[derive(Debug)]
pub(super) enum ReadEnd {
    /// The peer closed its side (or the shutdown shut our read side).
    Eof,
    /// The deadline passed; it says which limit it was.
    Timeout(Why),
    Error(io::Error),
}

/// TCP keepalive on every accepted connection: after this long without a byte from the peer the
/// kernel starts probing it...
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// ...every this long...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ...and gives up after this many probes unanswered: a peer gone without a FIN (cable pulled,
/// Wi-Fi gone, NAT entry dropped) is found in `KEEPALIVE_IDLE` + 3 × `KEEPALIVE_INTERVAL` = 25 s
/// even when the connection is idle and no deadline of ours runs.
pub const KEEPALIVE_PROBES: u32 = 3;
/// `TCP_USER_TIMEOUT`: data the server sent that stays unacknowledged this long ends the
/// connection (without it, retransmissions to a vanished peer go on for about 15 minutes); it
/// also caps the keepalive probing above.
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets the options every accepted connection gets: no Nagle delay (echo and replies go out at
/// once), read and write timeouts, so that no read or write can block forever, and TCP
/// keepalive with `TCP_USER_TIMEOUT`, so that a peer that vanished is found without traffic. The
/// write timeout (`server.write_timeout_secs`) is short: a peer that does not read cannot hold a
/// worker in a blocked write for long.
pub fn prepare_stream(stream: &TcpStream, read: Duration, write: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(read))?;
    stream.set_write_timeout(Some(write))?;
    let sock = SockRef::from(stream);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

impl Conn<'_> {
    /// The one place that reads from the socket: at most `buf.len()` bytes, by `deadline`, whose
    /// reason comes back if it passes first.
    /// Files waiting in the batch are committed (and answered) first when nothing more is
    /// readable right now, so no answer waits on the peer, or when the first of them has waited
    /// `batch::MAX_HOLD` while bytes keep coming.
    pub(super) fn read_by(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<usize, ReadEnd> {
        self.commit_unless_busy();
        loop {
            let left = deadline.left();
            if left.is_zero() {
                return Err(ReadEnd::Timeout(deadline.why));
            }
            let want = left.max(Duration::from_millis(1));
            let stale = self
                .read_timeout
                .is_none_or(|t| t.abs_diff(want) > TIMEOUT_SLACK);
            if stale {
                self.stream
                    .set_read_timeout(Some(want))
                    .map_err(ReadEnd::Error)?;
                self.read_timeout = Some(want);
            }
            match self.stream.read(buf) {
                Ok(0) => return Err(ReadEnd::Eof),
                Ok(n) => {
                    // Bytes that may begin a file frame: from here the connection is not one
                    // to choose to make room (`access::evict`), however long this worker then
                    // waits for a CPU before `frame` says so too. Text (a trickler's too) leaves
                    // it a candidate; the text loop says again when it waits.
                    if !self.place.is_busy() && buf[..n].contains(&MAGIC[0]) {
                        let _ = self.place.busy();
                    }
                    self.bytes_in += n as u64;
                    self.live.add_in(n as u64);
                    Stats::add(&self.shared.stats.bytes_in, n as u64);
                    return Ok(n);
                }
                // Timed out: the loop checks the deadline (set at most TIMEOUT_SLACK early).
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadEnd::Error(e)),
            }
        }
    }

    /// Commits the files waiting in the batch (and answers them) unless more bytes are already
    /// arriving and the first of them has waited less than `batch::MAX_HOLD`.
    pub(super) fn commit_unless_busy(&mut self) {
        if !self.batch.is_empty() && (self.batch.is_due() || !self.readable_now()) {
            self.commit_batch();
        }
    }

    /// Whether bytes from the peer wait to be read (not its end of stream): a peek that never
    /// blocks and takes nothing.
    fn readable_now(&self) -> bool {
        let mut byte = [0u8; 1];
        let peeked = rustix::net::recv(
            self.stream,
            &mut byte[..],
            RecvFlags::PEEK | RecvFlags::DONTWAIT,
        );
        matches!(peeked, Ok((n, _)) if n > 0)
    }

    /// Reads more bytes into an empty `input` by the idle deadline (or `limit`, if it comes
    /// first: the line deadline). A clean end of stream, the idle timeout and the shutdown each
    /// end the connection (after telling the peer why). In chat mode, an unfinished line is
    /// delivered after `server.chat_flush_ms` of silence and at the end of the stream, and the
    /// idle rule counts traffic both ways: a member that only reads is not idle while the room
    /// sends it lines (it is cut once neither way carried a byte for between one and two
    /// `idle_timeout_secs`).
    pub(super) fn fill(
        &mut self,
        input: &mut Input,
        limit: Option<Deadline>,
    ) -> Result<(), Reason> {
        input.start = 0;
        input.end = 0;
        loop {
            let idle = match limit {
                Some(limit) => self.idle_deadline().earliest(limit),
                None => self.idle_deadline(),
            };
            let deadline = match self.chat_flush_after() {
                Some(after) => idle.earliest(Deadline::after(after, Why::ChatFlush)),
                None => idle,
            };
            match self.read_by(input.buf, deadline) {
                Ok(n) => {
                    input.end = n;
                    return Ok(());
                }
                Err(ReadEnd::Timeout(Why::Idle)) if self.room_talked() => {}
                Err(ReadEnd::Timeout(Why::ChatFlush)) => self.flush_chat_line(),
                Err(ReadEnd::Eof) => {
                    self.flush_chat_line();
                    return Err(self.ended(ReadEnd::Eof));
                }
                Err(end) => return Err(self.ended(end)),
            }
        }
    }

    /// Appends bytes to `input` (after moving what is unused to the front), by `deadline`.
    pub(super) fn fill_more(
        &mut self,
        input: &mut Input,
        deadline: Deadline,
    ) -> Result<(), Reason> {
        input.compact();
        let end = input.end;
        match self.read_by(&mut input.buf[end..], deadline) {
            Ok(n) => {
                input.end += n;
                Ok(())
            }
            Err(end) => Err(self.ended(end)),
        }
    }

    /// The reason a connection ends for a read that ended without bytes, after telling the
    /// peer why where there is a why.
    pub(super) fn ended(&mut self, end: ReadEnd) -> Reason {
        match end {
            ReadEnd::Eof | ReadEnd::Error(_) if self.live.kicked_by().is_some() => self.kicked(),
            ReadEnd::Eof | ReadEnd::Error(_) if self.place.is_evicted() => self.evicted(),
            ReadEnd::Eof if self.shared.is_stopping() => {
                self.say(ERR_SHUTDOWN);
                Reason::Shutdown
            }
            ReadEnd::Eof => Reason::Eof,
            ReadEnd::Timeout(Why::Idle) => {
                let line = wire::err_idle(self.cfg.server.idle_timeout.as_secs());
                self.say(line.as_bytes());
                Reason::Idle
            }
            ReadEnd::Timeout(Why::Header) => {
                let secs = self.cfg.access.header_timeout.as_secs();
                logger::warn!(
                    "{} frame header not complete within access.header_timeout_secs = {secs}",
                    self.peer
                );
                let why = format!("header not complete within {secs} s");
                self.refuse(&wire::err_line(Code::Timeout, &why))
            }
            ReadEnd::Timeout(Why::Line) => {
                let line = wire::err_line_timeout(self.cfg.server.line_timeout.as_secs());
                self.say(line.as_bytes());
                Reason::SlowLine
            }
            ReadEnd::Timeout(Why::Auth) => {
                let secs = self.cfg.access.auth_timeout.as_secs();
                self.unauthorized(&format!(
                    "no AUTH line within {secs} s (access.auth_timeout_secs)"
                ))
            }
            ReadEnd::Timeout(why) => Reason::Protocol(format!("timed out ({why:?})")),
            ReadEnd::Error(e) => Reason::Error(e),
        }
    }

    /// This connection was chosen to make room: tell the peer why. Without waiting: a peer that
    /// does not read is not told (in chat mode the line goes through the writer's queue).
    /// The worker waits for the peer's next line since `since`, so the connection may be chosen
    /// to make room. Not in chat mode: a member that only reads is using the room as it is
    /// meant to be used (the room's own drain rule ends members that stop reading), so a full
    /// room answers newcomers `ERR busy` after `queue_timeout_secs` instead of ending members.
    pub(super) fn waiting_on_peer(&self, since: Instant) {
        if self.chat.is_some() {
            // Idempotent; a connection chosen before it joined sees `is_evicted` after its read.
            let _ = self.place.busy();
        } else {
            self.place.reading_since(since);
        }
    }

    pub(super) fn evicted(&mut self) -> Reason {
        if self.chat.is_some() {
            self.say(ERR_EVICTED);
        } else if self.stream.set_nonblocking(true).is_ok() {
            if self.write_all(ERR_EVICTED).is_err() {
                logger::debug!("{} could not be told why it was ended", self.peer);
            }
            let _ = self.stream.set_nonblocking(false);
        }
        Reason::Evicted
    }

    /// The operator ended this connection (`ferryd ctl kick`): tell the client and log who did.
    #[inline(never)]
    pub(super) fn kicked(&mut self) -> Reason {
        let uid = self.live.kicked_by().unwrap_or(u32::MAX);
        logger::warn!("{} kicked by the operator with uid {uid}", self.peer);
        self.say(ERR_KICKED);
        Reason::Kicked(uid)
    }

    /// The idle limit, counted from now.
    pub(super) fn idle_deadline(&self) -> Deadline {
        Deadline::after(self.cfg.server.idle_timeout, Why::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn accepted_streams_get_keepalive_and_a_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        prepare_stream(&server, Duration::from_secs(7), Duration::from_secs(3)).unwrap();
        let sock = SockRef::from(&server);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(server.nodelay().unwrap());
        assert_eq!(server.read_timeout().unwrap(), Some(Duration::from_secs(7)));
    }
}
