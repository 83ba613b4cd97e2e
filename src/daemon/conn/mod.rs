//! One connection, from `online` to `offline`: its state (`Conn`), its input buffer, its session
//! in order (nonce, `AUTH` gate, then text and frames in the server's mode) and the logged reason
//! it ended with (eof, idle, error, shutdown). One file per role: `read` (the one read path,
//! `read_by`), `text` (splitting text from frames, echo), `member` (a chat member), `gate` (the
//! nonce and the `AUTH` line), `frame` (frames, `NAME**SIZE` heads and their answers) and `body`
//! (a frame's body as the upload reads it). Every read has a byte limit (the buffer) and a time
//! limit (the socket's read timeout).

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::NONCE_LEN;
use crate::config::{Config, Mode};
use crate::daemon::access::evict::Place;
use crate::daemon::files::batch::Batch;
use crate::daemon::files::store::Store;
use crate::daemon::registry::{Live, State};
use crate::daemon::shared::{Client, Job, Proxied, Shared, Snapshot};
use crate::daemon::stats::Stats;
use crate::deadline::is_timeout;
use crate::logger;
use crate::peer::Peer;
use crate::proto;
use crate::proto::decimal::Fixed;
use crate::proto::starstar;
use crate::proto::wire::ERR_SHUTDOWN;

mod body;
mod compat;
mod frame;
mod gate;
mod member;
mod proxied;
mod read;
mod text;

use gate::Auth;
use member::ChatLine;
use read::prepare_stream;

/// How many bytes of a request or response a debug log line shows.
const LOG_WIDTH: usize = 80;
/// Size of the read buffer, on the worker's stack. Small, so that the stack of a worker waiting
/// on an idle connection fits in two pages (it is zeroed, so each of its bytes is touched);
/// large enough for a whole frame head (`proto::MAX_HEAD_LEN`) or `NAME**SIZE` head. File bodies
/// are read straight into the upload's own buffer, not through this one.
const READ_BUF: usize = 512;
const _: () = assert!(proto::MAX_HEAD_LEN <= READ_BUF);
const _: () = assert!(starstar::MAX_HEAD_LEN <= READ_BUF);

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
    /// The operator with this uid ended it (`ferryd ctl kick`).
    Kicked(u32),
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
            Reason::Kicked(uid) => write!(f, "kicked by operator (uid {uid})"),
        }
    }
}

/// Serves one accepted connection until it ends, logging `online` and `offline`. A balancer's
/// connection whose PROXY header no worker has read yet is admitted first (`admit_proxied`).
// Inlined into its callers (`net::pool`'s `serve_caught`, and `admit_then_serve`, which calls
// back into it, so the compiler would not inline it by itself): one frame less under every
// connection served (see `READ_BUF`).
#[inline(always)]
pub fn serve(shared: &Shared, job: Job) {
    let Job {
        stream,
        peer,
        client,
        listed,
    } = job;
    let started = Instant::now();
    // The settings this connection lives by, taken whole: a reload mid-way does not mix them. A
    // proxied connection took them when its header was read. The slot keeps it counted against
    // its address (from a balancer, the client's) until `serve` returns (or unwinds).
    let (_slot, via, snapshot) = match client {
        Client::Direct(slot) => (slot, None, shared.snapshot()),
        Client::Proxied(p) => {
            let Proxied {
                slot,
                via,
                version,
                snapshot,
            } = *p;
            (slot, Some((via, version)), snapshot)
        }
        Client::Unread => {
            let job = Job {
                stream,
                peer,
                client,
                listed,
            };
            admit_then_serve(shared, job);
            return;
        }
    };
    let cfg = Arc::clone(&snapshot.config);
    let s = &cfg.server;
    // A proxied connection's options were set before its header was read.
    if via.is_none() {
        if let Err(e) = prepare_stream(&stream, s.idle_timeout, s.write_timeout) {
            logger::warn!("{peer} cannot set socket options: {e}; closing");
            return;
        }
    }
    listed.serve(Arc::clone(&stream), base_state(&cfg));
    // On the board, this connection may be chosen to make room while it waits on its peer.
    let place = shared.board.enter(peer.ip(), Arc::clone(&stream));
    let _open = Stats::hold(&shared.stats.open);
    let text_locked = snapshot.key.is_some() && cfg.access.require_token;
    let mut conn = Conn {
        shared,
        cfg: Arc::clone(&cfg),
        snapshot: Arc::clone(&snapshot),
        store: &snapshot.store,
        batch: Batch::default(),
        stream: &stream,
        live: listed.live(),
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
    log_online(peer, via);
    let reason = conn.session(&stream);
    log_offline(&conn, started, &reason);
}

/// The `online` line, out of line for the same reason as `log_offline`.
#[inline(never)]
fn log_online(peer: Peer, via: Option<(Peer, u8)>) {
    match via {
        None => logger::info!("{peer} online"),
        Some((via, v)) => logger::info!("{peer} online (through {via}, PROXY v{v})"),
    }
}

/// A balancer's connection whose PROXY header is not read yet: takes the settings it will live
/// by, reads the header within `access.header_timeout_secs` and checks and counts the client it
/// carries (`proxied::admit`). Returns the job as its client's (`Client::Proxied`), or, once it
/// has been told why not, the client's address if the client itself was refused (access rules,
/// `max_per_ip`). The registry reaches its stream from here on, so that a stop wakes a worker
/// waiting for the header. Out of line, so that its frame is not part of `serve`'s, under a
/// worker that waits for an idle peer's next line.
#[inline(never)]
pub fn admit_proxied(shared: &Shared, job: Job) -> Result<Job, Option<Peer>> {
    let snapshot = shared.snapshot();
    let cfg = &snapshot.config;
    let s = &cfg.server;
    let via = job.peer;
    if let Err(e) = prepare_stream(&job.stream, s.idle_timeout, s.write_timeout) {
        logger::warn!("{via} cannot set socket options: {e}; closing");
        return Err(None);
    }
    job.listed.serve(Arc::clone(&job.stream), base_state(cfg));
    let a = proxied::admit(shared, cfg, &job.stream, via)?;
    job.listed.live().set_client(a.peer);
    let proxied = Proxied {
        slot: a.slot,
        via,
        version: a.version,
        snapshot: Arc::clone(&snapshot),
    };
    Ok(Job {
        peer: a.peer,
        client: Client::Proxied(Box::new(proxied)),
        ..job
    })
}

/// `serve` for a balancer's connection whose header no worker has read: out of line, so that
/// `serve`'s frame, under every connection served, holds no second `Job`.
#[inline(never)]
fn admit_then_serve(shared: &Shared, job: Job) {
    if let Ok(job) = admit_proxied(shared, job) {
        serve(shared, job);
    }
}

/// The state a served connection shows between frames: its mode.
fn base_state(cfg: &Config) -> State {
    match cfg.server.mode {
        Mode::Chat => State::Chat,
        Mode::Echo => State::Echo,
    }
}

/// The `offline` line. Out of line, like every rare or large path here, so that the stack of a
/// worker waiting on an idle peer stays small (see `READ_BUF`).
#[inline(never)]
fn log_offline(conn: &Conn<'_>, started: Instant, reason: &Reason) {
    logger::info!(
        "{} offline (in {} B, out {} B, {} s, reason: {reason})",
        conn.peer,
        conn.bytes_in,
        conn.bytes_out,
        Fixed::secs(started.elapsed(), 1)
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
    /// The snapshot's store, borrowed for as long as the connection lives, so that files
    /// waiting in `batch` can be held across frames.
    store: &'a Store,
    /// Verified files of earlier frames whose commit (and `OK`) waits to be shared with the
    /// next ones; committed before anything else is sent, before a read would wait, and when
    /// full or due (`files::batch`).
    batch: Batch<'a>,
    stream: &'a TcpStream,
    /// Its live state in the registry: what `ferryd ctl` sees and does.
    live: &'a Live,
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
}

impl Conn<'_> {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        // Under the wire lock, so that the operator's lines never land inside one of ours.
        self.live.write_echo(self.stream, data)?;
        self.live.add_out(data.len() as u64);
        self.bytes_out += data.len() as u64;
        Stats::add(&self.shared.stats.bytes_out, data.len() as u64);
        Ok(())
    }

    /// Sends a line of our own (an answer or a notice). In chat mode it goes to the client's
    /// private queue, which its writer sends before the room's lines; a client with
    /// `chat::PRIVATE_BYTES` of them unsent is not reading them. A peer that is gone cannot be
    /// told, which is not an error. The answers of the files waiting in the batch go first.
    fn say(&mut self, line: &[u8]) {
        self.commit_batch();
        self.say_now(line);
    }

    /// `say` without committing the batch first: for the batch's own answers.
    fn say_now(&mut self, line: &[u8]) {
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
