//! One connection, from `online` to `offline`: reads with a time limit, echoes text as it arrives,
//! and ends with a logged reason (eof, idle, error, shutdown).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use crate::escape::escaped;
use crate::listener;
use crate::peer::Peer;
use crate::server::{ERR_SHUTDOWN, Job, Shared};
use crate::stats::Stats;

/// The line a client is sent when it has been silent for `idle_timeout_secs`.
pub const ERR_IDLE: &[u8] = b"ERR idle timeout\n";

/// How many bytes of a request or response a debug log line shows.
const LOG_WIDTH: usize = 80;

/// Size of the read buffer, on the worker's stack. Small, so that an idle connection costs only
/// the pages it touches.
const READ_BUF: usize = 4096;

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
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Eof => f.write_str("eof"),
            Reason::Idle => f.write_str("idle"),
            Reason::Shutdown => f.write_str("shutdown"),
            Reason::Error(e) if is_timeout(e) => f.write_str("error: peer stopped reading"),
            Reason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Serves one accepted connection until it ends, logging `online` and `offline`.
pub fn serve(shared: &Shared, job: Job) {
    let Job { stream, peer } = job;
    let started = Instant::now();
    let cfg = &shared.config.server;
    if let Err(e) = listener::prepare_stream(&stream, cfg.idle_timeout) {
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

struct Conn<'a> {
    shared: &'a Shared,
    stream: &'a TcpStream,
    peer: Peer,
    bytes_in: u64,
    bytes_out: u64,
}

impl Conn<'_> {
    fn run(&mut self) -> Reason {
        let mut buf = [0u8; READ_BUF];
        loop {
            let n = match self.read(&mut buf) {
                Ok(0) if self.shared.is_stopping() => {
                    self.say(ERR_SHUTDOWN);
                    return Reason::Shutdown;
                }
                Ok(0) => return Reason::Eof,
                Ok(n) => n,
                Err(e) if is_timeout(&e) => {
                    self.say(ERR_IDLE);
                    return Reason::Idle;
                }
                Err(e) => return Reason::Error(e),
            };
            let data = &buf[..n];
            log::debug!("{} req {}", self.peer, escaped(data, LOG_WIDTH));
            if let Err(e) = self.write_all(data) {
                return Reason::Error(e);
            }
            log::debug!("{} resp {}", self.peer, escaped(data, LOG_WIDTH));
        }
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

/// A read or write that hit its socket timeout (SO_RCVTIMEO/SO_SNDTIMEO report EAGAIN).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
