//! A file being received into the upload directory (`Pending`): its bytes appended to the temp
//! file with writeback started as they land, the free space they took given back (`Reservation`),
//! and the two halves of the commit that makes it durable under its final name (`sync`, then
//! `place`, whose directories `files::batch` fsyncs); dropped without a commit, the temp file goes (unless a resumable upload keeps it). And the temp file's creation (`create_temp`).

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::num::NonZeroU64;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use rustix::fs::{Advice, AtFlags, FlockOperation, Mode, OFlags};

use crate::daemon::files::holders::Held;
use crate::daemon::files::partials::Listed;

use super::{PART_SUFFIX, RESERVED_PREFIX, Store, StoreError, WRITEBACK_STEP, io_err};

/// Free space set aside for one upload and not yet written. Written bytes are given back as they
/// land on disk (the file system counts them from then on); dropping it gives back the rest.
pub(super) struct Reservation<'a> {
    pub(super) store: &'a Store,
    pub(super) left: u64,
}

impl Reservation<'_> {
    /// `n` bytes of the reservation are now on disk.
    fn used(&mut self, n: u64) {
        let n = n.min(self.left);
        self.left -= n;
        self.store.release(n);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.store.release(self.left);
    }
}

/// A file being received. Dropping it without `commit` removes the temp file (and its
/// reservation gives back the space not written).
pub struct Pending<'a> {
    pub(super) reservation: Reservation<'a>,
    /// The directory the temp file is in, where it is renamed and which is fsynced.
    pub(super) dir: Arc<File>,
    pub(super) file: File,
    pub(super) temp_name: String,
    pub(super) name: String,
    pub(super) size: u64,
    pub(super) written: u64,
    /// Bytes for which writeback has been started.
    pub(super) flushed: u64,
    pub(super) done: bool,
    /// A resumable upload's partial body: left in place, not removed, if the upload ends
    /// without `commit` (unless `discard` was called).
    pub(super) keep: bool,
    /// A resumable upload's partial listed as held by this upload's connection, until dropped.
    pub(super) _held: Option<Held>,
    /// A resumable upload's partial, taken out of the index once committed or discarded.
    pub(super) _listed: Option<Listed>,
}

impl Pending<'_> {
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the bytes are kept for a resume if the upload is cut off.
    pub fn is_kept(&self) -> bool {
        self.keep
    }

    /// Removes the partial body when the upload ends without `commit` after all (a checksum
    /// mismatch, a disk error): its bytes are not worth continuing.
    pub fn discard(&mut self) {
        self.keep = false;
    }

    /// Reads bytes already in the file (a resumed upload's prefix) at `at`.
    pub fn read_at(&self, buf: &mut [u8], at: u64) -> Result<usize, StoreError> {
        std::os::unix::fs::FileExt::read_at(&self.file, buf, at)
            .map_err(io_err("read the partial upload"))
    }

    /// Appends body bytes. Never writes more than the announced size.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let room = self.size - self.written;
        if data.len() as u64 > room {
            return Err(StoreError::Io {
                op: "write the file",
                err: io::Error::other("more bytes than announced"),
            });
        }
        self.file
            .write_all(data)
            .map_err(io_err("write the file"))?;
        self.written += data.len() as u64;
        self.reservation.used(data.len() as u64);
        if self.written - self.flushed >= WRITEBACK_STEP {
            // Start writeback of what was written since the last step (and drop the clean pages
            // of the step before): with POSIX_FADV_DONTNEED, Linux queues the dirty pages for
            // writing without waiting. Purely a hint; an error changes nothing.
            let from = self.flushed.saturating_sub(WRITEBACK_STEP);
            let _ = rustix::fs::fadvise(
                &self.file,
                from,
                NonZeroU64::new(self.written - from),
                Advice::DontNeed,
            );
            self.flushed = self.written;
        }
        Ok(())
    }

    /// Starts writing the file's data to disk without waiting for it, so that when a batch's
    /// files are synced one after the other, each finds its data under way and their block
    /// allocations share a journal commit instead of taking one each. Purely a hint (with
    /// POSIX_FADV_DONTNEED Linux queues the dirty pages for writing); an error changes nothing.
    pub fn start_sync(&self) {
        let _ = rustix::fs::fadvise(&self.file, 0, None, Advice::DontNeed);
    }

    /// The first half of a commit: the file's mode set exactly and its data and inode made
    /// durable (fsync). Call only when every byte arrived and the checksum matched.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.written != self.size {
            return Err(StoreError::Io {
                op: "commit the file",
                err: io::Error::other(format!("{} of {} bytes written", self.written, self.size)),
            });
        }
        let mode = Permissions::from_mode(self.reservation.store.cfg.file_mode);
        // The umask may have narrowed the mode at creation; set it exactly.
        self.file
            .set_permissions(mode)
            .map_err(io_err("set the file mode"))?;
        self.file.sync_all().map_err(io_err("sync the file"))
    }

    /// The second half of a commit, after `sync`: gives the file its final name under the
    /// conflict policy, never clobbering. The file counts as stored only once the directory it
    /// went to (and the upload directory) are synced too (`Placed::sync_dirs`).
    pub fn place(mut self) -> Result<Placed, StoreError> {
        let (name, subdir) =
            self.reservation
                .store
                .place(&self.dir, &self.temp_name, &self.name)?;
        self.done = true;
        Ok(Placed {
            name,
            root: Arc::clone(&self.dir),
            subdir,
        })
    }
}

/// A file renamed into place whose directory entry is not yet known to be durable.
pub struct Placed {
    /// The name it got.
    pub name: String,
    /// The upload directory.
    root: Arc<File>,
    /// For a name with subdirectories, the directory it went to.
    subdir: Option<OwnedFd>,
}

impl Placed {
    /// The directories whose fsync makes the new name durable: the one it went to, and the
    /// upload directory (the same for a plain name).
    pub fn dirs(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.subdir
            .as_ref()
            .map(|fd| fd.as_fd())
            .into_iter()
            .chain(std::iter::once(self.root.as_fd()))
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done && !self.keep {
            let _ = rustix::fs::unlinkat(&*self.dir, self.temp_name.as_str(), AtFlags::empty());
        }
    }
}

/// Creates `.ferryd-<random>.part` in `dir` exclusively (O_EXCL, not following a symlink),
/// retrying on the rare collision, and locks it (`flock`); returns the file and its name.
pub(super) fn create_temp(dir: &File, mode: u32) -> Result<(File, String), StoreError> {
    let mut last = None;
    for _ in 0..8 {
        let name = format!("{RESERVED_PREFIX}{:016x}{PART_SUFFIX}", random_u64());
        match rustix::fs::openat(
            dir,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        ) {
            Ok(fd) => {
                // Held while the upload lives, so that another ferryd starting over the same
                // directory leaves it alone (`Store::open`'s clean-up skips locked temp files).
                let file = File::from(fd);
                match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                    // Another ferryd's start-up clean-up took it between our open and our lock:
                    // unlinked, it is worth nothing; take another name.
                    Ok(()) if !is_named(dir, &name, &file) => continue,
                    Ok(()) => return Ok((file, name)),
                    Err(rustix::io::Errno::WOULDBLOCK) => continue,
                    Err(e) => {
                        return Err(StoreError::Io {
                            op: "lock a temporary file",
                            err: e.into(),
                        });
                    }
                }
            }
            Err(rustix::io::Errno::EXIST) => last = Some(io::Error::from(rustix::io::Errno::EXIST)),
            Err(e) => {
                return Err(StoreError::Io {
                    op: "create a temporary file",
                    err: e.into(),
                });
            }
        }
    }
    Err(StoreError::Io {
        op: "create a temporary file",
        err: last.unwrap_or_else(|| io::Error::other("no free temporary name")),
    })
}

/// Whether `name` in `dir` still leads to `file`.
fn is_named(dir: &File, name: &str, file: &File) -> bool {
    match (
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        rustix::fs::fstat(file),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// 64 random bits from the kernel (getrandom(2)). Should the call fail, a counter mixed with the
/// clock stands in: names then become guessable, which only matters to O_EXCL, and that retries.
fn random_u64() -> u64 {
    static FALLBACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut buf = [0u8; 8];
    match rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty()) {
        Ok(8) => u64::from_le_bytes(buf),
        _ => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            nanos ^ FALLBACK.fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed)
        }
    }
}
