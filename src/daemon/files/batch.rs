//! Group commit: verified files held until several can be made durable together (each file
//! fsynced, each renamed into place, each directory they went to fsynced once), and the outcome
//! of each, in the order they arrived. A file's `OK` is answered only from here, so only once
//! its data, its name and its directory entry are on disk.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::daemon::files::store::{Pending, Placed, StoreError};
use crate::daemon::files::subdir::WalkError;
use crate::escape::escaped;
use crate::logger;
use crate::proto::Algo;
use crate::proto::decimal::Fixed;
use crate::proto::header::CHECKSUM_LEN;
use crate::proto::wire::{Code, hex};
use crate::threads;

/// Fsyncs of one batch in flight at once (`sync_all`).
const SYNC_THREADS: usize = 4;
/// The stack of a thread that only fsyncs.
const SYNC_STACK: usize = 64 * 1024;
/// The most files a batch holds: each keeps its temp file open until the batch is committed,
/// so this bounds the descriptors one connection holds.
pub const MAX_FILES: usize = 64;
/// A batch whose files hold this many bytes is committed without waiting for more.
pub const MAX_BYTES: u64 = 16 << 20;
/// The longest a verified file waits for others to share its commit while more bytes keep
/// arriving (when nothing more is readable, the batch is committed at once).
pub const MAX_HOLD: Duration = Duration::from_millis(20);

/// A file whose whole body arrived and matched its checksum, not yet durable.
pub struct Verified<'s> {
    pub(super) pending: Pending<'s>,
    pub(super) about: About,
}

/// What the log and the answer say about a verified file.
pub(super) struct About {
    /// The name as sent, escaped for the log.
    pub(super) shown: String,
    pub(super) size: u64,
    pub(super) algo: Algo,
    pub(super) checksum: [u8; CHECKSUM_LEN],
    /// How it was checked, for the log (`"trailing checksum, "`, or empty).
    pub(super) how: &'static str,
    pub(super) started: Instant,
}

/// How a verified file ended once its batch was committed.
#[derive(Debug)]
pub enum Committed {
    /// Durable under `stored_name`: answer `OK`.
    Stored {
        stored_name: String,
        size: u64,
        checksum: [u8; CHECKSUM_LEN],
    },
    /// Not stored (`exists` when the name was taken meanwhile, else `io`); the whole body was
    /// read, so the connection goes on.
    Failed { code: Code, reason: String },
}

/// Verified files waiting to be committed together, in arrival order.
#[derive(Default)]
pub struct Batch<'s> {
    files: Vec<Verified<'s>>,
    bytes: u64,
    since: Option<Instant>,
}

impl<'s> Batch<'s> {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Adds a verified file; the batch may then be full (`is_full`).
    pub fn push(&mut self, file: Verified<'s>) {
        self.bytes += file.about.size;
        self.since.get_or_insert_with(Instant::now);
        self.files.push(file);
    }

    /// Whether it holds `MAX_FILES` files or `MAX_BYTES` bytes: commit before taking more.
    pub fn is_full(&self) -> bool {
        self.files.len() >= MAX_FILES || self.bytes >= MAX_BYTES
    }

    /// Whether its first file has waited `MAX_HOLD` already.
    pub fn is_due(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= MAX_HOLD)
    }

    /// Makes every file durable under its name: starts the writeback of all, fsyncs each file,
    /// renames each into place, then fsyncs each directory they went to once. Returns each
    /// file's outcome in arrival order; a failure of one file costs that file only. `peer`
    /// labels the log lines.
    pub fn commit(&mut self, peer: &dyn fmt::Display) -> Vec<Committed> {
        let files = std::mem::take(&mut self.files);
        self.bytes = 0;
        self.since = None;
        if files.len() > 1 {
            for f in &files {
                f.pending.start_sync();
            }
        }
        // Every file synced, then each placed: a name never leads to bytes not yet on disk.
        let (abouts, mut pendings): (Vec<About>, Vec<Pending<'_>>) =
            files.into_iter().map(|f| (f.about, f.pending)).unzip();
        let synced = sync_all(&mut pendings);
        let placed: Vec<(About, Result<Placed, StoreError>)> = abouts
            .into_iter()
            .zip(pendings.into_iter().zip(synced))
            .map(|(about, (pending, synced))| (about, synced.and_then(|()| pending.place())))
            .collect();
        let failed_dirs = sync_dirs(&placed);
        placed
            .into_iter()
            .enumerate()
            .map(|(i, (f, placed))| {
                let placed = match (placed, failed_dirs.iter().find(|(at, _)| *at == i)) {
                    (Ok(_), Some((_, e))) => Err(StoreError::Io {
                        op: "sync the file's directory",
                        err: std::io::Error::from_raw_os_error(*e),
                    }),
                    (placed, _) => placed,
                };
                verdict(&f, placed, peer)
            })
            .collect()
    }
}

/// Fsyncs every file of a batch, `SYNC_THREADS` at a time: the block layer merges the flushes of
/// fsyncs in flight together, where one after another each waits for its own (2,000 files of
/// 4 KiB in batches of 64: 2.3–3.1 s one at a time, 1.0–1.7 s four at a time, on this project's
/// test VM). The threads live only for the call; if one cannot start, its files are synced here.
fn sync_all(pendings: &mut [Pending<'_>]) -> Vec<Result<(), StoreError>> {
    let per_thread = pendings.len().div_ceil(SYNC_THREADS).max(1);
    let mut out: Vec<Option<Result<(), StoreError>>> = pendings.iter().map(|_| None).collect();
    if pendings.len() > 1 {
        std::thread::scope(|scope| {
            let mut parts = pendings
                .chunks_mut(per_thread)
                .zip(out.chunks_mut(per_thread));
            // The first part is synced by this thread, beside the others.
            let own = parts.next();
            for (part, slots) in parts {
                let body = Box::new(move || sync_into(part, slots));
                // A thread that cannot start leaves its slots empty: they are synced below.
                let _ = threads::spawn_scoped(scope, None, Some(SYNC_STACK), body);
            }
            if let Some((part, slots)) = own {
                sync_into(part, slots);
            }
        });
    }
    pendings
        .iter_mut()
        .zip(out)
        .map(|(p, synced)| synced.unwrap_or_else(|| p.sync()))
        .collect()
}

fn sync_into(part: &mut [Pending<'_>], slots: &mut [Option<Result<(), StoreError>>]) {
    for (p, slot) in part.iter_mut().zip(slots) {
        *slot = Some(p.sync());
    }
}

/// Fsyncs each directory the placed files went to once (the same directory reached by several
/// descriptors counts once); returns the index of each file whose directory failed, with the
/// error number.
fn sync_dirs(placed: &[(About, Result<Placed, StoreError>)]) -> Vec<(usize, i32)> {
    // (device, inode), one descriptor for it, and the files that went there.
    let mut dirs: Vec<((u64, u64), BorrowedFd<'_>, Vec<usize>)> = Vec::new();
    let mut failed = Vec::new();
    for (i, (_, p)) in placed.iter().enumerate() {
        let Ok(p) = p else { continue };
        for fd in p.dirs() {
            let id = match rustix::fs::fstat(fd) {
                Ok(st) => (st.st_dev, st.st_ino),
                Err(e) => {
                    failed.push((i, e.raw_os_error()));
                    continue;
                }
            };
            match dirs.iter_mut().find(|(d, ..)| *d == id) {
                Some((.., files)) => files.push(i),
                None => dirs.push((id, fd, vec![i])),
            }
        }
    }
    for (_, fd, files) in &dirs {
        if let Err(e) = rustix::fs::fsync(fd) {
            failed.extend(files.iter().map(|&i| (i, e.raw_os_error())));
        }
    }
    failed
}

/// The outcome of one file of a committed batch, logged.
fn verdict(f: &About, placed: Result<Placed, StoreError>, peer: &dyn fmt::Display) -> Committed {
    let (shown, size, algo, how) = (&f.shown, f.size, f.algo, f.how);
    match placed {
        Ok(p) => {
            let took = f.started.elapsed();
            logger::info!(
                "{peer} stored \"{shown}\" as \"{}\" ({size} B, {algo} {}, {how}{} s, {} MB/s)",
                escaped(p.name.as_bytes(), 255),
                hex(&f.checksum),
                Fixed::secs(took, 2),
                Fixed::mb_per_s(size, took)
            );
            Committed::Stored {
                stored_name: p.name,
                size,
                checksum: f.checksum,
            }
        }
        Err(e) => {
            let code = match e {
                StoreError::Exists(_)
                | StoreError::NoFreeName(_)
                | StoreError::Path(WalkError::NotADirectory(_)) => Code::Exists,
                _ => Code::Io,
            };
            logger::error!("{peer} file \"{shown}\" not stored: {code}: {e}");
            Committed::Failed {
                code,
                reason: e.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, OnConflict};
    use crate::daemon::files::store::Store;

    #[test]
    fn a_file_that_fails_its_commit_costs_only_itself_and_outcomes_keep_their_order() {
        let path = std::env::temp_dir().join(format!("ferryd-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let mut cfg = Config::default().files;
        cfg.dir = path.clone();
        cfg.on_conflict = OnConflict::Reject;
        let store = Store::open(&cfg, true).unwrap().store;
        let mut batch = Batch::default();
        for name in ["a", "b", "c"] {
            let mut pending = store.begin(name, 3).unwrap();
            pending.write(name.repeat(3).as_bytes()).unwrap();
            batch.push(Verified {
                pending,
                about: About {
                    shown: name.to_string(),
                    size: 3,
                    algo: Algo::Blake3,
                    checksum: [0; CHECKSUM_LEN],
                    how: "",
                    started: Instant::now(),
                },
            });
        }
        assert!(!batch.is_full() && !batch.is_empty());
        // Taken after its name was checked and before its commit: the rename will not clobber it.
        std::fs::write(path.join("b"), b"old").unwrap();
        let out = batch.commit(&"test");
        assert!(batch.is_empty());
        let names: Vec<String> = out
            .iter()
            .map(|c| match c {
                Committed::Stored { stored_name, .. } => format!("stored {stored_name}"),
                Committed::Failed { code, .. } => format!("failed {code}"),
            })
            .collect();
        assert_eq!(names, ["stored a", "failed exists", "stored c"]);
        for (name, want) in [("a", "aaa"), ("b", "old"), ("c", "ccc")] {
            assert_eq!(std::fs::read(path.join(name)).unwrap(), want.as_bytes());
        }
        // Nothing else: the failed file's temp file is gone.
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 3);
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn files_synced_on_several_threads_keep_their_places_and_failures() {
        let path = std::env::temp_dir().join(format!("ferryd-syncs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let mut cfg = Config::default().files;
        cfg.dir = path.clone();
        let store = Store::open(&cfg, true).unwrap().store;
        // 10 files on up to SYNC_THREADS threads; the 7th is one byte short, so its sync fails.
        let mut pendings: Vec<Pending<'_>> = (0..10)
            .map(|i| {
                let mut p = store.begin(&format!("f{i}"), 2).unwrap();
                p.write(if i == 6 { b"x" } else { b"xy" }).unwrap();
                p
            })
            .collect();
        let synced = sync_all(&mut pendings);
        let ok: Vec<bool> = synced.iter().map(Result::is_ok).collect();
        let mut want = vec![true; 10];
        want[6] = false;
        assert_eq!(ok, want);
        drop(pendings);
        std::fs::remove_dir_all(&path).unwrap();
    }
}
