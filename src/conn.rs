//! One connection, from `online` to `offline`: splits the incoming stream into text and file
//! frames, echoes text as it arrives, hands frames to `upload`, and ends with a logged reason
//! (eof, idle, error, shutdown). Every read has a byte limit (the buffer) and a time limit (the
//! socket's read timeout).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::escape::escaped;
use crate::listener;
use crate::peer::Peer;
use crate::proto::{self, Code, FrameError, HEADER_LEN, Header, Parsed};
use crate::server::{ERR_SHUTDOWN, Job, Shared};
use crate::stats::Stats;
use crate::upload::{self, BodySource, Lost, Outcome};

/// The line a client is sent when it has been silent for `idle_timeout_secs`.
pub const ERR_IDLE: &[u8] = b"ERR idle timeout\n";

/// How many bytes of a request or response a debug log line shows.
const LOG_WIDTH: usize = 80;
/// Size of the text read buffer, on the worker's stack. Small, so that an idle connection costs
/// only the pages it touches.
const READ_BUF: usize = 4096;
/// Size of the body buffer, allocated while a file is being received and freed after.
const BODY_BUF: usize = 1 << 20;
/// After refusing a frame, how long and how much of the unread body is read and dropped before
/// closing, so that the peer gets the `ERR` line instead of a connection reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 8 << 20;

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
    /// The peer broke the protocol or a file was refused in a way that ends the connection.
    Protocol(String),
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
        }
    }
}

/// Serves one accepted connection until it ends, logging `online` and `offline`.
pub fn serve(shared: &Shared, job: Job) {
    let Job { stream, peer } = job;
    let started = Instant::now();
    let idle_timeout = shared.config().server.idle_timeout;
    if let Err(e) = listener::prepare_stream(&stream, idle_timeout) {
        log::warn!("{peer} cannot set socket options: {e}; closing");
        return;
    }
    let stream = Arc::new(stream);
    let _registration = shared.conns.register(Arc::clone(&stream));
    Stats::add(&shared.stats.open, 1);
    let mut conn = Conn {
        shared,
        stream: &stream,
        peer,
        bytes_in: 0,
        bytes_out: 0,
    };
    log::info!("{peer} online");
    let reason = if shared.is_stopping() {
        // Registered after the shutdown woke everyone: end here rather than wait for a read.
        conn.say(ERR_SHUTDOWN);
        Reason::Shutdown
    } else {
        conn.run()
    };
    Stats::sub(&shared.stats.open, 1);
    log::info!(
        "{peer} offline (in {} B, out {} B, {:.1} s, reason: {reason})",
        conn.bytes_in,
        conn.bytes_out,
        started.elapsed().as_secs_f64()
    );
}

/// Bytes read from the socket and not yet used.
struct Input {
    buf: [u8; READ_BUF],
    start: usize,
    end: usize,
}

impl Input {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
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
    stream: &'a TcpStream,
    peer: Peer,
    bytes_in: u64,
    bytes_out: u64,
}

impl Conn<'_> {
    fn run(&mut self) -> Reason {
        let mut input = Input {
            buf: [0; READ_BUF],
            start: 0,
            end: 0,
        };
        // Whether the next byte begins a message (so a frame may start there).
        let mut at_message_start = true;
        loop {
            if input.is_empty() {
                if let Err(reason) = self.fill(&mut input) {
                    return reason;
                }
            }
            let data = input.data();
            let n = proto::text_len(data, at_message_start);
            if n == 0 {
                if let Err(reason) = self.frame(&mut input) {
                    return reason;
                }
                at_message_start = true;
                continue;
            }
            let text = &data[..n];
            at_message_start = text[n - 1] == b'\n';
            log::debug!("{} req {}", self.peer, escaped(text, LOG_WIDTH));
            if let Err(e) = self.write_all(text) {
                return Reason::Error(e);
            }
            log::debug!("{} resp {}", self.peer, escaped(text, LOG_WIDTH));
            input.consume(n);
        }
    }

    /// Reads more bytes into an empty `input`. A clean end of stream, the idle timeout and the
    /// shutdown each end the connection (after telling the peer why, where there is a why).
    fn fill(&mut self, input: &mut Input) -> Result<(), Reason> {
        input.start = 0;
        input.end = 0;
        match self.read(&mut input.buf) {
            Ok(0) if self.shared.is_stopping() => {
                self.say(ERR_SHUTDOWN);
                Err(Reason::Shutdown)
            }
            Ok(0) => Err(Reason::Eof),
            Ok(n) => {
                input.end = n;
                Ok(())
            }
            Err(e) if is_timeout(&e) => {
                self.say(ERR_IDLE);
                Err(Reason::Idle)
            }
            Err(e) => Err(Reason::Error(e)),
        }
    }

    /// Handles the frame that starts at the beginning of `input`: header, name, body, answer.
    /// `Ok` means the connection goes on.
    fn frame(&mut self, input: &mut Input) -> Result<(), Reason> {
        let mut head = [0u8; HEADER_LEN];
        let mut have = 0;
        let header = loop {
            have += input.take_into(&mut head[have..]);
            match Header::parse(&head[..have]) {
                Ok(Parsed::Complete(h)) => break h,
                Ok(Parsed::Partial) => self.fill(input)?,
                Err(e) => {
                    log::warn!("{} bad frame header: {e}", self.peer);
                    return Err(self.refuse(&proto::answer::err_line(code_for(e), &e)));
                }
            }
        };
        let mut name = [0u8; proto::header::MAX_NAME_LEN as usize];
        let name = &mut name[..usize::from(header.name_len)];
        let mut have = input.take_into(name);
        while have < name.len() {
            self.fill(input)?;
            have += input.take_into(&mut name[have..]);
        }
        let shared = self.shared;
        let peer = self.peer;
        let mut source = ConnSource {
            conn: self,
            input,
            body: Vec::new(),
        };
        let store = shared.store();
        let outcome = upload::receive(&store, &header, name, &mut source, BODY_BUF, &peer);
        drop(source);
        let line = outcome.answer();
        match outcome {
            Outcome::Stored { .. } => Stats::add(&shared.stats.files_stored, 1),
            _ => Stats::add(&shared.stats.files_failed, 1),
        }
        if outcome.keeps_connection() {
            return self.write_all(line.as_bytes()).map_err(Reason::Error);
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
    fn refuse(&mut self, line: &str) -> Reason {
        self.say(line.as_bytes());
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + LINGER_TIME;
        let mut scratch = [0u8; READ_BUF];
        let mut drained = 0u64;
        while drained < LINGER_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match self.read(&mut scratch) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n as u64,
            }
        }
        Reason::Protocol(format!("refused: {}", line.trim_end()))
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(n) => {
                    self.bytes_in += n as u64;
                    Stats::add(&self.shared.stats.bytes_in, n as u64);
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut stream = self.stream;
        stream.write_all(data)?;
        self.bytes_out += data.len() as u64;
        Stats::add(&self.shared.stats.bytes_out, data.len() as u64);
        Ok(())
    }

    /// Sends a one-line notice; a peer that is gone cannot be told, which is not an error.
    fn say(&mut self, line: &[u8]) {
        let _ = self.write_all(line);
    }
}

/// The body of a frame: what is left in the input buffer, then reads from the socket straight
/// into a large buffer.
struct ConnSource<'c, 'a> {
    conn: &'c mut Conn<'a>,
    input: &'c mut Input,
    body: Vec<u8>,
}

impl BodySource for ConnSource<'_, '_> {
    fn next_chunk(&mut self, max: usize) -> Result<&[u8], Lost> {
        if !self.input.is_empty() {
            let start = self.input.start;
            let n = max.min(self.input.end - start);
            self.input.start += n;
            return Ok(&self.input.buf[start..start + n]);
        }
        if self.body.is_empty() {
            self.body = vec![0; BODY_BUF];
        }
        let max = max.min(self.body.len());
        match self.conn.read(&mut self.body[..max]) {
            Ok(0) if self.conn.shared.is_stopping() => Err(Lost::Shutdown),
            Ok(0) => Err(Lost::Eof),
            Ok(n) => Ok(&self.body[..n]),
            Err(e) if is_timeout(&e) => Err(Lost::Timeout),
            Err(e) => Err(Lost::Error(e)),
        }
    }
}

fn code_for(e: FrameError) -> Code {
    match e {
        FrameError::Magic => Code::BadMagic,
        FrameError::Version(_) => Code::BadVersion,
        FrameError::Flags(_) => Code::BadHeader,
        FrameError::NameLength(_) => Code::BadName,
    }
}

/// A read or write that hit its socket timeout (SO_RCVTIMEO/SO_SNDTIMEO report EAGAIN).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
