//! Making room when every worker is busy and a newcomer waits: the served connections that may
//! be asked to leave, and the choice of one. A connection is a candidate while its worker waits
//! on the peer in text (for its next line, or for it to take what was written), never in the
//! middle of a file frame. The one chosen comes from the address holding the most workers, and
//! of those it is the one waiting longest. It is woken by shutting its socket's read side (or
//! both sides, if it is stuck writing to a peer that does not read) and tells its peer why.
//!
//! A connection's state is one atomic word that its worker updates without a lock; the map of
//! connections is locked only to enter, to leave and to choose.

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustix::net::RecvFlags;

use crate::daemon::access::addrgroup;

/// In a file frame, or otherwise not to be disturbed.
const BUSY: u64 = 0;
/// Chosen to make room: its worker ends it at its next read.
const EVICTED: u64 = u64::MAX;
/// The low bit of a waiting state: set when the worker waits to write, clear when it waits to
/// read. The other bits hold when the wait began, in ms since the board's epoch, plus one.
const WRITING: u64 = 1;

/// The served connections, for choosing one to evict.
#[derive(Debug)]
pub struct Board {
    epoch: Instant,
    inner: Mutex<Inner>,
    /// Connections chosen and not yet gone.
    evicting: AtomicUsize,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// In id order: ids grow, and each is pushed under the lock that gave it.
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    ip: IpAddr,
    stream: Arc<TcpStream>,
    state: Arc<AtomicU64>,
}

/// One connection's place on the board; leaving it (drop) takes the connection off.
#[must_use = "the connection leaves the board when its place is dropped"]
#[derive(Debug)]
pub struct Place<'a> {
    board: &'a Board,
    id: u64,
    state: Arc<AtomicU64>,
}

/// Whom `evict_one` chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub ip: IpAddr,
    /// Its worker was waiting to write to a peer that does not read.
    pub writing: bool,
}

impl Default for Board {
    fn default() -> Board {
        Board {
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
            evicting: AtomicUsize::new(0),
        }
    }
}

impl Board {
    /// Puts a served connection on the board, busy until its worker says it waits.
    pub fn enter(&self, ip: IpAddr, stream: Arc<TcpStream>) -> Place<'_> {
        let state = Arc::new(AtomicU64::new(BUSY));
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.push(Entry {
            id,
            // The heaviest address is the heaviest group (an IPv6 peer's /64 by default).
            ip: addrgroup::of(ip),
            stream,
            state: Arc::clone(&state),
        });
        Place {
            board: self,
            id,
            state,
        }
    }

    /// Connections chosen to make room that have not left yet.
    pub fn evicting(&self) -> usize {
        self.evicting.load(Ordering::SeqCst)
    }

    /// Chooses a connection whose peer has kept it waiting `min_wait` or longer: from the
    /// address holding the most connections, the one waiting longest. Marks it evicted and wakes
    /// its worker. `None` if no connection has waited that long.
    pub fn evict_one(&self, min_wait: Duration) -> Option<Evicted> {
        let latest = Instant::now()
            .checked_sub(min_wait)
            .map_or(0, |t| self.since(t));
        let inner = self.lock();
        // Workers held per address, not counting those already leaving. (u64 counts: the same
        // map type as the refusal log's, one copy of the hash table code for both.)
        let mut held: HashMap<IpAddr, u64> = HashMap::new();
        for e in &inner.entries {
            if e.state.load(Ordering::SeqCst) != EVICTED {
                *held.entry(e.ip).or_insert(0) += 1;
            }
        }
        // A worker may change its state between the look and the mark: try again then.
        for _ in 0..4 {
            let chosen = inner
                .entries
                .iter()
                .filter_map(|e| {
                    let s = e.state.load(Ordering::SeqCst);
                    let waited = s != BUSY && s != EVICTED && s >> 1 <= latest;
                    // Unread bytes matter only to a worker waiting to read: one stuck writing
                    // to a peer that does not read has them piling up behind it.
                    let reading = s & WRITING == 0;
                    (waited && !(reading && has_unread(&e.stream))).then_some((e, s))
                })
                .max_by_key(|(e, s)| (held.get(&e.ip).copied().unwrap_or(0), u64::MAX - (s >> 1)));
            let (entry, seen) = chosen?;
            if entry
                .state
                .compare_exchange(seen, EVICTED, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            self.evicting.fetch_add(1, Ordering::SeqCst);
            let writing = seen & WRITING != 0;
            // A worker blocked in a read sees the end of the stream at once and can still say
            // why; one blocked writing to a peer that does not read is woken by shutting both.
            let how = if writing {
                Shutdown::Both
            } else {
                Shutdown::Read
            };
            let _ = entry.stream.shutdown(how);
            return Some(Evicted {
                ip: entry.ip,
                writing,
            });
        }
        None
    }

    fn since(&self, t: Instant) -> u64 {
        let ms = t.saturating_duration_since(self.epoch).as_millis();
        u64::try_from(ms)
            .unwrap_or(u64::MAX >> 2)
            .min(u64::MAX >> 2)
            + 1
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is one insert, remove or scan: the map stays consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether the peer's bytes wait in the socket for a worker waiting to read: then it is not the
/// peer that keeps the connection waiting but the worker (a loaded machine), and the bytes may
/// begin a file frame, which is never cut.
fn has_unread(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let flags = RecvFlags::PEEK | RecvFlags::DONTWAIT;
    matches!(rustix::net::recv(stream, &mut byte, flags), Ok((n, _)) if n > 0)
}

impl Place<'_> {
    /// The worker waits for the peer's next line, which it has been doing since `since` (the
    /// end of its last line or frame, or the connection's start).
    pub fn reading_since(&self, since: Instant) {
        self.set((self.board.since(since) << 1) & !WRITING);
    }

    /// The worker is about to write to the peer: if the peer does not take it, the connection
    /// may be chosen (its wait counts from now). False if it was chosen already: it must end.
    pub fn writing(&self) -> bool {
        self.set((self.board.since(Instant::now()) << 1) | WRITING)
    }

    /// The worker is in the middle of something that must not be cut (a file frame). False if
    /// the connection was chosen already: it must end.
    pub fn busy(&self) -> bool {
        self.set(BUSY)
    }

    /// Whether the worker said it is in the middle of something not to be cut.
    pub fn is_busy(&self) -> bool {
        self.state.load(Ordering::SeqCst) == BUSY
    }

    pub fn is_evicted(&self) -> bool {
        self.state.load(Ordering::SeqCst) == EVICTED
    }

    /// Sets the state unless the connection was chosen; false if it was.
    fn set(&self, new: u64) -> bool {
        self.state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s != EVICTED).then_some(new)
            })
            .is_ok()
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut inner = self.board.lock();
        if let Ok(at) = inner.entries.binary_search_by_key(&self.id, |e| e.id) {
            inner.entries.remove(at);
        }
        drop(inner);
        if self.is_evicted() {
            self.board.evicting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A connected pair on loopback: (the server's end, the client's end).
    fn pair(l: &TcpListener) -> (Arc<TcpStream>, TcpStream) {
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (Arc::new(server), client)
    }

    /// A board whose epoch lies a minute back, so that waits can start in the past.
    fn board() -> Board {
        let epoch = Instant::now()
            .checked_sub(Duration::from_secs(60))
            .expect("the clock started over a minute ago");
        Board {
            epoch,
            ..Board::default()
        }
    }

    #[test]
    fn unread_bytes_keep_a_reader_but_not_a_stuck_writer() {
        use std::io::Write;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let board = board();
        let t0 = board.epoch + Duration::from_secs(10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // Waiting to read, but its peer's bytes have come (the worker has not had a CPU yet):
        // it is not the peer that keeps it waiting.
        let (s, mut reader_peer) = pair(&l);
        let reader = board.enter(a, s);
        reader.reading_since(t0);
        reader_peer.write_all(b"a frame's first bytes").unwrap();
        // Stuck writing to a peer that does not read, while that peer's bytes pile up.
        let (s, mut writer_peer) = pair(&l);
        let writer = board.enter(a, s);
        writer.set(((board.since(t0) + 1) << 1) | WRITING);
        writer_peer.write_all(b"more and more").unwrap();
        let arrived = (0..500).any(|_| {
            let both = has_unread(&board.lock().entries[0].stream)
                && has_unread(&board.lock().entries[1].stream);
            both || {
                std::thread::sleep(Duration::from_millis(10));
                false
            }
        });
        assert!(arrived, "the bytes never reached the server's sockets");
        assert_eq!(
            board.evict_one(Duration::ZERO),
            Some(Evicted {
                ip: a,
                writing: true
            })
        );
        assert!(writer.is_evicted() && !reader.is_evicted());
        assert_eq!(
            board.evict_one(Duration::ZERO),
            None,
            "the reader has bytes to read"
        );
    }

    #[test]
    fn the_heaviest_address_and_then_the_longest_wait_go_first() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let board = board();
        let t0 = board.epoch + Duration::from_secs(10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut keep = Vec::new();
        // b: one connection waiting since t0 (the longest); a: three, waiting since t0 + 1..3 s,
        // and one busy in a frame.
        let (s, c) = pair(&l);
        let pb = board.enter(b, s);
        pb.reading_since(t0);
        keep.push(c);
        let mut places = Vec::new();
        for i in 1..=3u64 {
            let (s, c) = pair(&l);
            let p = board.enter(a, s);
            p.reading_since(t0 + Duration::from_secs(i));
            places.push(p);
            keep.push(c);
        }
        let (s, c) = pair(&l);
        let busy = board.enter(a, s);
        keep.push(c);
        assert_eq!(
            board.evict_one(Duration::ZERO),
            Some(Evicted {
                ip: a,
                writing: false
            })
        );
        assert!(places[0].is_evicted(), "a's longest wait goes first");
        assert!(!places[1].is_evicted() && !pb.is_evicted());
        assert!(!places[0].busy(), "an evicted place cannot become busy");
        assert!(busy.busy());
        assert_eq!(board.evicting(), 1);
        drop(places.remove(0));
        assert_eq!(board.evicting(), 0);
        // a holds three (two waiting, one busy), b one: a again, its longest wait.
        board.evict_one(Duration::ZERO);
        assert!(places[0].is_evicted() && !places[1].is_evicted());
        // a still holds two (the evicted one is leaving): a again.
        board.evict_one(Duration::ZERO);
        assert!(places[1].is_evicted() && !pb.is_evicted());
        // a holds only its busy one, b one: b, the only one waiting.
        board.evict_one(Duration::ZERO);
        assert!(pb.is_evicted());
        assert_eq!(
            board.evict_one(Duration::ZERO),
            None,
            "only the busy one is left"
        );
    }

    #[test]
    fn a_short_wait_is_not_cut() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let board = board();
        let (s, _c) = pair(&l);
        let p = board.enter("10.0.0.1".parse().unwrap(), s);
        p.reading_since(Instant::now());
        assert_eq!(board.evict_one(Duration::from_secs(1)), None);
        p.reading_since(Instant::now() - Duration::from_secs(2));
        assert!(board.evict_one(Duration::from_secs(1)).is_some());
    }

    #[test]
    fn a_writer_is_woken_by_shutting_both_sides() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let board = board();
        let (s, _c) = pair(&l);
        let p = board.enter("10.0.0.1".parse().unwrap(), Arc::clone(&s));
        p.writing();
        let e = board.evict_one(Duration::ZERO).unwrap();
        assert!(e.writing && p.is_evicted());
        let mut w: &TcpStream = &s;
        assert!(std::io::Write::write_all(&mut w, b"x").is_err());
    }
}
