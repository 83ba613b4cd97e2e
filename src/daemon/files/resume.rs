//! The partial bodies of resumable uploads (frames with flag bit 3): kept in the upload directory
//! as `.ferryd-resume-<checksum>-<size>-<name tag>.partial`, found again by opening that name,
//! computed from the frame (the size, the header's checksum field: the file's checksum, or for a
//! trailing frame the sender's resume id for this version of the file; and the name), held by one
//! upload at a time (an exclusive `flock`, which also spans a reload's new store and other
//! processes on the directory: a lock counts only while the name still leads to the locked
//! file), and removed when they expire (`files.resume_keep_secs`), when the same name arrives
//! with another checksum, or, oldest first, to keep their announced sizes within
//! `files.resume_max_bytes` and their number within `files.resume_max_count`. What exists is known
//! from `partials::Index`, rebuilt from a listing at start-up and by the sweep once a minute: no
//! claim lists the directory.
//!
//! A partial's bytes are only ever a candidate prefix: the upload that continues it hashes the
//! prefix from disk and the rest from the wire, and commits only if the whole file matches the
//! frame's checksum (in the header, or after the body).

use std::fs::File;
use std::io;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::daemon::files::partials::{Entry, Index, Inner};
use crate::logger;
use crate::proto::wire::hex;

/// Prefix of partial bodies (inside the reserved `.ferryd-` space, so no upload can take it).
pub const PREFIX: &str = ".ferryd-resume-";
/// Suffix of partial bodies (not `.part`: start-up removes those, while unexpired partials stay).
pub const SUFFIX: &str = ".partial";
/// Hex digits of the name tag (a BLAKE3 of the name) in a partial's file name.
const TAG_HEX: usize = 16;

/// How long partials are kept, how many bytes they may claim in all and how many there may be;
/// any of them 0 disables resuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub keep: Duration,
    pub max_bytes: u64,
    pub max_count: usize,
}

impl Limits {
    fn off(&self) -> bool {
        self.keep.is_zero() || self.max_bytes == 0 || self.max_count == 0
    }
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

/// What opening a partial by its name found.
enum Opened {
    Locked(File),
    Held,
    Absent,
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
/// `dir`, after removing the expired and superseded ones and making room within the budgets
/// (bytes and count), oldest first. The partial is found by opening its computed name; the rest
/// comes from `index`, never from a listing. Without a partial it can hold, the upload goes on
/// as an ordinary one.
pub fn claim(
    index: &Index,
    dir: &File,
    checksum: &[u8; 32],
    size: u64,
    name: &str,
    limits: Limits,
    mode: u32,
) -> io::Result<Claim> {
    if limits.off() || size > limits.max_bytes {
        return Ok(Claim::No);
    }
    let now = SystemTime::now();
    let tag = tag_of(name);
    let wanted = file_name(checksum, size, name);
    let mut idx = index.lock();
    remove_expired(&mut idx, dir, now, limits.keep)?;
    // Another version of the same file (its name tag, another checksum or size) is superseded.
    let superseded = idx
        .by_tag(&tag)
        .filter(|old| *old != wanted)
        .map(str::to_string);
    if let Some(old) = superseded {
        if remove_if_free(dir, &old)? {
            idx.remove(&old);
            logger::info!(
                "removed partial upload {old} (superseded by another version of the file)"
            );
        }
    }
    let entry = Entry {
        tag,
        size,
        since: now,
    };
    match open_locked(dir, &wanted)? {
        Opened::Locked(file) => {
            let mut offset = file.metadata()?.len();
            if offset > size {
                // Longer than the file it claims to start: worthless.
                file.set_len(0)?;
                offset = 0;
            }
            idx.insert(wanted.clone(), entry);
            return Ok(Claim::Got(Claimed {
                file,
                file_name: wanted,
                offset,
            }));
        }
        Opened::Held => return Ok(Claim::Held(wanted)),
        Opened::Absent => {}
    }
    if !make_room(&mut idx, dir, size, limits)? {
        return Ok(Claim::No);
    }
    let fd = match rustix::fs::openat(
        dir,
        wanted.as_str(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    ) {
        Ok(fd) => fd,
        // Another upload of the same file started it a moment ago.
        Err(Errno::EXIST) => return Ok(Claim::Held(wanted)),
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) if !still_named(dir, &wanted, &file) => Ok(Claim::Held(wanted)),
        Ok(()) => {
            idx.insert(wanted.clone(), entry);
            Ok(Claim::Got(Claimed {
                file,
                file_name: wanted,
                offset: 0,
            }))
        }
        Err(Errno::WOULDBLOCK) => Ok(Claim::Held(wanted)),
        Err(e) => Err(e.into()),
    }
}

/// Removes the partials unclaimed for longer than `keep`, oldest first, up to the first that is
/// not (those held right now are left, and looked at again next time).
fn remove_expired(idx: &mut Inner, dir: &File, now: SystemTime, keep: Duration) -> io::Result<()> {
    let mut held = Vec::new();
    while let Some((since, name)) = idx.oldest_except(&held) {
        if !now.duration_since(since).is_ok_and(|age| age > keep) {
            break;
        }
        if remove_if_free(dir, &name)? {
            logger::info!("removed partial upload {name} (expired)");
            idx.remove(&name);
        } else if is_gone(dir, &name) {
            idx.remove(&name);
        } else {
            held.push(name);
        }
    }
    Ok(())
}

/// Removes the oldest free partials until one more of `size` bytes fits both budgets; whether
/// it does.
fn make_room(idx: &mut Inner, dir: &File, size: u64, limits: Limits) -> io::Result<bool> {
    let mut held = Vec::new();
    loop {
        let over_count = idx.count() >= limits.max_count;
        if !over_count && idx.bytes().saturating_add(size) <= limits.max_bytes {
            return Ok(true);
        }
        let Some((_, name)) = idx.oldest_except(&held) else {
            return Ok(false);
        };
        if remove_if_free(dir, &name)? {
            let budget = if over_count {
                "files.resume_max_count"
            } else {
                "files.resume_max_bytes"
            };
            logger::info!("removed partial upload {name} to stay within {budget}");
            idx.remove(&name);
        } else if is_gone(dir, &name) {
            idx.remove(&name);
        } else {
            held.push(name);
        }
    }
}

/// Whether `name` no longer exists in `dir` (removed by another process on the directory).
fn is_gone(dir: &File, name: &str) -> bool {
    matches!(
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        Err(Errno::NOENT)
    )
}

/// At start-up and now and then: removes the expired partials (all of them when resuming is
/// off) and rebuilds `index` from what is left; returns the names removed and how many were
/// kept. The directory is listed without holding the index, so claims go on meanwhile.
pub fn sweep(index: &Index, dir: &File, limits: Limits) -> io::Result<(Vec<String>, usize)> {
    let began = SystemTime::now();
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for (file_name, e) in list(dir)? {
        let expired = began
            .duration_since(e.since)
            .is_ok_and(|age| age > limits.keep);
        if (limits.off() || expired) && remove_if_free(dir, &file_name)? {
            removed.push(file_name);
        } else {
            kept.push((file_name, e));
        }
    }
    let n_kept = kept.len();
    index.rebuild(kept, began);
    Ok((removed, n_kept))
}

/// The partials in `dir` (regular files with a partial's name), each dated by its last write.
fn list(dir: &File) -> io::Result<Vec<(String, Entry)>> {
    let mut out = Vec::new();
    let entries = rustix::fs::Dir::read_from(dir)?;
    for entry in entries {
        let entry = entry?;
        let Ok(file_name) = entry.file_name().to_str() else {
            continue;
        };
        let Some((_, size, tag)) = parse_name(file_name) else {
            continue;
        };
        let Ok(st) = rustix::fs::statat(dir, file_name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            continue;
        }
        let secs = u64::try_from(st.st_mtime).unwrap_or(0);
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        out.push((file_name.to_string(), Entry { tag, size, since }));
    }
    Ok(out)
}

/// Opens and locks the partial `name`, unless another upload holds it or it is not there.
fn open_locked(dir: &File, name: &str) -> io::Result<Opened> {
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Opened::Absent),
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        // Another ferryd over the directory removed or replaced it between open and lock.
        Ok(()) if !still_named(dir, name, &file) => Ok(Opened::Held),
        Ok(()) => Ok(Opened::Locked(file)),
        Err(Errno::WOULDBLOCK) => Ok(Opened::Held),
        Err(e) => Err(e.into()),
    }
}

/// Whether `name` in `dir` is still `file`: another ferryd over the same directory may have
/// removed the partial (or replaced it) between our open and our lock, and a lock on a file
/// that has no name any more holds nothing.
fn still_named(dir: &File, name: &str, file: &File) -> bool {
    match (
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        rustix::fs::fstat(file),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// Removes the partial `name` unless an upload holds it; whether it was removed.
fn remove_if_free(dir: &File, name: &str) -> io::Result<bool> {
    let Opened::Locked(held) = open_locked(dir, name)? else {
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
    fn claim_continues_supersedes_and_keeps_the_budgets() {
        let path = std::env::temp_dir().join(format!("ferryd-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        let dir = File::open(&path).unwrap();
        let index = Index::default();
        let limits = Limits {
            keep: Duration::from_secs(60),
            max_bytes: 100,
            max_count: 2,
        };
        let claim_as = |sum: &[u8; 32], size, name, limits| {
            claim(&index, &dir, sum, size, name, limits, 0o600)
        };
        let a = *blake3::hash(b"a").as_bytes();
        let b = *blake3::hash(b"b").as_bytes();
        let c = *blake3::hash(b"c").as_bytes();
        // A new partial, written to, released; the same file claims it back at its length.
        let one = got(claim_as(&a, 60, "one", limits));
        assert_eq!(one.offset, 0);
        std::io::Write::write_all(&mut &one.file, &[7; 25]).unwrap();
        // While held, nobody else gets it.
        assert!(
            matches!(claim_as(&a, 60, "one", limits), Ok(Claim::Held(n)) if n == one.file_name)
        );
        drop(one);
        let one = got(claim_as(&a, 60, "one", limits));
        assert_eq!(one.offset, 25);
        drop(one);
        // Over the byte budget alone: not resumable.
        assert!(matches!(claim_as(&b, 101, "two", limits), Ok(Claim::No)));
        // Another file needing room evicts the older partial.
        drop(got(claim_as(&b, 50, "two", limits)));
        assert_eq!(list(&dir).unwrap().len(), 1);
        // The same name with another checksum supersedes it.
        drop(got(claim_as(&a, 10, "two", limits)));
        let left: Vec<u64> = list(&dir)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.size)
            .collect();
        assert_eq!(left, [10]);
        // The count budget: a third partial makes the oldest go.
        drop(got(claim_as(&b, 10, "three", limits)));
        drop(got(claim_as(&c, 10, "four", limits)));
        let mut left: Vec<String> = list(&dir)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.tag)
            .collect();
        left.sort();
        let mut want = vec![tag_of("three"), tag_of("four")];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(index.lock().count(), 2);
        // A held partial is never evicted: with both held there is no room for a third.
        let three = got(claim_as(&b, 10, "three", limits));
        let four = got(claim_as(&c, 10, "four", limits));
        assert!(matches!(claim_as(&a, 10, "five", limits), Ok(Claim::No)));
        drop((three, four));
        // A sweep rebuilds the index from the directory.
        let fresh = Index::default();
        assert_eq!(sweep(&fresh, &dir, limits).unwrap(), (vec![], 2));
        let counted = {
            let idx = fresh.lock();
            (idx.count(), idx.bytes())
        };
        assert_eq!(counted, (2, 20));
        // Start-up with resuming off removes everything free.
        let off = Limits {
            keep: Duration::ZERO,
            ..limits
        };
        assert_eq!(sweep(&fresh, &dir, off).unwrap().0.len(), 2);
        assert_eq!(fresh.lock().count(), 0);
        let _ = std::fs::remove_dir_all(&path);
    }
}
