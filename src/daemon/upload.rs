//! Receiving one file frame after its header: check the name and the limits before a byte of body
//! is stored, stream the body into the store while hashing it, and commit only a verified file.
//! The bytes come from a `BodySource`, so this file touches no socket.

use std::fmt;
use std::time::{Duration, Instant};

use crate::daemon::store::{Store, StoreError};
use crate::daemon::streamhash::{HashPool, StreamHash};
use crate::escape::escaped;
use crate::proto::wire::{self as answer, Code, ERR_SHUTDOWN};
use crate::proto::{Header, name};

/// How often a large upload logs its progress, at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where body bytes come from: the connection's buffered bytes first, then the socket.
pub trait BodySource {
    /// Reads at least one and at most `buf.len()` (> 0) next bytes of the body into `buf`.
    fn read_into(&mut self, buf: &mut [u8]) -> Result<usize, Lost>;
}

/// Why the body stopped arriving.
#[derive(Debug)]
pub enum Lost {
    /// The peer closed its side before the end of the body.
    Eof,
    /// No byte arrived within the time limit.
    Timeout,
    /// The daemon is stopping.
    Shutdown,
    /// The body arrived slower than `access.min_upload_bytes_per_sec`.
    TooSlow { min: u64 },
    /// The connection failed.
    Error(std::io::Error),
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Eof => f.write_str("peer closed the connection in the middle of the body"),
            Lost::Timeout => f.write_str("body stalled past the time limit"),
            Lost::Shutdown => f.write_str("server shutting down"),
            Lost::TooSlow { min } => write!(
                f,
                "body slower than access.min_upload_bytes_per_sec = {min} B/s"
            ),
            Lost::Error(e) => write!(f, "connection error: {e}"),
        }
    }
}

/// How a frame ended.
#[derive(Debug)]
pub enum Outcome {
    /// Stored under `stored_name`; answer `OK`, keep the connection.
    Stored {
        stored_name: String,
        size: u64,
        checksum: [u8; 32],
    },
    /// Refused before the body: answer `ERR` and close, since the unread body would otherwise be
    /// taken for text.
    Refused { code: Code, reason: String },
    /// The whole body arrived but did not match its checksum: answer `ERR checksum`, nothing is
    /// stored, and the connection goes on.
    Mismatch { reason: String },
    /// The body was cut short; the connection is over (answer if the peer may still listen).
    Lost(Lost),
    /// The file could not be stored: answer `ERR`. `in_sync` says whether the whole body was
    /// read (so the connection can go on) or the failure came in the middle of it (close).
    Failed {
        code: Code,
        reason: String,
        in_sync: bool,
    },
}

impl Outcome {
    /// The answer line for the peer.
    pub fn answer(&self) -> String {
        match self {
            Outcome::Stored {
                stored_name,
                size,
                checksum,
            } => answer::ok_line(stored_name, *size, checksum),
            Outcome::Refused { code, reason } | Outcome::Failed { code, reason, .. } => {
                answer::err_line(*code, reason)
            }
            Outcome::Mismatch { reason } => answer::err_line(Code::Checksum, reason),
            Outcome::Lost(Lost::Shutdown) => String::from_utf8_lossy(ERR_SHUTDOWN).into_owned(),
            Outcome::Lost(lost @ (Lost::Timeout | Lost::TooSlow { .. })) => {
                answer::err_line(Code::Timeout, lost)
            }
            Outcome::Lost(lost) => answer::err_line(Code::ShortBody, lost),
        }
    }

    /// Whether the connection can carry further messages after this frame: after `OK`, and
    /// after an `ERR` whose code says so (`Code::keeps_connection`).
    pub fn keeps_connection(&self) -> bool {
        match self {
            Outcome::Stored { .. } => true,
            Outcome::Refused { code, .. } => code.keeps_connection(false),
            Outcome::Mismatch { .. } => Code::Checksum.keeps_connection(true),
            Outcome::Failed { code, in_sync, .. } => code.keeps_connection(*in_sync),
            Outcome::Lost(_) => false,
        }
    }
}

/// Receives the frame whose `header` and raw `name` have been read. `peer` only labels logs.
pub fn receive(
    store: &Store,
    header: &Header,
    raw_name: &[u8],
    source: &mut dyn BodySource,
    pool: Option<&HashPool>,
    peer: &dyn fmt::Display,
) -> Outcome {
    let started = Instant::now();
    let shown = escaped(raw_name, 255);
    let name = match name::validate(raw_name) {
        Ok(n) => n,
        Err(e) => {
            log::warn!("{peer} file \"{shown}\" refused: bad-name: {e}");
            return Outcome::Refused {
                code: Code::BadName,
                reason: e.to_string(),
            };
        }
    };
    let size = header.size;
    let mut pending = match store.begin(name, size) {
        Ok(p) => p,
        Err(e) => {
            let code = match e {
                StoreError::TooLarge { .. } => Code::TooLarge,
                StoreError::NoSpace { .. } => Code::NoSpace,
                StoreError::Exists(_) | StoreError::NoFreeName(_) => Code::Exists,
                StoreError::Io { .. } => Code::Io,
            };
            log::warn!("{peer} file \"{shown}\" ({size} B) refused: {code}: {e}");
            return Outcome::Refused {
                code,
                reason: e.to_string(),
            };
        }
    };
    log::debug!("{peer} receiving \"{shown}\" ({size} B)");
    // The body arrives piece by piece; each piece is hashed (on the hash pool, for large
    // bodies) while it is written out and the next one is received.
    let mut hash = StreamHash::new(size, pool);
    let mut last_progress = started;
    while pending.written() < size {
        let mut piece = hash.buffer();
        let mut filled = 0;
        while filled < piece.len() {
            match source.read_into(&mut piece[filled..]) {
                Ok(n) => filled += n,
                Err(lost) => {
                    log::warn!(
                        "{peer} file \"{shown}\" lost after {} of {size} B: {lost}; nothing stored",
                        pending.written() + filled as u64
                    );
                    return Outcome::Lost(lost);
                }
            }
        }
        let piece = hash.feed(piece);
        if let Err(e) = pending.write(&piece) {
            log::error!("{peer} file \"{shown}\" failed: {e}; nothing stored");
            return Outcome::Failed {
                code: Code::Io,
                reason: e.to_string(),
                in_sync: false,
            };
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let done = pending.written();
            log::info!(
                "{peer} receiving \"{shown}\": {} of {size} B ({:.0}%), {:.1} MB/s",
                done,
                done as f64 * 100.0 / size as f64,
                mb_per_s(done, started.elapsed())
            );
        }
    }
    let got = hash.finish();
    if got != header.checksum {
        let reason = format!(
            "body hashes to {}, header says {}",
            answer::hex(&got),
            answer::hex(&header.checksum)
        );
        log::warn!(
            "{peer} file \"{shown}\" ({size} B) refused: checksum: {reason}; nothing stored"
        );
        return Outcome::Mismatch { reason };
    }
    match pending.commit() {
        Ok(stored_name) => {
            let took = started.elapsed();
            log::info!(
                "{peer} stored \"{shown}\" as \"{}\" ({size} B, blake3 {}, {:.2} s, {:.1} MB/s)",
                escaped(stored_name.as_bytes(), 255),
                answer::hex(&got),
                took.as_secs_f64(),
                mb_per_s(size, took)
            );
            Outcome::Stored {
                stored_name,
                size,
                checksum: got,
            }
        }
        Err(e) => {
            let code = match e {
                StoreError::Exists(_) | StoreError::NoFreeName(_) => Code::Exists,
                _ => Code::Io,
            };
            log::error!("{peer} file \"{shown}\" not stored: {code}: {e}");
            Outcome::Failed {
                code,
                reason: e.to_string(),
                in_sync: true,
            }
        }
    }
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-6) / 1e6
}
