//! The upload directory: where a file's bytes go while they arrive (an exclusive hidden temp file)
//! and how a complete, verified file gets its final name without ever clobbering another.
//!
//! Invariant: a file under a final name is complete and verified. Until `Pending::place`, the
//! bytes live in `.ferryd-<random>.part`, which no upload can name and which is removed on any
//! failure (and at start-up, if a crash left one behind: one its upload still holds, `flock`ed,
//! belongs to another ferryd over the same directory and stays).
//!
//! Every file operation goes through one open handle on the directory (`*at` calls), so a temp
//! file and its rename always meet in the same directory. Before each upload the handle is
//! checked against the path: a directory that was removed or replaced is reopened (created
//! again if missing, as at start-up) before a byte of body is read.
//!
//! Here: opening the directory, reservations of free space, beginning an upload, placing a
//! committed file under its name. A file being received is a `Pending` (`pending`).

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, DirBuilder, File, Permissions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, RenameFlags};

use crate::config::{FilesConfig, OnConflict};
use crate::daemon::files::holders::Holders;
use crate::daemon::files::partials::Index;
use crate::daemon::files::subdir::{self, WalkError};
use crate::logger;
use crate::proto::name::{RESERVED_PREFIX, split_path};

mod pending;
mod resumable;

pub use pending::{Pending, Placed};
use pending::{Reservation, create_temp};

/// Suffix of temporary files.
const PART_SUFFIX: &str = ".part";
/// Mode of the upload directory when ferryd creates it.
const DIR_MODE: u32 = 0o750;
/// After this many bytes, ask the kernel to start writing them to disk, so that the final fsync
/// finds little left to do (the transfer and the flush overlap).
const WRITEBACK_STEP: u64 = 8 << 20;
/// How many `name (N).ext` candidates `rename` tries before giving up.
const MAX_RENAMES: u32 = 9999;

/// Why a file could not be stored.
#[derive(Debug)]
pub enum StoreError {
    TooLarge {
        size: u64,
        max: u64,
    },
    NoSpace {
        size: u64,
        usable: u64,
    },
    Exists(String),
    /// Every `name (N).ext` up to `MAX_RENAMES` is taken.
    NoFreeName(String),
    Io {
        op: &'static str,
        err: io::Error,
    },
    /// A name with subdirectories whose directories cannot be reached (`files.allow_subdirs`).
    Path(WalkError),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::TooLarge { size, max } => {
                write!(f, "size {size} is over the limit of {max} bytes")
            }
            StoreError::NoSpace { size, usable } => write!(
                f,
                "size {size} does not fit: {usable} bytes usable (free space minus files.min_free_bytes and uploads in progress)"
            ),
            // Names come from the peer: shown escaped wherever this is printed (log, answer).
            StoreError::Exists(name) => write!(f, "{} already exists", subdir::shown(name)),
            StoreError::NoFreeName(name) => {
                write!(
                    f,
                    "{} and its first {MAX_RENAMES} renamed variants all exist",
                    subdir::shown(name)
                )
            }
            StoreError::Io { op, err } => write!(f, "cannot {op}: {err}"),
            StoreError::Path(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StoreError {}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    move |err| StoreError::Io { op, err }
}

/// The upload directory and its policy.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// An open handle on the directory: the anchor for `*at` calls and for fsync. Replaced when
    /// the directory at `dir` is no longer the one it names.
    dir_handle: RwLock<Arc<File>>,
    cfg: FilesConfig,
    /// Bytes promised to uploads in progress and not yet written; shared with the store a reload
    /// replaces this one with, so uploads in flight stay counted.
    reserved: Arc<Mutex<u64>>,
    /// When expired partial bodies were last swept away (and the index rebuilt).
    last_sweep: Mutex<Option<Instant>>,
    /// The partial bodies in the directory (`partials::Index`); shared with the store a reload
    /// makes for the same directory.
    partials: Arc<Index>,
    /// Which upload holds each partial in this process; shared with the store a reload makes.
    holders: Arc<Holders>,
}

/// What the stores a reload makes share with the one they replace.
struct Shared {
    reserved: Arc<Mutex<u64>>,
    holders: Arc<Holders>,
    partials: Arc<Index>,
}

/// What `Store::open` found.
#[derive(Debug)]
pub struct Opened {
    pub store: Store,
    /// Stale `.part` files (left by a crash) that were removed.
    pub stale_removed: Vec<String>,
    /// Entries with a temp file's name that were left in place, each with the reason.
    pub stale_kept: Vec<(String, String)>,
}

impl Store {
    /// Creates the directory if missing, removes stale temp files if `clean_stale` (at start-up;
    /// not on a reload, when uploads may be in flight) and checks that a file can be created.
    /// A stale entry that cannot be removed (a directory, an undeletable file) is reported in
    /// `stale_kept`, never an error.
    pub fn open(cfg: &FilesConfig, clean_stale: bool) -> Result<Opened, StoreError> {
        let shared = Shared {
            reserved: Arc::new(Mutex::new(0)),
            holders: Arc::default(),
            partials: Arc::default(),
        };
        Store::open_counting(cfg, clean_stale, shared)
    }

    /// `open` for a reload: the new store keeps counting the space reserved by uploads that
    /// started under `self`.
    pub fn reopen(&self, cfg: &FilesConfig) -> Result<Opened, StoreError> {
        let shared = Shared {
            reserved: Arc::clone(&self.reserved),
            holders: Arc::clone(&self.holders),
            // Another directory has other partials: its index is built by its first sweep.
            partials: if cfg.dir == self.dir {
                Arc::clone(&self.partials)
            } else {
                Arc::default()
            },
        };
        Store::open_counting(cfg, false, shared)
    }

    fn open_counting(
        cfg: &FilesConfig,
        clean_stale: bool,
        shared: Shared,
    ) -> Result<Opened, StoreError> {
        let Shared {
            reserved,
            holders,
            partials,
        } = shared;
        let dir = cfg.dir.clone();
        let dir_handle = open_dir(&dir)?;
        let mut stale_removed = Vec::new();
        let mut stale_kept = Vec::new();
        if clean_stale {
            for entry in fs::read_dir(&dir).map_err(io_err("list the upload directory"))? {
                let entry = entry.map_err(io_err("list the upload directory"))?;
                let name = entry.file_name();
                if !is_temp_name(&name) {
                    continue;
                }
                let shown = name.to_string_lossy().into_owned();
                // Held until it is removed, so that its name is not taken meanwhile.
                let mut _held = None;
                match entry.file_type() {
                    Ok(t) if t.is_file() => match lock_stale(&dir_handle, &name) {
                        Ok(fd) => _held = fd,
                        Err(InUse) => continue,
                    },
                    Ok(t) if t.is_symlink() => {}
                    Ok(_) => {
                        stale_kept.push((shown, "not a regular file".to_string()));
                        continue;
                    }
                    Err(e) => {
                        stale_kept.push((shown, e.to_string()));
                        continue;
                    }
                }
                match rustix::fs::unlinkat(&dir_handle, &name, AtFlags::empty()) {
                    Ok(()) => stale_removed.push(shown),
                    Err(e) => stale_kept.push((shown, io::Error::from(e).to_string())),
                }
            }
        }
        let store = Store {
            dir,
            dir_handle: RwLock::new(Arc::new(dir_handle)),
            cfg: cfg.clone(),
            reserved,
            last_sweep: Mutex::new(None),
            holders,
            partials,
        };
        // Fail at start-up, not on the first upload, if the directory is not writable.
        let handle = store.handle();
        let (probe, temp_name) = create_temp(&handle, store.cfg.file_mode)?;
        drop(probe);
        rustix::fs::unlinkat(&*handle, temp_name.as_str(), AtFlags::empty()).map_err(|e| {
            StoreError::Io {
                op: "remove the probe file",
                err: e.into(),
            }
        })?;
        Ok(Opened {
            store,
            stale_removed,
            stale_kept,
        })
    }

    fn handle(&self) -> Arc<File> {
        Arc::clone(
            &self
                .dir_handle
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The handle on the directory now at `dir`: the open one if it still is that directory,
    /// else a new one (the directory created again if it is gone).
    fn current_handle(&self) -> Result<Arc<File>, StoreError> {
        let handle = self.handle();
        if same_dir(&handle, &self.dir) {
            return Ok(handle);
        }
        let mut slot = self
            .dir_handle
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if same_dir(&slot, &self.dir) {
            // Another upload reopened it meanwhile.
            return Ok(Arc::clone(&slot));
        }
        let fresh = Arc::new(open_dir(&self.dir)?);
        logger::warn!(
            "upload directory {} was removed or replaced while running; using the directory now at that path",
            self.dir.display()
        );
        *slot = Arc::clone(&fresh);
        Ok(fresh)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether names may hold subdirectories (`files.allow_subdirs`).
    pub fn allows_subdirs(&self) -> bool {
        self.cfg.allow_subdirs
    }

    /// Checks an announced upload against the limits and, if it may go ahead, opens its temp
    /// file. Nothing of the body has been read yet.
    pub fn begin(&self, name: &str, size: u64) -> Result<Pending<'_>, StoreError> {
        if size > self.cfg.max_file_size {
            return Err(StoreError::TooLarge {
                size,
                max: self.cfg.max_file_size,
            });
        }
        let dir = self.current_handle()?;
        self.check_name(&dir, name)?;
        self.sweep_now_and_then(&dir);
        let reservation = self.reserve(&dir, size)?;
        // On an error the reservation's drop gives the space back.
        let (file, temp_name) = create_temp(&dir, self.cfg.file_mode)?;
        Ok(Pending {
            reservation,
            dir,
            file,
            temp_name,
            name: name.to_string(),
            size,
            written: 0,
            flushed: 0,
            done: false,
            keep: false,
            _held: None,
            _listed: None,
        })
    }

    /// Reserves `size` bytes of free space, or says how much is usable.
    fn reserve(&self, dir: &File, size: u64) -> Result<Reservation<'_>, StoreError> {
        let vfs = rustix::fs::fstatvfs(dir).map_err(|e| StoreError::Io {
            op: "read the free space of the upload directory",
            err: e.into(),
        })?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        let usable = free
            .saturating_sub(self.cfg.min_free_bytes)
            .saturating_sub(*reserved);
        if size > usable {
            return Err(StoreError::NoSpace { size, usable });
        }
        *reserved += size;
        Ok(Reservation {
            store: self,
            left: size,
        })
    }

    fn release(&self, n: u64) {
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        *reserved = reserved.saturating_sub(n);
    }

    /// Early answers save the transfer; `place` still refuses atomically if a name is taken
    /// meanwhile. For a name with subdirectories, a symlink or a file on the way to its
    /// directory is refused here (nothing is created); a name that is a directory is refused
    /// unless `rename` can pick another.
    fn check_name(&self, dir: &File, name: &str) -> Result<(), StoreError> {
        let (parents, leaf) = split_path(name);
        let parent = subdir::open_beneath(dir.as_fd(), parents, false).map_err(StoreError::Path)?;
        if parent.is_none() && !parents.is_empty() {
            // Its directory does not exist yet: nothing is in the way.
            return Ok(());
        }
        let at = parent.as_ref().map_or(dir.as_fd(), |fd| fd.as_fd());
        let kind = |n: &str| subdir::entry_type(at, n).ok().flatten();
        let is_dir = kind(leaf) == Some(FileType::Directory);
        match self.cfg.on_conflict {
            OnConflict::Reject | OnConflict::Overwrite if is_dir => {
                Err(StoreError::Exists(format!("{name} (a directory)")))
            }
            OnConflict::Reject if kind(leaf).is_some() => Err(StoreError::Exists(name.to_string())),
            OnConflict::Rename if (0..=MAX_RENAMES).all(|n| kind(&numbered(leaf, n)).is_some()) => {
                Err(StoreError::NoFreeName(name.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Moves `temp_name` in `dir` to `name` under the conflict policy; returns the name it got
    /// and, for a name with subdirectories, its directory (created as needed beneath `dir`,
    /// never through a symlink), to be fsynced.
    fn place(
        &self,
        dir: &File,
        temp_name: &str,
        name: &str,
    ) -> Result<(String, Option<OwnedFd>), StoreError> {
        let (parents, leaf) = split_path(name);
        let parent = subdir::open_beneath(dir.as_fd(), parents, true).map_err(StoreError::Path)?;
        let target = parent.as_ref().map_or(dir.as_fd(), |fd| fd.as_fd());
        let stored = self.place_in(dir, temp_name, target, leaf)?;
        let stored = match parents {
            "" => stored,
            p => format!("{p}/{stored}"),
        };
        Ok((stored, parent))
    }

    /// Moves `temp_name` in `dir` to `name` in `target` under the conflict policy; returns the
    /// name it got there.
    fn place_in(
        &self,
        dir: &File,
        temp_name: &str,
        target: BorrowedFd<'_>,
        name: &str,
    ) -> Result<String, StoreError> {
        match self.cfg.on_conflict {
            OnConflict::Overwrite => {
                if subdir::entry_type(target, name).ok().flatten() == Some(FileType::Directory) {
                    return Err(StoreError::Exists(format!("{name} (a directory)")));
                }
                rustix::fs::renameat(dir, temp_name, target, name).map_err(|e| StoreError::Io {
                    op: "rename the file into place",
                    err: e.into(),
                })?;
                Ok(name.to_string())
            }
            OnConflict::Reject => match place_new(dir, temp_name, target, name) {
                Ok(()) => Ok(name.to_string()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(StoreError::Exists(name.to_string()))
                }
                Err(e) => Err(StoreError::Io {
                    op: "move the file into place",
                    err: e,
                }),
            },
            OnConflict::Rename => {
                for n in 0..=MAX_RENAMES {
                    let candidate = numbered(name, n);
                    match place_new(dir, temp_name, target, &candidate) {
                        Ok(()) => return Ok(candidate),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(e) => {
                            return Err(StoreError::Io {
                                op: "move the file into place",
                                err: e,
                            });
                        }
                    }
                }
                Err(StoreError::NoFreeName(name.to_string()))
            }
        }
    }
}

/// Gives `temp_name` in `d` the name `name` in `target` (`d` itself, or a directory beneath it)
/// only if `name` does not exist, atomically: renameat2 with RENAME_NOREPLACE, or on a file
/// system without it, link(2) then unlink(2) (link never replaces an existing name either).
fn place_new(d: &File, temp_name: &str, target: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    match rustix::fs::renameat_with(d, temp_name, target, name, RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {}
        Err(e) => return Err(e.into()),
    }
    rustix::fs::linkat(d, temp_name, target, name, AtFlags::empty())?;
    rustix::fs::unlinkat(d, temp_name, AtFlags::empty())?;
    Ok(())
}

/// Whether the temp file `name` belongs to an upload in progress, here or in another ferryd over
/// the same directory (its upload holds it locked: `create_temp` locks each); if not, the lock
/// that keeps it from being taken until it is removed (none for a file that cannot be opened).
fn lock_stale(dir: &File, name: &OsStr) -> Result<Option<OwnedFd>, InUse> {
    let Ok(fd) = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return Ok(None);
    };
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Err(rustix::io::Errno::WOULDBLOCK) => Err(InUse),
        _ => Ok(Some(fd)),
    }
}

/// A temp file an upload holds.
struct InUse;

/// Creates the directory if missing (mode 0750) and opens it.
fn open_dir(dir: &Path) -> Result<File, StoreError> {
    let existed = dir.is_dir();
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|err| {
            if err.kind() == io::ErrorKind::AlreadyExists {
                // create_dir_all reports "File exists" for a non-directory in the way.
                StoreError::Io {
                    op: "use the upload directory",
                    err: io::Error::other(format!("{} is not a directory", dir.display())),
                }
            } else {
                StoreError::Io {
                    op: "create the upload directory",
                    err,
                }
            }
        })?;
    if !existed {
        // The umask may have narrowed the mode; a directory we create gets exactly 0750.
        fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
            .map_err(io_err("set the upload directory's mode"))?;
    }
    File::open(dir).map_err(io_err("open the upload directory"))
}

/// Whether `handle` is the directory now at `path` (same device and inode).
fn same_dir(handle: &File, path: &Path) -> bool {
    match (handle.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => b.is_dir() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `name` is one of ferryd's temporary files.
fn is_temp_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with(RESERVED_PREFIX) && name.ends_with(PART_SUFFIX)
}

/// `name` for `n = 0`, else `stem (n).ext` as croc's `--rename` does: the number goes before the
/// last extension (`photo (1).jpg`, `archive.tar (1).gz`, `.bashrc (1)`, `README (1)`). The stem
/// is shortened (on a character boundary) so the result stays within 255 bytes.
pub fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_string();
    }
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    };
    let tag = format!(" ({n})");
    let budget = 255usize.saturating_sub(tag.len() + ext.len());
    let mut cut = stem.len().min(budget);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tag}{ext}", &stem[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn start_up_leaves_the_temp_files_of_uploads_in_progress() {
        let path = std::env::temp_dir().join(format!("ferryd-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        let mut cfg = Config::default().files;
        cfg.dir = path.clone();
        // Another ferryd's upload in progress (locked), and a crash's leftover (not locked).
        let dir = open_dir(&path).unwrap();
        let (held, held_name) = create_temp(&dir, 0o600).unwrap();
        fs::write(path.join(".ferryd-0123456789abcdef.part"), b"stale").unwrap();
        let opened = Store::open(&cfg, true).unwrap();
        assert_eq!(opened.stale_removed, [".ferryd-0123456789abcdef.part"]);
        assert!(opened.stale_kept.is_empty());
        assert!(path.join(&held_name).exists());
        // Once its upload is gone, the next start-up removes it.
        drop(held);
        let opened = Store::open(&cfg, true).unwrap();
        assert_eq!(opened.stale_removed, [held_name]);
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn numbered_names() {
        let long = format!("{}.txt", "é".repeat(125)); // 250 + 4 bytes
        let cases = [
            ("photo.jpg", 0, "photo.jpg".to_string()),
            ("photo.jpg", 1, "photo (1).jpg".to_string()),
            ("archive.tar.gz", 2, "archive.tar (2).gz".to_string()),
            (".bashrc", 1, ".bashrc (1)".to_string()),
            ("README", 12, "README (12)".to_string()),
            ("a.", 1, "a (1).".to_string()),
            (
                long.as_str(),
                3,
                format!("{}{}", "é".repeat(123), " (3).txt"),
            ),
        ];
        for (name, n, want) in cases {
            let got = numbered(name, n);
            assert_eq!(got, want, "{name} {n}");
            assert!(got.len() <= 255);
        }
    }

    #[test]
    fn temp_names() {
        assert!(is_temp_name(OsStr::new(".ferryd-0123456789abcdef.part")));
        assert!(!is_temp_name(OsStr::new("photo.part")));
        assert!(!is_temp_name(OsStr::new(".ferryd-x")));
    }
}
