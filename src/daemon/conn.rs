//! One connection, from `online` to `offline`: splits the incoming stream into text and file
//! frames, echoes text as it arrives, hands frames to `upload`, and ends with a logged reason
//! (eof, idle, error, shutdown). Every read has a byte limit (the buffer) and a time limit (the
//! socket's read timeout).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::auth::{self, Key, NONCE_LEN};
use crate::config::{Config, Mode};
use crate::daemon::chat::{ChatLimits, Seat};
use crate::daemon::evict::Place;
use crate::daemon::listener;
use crate::daemon::refusals;
use crate::daemon::shared::{Job, Shared, Snapshot, worker_stack_bytes};
use crate::daemon::stats::Stats;
use crate::daemon::upload::{self, BodySource, Check, Lost, Outcome};
use crate::deadline::{Deadline, Why, is_timeout};
use crate::escape::{escaped, push_chat_text};
use crate::peer::Peer;
use crate::proto::header::MAX_NAME_LEN;
use crate::proto::starstar;
use crate::proto::wire::{self, ERR_EVICTED, ERR_SHUTDOWN, OK_AUTH};
use crate::proto::{self, Code, FrameError, FrameHead, Parsed};

mod compat;

/// How many bytes of a request or response a debug log line shows.
const LOG_WIDTH: usize = 80;
/// Size of the read buffer, on the worker's stack. Small, so that the stack of a worker waiting
/// on an idle connection fits in two pages (it is zeroed, so each of its bytes is touched);
/// large enough for a whole frame head (`proto::MAX_HEAD_LEN`) or `NAME**SIZE` head. File bodies
/// are read straight into the upload's own buffer, not through this one.
const READ_BUF: usize = 512;
const _: () = assert!(proto::MAX_HEAD_LEN <= READ_BUF);
const _: () = assert!(starstar::MAX_HEAD_LEN <= READ_BUF);
/// The buffer that drains a refused peer's bytes (on the stack only while refusing).
const DRAIN_BUF: usize = 4096;
/// After refusing a frame, how long and how much of the unread body is read and dropped before
/// closing, so that the peer gets the `ERR` line instead of a connection reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 8 << 20;
/// Longest `AUTH` line accepted.
const MAX_AUTH_LINE: usize = 256;
/// A socket's read timeout is set again only when the time left differs from it by more than
/// this, so that a stream of reads under one deadline costs no system call each; a deadline is
/// overshot by at most this much.
const TIMEOUT_SLACK: Duration = Duration::from_millis(10);

/// The kernel send buffer of a chat client (Linux doubles it). A fixed size bounds what a client
/// that stops reading can hold in the kernel, so that its writer blocks and the drop rule sees it
/// instead of the kernel buffering megabytes for it.
const CHAT_SNDBUF: usize = 64 * 1024;

/// Why a connection ended.
#[derive(Debug)]
pub enum Reason {
    /// The peer closed its side.
    Eof,
    /// The peer sent nothing for `idle_timeout_secs`.
    Idle,
    /// The daemon is stopping.
    Shutdown,
    /// A read or write failed.
    Error(io::Error),
    /// The peer broke the protocol.
    Protocol(String),
    /// A file frame was refused in a way that ends the connection (the `ERR` line).
    Refused(String),
    /// Chat: the room dropped the client for not draining what waited for it (why).
    TooSlow(String),
    /// Every worker was busy and this connection, waiting on its peer longest, made room.
    Evicted,
    /// A text line was not complete within `line_timeout_secs` of its first byte.
    SlowLine,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Eof => f.write_str("eof"),
            Reason::Idle => f.write_str("idle"),
            Reason::Shutdown => f.write_str("shutdown"),
            Reason::Error(e) if is_timeout(e) => f.write_str("error: peer stopped reading"),
            Reason::Error(e) => write!(f, "error: {e}"),
            Reason::Protocol(what) => write!(f, "error: {what}"),
            Reason::Refused(line) => write!(f, "refused: {line}"),
            Reason::TooSlow(why) => write!(f, "too slow: {why}"),
            Reason::Evicted => {
                f.write_str("evicted: every worker busy, made room for a waiting connection")
            }
            Reason::SlowLine => f.write_str("slow line: not complete within line_timeout_secs"),
        }
    }
}

/// Serves one accepted connection until it ends, logging `online` and `offline`.
pub fn serve(shared: &Shared, job: Job) {
    // The slot keeps this connection counted against its address until `serve` returns (or
    // unwinds).
    let Job {
        stream,
        peer,
        slot: _slot,
    } = job;
    let started = Instant::now();
    // The settings this connection lives by, taken whole: a reload mid-way does not mix them.
    let snapshot = shared.snapshot();
    let cfg = Arc::clone(&snapshot.config);
    let s = &cfg.server;
    if let Err(e) = listener::prepare_stream(&stream, s.idle_timeout, s.write_timeout) {
        log::warn!("{peer} cannot set socket options: {e}; closing");
        return;
    }
    let stream = Arc::new(stream);
    let _registration = shared.conns.register(Arc::clone(&stream));
    // On the board, this connection may be chosen to make room while it waits on its peer.
    let place = shared.board.enter(peer.ip(), Arc::clone(&stream));
    let _open = Stats::hold(&shared.stats.open);
    let text_locked = snapshot.key.is_some() && cfg.access.require_token;
    let mut conn = Conn {
        shared,
        cfg: Arc::clone(&cfg),
        snapshot: Arc::clone(&snapshot),
        stream: &stream,
        place: &place,
        peer,
        bytes_in: 0,
        bytes_out: 0,
        read_timeout: Some(cfg.server.idle_timeout),
        chat: None,
        auth: snapshot.key.clone().map(|key| Auth {
            key,
            nonce: [0; NONCE_LEN],
            seq: 0,
        }),
        text_locked,
        auth_line: Vec::new(),
        frames: 0,
        panic_line: debug_panic_line(),
    };
    log::info!("{peer} online");
    let reason = conn.session(&stream);
    log_offline(&conn, started, &reason);
}

/// The `offline` line. Out of line, like every rare or large path here, so that the stack of a
/// worker waiting on an idle peer stays small (see `READ_BUF`).
#[inline(never)]
fn log_offline(conn: &Conn<'_>, started: Instant, reason: &Reason) {
    log::info!(
        "{} offline (in {} B, out {} B, {:.1} s, reason: {reason})",
        conn.peer,
        conn.bytes_in,
        conn.bytes_out,
        started.elapsed().as_secs_f64()
    );
}

/// A debug build's test hook: a chat line equal to `$FERRYD_DEBUG_PANIC_LINE` makes its handler
/// panic, so that a test can show what a panic in a handler leaves behind (nothing). Release
/// builds never read the variable.
fn debug_panic_line() -> Option<Vec<u8>> {
    if cfg!(debug_assertions) {
        std::env::var_os("FERRYD_DEBUG_PANIC_LINE").map(|v| v.into_encoded_bytes())
    } else {
        None
    }
}

/// How a read under a deadline ended without bytes.
#[derive(Debug)]
enum ReadEnd {
    /// The peer closed its side (or the shutdown shut our read side).
    Eof,
    /// The deadline passed; it says which limit it was.
    Timeout(Why),
    Error(io::Error),
}

/// Bytes read from the socket and not yet used, in a buffer on the worker's stack (`READ_BUF`)
/// or, for a chat member, a larger one on the heap (`CHAT_READ_BUF`).
struct Input<'b> {
    buf: &'b mut [u8],
    start: usize,
    end: usize,
}

impl Input<'_> {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// Moves the unused bytes to the front, so that a read can append after them.
    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// Moves up to `out.len()` bytes into `out`; returns how many.
    fn take_into(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }
}

struct Conn<'a> {
    shared: &'a Shared,
    /// The configuration as it was when the connection started (`snapshot.config`).
    cfg: Arc<Config>,
    /// The settings in force when the connection started: config, store and key.
    snapshot: Arc<Snapshot>,
    stream: &'a TcpStream,
    /// This connection on the board of those that may be chosen to make room.
    place: &'a Place<'a>,
    peer: Peer,
    bytes_in: u64,
    bytes_out: u64,
    /// The socket's read timeout as last set (only `read_by` sets it).
    read_timeout: Option<Duration>,
    /// Chat mode: this client's seat in the room and its unfinished line.
    chat: Option<ChatLine<'a>>,
    /// Set when uploads need a key: the key, this connection's nonce, and the sequence number
    /// the next authenticated frame must carry.
    auth: Option<Auth>,
    /// `access.require_token`: text is refused until a good `AUTH` line.
    text_locked: bool,
    /// The `AUTH` line being read while text is locked.
    auth_line: Vec<u8>,
    /// File frames seen on this connection.
    frames: u32,
    /// See `debug_panic_line`.
    panic_line: Option<Vec<u8>>,
}

struct Auth {
    key: Arc<Key>,
    nonce: [u8; NONCE_LEN],
    seq: u64,
}

/// A chat client's seat and the line being assembled.
struct ChatLine<'a> {
    seat: Seat<'a>,
    limits: ChatLimits,
    /// `[ip:port] `, which begins each of its lines as the others see them.
    prefix: String,
    line: Vec<u8>,
    /// The current line was too long and is being thrown away up to its newline.
    skipping: bool,
    /// Bytes its writer has sent, and their count when the idle deadline last passed: a member
    /// the room talks to is not idle, even if it only reads.
    written: Arc<AtomicU64>,
    seen_written: u64,
    /// The current line was delivered without its newline after `server.chat_flush_ms` of
    /// silence: a newline that comes next ends it and is not an empty line of its own.
    flushed: bool,
}

impl Conn<'_> {
    /// The connection from its first byte to its end: the nonce when uploads need a key, the
    /// `AUTH` line when text does, then text and frames in the server's mode.
    #[inline(never)]
    fn session(&mut self, stream: &Arc<TcpStream>) -> Reason {
        if self.auth.is_some() {
            if let Err(reason) = self.send_nonce() {
                return reason;
            }
        }
        let mut buf = [0; READ_BUF];
        let mut input = Input {
            buf: &mut buf,
            start: 0,
            end: 0,
        };
        if self.shared.is_stopping() {
            // Registered after the shutdown woke everyone: end here rather than wait for a read.
            self.say(ERR_SHUTDOWN);
            return Reason::Shutdown;
        }
        if let Err(reason) = self.unlock(&mut input) {
            return reason;
        }
        if self.cfg.server.mode == Mode::Chat {
            self.run_chat(stream, &mut input)
        } else {
            self.run(&mut input)
        }
    }

    /// Draws this connection's nonce and sends it, before anything else, so that a client can
    /// read it as the first line.
    #[inline(never)]
    fn send_nonce(&mut self) -> Result<(), Reason> {
        let Some(auth) = self.auth.as_mut() else {
            return Ok(());
        };
        match auth::new_nonce() {
            Ok(nonce) => auth.nonce = nonce,
            Err(e) => {
                log::error!("{} no random nonce: {e}; closing", self.peer);
                return Err(Reason::Error(e));
            }
        }
        let line = wire::nonce_line(&auth.nonce);
        self.say(line.as_bytes());
        Ok(())
    }
}

/// The largest message one read's lines make before they go to the room (plus one line).
const CHAT_MSG_BYTES: usize = 16 * 1024;
/// A chat member's read buffer, on the heap: larger than `READ_BUF`, so that a member sending
/// fast gets its lines to the room in few reads and few appends (each read's lines are one
/// message), while an idle echo connection keeps its small stack.
const CHAT_READ_BUF: usize = 4096;

impl Conn<'_> {
    /// Chat mode: joins the room, starts this client's writer thread (the only one that writes
    /// to its socket from now on), serves, leaves. The seat is the membership: dropping it leaves
    /// the room, on every path, a panic included.
    #[inline(never)]
    fn run_chat(&mut self, stream: &Arc<TcpStream>, small: &mut Input) -> Reason {
        let shared = self.shared;
        let mut buf = vec![0; CHAT_READ_BUF.max(small.data().len())];
        let end = small.take_into(&mut buf);
        let input = &mut Input {
            buf: &mut buf,
            start: 0,
            end,
        };
        // Best effort: without it the kernel buffers more for a client that does not read.
        let _ = SockRef::from(&**stream).set_send_buffer_size(CHAT_SNDBUF);
        let limits = ChatLimits {
            queue_bytes: self.cfg.server.chat_queue_bytes,
            drain_timeout: self.cfg.server.chat_drain_timeout,
        };
        let (mut seat, writer) = shared.room.join(self.peer, Arc::clone(stream), limits);
        let written = Arc::new(AtomicU64::new(0));
        let stack = worker_stack_bytes(&self.cfg);
        let reason = thread::scope(|s| {
            let counter = Arc::clone(&written);
            let spawned = thread::Builder::new()
                .name("chat-writer".into())
                .stack_size(stack)
                .spawn_scoped(s, move || writer.run(&counter));
            if let Err(e) = spawned {
                seat.leave("server error");
                return Reason::Error(e);
            }
            self.chat = Some(ChatLine {
                seat,
                limits,
                prefix: format!("{} ", self.peer),
                line: Vec::new(),
                skipping: false,
                written: Arc::clone(&written),
                seen_written: 0,
                flushed: false,
            });
            let served = panic::catch_unwind(AssertUnwindSafe(|| self.run(input)));
            // Leave before the scope joins the writer: leaving is what ends the writer, once it
            // has sent what is still queued for this client alone.
            let chat = self.chat.take();
            let reason = match served {
                Ok(reason) => reason,
                Err(panic) => {
                    // Wake the writer too (it may be blocked on a full socket), then leave.
                    let _ = stream.shutdown(Shutdown::Both);
                    if let Some(mut chat) = chat {
                        chat.seat.leave("server error");
                    }
                    panic::resume_unwind(panic);
                }
            };
            let Some(mut chat) = chat else {
                return reason;
            };
            let reason = match chat.seat.dropped() {
                Some(why) => Reason::TooSlow(why),
                None => reason,
            };
            chat.seat.leave(&reason.to_string());
            reason
        });
        let written = written.load(Ordering::Relaxed);
        self.bytes_out += written;
        Stats::add(&self.shared.stats.bytes_out, written);
        reason
    }

    fn run(&mut self, input: &mut Input) -> Reason {
        // A NAME**SIZE head can only open a connection: not after an AUTH line whose following
        // bytes wait in `input` (and those must not be dropped). `first_line` is the limit of
        // the line the connection's first byte began, which a slow head counts toward.
        let mut first_line = None;
        if input.is_empty() {
            // Waiting for the first bytes: a silent peer may be chosen to make room.
            self.waiting_on_peer(Instant::now());
            match self.starstar(input) {
                Ok(deadline) => first_line = deadline,
                Err(reason) => return reason,
            }
        }
        // The minimum progress for text lines. In chat mode with chat_flush_ms an unfinished
        // line is delivered after a pause, so there is no unfinished line to time.
        let line_rule = self.chat.is_none() || self.cfg.server.chat_flush_ms == 0;
        // Whether the next byte begins a message (so a frame may start there).
        let mut at_message_start = true;
        // When the last line (or frame) ended: how long the peer has kept us waiting.
        let mut last_line = Instant::now();
        // While a text line is incomplete: when it must be complete (`line_timeout_secs`).
        let mut line_deadline: Option<Deadline> = None;
        loop {
            if input.is_empty() {
                self.waiting_on_peer(last_line);
                if let Err(reason) = self.fill(input, line_deadline) {
                    return reason;
                }
                // Chosen to make room while the peer's bytes were still arriving (shutting the
                // read side lets queued bytes through first): end now.
                if self.place.is_evicted() {
                    return self.evicted();
                }
            }
            let data = input.data();
            let n = proto::text_len(data, at_message_start);
            if n == 0 {
                if let Err(reason) = self.frame(input) {
                    return reason;
                }
                at_message_start = true;
                last_line = Instant::now();
                line_deadline = None;
                continue;
            }
            // While text is locked, the AUTH line is taken on its own: what follows it is text
            // for the mode (or a frame) once it has unlocked.
            let n = match data[..n].iter().position(|&b| b == b'\n') {
                Some(i) if self.text_locked => i + 1,
                _ => n,
            };
            let text = &data[..n];
            let was_start = at_message_start;
            at_message_start = text[n - 1] == b'\n';
            if at_message_start {
                last_line = Instant::now();
                line_deadline = None;
                first_line = None;
            } else if line_rule && (was_start || text.contains(&b'\n')) {
                // A new line began in these bytes and is not complete yet: its limit counts from
                // its first byte, which came before these if the opening head was slow.
                let limit = self.cfg.server.line_timeout;
                let began = first_line.take().filter(|_| !text.contains(&b'\n'));
                line_deadline = Some(began.unwrap_or_else(|| Deadline::after(limit, Why::Line)));
            }
            log::debug!("{} req {}", self.peer, escaped(text, LOG_WIDTH));
            if self.text_locked {
                if let Err(reason) = self.auth_text(text) {
                    return reason;
                }
            } else if self.chat.is_some() {
                self.chat_text(text);
            } else {
                // A peer that does not take the echo may be chosen to make room meanwhile.
                if !self.place.writing() {
                    return self.evicted();
                }
                if let Err(e) = self.write_all(text) {
                    if self.place.is_evicted() {
                        return Reason::Evicted;
                    }
                    return Reason::Error(e);
                }
                log::debug!("{} resp {}", self.peer, escaped(text, LOG_WIDTH));
            }
            input.consume(n);
        }
    }

    /// `access.require_token`: before the client's text goes anywhere (echoed, or into the chat
    /// room, where it would see the members, the notices and the messages), the client must
    /// prove the key within `access.auth_timeout_secs`: a good `AUTH` line, or a file frame with
    /// a good tag (`ferryd send --key-file`). Frames may come before the `AUTH` line; text other
    /// than it ends the connection with `ERR unauthorized`. Returns once text is unlocked.
    #[inline(never)]
    fn unlock(&mut self, input: &mut Input) -> Result<(), Reason> {
        let auth_deadline = Deadline::after(self.cfg.access.auth_timeout, Why::Auth);
        let mut proven = false;
        let mut since = Instant::now();
        while self.text_locked {
            if input.is_empty() {
                let idle = self.idle_deadline();
                let deadline = if proven {
                    idle
                } else {
                    idle.earliest(auth_deadline)
                };
                self.place.reading_since(since);
                input.start = 0;
                input.end = 0;
                self.fill_more(input, deadline)?;
                if self.place.is_evicted() {
                    return Err(self.evicted());
                }
            }
            let data = input.data();
            let n = proto::text_len(data, self.auth_line.is_empty());
            if n == 0 {
                self.frame(input)?;
                proven = true;
                since = Instant::now();
                continue;
            }
            // The AUTH line is taken on its own: what follows it is text for the mode.
            let n = data[..n]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(n, |i| i + 1);
            let text = &data[..n];
            log::debug!("{} req {}", self.peer, escaped(text, LOG_WIDTH));
            self.auth_text(text)?;
            input.consume(n);
        }
        Ok(())
    }

    /// `access.require_token`: text must begin with `AUTH <hex tag>`; anything else ends the
    /// connection with `ERR unauthorized`.
    fn auth_text(&mut self, text: &[u8]) -> Result<(), Reason> {
        if self.auth_line.len() + text.len() > MAX_AUTH_LINE {
            return Err(self.unauthorized("expected the line AUTH <hex tag> first"));
        }
        self.auth_line.extend_from_slice(text);
        if self.auth_line.last() != Some(&b'\n') {
            return Ok(());
        }
        let line = std::mem::take(&mut self.auth_line);
        let Some(hex_tag) = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.trim_end().strip_prefix("AUTH "))
        else {
            return Err(self.unauthorized(
                "text is locked (access.require_token): send the line AUTH <hex tag> first",
            ));
        };
        let good = match (&self.auth, auth::from_hex(hex_tag.trim())) {
            (Some(a), Some(tag)) => a.key.verify_auth(&a.nonce, &tag),
            _ => false,
        };
        if !good {
            return Err(self
                .unauthorized("the AUTH tag does not match this connection's nonce and the key"));
        }
        self.text_locked = false;
        log::info!("{} authenticated", self.peer);
        self.say(OK_AUTH);
        Ok(())
    }

    fn unauthorized(&mut self, why: &str) -> Reason {
        let peer = self.peer;
        self.shared
            .refused(refusals::Why::Unauthorized, Some(peer.ip()), || {
                format!("{peer} refused: unauthorized: {why}")
            });
        self.refuse(&wire::err_line(Code::Unauthorized, &why))
    }

    /// Chat: adds text to the current line; each completed line goes to everyone else as
    /// `[ip:port] line`. The lines completed by one read travel as few messages as
    /// `CHAT_MSG_BYTES` allows, so a sender's burst costs the room few entries. A line over
    /// `max_line_bytes` is refused to its sender and thrown away. Waits while the room's log is
    /// full or this sender holds its share of it.
    fn chat_text(&mut self, text: &[u8]) {
        let max = self.cfg.server.max_line_bytes;
        let shared = self.shared;
        let Some(chat) = self.chat.as_mut() else {
            return;
        };
        let give_up = || shared.is_stopping();
        let mut out = String::with_capacity(CHAT_MSG_BYTES.min(2 * text.len() + 64));
        let mut too_long = false;
        for segment in text.split_inclusive(|&b| b == b'\n') {
            let ends_line = segment.last() == Some(&b'\n');
            let content = segment.strip_suffix(b"\n").unwrap_or(segment);
            // The newline of a line already delivered by the flush.
            if std::mem::take(&mut chat.flushed)
                && ends_line
                && chat.line.is_empty()
                && matches!(content, b"" | b"\r")
            {
                continue;
            }
            if chat.skipping {
                chat.skipping = !ends_line;
                continue;
            }
            // A CR that ends a CRLF line is not part of the line.
            let cr = ends_line
                && (content.last() == Some(&b'\r')
                    || (content.is_empty() && chat.line.last() == Some(&b'\r')));
            if chat.line.len() + content.len() > max + usize::from(cr) {
                chat.line = Vec::new();
                chat.skipping = !ends_line;
                too_long = true;
                continue;
            }
            chat.line.extend_from_slice(content);
            if ends_line {
                let line = std::mem::take(&mut chat.line);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if self.panic_line.as_deref() == Some(line) {
                    panic!("FERRYD_DEBUG_PANIC_LINE received");
                }
                out.push_str(&chat.prefix);
                push_chat_text(&mut out, line);
                out.push('\n');
                if out.len() >= CHAT_MSG_BYTES {
                    chat.seat.broadcast(out.as_bytes(), chat.limits, &give_up);
                    out.clear();
                }
            }
        }
        if !out.is_empty() {
            chat.seat.broadcast(out.as_bytes(), chat.limits, &give_up);
        }
        if too_long {
            log::warn!(
                "{} chat line over server.max_line_bytes = {max}; refused",
                self.peer
            );
            self.say(wire::err_line_too_long(max).as_bytes());
        }
    }

    /// Reads more bytes into an empty `input` by the idle deadline (or `limit`, if it comes
    /// first: the line deadline). A clean end of stream, the idle timeout and the shutdown each
    /// end the connection (after telling the peer why). In chat mode, an unfinished line is
    /// delivered after `server.chat_flush_ms` of silence and at the end of the stream, and the
    /// idle rule counts traffic both ways: a member that only reads is not idle while the room
    /// sends it lines (it is cut once neither way carried a byte for between one and two
    /// `idle_timeout_secs`).
    fn fill(&mut self, input: &mut Input, limit: Option<Deadline>) -> Result<(), Reason> {
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

    /// Chat: whether this member's writer sent it anything since the last time this was asked.
    fn room_talked(&mut self) -> bool {
        let Some(chat) = self.chat.as_mut() else {
            return false;
        };
        let written = chat.written.load(Ordering::Relaxed);
        let talked = written != chat.seen_written;
        chat.seen_written = written;
        talked
    }

    /// Chat: how long to wait before delivering the unfinished line, if there is one.
    fn chat_flush_after(&self) -> Option<Duration> {
        let chat = self.chat.as_ref()?;
        if chat.line.is_empty() || chat.skipping {
            return None;
        }
        match self.cfg.server.chat_flush_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Chat: delivers the unfinished line as a line (a client that writes without newlines, or
    /// the last line before the end of the stream).
    fn flush_chat_line(&mut self) {
        let Some(chat) = self.chat.as_mut() else {
            return;
        };
        if chat.skipping || chat.line.is_empty() {
            return;
        }
        let line = std::mem::take(&mut chat.line);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        chat.flushed = true;
        let mut out = chat.prefix.clone();
        push_chat_text(&mut out, line);
        out.push('\n');
        let shared = self.shared;
        chat.seat
            .broadcast(out.as_bytes(), chat.limits, &|| shared.is_stopping());
    }

    /// Appends bytes to `input` (after moving what is unused to the front), by `deadline`.
    fn fill_more(&mut self, input: &mut Input, deadline: Deadline) -> Result<(), Reason> {
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
    fn ended(&mut self, end: ReadEnd) -> Reason {
        match end {
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
                log::warn!(
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
    fn waiting_on_peer(&self, since: Instant) {
        if self.chat.is_some() {
            // Idempotent; a connection chosen before it joined sees `is_evicted` after its read.
            let _ = self.place.busy();
        } else {
            self.place.reading_since(since);
        }
    }

    fn evicted(&mut self) -> Reason {
        if self.chat.is_some() {
            self.say(ERR_EVICTED);
        } else if self.stream.set_nonblocking(true).is_ok() {
            if self.write_all(ERR_EVICTED).is_err() {
                log::debug!("{} could not be told why it was ended", self.peer);
            }
            let _ = self.stream.set_nonblocking(false);
        }
        Reason::Evicted
    }

    /// The idle limit, counted from now.
    fn idle_deadline(&self) -> Deadline {
        Deadline::after(self.cfg.server.idle_timeout, Why::Idle)
    }

    /// The one place that reads from the socket: at most `buf.len()` bytes, by `deadline`, whose
    /// reason comes back if it passes first.
    fn read_by(&mut self, buf: &mut [u8], deadline: Deadline) -> Result<usize, ReadEnd> {
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
                    self.bytes_in += n as u64;
                    Stats::add(&self.shared.stats.bytes_in, n as u64);
                    return Ok(n);
                }
                // Timed out: the loop checks the deadline (set at most TIMEOUT_SLACK early).
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadEnd::Error(e)),
            }
        }
    }

    /// Handles the frame that starts at the beginning of `input`: header, name, body, answer.
    /// `Ok` means the connection goes on.
    // Not inlined, so that its buffers and the upload's frames take stack only while it runs,
    // never under a worker that waits for an idle peer's next line.
    #[inline(never)]
    fn frame(&mut self, input: &mut Input) -> Result<(), Reason> {
        // From here to the answer, the connection must not be chosen to make room.
        if !self.place.busy() {
            return Err(self.evicted());
        }
        self.frames += 1;
        let max_files = self.cfg.access.max_files_per_connection;
        if self.frames > max_files {
            log::warn!(
                "{} refused: more than access.max_files_per_connection = {max_files} files",
                self.peer
            );
            let why =
                format!("this connection has carried {max_files} files, the limit; reconnect");
            return Err(self.refuse(&wire::err_line(Code::TooManyFiles, &why)));
        }
        // The header, name and tag must all arrive within header_timeout_secs of the first byte.
        let header_deadline = Deadline::after(self.cfg.access.header_timeout, Why::Header);
        let mut name_buf = [0u8; MAX_NAME_LEN as usize];
        let (header, raw_header, name_len, tag, resumable) = loop {
            match FrameHead::parse(input.data()) {
                Ok(Parsed::Complete(head)) => {
                    let name = &mut name_buf[..head.name.len()];
                    name.copy_from_slice(head.name);
                    let parts = (
                        head.header,
                        head.raw_header,
                        head.name.len(),
                        head.tag,
                        head.resumable(),
                    );
                    input.consume(head.len);
                    break parts;
                }
                Ok(Parsed::Partial) => {
                    let deadline = self.idle_deadline().earliest(header_deadline);
                    self.fill_more(input, deadline)?;
                }
                Err(e) => {
                    log::warn!("{} bad frame header: {e}", self.peer);
                    return Err(self.refuse(&wire::err_line(code_for(e), &e)));
                }
            }
        };
        let name = &name_buf[..name_len];
        if let Some(auth) = self.auth.as_mut() {
            let Some(tag) = tag else {
                return Err(
                    self.unauthorized("this server needs an upload key (ferryd send --key-file)")
                );
            };
            if !auth
                .key
                .verify_upload(&auth.nonce, auth.seq, &raw_header, name, &tag)
            {
                return Err(
                    self.unauthorized("the tag does not match this frame, connection and key")
                );
            }
            auth.seq += 1;
        }
        // A trailing checksum comes with a second tag when the frame needed a key.
        let trailer_key = match (&self.auth, tag) {
            (Some(a), Some(tag)) if header.trailing => Some((Arc::clone(&a.key), tag)),
            _ => None,
        };
        let shared = self.shared;
        let peer = self.peer;
        let mut source = ConnSource::new(self, input);
        let store = Arc::clone(&source.conn.snapshot.store);
        let outcome = upload::receive_checked(
            &store,
            Check::Frame {
                header: &header,
                trailer_auth: trailer_key.as_ref().map(|(key, tag)| upload::TrailerAuth {
                    key,
                    first_tag: *tag,
                }),
                resumable,
            },
            name,
            &mut source,
            shared.hash_pool(),
            &peer,
        );
        self.answer_upload(outcome)
    }

    /// Counts an upload's outcome, announces a stored file to the chat room, and answers it;
    /// `Ok` means the connection goes on.
    fn answer_upload(&mut self, outcome: Outcome) -> Result<(), Reason> {
        let shared = self.shared;
        let peer = self.peer;
        let line = outcome.answer();
        match &outcome {
            Outcome::Stored {
                stored_name, size, ..
            } => {
                Stats::add(&shared.stats.files_stored, 1);
                if let Some(chat) = &self.chat {
                    let mut shown = String::new();
                    push_chat_text(&mut shown, stored_name.as_bytes());
                    let notice = wire::chat_uploaded(&peer, &shown, *size);
                    chat.seat
                        .broadcast(notice.as_bytes(), chat.limits, &|| shared.is_stopping());
                }
            }
            _ => Stats::add(&shared.stats.files_failed, 1),
        }
        if outcome.keeps_connection() {
            self.say(line.as_bytes());
            // After the answer, so a hook never delays the client.
            if let Outcome::Stored {
                stored_name,
                size,
                checksum,
            } = &outcome
            {
                let snapshot = &self.snapshot;
                shared.hooks.stored(
                    &snapshot.config,
                    snapshot.store.dir(),
                    stored_name,
                    *size,
                    checksum,
                    peer.addr(),
                );
            }
            return Ok(());
        }
        Err(match outcome {
            Outcome::Lost(Lost::Shutdown) => {
                self.say(line.as_bytes());
                Reason::Shutdown
            }
            Outcome::Lost(Lost::Timeout) => {
                self.say(line.as_bytes());
                Reason::Idle
            }
            Outcome::Lost(Lost::TooSlow { min }) => {
                self.say(line.as_bytes());
                Reason::Protocol(format!("body slower than {min} B/s"))
            }
            Outcome::Lost(Lost::Error(e)) => Reason::Error(e),
            Outcome::Lost(Lost::Eof) => {
                // The peer may have only half-closed (e.g. `nc -N`): tell it.
                self.say(line.as_bytes());
                Reason::Protocol("end of stream in the middle of a file".into())
            }
            _ => self.refuse(&line),
        })
    }

    /// Answers a refused frame and prepares to close: the rest of its bytes cannot be told apart
    /// from text, so the connection ends. The unread bytes are drained for a moment first, since
    /// closing a socket with unread input sends a reset that could destroy the answer.
    // Not inlined, so that its drain buffer takes stack only while it runs, never under a
    // worker that waits for an idle peer's next line.
    #[inline(never)]
    fn refuse(&mut self, line: &str) -> Reason {
        self.say(line.as_bytes());
        let reason = Reason::Refused(line.trim_end().to_string());
        match self.chat.as_mut() {
            // Chat: the writer sends the answer (and what is queued for this client alone), then
            // shuts the sending side.
            Some(chat) => chat.seat.leave(&reason.to_string()),
            None => {
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        let deadline = Deadline::after(LINGER_TIME, Why::Linger);
        let mut scratch = [0u8; DRAIN_BUF];
        let mut drained = 0u64;
        while drained < LINGER_BYTES {
            match self.read_by(&mut scratch, deadline) {
                Ok(n) => drained += n as u64,
                Err(_) => break,
            }
        }
        reason
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut stream = self.stream;
        stream.write_all(data)?;
        self.bytes_out += data.len() as u64;
        Stats::add(&self.shared.stats.bytes_out, data.len() as u64);
        Ok(())
    }

    /// Sends a line of our own (an answer or a notice). In chat mode it goes to the client's
    /// private queue, which its writer sends before the room's lines; a client with
    /// `chat::PRIVATE_BYTES` of them unsent is not reading them. A peer that is gone cannot be
    /// told, which is not an error.
    fn say(&mut self, line: &[u8]) {
        match &self.chat {
            Some(chat) => chat.seat.tell(line),
            // A peer that does not read may be chosen to make room while this blocks (and one
            // chosen already is told by `evicted`, not here).
            None if self.place.writing() => {
                let _ = self.write_all(line);
            }
            None => {}
        }
    }
}

/// The body of a frame: what is left in the input buffer, then reads from the socket straight
/// into a large buffer.
struct ConnSource<'c, 'a, 'i> {
    conn: &'c mut Conn<'a>,
    input: &'c mut Input<'i>,
    /// `access.min_upload_bytes_per_sec` (0: no check), checked over windows of
    /// `access.upload_rate_window_secs`; a body read waits at most until the end of the window.
    min_rate: u64,
    window: Duration,
    window_start: Instant,
    window_bytes: u64,
}

impl<'c, 'a, 'i> ConnSource<'c, 'a, 'i> {
    /// The body source for a frame (or `NAME**SIZE` upload) starting now, under the snapshot's
    /// `access.min_upload_bytes_per_sec` and `access.upload_rate_window_secs`.
    fn new(conn: &'c mut Conn<'a>, input: &'c mut Input<'i>) -> Self {
        let min_rate = conn.cfg.access.min_upload_bytes_per_sec;
        let window = conn.cfg.access.upload_rate_window;
        ConnSource {
            conn,
            input,
            min_rate,
            window,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// At the end of a rate window, checks the window's rate and starts the next one.
    fn check_rate(&mut self) -> Result<(), Lost> {
        let elapsed = self.window_start.elapsed();
        if self.min_rate == 0 || elapsed < self.window {
            return Ok(());
        }
        if (self.window_bytes as f64) < self.min_rate as f64 * elapsed.as_secs_f64() {
            return Err(Lost::TooSlow { min: self.min_rate });
        }
        self.window_start = Instant::now();
        self.window_bytes = 0;
        Ok(())
    }
}

impl BodySource for ConnSource<'_, '_, '_> {
    fn read_into(&mut self, buf: &mut [u8]) -> Result<usize, Lost> {
        if !self.input.is_empty() {
            return Ok(self.input.take_into(buf));
        }
        loop {
            let mut deadline = self.conn.idle_deadline();
            if self.min_rate > 0 {
                // Wake up at the end of the window at the latest, so a stalled body is noticed.
                let window_end = Deadline {
                    at: self.window_start + self.window,
                    why: Why::RateWindow,
                };
                deadline = deadline.earliest(window_end);
            }
            match self.conn.read_by(buf, deadline) {
                Ok(n) => {
                    self.window_bytes += n as u64;
                    self.check_rate()?;
                    return Ok(n);
                }
                Err(ReadEnd::Timeout(Why::RateWindow)) => self.check_rate()?,
                Err(ReadEnd::Eof) if self.conn.shared.is_stopping() => return Err(Lost::Shutdown),
                Err(ReadEnd::Eof) => return Err(Lost::Eof),
                Err(ReadEnd::Timeout(_)) => return Err(Lost::Timeout),
                Err(ReadEnd::Error(e)) => return Err(Lost::Error(e)),
            }
        }
    }

    fn tell(&mut self, line: &str) -> Result<(), Lost> {
        self.conn.say(line.as_bytes());
        // The body starts after the peer has read this: the rate window starts now.
        self.window_start = Instant::now();
        self.window_bytes = 0;
        Ok(())
    }
}

fn code_for(e: FrameError) -> Code {
    match e {
        FrameError::Magic => Code::BadMagic,
        FrameError::Version(_) => Code::BadVersion,
        FrameError::Flags(_) | FrameError::TrailingChecksum => Code::BadHeader,
        FrameError::NameLength(_) => Code::BadName,
    }
}
