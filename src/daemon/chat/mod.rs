//! Chat mode's room: one shared log of messages, bounded in bytes, that every member's writer
//! thread reads at its own cursor; a small private queue per member for the server's own lines to
//! it; the join/leave notice gate; and the drop rule for members that stop draining.
//!
//! A sender appends under the room's lock, so all members see the room's messages in one order,
//! and each sender's lines in the order it sent them. Appending costs one entry whatever the
//! number of members; fan-out happens in the writers, each sending many entries per vectored
//! `write`. When the log holds `server.chat_queue_bytes`, a sender waits for the slowest member
//! to take its next batch: fast senders are slowed down to what the members drain, and each
//! sender may hold only its fair share of the log (the bytes divided by the senders with bytes
//! in it), so one blasting client cannot crowd out the others. A member is dropped only when it
//! has stopped draining for `server.chat_drain_timeout_secs`: its writer could not send it one
//! batch (64 KiB at most) in that time, or it held the oldest message of the room while a sender
//! waited and took nothing for that long.
//!
//! Memory: the log holds at most `chat_queue_bytes` plus the notices (rate-limited, below), the
//! writers at most one batch more (they take consecutive entries), so the room's messages never
//! exceed `chat_queue_bytes + BATCH_BYTES + NOTICE_SLACK` plus one message larger than a batch.
//!
//! Here: the room, a member's seat and its writer. The log's rules under the lock are in
//! `backlog`, the notice gate in `notices`.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::daemon::access::addrgroup;
use crate::deadline::is_timeout;
use crate::peer::Peer;
use crate::proto::wire;

mod backlog;
mod members;
mod notices;
mod operator;

use members::Members;
use notices::{Notice, NoticeGate};

/// A message on its way to members: the bytes of one or more whole lines, shared by all writers.
pub type Msg = Arc<[u8]>;

/// How many names the welcome line lists before it only counts.
const WELCOME_NAMES: usize = 20;
/// A writer sends at most this many bytes (or one larger message) per `write`.
pub const BATCH_BYTES: usize = 64 * 1024;
/// And at most this many messages (iovecs) per `write`.
const BATCH_MSGS: usize = 256;
/// How long a writer woken by a new message waits for more before it writes.
const COALESCE: Duration = Duration::from_millis(2);
/// Lines of the server's own (answers, the welcome) queued for one member; beyond this the member
/// is not reading even its own answers, and further ones are not queued.
pub const PRIVATE_BYTES: usize = 64 * 1024;
/// Bytes the notices may add to a full log while it waits on its slowest member: at most
/// `NOTICES_PER_WINDOW + 1` lines of at most `NOTICE_MAX` bytes per window for one drain timeout
/// of up to an hour. Notices never wait, so joining and leaving never block.
const NOTICE_MAX: usize = 256;
/// A writer sets its socket's write timeout again only when it is off by more than this, so
/// the deadline of a batch is overshot by at most this much.
const TIMEOUT_SLACK: Duration = Duration::from_millis(50);
/// How often a waiting sender looks again at the drop rule and the shutdown, and an idle writer
/// at the notice summary.
const SENDER_RECHECK: Duration = Duration::from_millis(100);
const WRITER_RECHECK: Duration = Duration::from_secs(1);

/// The limits of one connection's configuration (a reload applies to new connections).
#[derive(Debug, Clone, Copy)]
pub struct ChatLimits {
    /// `server.chat_queue_bytes`: bytes of messages the log holds before senders wait.
    pub queue_bytes: usize,
    /// `server.chat_drain_timeout_secs`: how long a member may take nothing before it is dropped.
    pub drain_timeout: Duration,
}

#[derive(Debug, Default)]
pub struct Room {
    state: Mutex<State>,
    /// Senders wait here for space in the log.
    space: Condvar,
}

/// A member's place in the room, held by its connection: dropping it leaves the room (on every
/// path, a panic included), telling the others why.
#[derive(Debug)]
pub struct Seat<'r> {
    room: &'r Room,
    id: u64,
    left: bool,
}

/// A member's writer, to run on its own thread. Dropping it (run or not) forgets the member once
/// its seat is gone too.
#[derive(Debug)]
pub struct Writer<'r> {
    room: &'r Room,
    id: u64,
    stream: Arc<TcpStream>,
    limits: ChatLimits,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    members: Members,
    log: VecDeque<Entry>,
    /// The sequence number of `log[0]`.
    first_seq: u64,
    log_bytes: usize,
    /// Address groups (`addrgroup`: an IPv6 peer's /64 by default) with bytes of their own in
    /// the log: the fair share is per group, so many connections from one host get one share.
    n_senders: usize,
    /// Bytes in the log per address group of the members that sent them (u64: the same map
    /// type as the access counts', one copy of the hash table code for all of them).
    group_bytes: HashMap<IpAddr, u64>,
    notices: NoticeGate,
}

#[derive(Debug)]
struct Entry {
    /// The sending member (it does not get its own lines back); `None` for notices.
    from: Option<u64>,
    msg: Msg,
    at: Instant,
}

#[derive(Debug)]
struct Member {
    peer: Peer,
    stream: Arc<TcpStream>,
    /// Wakes this member's writer.
    wake: Arc<Condvar>,
    /// Its writer waits on `wake` right now.
    waiting: bool,
    /// In the room: it receives the log from `cursor` on and holds back the log's oldest entries.
    listening: bool,
    cursor: u64,
    /// When its writer last took a batch from the log (or it joined).
    last_take: Instant,
    /// The seat is gone: the writer sends what is private, then ends.
    seat_gone: bool,
    writer_gone: bool,
    /// Why the room dropped it, if it did.
    dropped: Option<String>,
    /// The others were told it left.
    announced: bool,
    private: VecDeque<Msg>,
    private_bytes: usize,
    /// Bytes of its own messages in the log.
    in_log: usize,
}

impl Room {
    /// Adds a member. Its private queue starts with a welcome that lists who is there; everyone
    /// else is told it joined (see `NoticeGate`).
    pub fn join(
        &self,
        peer: Peer,
        stream: Arc<TcpStream>,
        limits: ChatLimits,
    ) -> (Seat<'_>, Writer<'_>) {
        let mut st = self.lock();
        let mut names: Vec<String> = st
            .members
            .values()
            .filter(|m| m.listening)
            .map(|m| m.peer.to_string())
            .collect();
        names.sort_unstable();
        let shown = names.len().min(WELCOME_NAMES);
        let welcome = wire::chat_welcome(&peer, &names[..shown], names.len() - shown);
        let now = Instant::now();
        st.notice(now, Notice::Joined, wire::chat_joined(&peer));
        let id = st.next_id;
        st.next_id += 1;
        let cursor = st.first_seq + st.log.len() as u64;
        let welcome = msg(welcome.as_bytes());
        st.members.insert(
            id,
            Member {
                peer,
                stream: Arc::clone(&stream),
                wake: Arc::new(Condvar::new()),
                waiting: false,
                listening: true,
                cursor,
                last_take: now,
                seat_gone: false,
                writer_gone: false,
                dropped: None,
                announced: false,
                private_bytes: welcome.len(),
                private: VecDeque::from([welcome]),
                in_log: 0,
            },
        );
        // Entries nobody was listening to go (the invariant: the log starts at the smallest
        // listening cursor).
        st.trim();
        (
            Seat {
                room: self,
                id,
                left: false,
            },
            Writer {
                room: self,
                id,
                stream,
                limits,
            },
        )
    }

    fn stream_of(&self, id: u64) -> Option<Arc<TcpStream>> {
        self.lock().members.get(&id).map(|m| Arc::clone(&m.stream))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the next batch for member `id` into `batch`, waiting for one; false when the
    /// member's writer should end (the member left or was dropped, and its private lines are
    /// sent).
    fn take(&self, id: u64, batch: &mut Vec<Msg>) -> bool {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let st_ref = &mut *st;
            let Some(m) = st_ref.members.get_mut(&id) else {
                return false;
            };
            let mut bytes = 0;
            while let Some(p) = m.private.front() {
                if batch.len() == BATCH_MSGS || (!batch.is_empty() && bytes + p.len() > BATCH_BYTES)
                {
                    break;
                }
                bytes += p.len();
                m.private_bytes -= p.len();
                batch.extend(m.private.pop_front());
            }
            let mut freed = false;
            if m.listening {
                let start = m.cursor.saturating_sub(st_ref.first_seq) as usize;
                let mut seq = m.cursor;
                for e in st_ref.log.range(start.min(st_ref.log.len())..) {
                    if batch.len() == BATCH_MSGS
                        || (!batch.is_empty() && bytes + e.msg.len() > BATCH_BYTES)
                    {
                        break;
                    }
                    seq += 1;
                    if e.from != Some(id) {
                        bytes += e.msg.len();
                        batch.push(Arc::clone(&e.msg));
                    }
                }
                if seq != m.cursor {
                    freed = m.cursor == st_ref.first_seq;
                    m.cursor = seq;
                    m.last_take = now;
                }
            }
            let (listening, seat_gone) = (m.listening, m.seat_gone);
            // Senders are woken only when the log's head moved: while another member still
            // holds it, none of them could append more, and waking them all would be for
            // nothing.
            if freed && st_ref.trim() {
                self.space.notify_all();
            }
            if !batch.is_empty() {
                return true;
            }
            if !listening || seat_gone {
                return false;
            }
            if st_ref.notices.summary_due(now) {
                st_ref.flush_notices(now);
                continue;
            }
            let Some(m) = st_ref.members.get_mut(&id) else {
                return false;
            };
            m.waiting = true;
            let wake = Arc::clone(&m.wake);
            let (guard, waited) = wake
                .wait_timeout(st, WRITER_RECHECK)
                .unwrap_or_else(PoisonError::into_inner);
            st = guard;
            if !waited.timed_out() {
                // Woken by a new message: let the next ones arrive too, so that one `write`
                // carries them all instead of one each (under load, most of them come together).
                drop(st);
                thread::sleep(COALESCE);
                st = self.lock();
            }
            if let Some(m) = st.members.get_mut(&id) {
                m.waiting = false;
            }
        }
    }

    /// Drops member `id` for not draining: out of the room, its socket shut (which wakes both of
    /// its threads), the others told.
    fn drop_member(&self, id: u64, why: String) {
        let mut st = self.lock();
        if st.drop_member(id, why) {
            self.space.notify_all();
        }
    }
}

impl Seat<'_> {
    /// Sends `text` (whole lines) to every other member, waiting while the log is full or this
    /// sender has its share of it. Gives up (false) when this member is no longer in the room, or
    /// when `give_up` says so (the daemon is stopping). While it waits it applies the drop rule
    /// to the member that holds the log back.
    pub fn broadcast(&self, text: &[u8], limits: ChatLimits, give_up: &dyn Fn() -> bool) -> bool {
        let message = msg(text);
        let len = message.len();
        let room = self.room;
        let mut st = room.lock();
        loop {
            let now = Instant::now();
            let Some(m) = st.members.get(&self.id) else {
                return false;
            };
            if !m.listening || give_up() {
                return false;
            }
            let group_in_log = st.group_bytes.get(&addrgroup::of(m.peer.ip())).copied();
            let group_in_log = group_in_log.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
            if st.fits(len, group_in_log, limits.queue_bytes) {
                st.append(Some(self.id), message, now);
                return true;
            }
            if st.drop_stalled(now, limits.drain_timeout) {
                room.space.notify_all();
                continue;
            }
            st = room
                .space
                .wait_timeout(st, SENDER_RECHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Queues a line of the server's own for this member only (an answer, a notice), behind the
    /// others of its kind. A member with `PRIVATE_BYTES` of them unsent is not reading, and the
    /// line is not queued.
    pub fn tell(&self, line: &[u8]) {
        let mut st = self.room.lock();
        let Some(m) = st.members.get_mut(&self.id) else {
            return;
        };
        if m.writer_gone || (!m.private.is_empty() && m.private_bytes + line.len() > PRIVATE_BYTES)
        {
            return;
        }
        m.private_bytes += line.len();
        m.private.push_back(msg(line));
        m.wake.notify_one();
    }

    /// Why the room dropped this member, if it did.
    pub fn dropped(&self) -> Option<String> {
        self.room
            .lock()
            .members
            .get(&self.id)
            .and_then(|m| m.dropped.clone())
    }

    /// Leaves the room, telling the others `reason` (unless the room dropped it and told them
    /// already). The writer sends the lines still private to this member, shuts the sending side
    /// of the socket and ends. Later calls do nothing.
    pub fn leave(&mut self, reason: &str) {
        if self.left {
            return;
        }
        self.left = true;
        let mut st = self.room.lock();
        let now = Instant::now();
        let Some(m) = st.members.get_mut(&self.id) else {
            return;
        };
        m.seat_gone = true;
        m.wake.notify_one();
        let (announce, peer, writer_gone) = (!m.announced, m.peer, m.writer_gone);
        m.listening = false;
        m.announced = true;
        if writer_gone {
            st.forget(self.id);
        }
        if announce {
            let reason = cut(reason, NOTICE_MAX - 80);
            st.notice(now, Notice::Left, wire::chat_left(&peer, &reason));
        }
        st.trim();
        self.room.space.notify_all();
    }
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        if thread::panicking() && !self.left {
            // The handler failed: wake this member's writer, which may be blocked on a full
            // socket, so that the worker is not held until the write timeout.
            if let Some(stream) = self.room.stream_of(self.id) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        self.leave("server error");
    }
}

impl Writer<'_> {
    /// Sends what the member's queues receive, many messages per `write`, until it leaves or is
    /// dropped; adds the bytes written to `written`. A batch (at most `BATCH_BYTES`, or one
    /// larger message) must be sent within `chat_drain_timeout_secs` for each `BATCH_BYTES` in
    /// it, or the member is dropped: that is the least a member must take to stay.
    pub fn run(self, written: &AtomicU64) {
        let stream = &*self.stream;
        let mut timeout = None;
        let mut batch = Vec::with_capacity(BATCH_MSGS);
        loop {
            batch.clear();
            if !self.room.take(self.id, &mut batch) {
                // Left: after its last line, the peer sees the end of the stream.
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            let bytes: usize = batch.iter().map(|m| m.len()).sum();
            let allowance = allowance(bytes, self.limits.drain_timeout);
            let deadline = Instant::now() + allowance;
            match write_batch(stream, &batch, deadline, &mut timeout, written) {
                Ok(()) => {}
                Err(e) if is_timeout(&e) => {
                    let secs = allowance.as_secs();
                    self.room.drop_member(
                        self.id,
                        format!(
                            "not reading: it took less than {bytes} B in {secs} s (server.chat_drain_timeout_secs)"
                        ),
                    );
                    return;
                }
                Err(_) => {
                    // The reader sees the shut socket and ends the connection.
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }
}

/// The time a batch of `bytes` may take: the drain timeout for each `BATCH_BYTES` begun.
fn allowance(bytes: usize, drain_timeout: Duration) -> Duration {
    let batches = bytes.div_ceil(BATCH_BYTES).max(1);
    drain_timeout.saturating_mul(u32::try_from(batches).unwrap_or(u32::MAX))
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        let mut st = self.room.lock();
        let Some(m) = st.members.get_mut(&self.id) else {
            return;
        };
        m.writer_gone = true;
        let (was_listening, seat_gone) = (m.listening, m.seat_gone);
        m.listening = false;
        if seat_gone {
            st.forget(self.id);
        }
        if was_listening {
            st.trim();
            self.room.space.notify_all();
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn msg(bytes: &[u8]) -> Msg {
    Arc::from(bytes)
}

/// Writes every message of `batch`, as few `write`s as the socket allows.
/// Writes every message of `batch` by `deadline`, as few `write`s as the socket allows. The
/// socket's write timeout (`timeout`, as last set) is set again only when it is off from the time
/// left by more than `TIMEOUT_SLACK`, so a batch that goes out at once costs no extra system call.
fn write_batch(
    mut out: &TcpStream,
    batch: &[Msg],
    deadline: Instant,
    timeout: &mut Option<Duration>,
    written: &AtomicU64,
) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|m| IoSlice::new(m)).collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if timeout.is_none_or(|t| t.abs_diff(left) > TIMEOUT_SLACK) {
            out.set_write_timeout(Some(left))?;
            *timeout = Some(left);
        }
        match out.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written.fetch_add(n as u64, Ordering::Relaxed);
                IoSlice::advance_slices(&mut bufs, n);
            }
            // Timed out: the loop checks the deadline.
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gets_the_drain_timeout_per_64_kib() {
        let td = Duration::from_secs(5);
        let cases = [
            (0, 5),
            (1, 5),
            (BATCH_BYTES, 5),
            (BATCH_BYTES + 1, 10),
            (4 * BATCH_BYTES, 20),
        ];
        for (bytes, secs) in cases {
            assert_eq!(allowance(bytes, td), Duration::from_secs(secs), "{bytes} B");
        }
    }

    #[test]
    fn fair_share_of_the_log() {
        // (log bytes, senders with bytes in it, this sender's bytes, message, queue) -> fits
        let cases = [
            (0, 0, 0, 5000, 1000, true),    // an empty log takes any message
            (900, 1, 0, 100, 1000, true),   // space left, a newcomer
            (900, 1, 0, 101, 1000, false),  // no space
            (600, 2, 400, 50, 1000, true),  // within half
            (600, 2, 500, 1, 1000, false),  // over half
            (100, 1, 100, 800, 1000, true), // alone: the whole log
            (300, 3, 0, 200, 1000, true),   // a newcomer always gets one message in
        ];
        for (log_bytes, n_senders, in_log, len, queue, want) in cases {
            let st = State {
                log_bytes,
                n_senders,
                ..State::default()
            };
            assert_eq!(
                st.fits(len, in_log, queue),
                want,
                "log {log_bytes}, senders {n_senders}, own {in_log}, len {len}"
            );
        }
    }
}
