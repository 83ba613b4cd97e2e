//! The partial bodies of resumable uploads (frames with flag bit 3): kept in the upload directory
//! as `.ferryd-resume-<checksum>-<size>-<name tag>.partial`, found again by the size and the
//! header's checksum field (the file's checksum, or for a trailing frame the sender's resume id
//! for this version of the file; never by its name alone), held by one upload at a time (an exclusive
//! `flock`, which also spans a reload's new store), and removed when they expire
//! (`files.resume_keep_secs`), when the same name arrives with another checksum, or, oldest
//! first, to keep their announced sizes within `files.resume_max_bytes`.
//!
//! A partial's bytes are only ever a candidate prefix: the upload that continues it hashes the
//! prefix from disk and the rest from the wire, and commits only if the whole file matches the
//! frame's checksum (in the header, or after the body).

use std::fs::File;
use std::io;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::proto::wire::hex;

/// Prefix of partial bodies (inside the reserved `.ferryd-` space, so no upload can take it).
pub const PREFIX: &str = ".ferryd-resume-";
/// Suffix of partial bodies (not `.part`: start-up removes those, while unexpired partials stay).
pub const SUFFIX: &str = ".partial";
/// Hex digits of the name tag (a BLAKE3 of the name) in a partial's file name.
const TAG_HEX: usize = 16;

/// How long partials are kept and how many bytes they may claim in all; either 0 disables
/// resuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub keep: Duration,
    pub max_bytes: u64,
}

/// A partial body this upload now holds.
#[derive(Debug)]
pub struct Claimed {
    /// Open for reading and writing, locked, positioned nowhere in particular.
    pub file: File,
    pub file_name: String,
    /// Bytes already there: the body continues from here.
    pub offset: u64,
}

/// What `claim` found.
#[derive(Debug)]
pub enum Claim {
    /// This upload now holds the partial (new or continued).
    Got(Claimed),
    /// Another upload holds the partial for this file right now (often the connection that was
    /// just cut, which the server has not finished with yet): worth trying again shortly. With
    /// the partial's file name, by which its holder is found (`holders`).
    Held(String),
    /// This upload cannot be resumable (resuming is off, or the file is over the budget).
    No,
}

/// One partial found in the directory.
#[derive(Debug, Clone)]
struct Entry {
    file_name: String,
    /// `<checksum hex>-<size>`: what identifies the file.
    key: String,
    tag: String,
    /// The whole file's size, from the name.
    size: u64,
    /// Bytes on disk.
    len: u64,
    modified: SystemTime,
}

/// The file name of the partial of a file of `size` bytes and `checksum`, sent as `name`.
pub fn file_name(checksum: &[u8; 32], size: u64, name: &str) -> String {
    format!("{PREFIX}{}{SUFFIX}", stem(checksum, size, &tag_of(name)))
}

fn stem(checksum: &[u8; 32], size: u64, tag: &str) -> String {
    format!("{}-{size}-{tag}", hex(checksum))
}

fn tag_of(name: &str) -> String {
    let h = blake3::hash(name.as_bytes());
    hex(h.as_bytes()).chars().take(TAG_HEX).collect()
}

/// `(key, size, tag)` of a partial's file name.
fn parse_name(file_name: &str) -> Option<(String, u64, String)> {
    let stem = file_name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    let (key, tag) = stem.rsplit_once('-')?;
    let (checksum, size) = key.split_once('-')?;
    if checksum.len() != 64 || tag.len() != TAG_HEX {
        return None;
    }
    Some((key.to_string(), size.parse().ok()?, tag.to_string()))
}

/// Finds (or starts) the partial for a file of `size` bytes and `checksum`, sent as `name`, in
/// `dir`, after removing the expired and superseded ones and making room within the byte budget.
/// Without a partial it can hold, the upload goes on as an ordinary one.
pub fn claim(
    dir: &File,
    checksum: &[u8; 32],
    size: u64,
    name: &str,
    limits: Limits,
    mode: u32,
) -> io::Result<Claim> {
    if limits.keep.is_zero() || size > limits.max_bytes {
        return Ok(Claim::No);
    }
    let now = SystemTime::now();
    let tag = tag_of(name);
    let key = format!("{}-{size}", hex(checksum));
    let mut live = Vec::new();
    for e in list(dir)? {
        let expired = now
            .duration_since(e.modified)
            .is_ok_and(|age| age > limits.keep);
        let superseded = e.tag == tag && e.key != key;
        if (expired || superseded) && remove_if_free(dir, &e.file_name)? {
            let why = if expired {
                "expired"
            } else {
                "superseded by another version of the file"
            };
            log::info!("removed partial upload {} ({why})", e.file_name);
            continue;
        }
        live.push(e);
    }
    if let Some(e) = live.iter().find(|e| e.key == key) {
        let Some(file) = lock(dir, &e.file_name)? else {
            return Ok(Claim::Held(e.file_name.clone()));
        };
        let mut offset = e.len;
        if offset > size {
            // Longer than the file it claims to start: worthless.
            file.set_len(0)?;
            offset = 0;
        }
        let wanted = file_name(checksum, size, name);
        let file_name = if wanted == e.file_name {
            wanted
        } else {
            // The latest name owns it, for the superseding rule.
            match rustix::fs::renameat(dir, e.file_name.as_str(), dir, wanted.as_str()) {
                Ok(()) => wanted,
                Err(_) => e.file_name.clone(),
            }
        };
        return Ok(Claim::Got(Claimed {
            file,
            file_name,
            offset,
        }));
    }
    // A new partial: make room, oldest first.
    live.sort_by_key(|e| e.modified);
    let mut total: u64 = live.iter().map(|e| e.size).sum();
    let mut i = 0;
    while total.saturating_add(size) > limits.max_bytes {
        let Some(e) = live.get(i) else {
            return Ok(Claim::No);
        };
        i += 1;
        if remove_if_free(dir, &e.file_name)? {
            log::info!(
                "removed partial upload {} to stay within files.resume_max_bytes",
                e.file_name
            );
            total = total.saturating_sub(e.size);
        }
    }
    let file_name = file_name(checksum, size, name);
    let fd = match rustix::fs::openat(
        dir,
        file_name.as_str(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    ) {
        Ok(fd) => fd,
        // Another upload of the same file started it a moment ago.
        Err(Errno::EXIST) => return Ok(Claim::Held(file_name)),
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Claim::Got(Claimed {
            file,
            file_name,
            offset: 0,
        })),
        Err(Errno::WOULDBLOCK) => Ok(Claim::Held(file_name)),
        Err(e) => Err(e.into()),
    }
}

/// At start-up: removes the expired partials (all of them when resuming is off); returns the
/// names removed and how many unexpired ones were kept.
pub fn sweep(dir: &File, limits: Limits) -> io::Result<(Vec<String>, usize)> {
    let now = SystemTime::now();
    let off = limits.keep.is_zero() || limits.max_bytes == 0;
    let mut removed = Vec::new();
    let mut kept = 0;
    for e in list(dir)? {
        let expired = now
            .duration_since(e.modified)
            .is_ok_and(|age| age > limits.keep);
        if (off || expired) && remove_if_free(dir, &e.file_name)? {
            removed.push(e.file_name);
        } else {
            kept += 1;
        }
    }
    Ok((removed, kept))
}

/// The partials in `dir` (regular files with a partial's name).
fn list(dir: &File) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let entries = rustix::fs::Dir::read_from(dir)?;
    for entry in entries {
        let entry = entry?;
        let Ok(file_name) = entry.file_name().to_str() else {
            continue;
        };
        let Some((key, size, tag)) = parse_name(file_name) else {
            continue;
        };
        let Ok(st) = rustix::fs::statat(dir, file_name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            continue;
        }
        let secs = u64::try_from(st.st_mtime).unwrap_or(0);
        out.push(Entry {
            file_name: file_name.to_string(),
            key,
            tag,
            size,
            len: u64::try_from(st.st_size).unwrap_or(0),
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        });
    }
    Ok(out)
}

/// Opens and locks the partial `name`; `None` if another upload holds it or it is gone.
fn lock(dir: &File, name: &str) -> io::Result<Option<File>> {
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes the partial `name` unless an upload holds it; whether it was removed.
fn remove_if_free(dir: &File, name: &str) -> io::Result<bool> {
    let Some(held) = lock(dir, name)? else {
        return Ok(false);
    };
    let removed = match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => true,
        Err(Errno::NOENT) => false,
        Err(e) => return Err(e.into()),
    };
    drop(held);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_ignored() {
        let sum = *blake3::hash(b"x").as_bytes();
        let name = file_name(&sum, 1234, "fw.bin");
        let (key, size, tag) = parse_name(&name).unwrap();
        assert_eq!(key, format!("{}-1234", hex(&sum)));
        assert_eq!((size, tag.len()), (1234, TAG_HEX));
        assert!(name.starts_with(".ferryd-resume-") && name.ends_with(".partial"));
        for other in [
            ".ferryd-0011.part",
            "fw.bin",
            ".ferryd-resume-zz.partial",
            "",
        ] {
            assert_eq!(parse_name(other), None, "{other}");
        }
    }

    fn got(c: io::Result<Claim>) -> Claimed {
        match c {
            Ok(Claim::Got(c)) => c,
            other => panic!("expected a claimed partial, got {other:?}"),
        }
    }

    #[test]
    fn claim_continues_supersedes_and_keeps_the_budget() {
        let path = std::env::temp_dir().join(format!("ferryd-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        let dir = File::open(&path).unwrap();
        let limits = Limits {
            keep: Duration::from_secs(60),
            max_bytes: 100,
        };
        let a = *blake3::hash(b"a").as_bytes();
        let b = *blake3::hash(b"b").as_bytes();
        // A new partial, written to, released; the same file claims it back at its length.
        let c = got(claim(&dir, &a, 60, "one", limits, 0o600));
        assert_eq!(c.offset, 0);
        std::io::Write::write_all(&mut &c.file, &[7; 25]).unwrap();
        // While held, nobody else gets it.
        assert!(matches!(
            claim(&dir, &a, 60, "one", limits, 0o600),
            Ok(Claim::Held(_))
        ));
        drop(c);
        let c = got(claim(&dir, &a, 60, "one", limits, 0o600));
        assert_eq!(c.offset, 25);
        drop(c);
        // Over the budget alone: not resumable.
        assert!(matches!(
            claim(&dir, &b, 101, "two", limits, 0o600),
            Ok(Claim::No)
        ));
        // Another file needing room evicts the older partial.
        let c = got(claim(&dir, &b, 50, "two", limits, 0o600));
        assert_eq!(c.offset, 0);
        drop(c);
        assert_eq!(list(&dir).unwrap().len(), 1);
        // The same name with another checksum supersedes it.
        let c = got(claim(&dir, &a, 10, "two", limits, 0o600));
        drop(c);
        let left: Vec<String> = list(&dir).unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(left, [format!("{}-10", hex(&a))]);
        // Start-up with resuming off removes everything free.
        let off = Limits {
            keep: Duration::ZERO,
            max_bytes: 100,
        };
        assert_eq!(sweep(&dir, off).unwrap().0.len(), 1);
        let _ = std::fs::remove_dir_all(&path);
    }
}
