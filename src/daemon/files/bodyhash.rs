//! The checksum of an upload while it arrives, in the algorithm its frame names: BLAKE3 in
//! parallel subtrees on the hash pool (`streamhash`), or SHA-256, which is sequential, hashed on
//! the pool one piece behind the receiving worker so that hashing overlaps receiving and writing.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::daemon::files::oneshot;
use crate::daemon::files::streamhash::{HashPool, PIECE, StreamHash};
use crate::proto::header::Algo;

/// The hash of a body of known length, fed piece by piece: ask for a `buffer`, fill it, `feed`
/// it, write out what `feed` returns and drop it; `finish` once every byte has been fed.
pub enum BodyHash<'p> {
    Blake3(StreamHash<'p>),
    Sha256(ShaStream<'p>),
}

impl<'p> BodyHash<'p> {
    /// A hash in `algo` for a body of `total` bytes, using `pool` if there is one.
    pub fn new(algo: Algo, total: u64, pool: Option<&'p HashPool>) -> BodyHash<'p> {
        match algo {
            Algo::Blake3 => BodyHash::Blake3(StreamHash::new(total, pool)),
            Algo::Sha256 => BodyHash::Sha256(ShaStream {
                total,
                fed: 0,
                pool,
                state: Some(Box::new(Sha256::new())),
                inflight: None,
                spare: None,
            }),
        }
    }

    /// A buffer for the next piece, exactly as long as it.
    pub fn buffer(&mut self) -> Vec<u8> {
        match self {
            BodyHash::Blake3(h) => h.buffer(),
            BodyHash::Sha256(h) => h.buffer(),
        }
    }

    /// Hands over the next piece, filled; returns it shared, for writing out while it is hashed.
    pub fn feed(&mut self, piece: Vec<u8>) -> Arc<Vec<u8>> {
        match self {
            BodyHash::Blake3(h) => h.feed(piece),
            BodyHash::Sha256(h) => h.feed(piece),
        }
    }

    /// The 32-byte checksum, once every byte has been fed.
    pub fn finish(self) -> [u8; 32] {
        match self {
            BodyHash::Blake3(h) => h.finish(),
            BodyHash::Sha256(h) => h.finish(),
        }
    }
}

/// A piece on the pool: where the state comes back, and the piece's buffer.
type InFlight = (oneshot::Receiver<Box<Sha256>>, Arc<Vec<u8>>);

/// SHA-256 of a body, each piece hashed on the pool while it is written out and the next one
/// is received; at most one piece is in flight, so pieces are hashed in order.
pub struct ShaStream<'p> {
    total: u64,
    fed: u64,
    pool: Option<&'p HashPool>,
    /// The hash state, here when no piece is in flight.
    state: Option<Box<Sha256>>,
    /// The piece being hashed on the pool, and where its state comes back.
    inflight: Option<InFlight>,
    /// A buffer to use again.
    spare: Option<Arc<Vec<u8>>>,
}

impl ShaStream<'_> {
    /// Does not wait for the piece in flight: the next piece is received into another buffer
    /// while it is hashed (two buffers take turns).
    fn buffer(&mut self) -> Vec<u8> {
        let len = (self.total - self.fed).min(PIECE as u64) as usize;
        let mut buf = self
            .spare
            .take()
            .and_then(|b| Arc::try_unwrap(b).ok())
            .unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn feed(&mut self, piece: Vec<u8>) -> Arc<Vec<u8>> {
        self.fed += piece.len() as u64;
        let piece = Arc::new(piece);
        self.settle();
        let mut state = self.state.take().unwrap_or_default();
        let Some(pool) = self.pool.filter(|_| piece.len() >= PIECE) else {
            state.update(&piece[..]);
            self.state = Some(state);
            return piece;
        };
        let (tx, rx) = oneshot::pair();
        let shared = Arc::clone(&piece);
        let job = Box::new(move || {
            state.update(&shared[..]);
            drop(shared);
            tx.send(state);
        });
        match pool.submit_back(job) {
            Ok(()) => self.inflight = Some((rx, Arc::clone(&piece))),
            // The pool is gone (never expected): hash here.
            Err(job) => {
                job();
                self.state = rx.recv();
            }
        }
        piece
    }

    /// Waits for the piece in flight, if any, and takes back the state and its buffer.
    fn settle(&mut self) {
        let Some((rx, buf)) = self.inflight.take() else {
            return;
        };
        // A pool thread always answers; should one die, the state is lost with it, and the
        // checksum cannot match: the upload is refused, never stored unverified.
        self.state = rx.recv();
        if self.state.is_none() {
            self.state = Some(Box::new(Sha256::new_with_prefix(b"lost")));
        }
        self.spare = Some(buf);
    }

    fn finish(mut self) -> [u8; 32] {
        self.settle();
        let state = self.state.take().unwrap_or_default();
        state.finalize().into()
    }
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
    fn matches_one_shot_hashes() {
        let pool = HashPool::start(256 * 1024).unwrap();
        let big = data(5 * PIECE + 77);
        let sizes = [
            0,
            1,
            1023,
            PIECE - 1,
            PIECE,
            PIECE + 1,
            3 * PIECE,
            big.len(),
        ];
        for algo in [Algo::Blake3, Algo::Sha256] {
            for len in sizes {
                let want: [u8; 32] = match algo {
                    Algo::Blake3 => *blake3::hash(&big[..len]).as_bytes(),
                    Algo::Sha256 => Sha256::digest(&big[..len]).into(),
                };
                for pool in [Some(&pool), None] {
                    let mut h = BodyHash::new(algo, len as u64, pool);
                    let mut at = 0;
                    while at < len {
                        let mut buf = h.buffer();
                        let n = buf.len();
                        assert!(n > 0 && n <= PIECE);
                        buf.copy_from_slice(&big[at..at + n]);
                        at += n;
                        drop(h.feed(buf));
                    }
                    assert_eq!(h.finish(), want, "{algo} len {len} pool {}", pool.is_some());
                }
            }
        }
    }
}
