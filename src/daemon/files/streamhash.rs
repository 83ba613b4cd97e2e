//! BLAKE3 of an upload while it arrives, with the hashing done by a small fixed pool of threads
//! instead of the receiving worker: the body is cut into 1 MiB pieces, each a complete subtree of
//! the BLAKE3 tree (`blake3::hazmat`), hashed on the pool while the worker receives and writes the
//! next one, and the subtree chaining values are merged in order. The pool has
//! `min(cores, MAX_POOL)` threads whatever the load, so the daemon's thread count stays
//! `max_connections` plus a constant; they start with the first upload that needs them, so an
//! idle daemon holds none of their stacks.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use crossbeam_channel::Sender;

use crate::daemon::files::oneshot;
use crate::threads;
use crate::{cpus, logger};

/// Piece size: a power of two multiple of BLAKE3's 1 KiB chunk, so that every piece but the last
/// is a complete subtree.
pub const PIECE: usize = 1 << 20;
/// Pieces in flight per upload (each holds a buffer of `PIECE` bytes).
const RING: usize = 3;
/// Largest pool.
const MAX_POOL: usize = 4;
/// Jobs waiting for a pool thread.
const QUEUE: usize = 64;

/// Work for a pool thread.
pub type Job = threads::Body;

/// The hashing threads, started on first use.
#[derive(Debug)]
pub struct HashPool {
    /// Stack size of each thread.
    stack: usize,
    /// The threads' queue once the first job has started them; `None` in it if not even one
    /// thread could start (jobs are then hashed by their caller).
    tx: OnceLock<Option<Sender<Job>>>,
}

impl HashPool {
    /// A pool of `min(cores, MAX_POOL)` threads with `stack` bytes of stack each, started by the
    /// first job.
    pub fn new(stack: usize) -> HashPool {
        HashPool {
            stack,
            tx: OnceLock::new(),
        }
    }

    /// As `new`; kept until the server calls `new` (it cannot fail any more).
    pub fn start(stack: usize) -> std::io::Result<HashPool> {
        Ok(HashPool::new(stack))
    }

    /// Runs `job` on a pool thread, waiting for room in the queue if need be. False if the
    /// pool is gone or could not start.
    fn submit(&self, job: Job) -> bool {
        match self.tx.get_or_init(|| self.spawn()) {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        }
    }

    /// Starts the threads; `None` if none could start.
    fn spawn(&self) -> Option<Sender<Job>> {
        let threads = cpus::count().min(MAX_POOL);
        let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE);
        let mut started = 0;
        for i in 0..threads {
            let spawned = threads::spawn_runner(format!("hash-{i}"), Some(self.stack), rx.clone());
            match spawned {
                Ok(_) => started += 1,
                Err(e) => logger::warn!("cannot start hashing thread {}: {e}", i + 1),
            }
        }
        if started == 0 {
            logger::warn!("no hashing thread could start; uploads are hashed by their worker");
            return None;
        }
        Some(tx)
    }

    /// As `submit`, but gives the job back if the pool is gone, so the caller can run it.
    pub fn submit_back(&self, job: Job) -> Result<(), Job> {
        match self.tx.get_or_init(|| self.spawn()) {
            Some(tx) => tx.send(job).map_err(|e| e.into_inner()),
            None => Err(job),
        }
    }
}

/// The BLAKE3 of a body of known length, fed piece by piece.
pub struct StreamHash<'p> {
    total: u64,
    fed: u64,
    mode: HashMode<'p>,
}

enum HashMode<'p> {
    /// Small bodies, or no pool: one hasher on the caller's thread.
    Inline(Box<blake3::Hasher>),
    Pooled(Pooled<'p>),
}

struct Pooled<'p> {
    pool: &'p HashPool,
    /// Chaining values of completed subtrees, merged as in BLAKE3's own stack.
    stack: Vec<ChainingValue>,
    /// Complete pieces pushed onto the stack so far.
    pushed: u64,
    /// Results still to come, in piece order, with each piece's buffer.
    inflight: VecDeque<(oneshot::Receiver<ChainingValue>, Arc<Vec<u8>>)>,
    /// Buffers ready to be filled again.
    spare: Vec<Arc<Vec<u8>>>,
    /// The last piece's chaining value, once known.
    last: Option<ChainingValue>,
    /// The pool failed to take a job: hash what is left inline (never expected).
    broken: bool,
}

impl<'p> StreamHash<'p> {
    /// A hash for a body of `total` bytes, using `pool` if there is one and the body is larger
    /// than one piece.
    pub fn new(total: u64, pool: Option<&'p HashPool>) -> StreamHash<'p> {
        let mode = match pool {
            Some(pool) if total > PIECE as u64 => HashMode::Pooled(Pooled {
                pool,
                stack: Vec::new(),
                pushed: 0,
                inflight: VecDeque::new(),
                spare: Vec::new(),
                last: None,
                broken: false,
            }),
            _ => HashMode::Inline(Box::new(blake3::Hasher::new())),
        };
        StreamHash {
            total,
            fed: 0,
            mode,
        }
    }

    /// A buffer to receive the next piece into: `piece_len()` bytes long.
    pub fn buffer(&mut self) -> Vec<u8> {
        let len = self.piece_len();
        match &mut self.mode {
            HashMode::Inline(_) => vec![0; len],
            HashMode::Pooled(p) => {
                if p.spare.is_empty() && p.inflight.len() >= RING {
                    p.settle_one(self.fed, self.total);
                }
                let mut buf = p
                    .spare
                    .pop()
                    .and_then(|b| Arc::try_unwrap(b).ok())
                    .unwrap_or_default();
                buf.resize(len, 0);
                buf
            }
        }
    }

    /// Length of the next piece.
    pub fn piece_len(&self) -> usize {
        (self.total - self.fed).min(PIECE as u64) as usize
    }

    /// Hands over the next piece, filled; returns it shared, for writing out while it is hashed.
    /// Drop the returned handle once written, so that the buffer can be used again.
    pub fn feed(&mut self, piece: Vec<u8>) -> Arc<Vec<u8>> {
        let offset = self.fed;
        self.fed += piece.len() as u64;
        let piece = Arc::new(piece);
        match &mut self.mode {
            HashMode::Inline(h) => {
                h.update(&piece);
            }
            HashMode::Pooled(p) => p.feed(Arc::clone(&piece), offset),
        }
        piece
    }

    /// The 32-byte hash, once every byte has been fed.
    pub fn finish(self) -> [u8; 32] {
        match self.mode {
            HashMode::Inline(h) => *h.finalize().as_bytes(),
            HashMode::Pooled(mut p) => {
                while !p.inflight.is_empty() {
                    p.settle_one(self.fed, self.total);
                }
                let mut out = p.last.unwrap_or_default();
                while let Some(left) = p.stack.pop() {
                    out = if p.stack.is_empty() {
                        return *merge_subtrees_root(&left, &out, Mode::Hash).as_bytes();
                    } else {
                        merge_subtrees_non_root(&left, &out, Mode::Hash)
                    };
                }
                // Unreachable for bodies over one piece: there is always a left subtree.
                *blake3::hash(&[]).as_bytes()
            }
        }
    }
}

impl Pooled<'_> {
    fn feed(&mut self, piece: Arc<Vec<u8>>, offset: u64) {
        let (tx, rx) = oneshot::pair();
        let shared = Arc::clone(&piece);
        let job: Job = Box::new(move || {
            let cv = subtree_cv(&shared, offset);
            // Release the buffer before reporting, so the caller can reuse it at once.
            drop(shared);
            tx.send(cv);
        });
        if self.broken || !self.pool.submit(job) {
            self.broken = true;
            let (tx, rx2) = oneshot::pair();
            tx.send(subtree_cv(&piece, offset));
            self.inflight.push_back((rx2, piece));
        } else {
            self.inflight.push_back((rx, piece));
        }
    }

    /// Waits for the oldest piece in flight and puts its chaining value in place.
    fn settle_one(&mut self, fed: u64, total: u64) {
        let Some((rx, buf)) = self.inflight.pop_front() else {
            return;
        };
        // A pool thread always answers; should one die, hash here rather than hang.
        let cv = rx.recv().unwrap_or_else(|| {
            let offset = self.pushed * PIECE as u64;
            subtree_cv(&buf, offset)
        });
        let is_last = self.inflight.is_empty() && fed == total;
        if is_last {
            self.last = Some(cv);
        } else {
            self.push(cv);
        }
        if self.spare.len() < RING {
            self.spare.push(buf);
        }
    }

    /// Adds a complete subtree that is not the last, merging the subtrees it completes
    /// (BLAKE3's "add_chunk_chaining_value", with pieces for chunks).
    fn push(&mut self, mut cv: ChainingValue) {
        self.pushed += 1;
        let mut total = self.pushed;
        while total & 1 == 0 {
            let Some(left) = self.stack.pop() else { break };
            cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
            total >>= 1;
        }
        self.stack.push(cv);
    }
}

/// The chaining value of a piece that starts at `offset` (a multiple of `PIECE`).
fn subtree_cv(piece: &[u8], offset: u64) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(piece);
    h.finalize_non_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect()
    }

    #[test]
    fn matches_blake3_hash() {
        let pool = HashPool::new(256 * 1024);
        let big = data((9 << 20) + 321);
        let sizes = [
            0,
            1,
            1023,
            1024,
            PIECE - 1,
            PIECE,
            PIECE + 1,
            2 * PIECE,
            3 * PIECE,
            3 * PIECE + 5,
            4 * PIECE,
            7 * PIECE + 99,
            8 * PIECE,
            big.len(),
        ];
        for len in sizes {
            let want = *blake3::hash(&big[..len]).as_bytes();
            for pool in [Some(&pool), None] {
                let mut h = StreamHash::new(len as u64, pool);
                let mut at = 0;
                while at < len {
                    let mut buf = h.buffer();
                    assert_eq!(buf.len(), h.piece_len());
                    let n = buf.len();
                    buf.copy_from_slice(&big[at..at + n]);
                    at += n;
                    drop(h.feed(buf));
                }
                assert_eq!(h.finish(), want, "len {len}, pool {}", pool.is_some());
            }
        }
    }
}
