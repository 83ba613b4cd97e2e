//! Receiving one file frame after its header: check the name and the limits before a byte of body
//! is stored, stream the body into the store while hashing it (BLAKE3 or SHA-256, as the frame
//! says), read a trailing checksum (and its tag) where the frame has one, and commit only a
//! verified file. The bytes come from a `BodySource`, so this file touches no socket.

use std::fmt;
use std::time::{Duration, Instant};

use crate::auth::{Key, TAG_LEN};
use crate::daemon::bodyhash::BodyHash;
use crate::daemon::store::{Store, StoreError};
use crate::daemon::streamhash::HashPool;
use crate::daemon::subdir::WalkError;
use crate::escape::escaped;
use crate::proto::header::CHECKSUM_LEN;
use crate::proto::name::NameError;
use crate::proto::wire::{self as answer, Code, ERR_SHUTDOWN};
use crate::proto::{Header, name};

/// How often a large upload logs its progress, at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where body bytes come from: the connection's buffered bytes first, then the socket.
pub trait BodySource {
    /// Reads at least one and at most `buf.len()` (> 0) next bytes of the body into `buf`.
    fn read_into(&mut self, buf: &mut [u8]) -> Result<usize, Lost>;
    /// Sends `line` to the peer before the body (a resumable frame's `RESUME <offset>`).
    fn tell(&mut self, line: &str) -> Result<(), Lost>;
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
    /// A `NAME**SIZE` upload: more bytes came after its SIZE bytes (so SIZE was not where the
    /// head seemed to end).
    Trailing,
    /// A `NAME**SIZE` upload: the stream did not end after its SIZE bytes.
    Unended,
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
            Lost::Trailing => f.write_str(
                "more bytes follow the SIZE bytes of a NAME**SIZE upload: its head was not read whole",
            ),
            Lost::Unended => f.write_str(
                "the stream did not end after the SIZE bytes of a NAME**SIZE upload (access.header_timeout_secs)",
            ),
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
            Outcome::Lost(lost @ (Lost::Trailing | Lost::Unended)) => {
                answer::err_line(Code::BadHeader, lost)
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

/// For an authenticated frame with a trailing checksum: the key and the frame's first tag, to
/// check the tag that follows the checksum (see `crate::auth`).
pub struct TrailerAuth<'k> {
    pub key: &'k Key,
    pub first_tag: [u8; TAG_LEN],
}

/// What the body is checked against.
pub enum Check<'k> {
    /// A frame: the checksum in its header, or the one after its body (and, on an authenticated
    /// connection, the tag after that).
    Frame {
        header: &'k Header,
        trailer_auth: Option<TrailerAuth<'k>>,
        /// Flag bit 3: answer `RESUME <offset>` and continue a kept partial body.
        resumable: bool,
    },
    /// A `NAME**SIZE` upload: there is no checksum; the body's BLAKE3 is computed for the
    /// answer and the log, which says `unverified`.
    Unverified { size: u64 },
}

/// Receives an upload whose head (for a frame: header, raw `name` and first tag, already
/// checked) has been read, checked as `check` says. `peer` only labels logs.
pub fn receive_checked(
    store: &Store,
    check: Check<'_>,
    raw_name: &[u8],
    source: &mut dyn BodySource,
    pool: Option<&HashPool>,
    peer: &dyn fmt::Display,
) -> Outcome {
    let unverified_header;
    let (header, trailer_auth, verified, resumable) = match check {
        Check::Frame {
            header,
            trailer_auth,
            resumable,
        } => (header, trailer_auth, true, resumable),
        Check::Unverified { size } => {
            unverified_header = Header {
                size,
                ..Header::default()
            };
            (&unverified_header, None, false, false)
        }
    };
    let started = Instant::now();
    let shown = escaped(raw_name, 255);
    let checked = if store.allows_subdirs() {
        name::validate_path(raw_name)
    } else {
        name::validate(raw_name)
    };
    let name = match checked {
        Ok(n) => n,
        Err(e) => {
            let mut reason = e.to_string();
            if e == NameError::Separator && raw_name.contains(&b'/') {
                reason.push_str("; this server takes no subdirectories (files.allow_subdirs)");
            }
            log::warn!("{peer} file \"{shown}\" refused: bad-name: {reason}");
            return Outcome::Refused {
                code: Code::BadName,
                reason,
            };
        }
    };
    let size = header.size;
    let begun = if resumable {
        store.begin_resumable(name, size, &header.checksum)
    } else {
        store.begin(name, size).map(|p| (p, 0))
    };
    let (mut pending, offset) = match begun {
        Ok(p) => p,
        Err(e) => {
            let code = match e {
                StoreError::TooLarge { .. } => Code::TooLarge,
                StoreError::NoSpace { .. } => Code::NoSpace,
                StoreError::Exists(_)
                | StoreError::NoFreeName(_)
                | StoreError::Path(WalkError::NotADirectory(_)) => Code::Exists,
                StoreError::Path(WalkError::Symlink(_)) => Code::BadName,
                StoreError::Io { .. } | StoreError::Path(WalkError::Io { .. }) => Code::Io,
            };
            log::warn!("{peer} file \"{shown}\" ({size} B) refused: {code}: {e}");
            return Outcome::Refused {
                code,
                reason: e.to_string(),
            };
        }
    };
    log::debug!("{peer} receiving \"{shown}\" ({size} B)");
    if resumable {
        // The peer waits for this line before it sends the body from `offset` on.
        if let Err(lost) = source.tell(&answer::resume_line(offset)) {
            log::warn!("{peer} file \"{shown}\" lost before its body: {lost}");
            return Outcome::Lost(lost);
        }
        if offset > 0 {
            log::info!("{peer} resuming \"{shown}\" at {offset} of {size} B");
        }
    }
    // The body arrives piece by piece; each piece is hashed (on the hash pool, for large
    // bodies) while it is written out and the next one is received. A resumed upload's first
    // `offset` bytes come from its partial body on disk, hashed like the rest, so the checksum
    // always covers the whole file.
    let algo = header.algo;
    let mut hash = BodyHash::new(algo, size, pool);
    let mut last_progress = started;
    let mut fed: u64 = 0;
    while fed < size {
        let mut piece = hash.buffer();
        let mut filled = 0;
        while filled < piece.len() && fed + (filled as u64) < offset {
            let at = fed + filled as u64;
            let want = (offset - at).min((piece.len() - filled) as u64) as usize;
            let got = piece
                .get_mut(filled..filled + want)
                .map(|buf| pending.read_at(buf, at));
            match got {
                Some(Ok(n)) if n > 0 => filled += n,
                _ => {
                    pending.discard();
                    let reason = format!("partial upload unreadable at byte {at}");
                    log::error!("{peer} file \"{shown}\" failed: {reason}; partial dropped");
                    return Outcome::Failed {
                        code: Code::Io,
                        reason,
                        in_sync: false,
                    };
                }
            }
        }
        while filled < piece.len() {
            match source.read_into(&mut piece[filled..]) {
                Ok(n) => filled += n,
                Err(lost) => {
                    let got = fed + filled as u64;
                    if pending.is_kept() {
                        // Keep every byte that arrived, not only whole pieces: the next try
                        // continues right after them.
                        let skip = offset.saturating_sub(fed).min(filled as u64) as usize;
                        if piece
                            .get(skip..filled)
                            .is_some_and(|rest| pending.write(rest).is_err())
                        {
                            pending.discard();
                        }
                    }
                    if pending.is_kept() {
                        log::warn!(
                            "{peer} file \"{shown}\" lost after {got} of {size} B: {lost}; {} B kept for a resume",
                            pending.written()
                        );
                    } else {
                        log::warn!(
                            "{peer} file \"{shown}\" lost after {got} of {size} B: {lost}; nothing stored"
                        );
                    }
                    return Outcome::Lost(lost);
                }
            }
        }
        let piece = hash.feed(piece);
        let skip = offset.saturating_sub(fed).min(piece.len() as u64) as usize;
        fed += piece.len() as u64;
        if let Err(e) = pending.write(piece.get(skip..).unwrap_or(&[])) {
            pending.discard();
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
    let (want, said) = if !verified {
        (got, "")
    } else if header.trailing {
        // The checksum (and, with a key, the tag binding it) follows the body.
        let mut trailer = [0u8; CHECKSUM_LEN + TAG_LEN];
        let len = if trailer_auth.is_some() {
            CHECKSUM_LEN + TAG_LEN
        } else {
            CHECKSUM_LEN
        };
        let mut filled = 0;
        while filled < len {
            match source.read_into(&mut trailer[filled..len]) {
                Ok(n) => filled += n,
                Err(lost) => {
                    let kept = if pending.is_kept() {
                        format!("{} B kept for a resume", pending.written())
                    } else {
                        "nothing stored".to_string()
                    };
                    log::warn!(
                        "{peer} file \"{shown}\" lost after its {size} B body, in its trailing checksum: {lost}; {kept}"
                    );
                    return Outcome::Lost(lost);
                }
            }
        }
        let mut sum = [0u8; CHECKSUM_LEN];
        sum.copy_from_slice(&trailer[..CHECKSUM_LEN]);
        if let Some(a) = &trailer_auth {
            if !a
                .key
                .verify_trailer(&a.first_tag, &sum, &trailer[CHECKSUM_LEN..len])
            {
                let reason = "the tag after the trailing checksum does not match it, the frame's tag and the key";
                log::warn!(
                    "{peer} file \"{shown}\" ({size} B) refused: unauthorized: {reason}; nothing stored"
                );
                return Outcome::Refused {
                    code: Code::Unauthorized,
                    reason: reason.to_string(),
                };
            }
        }
        (sum, "the trailing checksum says")
    } else {
        (header.checksum, "header says")
    };
    if got != want {
        let reason = format!(
            "body's {algo} is {}, {said} {}",
            answer::hex(&got),
            answer::hex(&want)
        );
        let dropped = if offset > 0 {
            format!("; the partial body it continued ({offset} B) is dropped")
        } else {
            String::new()
        };
        pending.discard();
        log::warn!(
            "{peer} file \"{shown}\" ({size} B) refused: checksum: {reason}; nothing stored{dropped}"
        );
        return Outcome::Mismatch { reason };
    }
    match pending.commit() {
        Ok(stored_name) => {
            let took = started.elapsed();
            log::info!(
                "{peer} stored \"{shown}\" as \"{}\" ({size} B, {algo} {}, {}{:.2} s, {:.1} MB/s)",
                escaped(stored_name.as_bytes(), 255),
                answer::hex(&got),
                if !verified {
                    "unverified (NAME**SIZE upload, no checksum), "
                } else if header.trailing {
                    "trailing checksum, "
                } else {
                    ""
                },
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
                StoreError::Exists(_)
                | StoreError::NoFreeName(_)
                | StoreError::Path(WalkError::NotADirectory(_)) => Code::Exists,
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
