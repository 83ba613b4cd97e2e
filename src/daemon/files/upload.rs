//! Receiving one file frame after its header: check the name and the limits before a byte of body
//! is stored, stream the body into the store while hashing it (BLAKE3 or SHA-256, as the frame
//! says), read a trailing checksum (and its tag) where the frame has one, and commit only a
//! verified file. The bytes come from a `BodySource`, so this file touches no socket.

use std::fmt;
use std::time::{Duration, Instant};

use crate::auth::{Key, TAG_LEN};
use crate::daemon::files::batch::{About, Batch, Committed, Verified};
use crate::daemon::files::bodyhash::BodyHash;
use crate::daemon::files::holders::Holder;
use crate::daemon::files::store::{Pending, Store, StoreError};
use crate::daemon::files::streamhash::HashPool;
use crate::daemon::files::subdir::WalkError;
use crate::escape::{Escaped, escaped};
use crate::logger;
use crate::proto::decimal::Fixed;
use crate::proto::header::CHECKSUM_LEN;
use crate::proto::name::NameError;
use crate::proto::wire::{self as answer, Code, ERR_SHUTDOWN};
use crate::proto::{Algo, Header, name};

/// How often a large upload logs its progress, at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where body bytes come from: the connection's buffered bytes first, then the socket.
pub trait BodySource {
    /// Reads at least one and at most `buf.len()` (> 0) next bytes of the body into `buf`.
    fn read_into(&mut self, buf: &mut [u8]) -> Result<usize, Lost>;
    /// Sends `line` to the peer before the body (a resumable frame's `RESUME <offset>`).
    fn tell(&mut self, line: &str) -> Result<(), Lost>;
    /// The connection the body comes over, listed as the holder of a resumable upload's
    /// partial so that a newer upload of the same file can end it once it goes quiet.
    fn holder(&self) -> Option<Holder> {
        None
    }
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

/// Receives an upload and commits it on its own (`receive_verified`, then a batch of one).
pub fn receive_checked(
    store: &Store,
    check: Check<'_>,
    raw_name: &[u8],
    source: &mut dyn BodySource,
    pool: Option<&HashPool>,
    peer: &dyn fmt::Display,
) -> Outcome {
    match receive_verified(store, check, raw_name, source, pool, peer) {
        Ok(file) => {
            let mut batch = Batch::default();
            batch.push(file);
            match batch.commit(peer).pop() {
                Some(committed) => committed.into(),
                None => Outcome::Failed {
                    code: Code::Io,
                    reason: "the file was not committed".to_string(),
                    in_sync: true,
                },
            }
        }
        Err(outcome) => outcome,
    }
}

/// Receives an upload whose head (for a frame: header, raw `name` and first tag, already
/// checked) has been read, checked as `check` says, up to a verified file in its temp file, to
/// be committed (`batch`); any other ending is the `Outcome` to answer. `peer` only labels
/// logs. The steps: the name, the temp file (or the partial it resumes), the body into it
/// while hashing, the checksum to compare with (trailing, or the header's), the verdict.
pub fn receive_verified<'s>(
    store: &'s Store,
    check: Check<'_>,
    raw_name: &[u8],
    source: &mut dyn BodySource,
    pool: Option<&HashPool>,
    peer: &dyn fmt::Display,
) -> Result<Verified<'s>, Outcome> {
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
    let name = checked_name(store, raw_name, &shown, peer)?;
    let size = header.size;
    // Only a resumable upload lists its connection as its partial's holder.
    let holder = if resumable { source.holder() } else { None };
    let (mut pending, offset) = begin(store, name, header, resumable, holder, &shown, peer)?;
    logger::debug!("{peer} receiving \"{shown}\" ({size} B)");
    let up = Receiving {
        peer,
        shown,
        size,
        offset,
        started,
    };
    if resumable {
        // The peer waits for this line before it sends the body from `offset` on.
        if let Err(lost) = source.tell(&answer::resume_line(offset)) {
            logger::warn!("{peer} file \"{}\" lost before its body: {lost}", up.shown);
            return Err(Outcome::Lost(lost));
        }
        if offset > 0 {
            logger::info!("{peer} resuming \"{}\" at {offset} of {size} B", up.shown);
        }
    }
    let got = up.body(&mut pending, source, header.algo, pool)?;
    let (want, said) = if !verified {
        (got, "")
    } else if header.trailing {
        // The checksum (and, with a key, the tag binding it) follows the body.
        match up.trailer(&pending, source, trailer_auth.as_ref()) {
            Ok(sum) => (sum, "the trailing checksum says"),
            Err(outcome) => return Err(outcome),
        }
    } else {
        (header.checksum, "header says")
    };
    if got != want {
        return Err(up.mismatch(pending, header.algo, &got, &want, said));
    }
    let how = if !verified {
        "unverified (NAME**SIZE upload, no checksum), "
    } else if header.trailing {
        "trailing checksum, "
    } else {
        ""
    };
    Ok(up.verified(pending, header.algo, got, how))
}

/// The upload's name, checked by the rules of the store (with or without subdirectories).
fn checked_name<'n>(
    store: &Store,
    raw_name: &'n [u8],
    shown: &dyn fmt::Display,
    peer: &dyn fmt::Display,
) -> Result<&'n str, Outcome> {
    let checked = if store.allows_subdirs() {
        name::validate_path(raw_name)
    } else {
        name::validate(raw_name)
    };
    match checked {
        Ok(n) => Ok(n),
        Err(e) => {
            let mut reason = e.to_string();
            if e == NameError::Separator && raw_name.contains(&b'/') {
                reason.push_str("; this server takes no subdirectories (files.allow_subdirs)");
            }
            logger::warn!("{peer} file \"{shown}\" refused: bad-name: {reason}");
            Err(Outcome::Refused {
                code: Code::BadName,
                reason,
            })
        }
    }
}

/// The temp file the body goes into, or the partial body a resumable upload continues, and
/// how many bytes of it are kept.
fn begin<'s>(
    store: &'s Store,
    name: &str,
    header: &Header,
    resumable: bool,
    holder: Option<Holder>,
    shown: &dyn fmt::Display,
    peer: &dyn fmt::Display,
) -> Result<(Pending<'s>, u64), Outcome> {
    let size = header.size;
    let begun = if resumable {
        store.begin_resumable(name, size, &header.checksum, holder)
    } else {
        store.begin(name, size).map(|p| (p, 0))
    };
    begun.map_err(|e| {
        let code = match e {
            StoreError::TooLarge { .. } => Code::TooLarge,
            StoreError::NoSpace { .. } => Code::NoSpace,
            StoreError::Exists(_)
            | StoreError::NoFreeName(_)
            | StoreError::Path(WalkError::NotADirectory(_)) => Code::Exists,
            StoreError::Path(WalkError::Symlink(_)) => Code::BadName,
            StoreError::Io { .. } | StoreError::Path(WalkError::Io { .. }) => Code::Io,
        };
        logger::warn!("{peer} file \"{shown}\" ({size} B) refused: {code}: {e}");
        Outcome::Refused {
            code,
            reason: e.to_string(),
        }
    })
}

/// One upload being received: what its log lines name, its size, and where its body starts.
struct Receiving<'p> {
    peer: &'p dyn fmt::Display,
    shown: Escaped<'p>,
    size: u64,
    /// Bytes kept from an earlier try, read back from the partial body.
    offset: u64,
    started: Instant,
}

impl Receiving<'_> {
    /// The body, piece by piece, into `pending`; returns its checksum. Each piece is hashed (on
    /// the hash pool, for large bodies) while it is written out and the next one is received. A
    /// resumed upload's first `offset` bytes come from its partial body on disk, hashed like the
    /// rest, so the checksum always covers the whole file.
    fn body(
        &self,
        pending: &mut Pending<'_>,
        source: &mut dyn BodySource,
        algo: Algo,
        pool: Option<&HashPool>,
    ) -> Result<[u8; CHECKSUM_LEN], Outcome> {
        let (peer, shown, size, offset) = (self.peer, &self.shown, self.size, self.offset);
        let mut hash = BodyHash::new(algo, size, pool);
        let mut last_progress = self.started;
        let mut fed: u64 = 0;
        while fed < size {
            let mut piece = hash.buffer();
            let mut filled = self.kept_prefix(pending, &mut piece, fed)?;
            while filled < piece.len() {
                match source.read_into(&mut piece[filled..]) {
                    Ok(n) => filled += n,
                    Err(lost) => return Err(self.lost_body(pending, &piece, fed, filled, lost)),
                }
            }
            let piece = hash.feed(piece);
            let skip = offset.saturating_sub(fed).min(piece.len() as u64) as usize;
            fed += piece.len() as u64;
            if let Err(e) = pending.write(piece.get(skip..).unwrap_or(&[])) {
                pending.discard();
                logger::error!("{peer} file \"{shown}\" failed: {e}; nothing stored");
                return Err(Outcome::Failed {
                    code: Code::Io,
                    reason: e.to_string(),
                    in_sync: false,
                });
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                let done = pending.written();
                logger::info!(
                    "{peer} receiving \"{shown}\": {} of {size} B ({}%), {} MB/s",
                    done,
                    Fixed::percent(done, size),
                    Fixed::mb_per_s(done, self.started.elapsed())
                );
            }
        }
        Ok(hash.finish())
    }

    /// Fills the start of `piece` (the body from byte `fed` on) with what the partial body kept
    /// before `offset`; returns how many bytes.
    fn kept_prefix(
        &self,
        pending: &mut Pending<'_>,
        piece: &mut [u8],
        fed: u64,
    ) -> Result<usize, Outcome> {
        let (peer, shown, offset) = (self.peer, &self.shown, self.offset);
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
                    logger::error!("{peer} file \"{shown}\" failed: {reason}; partial dropped");
                    return Err(Outcome::Failed {
                        code: Code::Io,
                        reason,
                        in_sync: false,
                    });
                }
            }
        }
        Ok(filled)
    }

    /// The body ended early: a resumable upload keeps every byte that arrived in `piece` (not
    /// only whole pieces), so the next try continues right after them.
    fn lost_body(
        &self,
        pending: &mut Pending<'_>,
        piece: &[u8],
        fed: u64,
        filled: usize,
        lost: Lost,
    ) -> Outcome {
        let (peer, shown, size, offset) = (self.peer, &self.shown, self.size, self.offset);
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
            logger::warn!(
                "{peer} file \"{shown}\" lost after {got} of {size} B: {lost}; {} B kept for a resume",
                pending.written()
            );
        } else {
            logger::warn!(
                "{peer} file \"{shown}\" lost after {got} of {size} B: {lost}; nothing stored"
            );
        }
        Outcome::Lost(lost)
    }

    /// The checksum that follows the body, and with a key the tag binding it, checked.
    fn trailer(
        &self,
        pending: &Pending<'_>,
        source: &mut dyn BodySource,
        trailer_auth: Option<&TrailerAuth<'_>>,
    ) -> Result<[u8; CHECKSUM_LEN], Outcome> {
        let (peer, shown, size) = (self.peer, &self.shown, self.size);
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
                    logger::warn!(
                        "{peer} file \"{shown}\" lost after its {size} B body, in its trailing checksum: {lost}; {kept}"
                    );
                    return Err(Outcome::Lost(lost));
                }
            }
        }
        let mut sum = [0u8; CHECKSUM_LEN];
        sum.copy_from_slice(&trailer[..CHECKSUM_LEN]);
        if let Some(a) = trailer_auth {
            if !a
                .key
                .verify_trailer(&a.first_tag, &sum, &trailer[CHECKSUM_LEN..len])
            {
                let reason = "the tag after the trailing checksum does not match it, the frame's tag and the key";
                logger::warn!(
                    "{peer} file \"{shown}\" ({size} B) refused: unauthorized: {reason}; nothing stored"
                );
                return Err(Outcome::Refused {
                    code: Code::Unauthorized,
                    reason: reason.to_string(),
                });
            }
        }
        Ok(sum)
    }

    /// The body's checksum is not the one it should be: nothing is stored, and a partial body
    /// it continued is dropped.
    fn mismatch(
        &self,
        mut pending: Pending<'_>,
        algo: Algo,
        got: &[u8; CHECKSUM_LEN],
        want: &[u8; CHECKSUM_LEN],
        said: &str,
    ) -> Outcome {
        let (peer, shown, size, offset) = (self.peer, &self.shown, self.size, self.offset);
        let reason = format!(
            "body's {algo} is {}, {said} {}",
            answer::hex(got),
            answer::hex(want)
        );
        let dropped = if offset > 0 {
            format!("; the partial body it continued ({offset} B) is dropped")
        } else {
            String::new()
        };
        pending.discard();
        logger::warn!(
            "{peer} file \"{shown}\" ({size} B) refused: checksum: {reason}; nothing stored{dropped}"
        );
        Outcome::Mismatch { reason }
    }

    /// The verdict for a body whose checksum matched: a verified file, to be committed.
    fn verified<'s>(
        self,
        pending: Pending<'s>,
        algo: Algo,
        got: [u8; CHECKSUM_LEN],
        how: &'static str,
    ) -> Verified<'s> {
        Verified {
            pending,
            about: About {
                shown: self.shown.to_string(),
                size: self.size,
                algo,
                checksum: got,
                how,
                started: self.started,
            },
        }
    }
}

impl From<Committed> for Outcome {
    fn from(c: Committed) -> Outcome {
        match c {
            Committed::Stored {
                stored_name,
                size,
                checksum,
            } => Outcome::Stored {
                stored_name,
                size,
                checksum,
            },
            Committed::Failed { code, reason } => Outcome::Failed {
                code,
                reason,
                in_sync: true,
            },
        }
    }
}
