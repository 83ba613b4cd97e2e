//! The connections accepted and not yet ended, each with its live state (`Live`): shutdown
//! reaches every one of them through it (it wakes each worker blocked in `read` by shutting the
//! socket's read side, and, past the grace period, closes what is left), and the control socket
//! lists them, says a line to them and ends one. A connection is listed from its acceptance
//! (queued) to its end; its worker updates the live state with relaxed atomics, once per read or
//! write, never per byte.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::TryLockError;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::peer::Peer;

/// Bytes a control `say` may leave waiting for an echo connection's current line to end.
pub const OUTBOX_BYTES: usize = 4096;

#[derive(Debug, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// In id order, so oldest first: ids grow, and each is pushed under the lock that gave it.
    conns: Vec<Arc<Live>>,
}

/// What a connection is doing, as `ferryd ctl list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Accepted, waiting for a worker.
    Queued,
    /// Served in echo mode (text comes back).
    Echo,
    /// A chat member.
    Chat,
    /// In the middle of a file frame.
    Receiving,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Echo => "echo",
            State::Chat => "chat",
            State::Receiving => "receiving",
        }
    }

    fn from_u8(n: u8) -> State {
        match n {
            1 => State::Echo,
            2 => State::Chat,
            3 => State::Receiving,
            _ => State::Queued,
        }
    }
}

/// The file a connection is receiving: its name (already escaped for showing), its size, and
/// when its body began.
#[derive(Debug, Clone)]
pub struct Upload {
    pub name: String,
    pub size: u64,
    pub started: Instant,
}

/// One listed connection's live state.
#[derive(Debug)]
pub struct Live {
    pub id: u64,
    /// The address it was accepted from: a balancer's, for a connection through one.
    accepted_from: Peer,
    /// The client's address from a PROXY header, once a worker has read it.
    client: OnceLock<Peer>,
    pub since: Instant,
    state: AtomicU8,
    /// The state the connection returns to after a frame (echo or chat).
    base: AtomicU8,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Body bytes of the current upload received so far.
    pub upload_done: AtomicU64,
    upload: Mutex<Option<Upload>>,
    /// The uid of the operator who kicked it, plus one (0: not kicked).
    kicked_by: AtomicU32,
    stream: OnceLock<Arc<TcpStream>>,
    /// Chat mode: the bytes its writer thread has sent.
    chat_out: OnceLock<Arc<AtomicU64>>,
    /// Echo mode: the lock every write to the socket takes, so that a control `say` never lands
    /// inside a line, and what it left to send at the next line boundary.
    wire: Mutex<Wire>,
}

/// The echo stream's position and the operator's lines waiting for the end of a line.
#[derive(Debug, Default)]
struct Wire {
    /// The bytes sent so far end in the middle of a line.
    mid_line: bool,
    outbox: Vec<u8>,
}

/// What became of a line said to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// Written to the socket (or to the kernel's buffer) whole.
    Sent,
    /// Waiting for the client's current line to end, or for room in its socket.
    Queued,
    /// Not taken: the outbox is full or the connection is not served yet.
    Dropped,
    /// Not taken: its worker has been writing to a client that does not read for `LOCK_WAIT`.
    Busy,
}

/// How long the operator's `say` waits for a worker that is writing to let go of the wire.
const LOCK_WAIT: Duration = Duration::from_millis(100);

/// Keeps a connection listed until dropped.
#[must_use = "the connection is unlisted when the registration is dropped"]
#[derive(Debug)]
pub struct Registration {
    inner: Arc<Mutex<Inner>>,
    live: Arc<Live>,
}

impl Registry {
    /// Lists a connection just accepted (queued until `Registration::serve`).
    pub fn register(&self, peer: Peer) -> Registration {
        let mut inner = lock(&self.inner);
        let id = inner.next_id;
        inner.next_id += 1;
        let live = Arc::new(Live {
            id,
            accepted_from: peer,
            client: OnceLock::new(),
            since: Instant::now(),
            state: AtomicU8::new(0),
            base: AtomicU8::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            upload_done: AtomicU64::new(0),
            upload: Mutex::new(None),
            kicked_by: AtomicU32::new(0),
            stream: OnceLock::new(),
            chat_out: OnceLock::new(),
            wire: Mutex::new(Wire::default()),
        });
        inner.conns.push(Arc::clone(&live));
        Registration {
            inner: Arc::clone(&self.inner),
            live,
        }
    }

    /// Connections being served by a worker (queued ones aside).
    pub fn count(&self) -> usize {
        lock(&self.inner)
            .conns
            .iter()
            .filter(|l| l.stream.get().is_some())
            .count()
    }

    /// Every listed connection, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Live>> {
        lock(&self.inner).conns.clone()
    }

    /// Shuts the read side of every served connection: a worker blocked in `read` sees end of
    /// input at once, and can still write its goodbye line.
    pub fn wake_readers(&self) {
        for live in &lock(&self.inner).conns {
            if let Some(stream) = live.stream.get() {
                let _ = stream.shutdown(Shutdown::Read);
            }
        }
    }

    /// Shuts both directions of every served connection, waking workers blocked in `write` too.
    pub fn close_all(&self) {
        for live in &lock(&self.inner).conns {
            if let Some(stream) = live.stream.get() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Registration {
    /// This connection's live state.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// A worker took the connection: it is served in `state` over `stream` from now on.
    pub fn serve(&self, stream: Arc<TcpStream>, state: State) {
        let _ = self.live.stream.set(stream);
        self.live.set_base(state);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = lock(&self.inner);
        if let Ok(at) = inner.conns.binary_search_by_key(&self.live.id, |l| l.id) {
            inner.conns.remove(at);
        }
    }
}

impl Live {
    /// The connection's peer: the client's address from its PROXY header if it came through
    /// a balancer, else the address it was accepted from.
    pub fn peer(&self) -> Peer {
        self.client.get().copied().unwrap_or(self.accepted_from)
    }

    /// Sets the client's address read from the connection's PROXY header (once).
    pub fn set_client(&self, peer: Peer) {
        let _ = self.client.set(peer);
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// The connection's mode (echo or chat), which it shows between frames.
    pub fn set_base(&self, state: State) {
        self.base.store(state as u8, Ordering::Relaxed);
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Chat mode: counts what the member's writer thread sends in its bytes out.
    pub fn count_chat_out(&self, written: Arc<AtomicU64>) {
        let _ = self.chat_out.set(written);
    }

    /// Bytes sent to the client, by its worker and (in chat mode) its writer.
    pub fn sent(&self) -> u64 {
        let chat = self.chat_out.get().map_or(0, |w| w.load(Ordering::Relaxed));
        self.bytes_out.load(Ordering::Relaxed) + chat
    }

    pub fn add_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// A frame's body begins: `name` (escaped) of `size` bytes.
    pub fn begin_upload(&self, name: String, size: u64) {
        *lock(&self.upload) = Some(Upload {
            name,
            size,
            started: Instant::now(),
        });
        self.upload_done.store(0, Ordering::Relaxed);
        self.state.store(State::Receiving as u8, Ordering::Relaxed);
    }

    pub fn add_upload(&self, n: u64) {
        self.upload_done.fetch_add(n, Ordering::Relaxed);
    }

    /// The frame is over: back to the connection's mode.
    pub fn end_upload(&self) {
        *lock(&self.upload) = None;
        self.state
            .store(self.base.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The file being received, if any, and its bytes so far.
    pub fn upload(&self) -> Option<(Upload, u64)> {
        let up = lock(&self.upload).clone()?;
        Some((up, self.upload_done.load(Ordering::Relaxed)))
    }

    /// Ends the connection for the operator `uid`: marks it and wakes its worker, which tells
    /// the client and logs who did it. False when it is not served yet (queued).
    pub fn kick(&self, uid: u32) -> bool {
        let Some(stream) = self.stream.get() else {
            return false;
        };
        // A connection from a balancer that a worker put back in the queue after reading its
        // PROXY header (its stream is set) waits like any other queued one.
        if self.state() == State::Queued {
            return false;
        }
        self.kicked_by
            .store(uid.saturating_add(1), Ordering::SeqCst);
        let _ = stream.shutdown(Shutdown::Read);
        true
    }

    /// The uid of the operator who kicked this connection, if one did.
    pub fn kicked_by(&self) -> Option<u32> {
        match self.kicked_by.load(Ordering::SeqCst) {
            0 => None,
            n => Some(n - 1),
        }
    }

    /// Echo mode: writes `data` (echoed text or a line of the server's) under the wire lock, with
    /// the operator's waiting lines sent at the line boundaries before and after it.
    pub fn write_echo(&self, stream: &TcpStream, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut wire = lock(&self.wire);
        let mut out = stream;
        if !wire.mid_line && !wire.outbox.is_empty() {
            let waiting = std::mem::take(&mut wire.outbox);
            out.write_all(&waiting)?;
            self.add_out(waiting.len() as u64);
        }
        out.write_all(data)?;
        if let Some(&last) = data.last() {
            wire.mid_line = last != b'\n';
        }
        if !wire.mid_line && !wire.outbox.is_empty() {
            let waiting = std::mem::take(&mut wire.outbox);
            out.write_all(&waiting)?;
            self.add_out(waiting.len() as u64);
        }
        Ok(())
    }

    /// The operator's `line` (whole, newline-terminated) to an echo connection: sent now without
    /// blocking if the client is between lines, else kept (up to `OUTBOX_BYTES`) for the worker
    /// to send when the current line ends. Waits at most `LOCK_WAIT` for a worker that holds
    /// the wire (it is writing to a client that does not read), then gives up (`Busy`).
    pub fn say_echo(&self, line: &[u8]) -> Said {
        let Some(stream) = self.stream.get() else {
            return Said::Dropped;
        };
        let Some(mut wire) = self.try_wire() else {
            return Said::Busy;
        };
        if wire.mid_line || !wire.outbox.is_empty() {
            if wire.outbox.len() + line.len() > OUTBOX_BYTES {
                return Said::Dropped;
            }
            wire.outbox.extend_from_slice(line);
            return Said::Queued;
        }
        // Without waiting: a client that does not read cannot hold the control thread.
        match rustix::net::send(stream.as_fd(), line, rustix::net::SendFlags::DONTWAIT) {
            Ok(n) if n == line.len() => {
                self.add_out(n as u64);
                Said::Sent
            }
            Ok(n) => {
                // The rest goes first when the worker next writes: nothing else enters the line.
                self.add_out(n as u64);
                wire.outbox.extend_from_slice(&line[n..]);
                Said::Queued
            }
            Err(_) => {
                wire.outbox.extend_from_slice(line);
                Said::Queued
            }
        }
    }
}

impl Live {
    /// The wire lock, waiting at most `LOCK_WAIT` for a worker blocked in a write.
    fn try_wire(&self) -> Option<MutexGuard<'_, Wire>> {
        let give_up = Instant::now() + LOCK_WAIT;
        loop {
            match self.wire.try_lock() {
                Ok(guard) => return Some(guard),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() >= give_up => return None,
                Err(TryLockError::WouldBlock) => thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single insert, remove, swap or iteration (or a write whose
    // failure ends the connection): the data stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};

    use super::*;

    #[test]
    fn a_connection_is_kicked_only_while_served() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (stream, _) = l.accept().unwrap();
        let registry = Registry::default();
        let peer = Peer::new(SocketAddr::from(([192, 0, 2, 1], 1000)));
        let listed = registry.register(peer);
        let live = Arc::clone(listed.live());
        // Queued: no worker has it yet.
        assert!(!live.kick(0));
        // A worker reads from it (a PROXY header) and puts it back in the queue: still queued.
        listed.serve(Arc::new(stream), State::Echo);
        live.set_base(State::Queued);
        assert!(!live.kick(0));
        assert_eq!(live.kicked_by(), None);
        // Served again.
        live.set_base(State::Echo);
        assert!(live.kick(7));
        assert_eq!(live.kicked_by(), Some(7));
    }
}
