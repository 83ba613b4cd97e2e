//! Chat mode's room: who is connected, and delivery of lines and notices to everyone else through
//! each member's bounded outbound queue. A member whose queue is full is dropped on the spot
//! (its socket shut, the others told), so one client that stops reading never slows the rest.
//!
//! Every delivery happens under the room's lock with non-blocking `try_send`s only, so all
//! members see all messages in one order, and each sender's lines in the order it sent them.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::peer::Peer;

/// A message on its way to members: the bytes of one or more whole lines, shared by all queues.
pub type Msg = Arc<[u8]>;

/// How many names the welcome line lists before it only counts.
const WELCOME_NAMES: usize = 20;
/// A writer sends queued messages in batches of up to this many bytes per `write`.
const BATCH: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Room {
    members: Mutex<Members>,
}

#[derive(Debug, Default)]
struct Members {
    next_id: u64,
    by_id: HashMap<u64, Member>,
}

#[derive(Debug)]
struct Member {
    peer: Peer,
    tx: Sender<Msg>,
    stream: Arc<TcpStream>,
    dropped: Arc<AtomicBool>,
}

/// A member's own view of its membership, and the membership itself: dropping the seat leaves
/// the room (on every path, a panic included), telling the others why.
#[derive(Debug)]
pub struct Seat<'r> {
    room: &'r Room,
    pub id: u64,
    pub tx: Sender<Msg>,
    /// Set when the room dropped this member for not reading.
    pub dropped: Arc<AtomicBool>,
}

impl Seat<'_> {
    /// Leaves the room, telling the others `reason`.
    pub fn leave_with(self, reason: &str) {
        self.room.leave(self.id, reason);
        // The drop below finds the member gone and does nothing more.
    }
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The handler failed: wake this member's writer, which may be blocked on a full
            // socket, so that the worker is not held until the write timeout.
            if let Some(stream) = self.room.stream_of(self.id) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        self.room.leave(self.id, "server error");
    }
}

impl Room {
    /// Adds a member with an outbound queue of `depth` messages. The newcomer's queue starts with
    /// a welcome that lists who is there; everyone else is told it joined.
    pub fn join(
        &self,
        peer: Peer,
        stream: Arc<TcpStream>,
        depth: usize,
    ) -> (Seat<'_>, Receiver<Msg>) {
        let (tx, rx) = crossbeam_channel::bounded(depth.max(1));
        let mut m = self.lock();
        let mut names: Vec<String> = m.by_id.values().map(|o| o.peer.to_string()).collect();
        names.sort();
        let welcome = match names.len() {
            0 => format!("* welcome {peer}; nobody else is here\n"),
            n if n <= WELCOME_NAMES => format!("* welcome {peer}; here: {}\n", names.join(", ")),
            n => format!(
                "* welcome {peer}; here: {} and {} more\n",
                names[..WELCOME_NAMES].join(", "),
                n - WELCOME_NAMES
            ),
        };
        // The queue is new and has room for at least one message.
        let _ = tx.try_send(msg(welcome.as_bytes()));
        deliver(&mut m, None, msg(format!("* {peer} joined\n").as_bytes()));
        let id = m.next_id;
        m.next_id += 1;
        let dropped = Arc::new(AtomicBool::new(false));
        m.by_id.insert(
            id,
            Member {
                peer,
                tx: tx.clone(),
                stream,
                dropped: Arc::clone(&dropped),
            },
        );
        (
            Seat {
                room: self,
                id,
                tx,
                dropped,
            },
            rx,
        )
    }

    /// Delivers `text` (whole lines) to every member but `from`.
    pub fn broadcast(&self, from: u64, text: &[u8]) {
        deliver(&mut self.lock(), Some(from), msg(text));
    }

    /// Removes a member and tells the others why it left. Does nothing if the room already
    /// dropped it.
    pub fn leave(&self, id: u64, reason: &str) {
        let mut m = self.lock();
        if let Some(member) = m.by_id.remove(&id) {
            let notice = format!("* {} left ({reason})\n", member.peer);
            deliver(&mut m, None, msg(notice.as_bytes()));
        }
    }

    fn stream_of(&self, id: u64) -> Option<Arc<TcpStream>> {
        self.lock().by_id.get(&id).map(|m| Arc::clone(&m.stream))
    }

    fn lock(&self) -> MutexGuard<'_, Members> {
        // Every critical section leaves the map consistent, even if a holder panicked.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn msg(bytes: &[u8]) -> Msg {
    Arc::from(bytes)
}

/// Puts `message` in every member's queue except `except`'s. Members whose queue is full are
/// dropped, and the others told, until no queue overflows.
fn deliver(m: &mut Members, except: Option<u64>, message: Msg) {
    let mut pending = vec![(except, message)];
    while let Some((except, message)) = pending.pop() {
        let mut full = Vec::new();
        for (&id, member) in &m.by_id {
            if Some(id) == except {
                continue;
            }
            match member.tx.try_send(Arc::clone(&message)) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => full.push(id),
            }
        }
        for id in full {
            if let Some(member) = m.by_id.remove(&id) {
                member.dropped.store(true, Ordering::SeqCst);
                // Wakes both of its threads: the writer blocked on a full socket, the reader.
                let _ = member.stream.shutdown(Shutdown::Both);
                log::warn!(
                    "{} dropped from the chat: not reading, its outbound queue of {} messages is full (server.chat_queue_depth)",
                    member.peer,
                    member.tx.capacity().unwrap_or(0)
                );
                let notice = format!("* {} left (too slow: not reading)\n", member.peer);
                pending.push((None, msg(notice.as_bytes())));
            }
        }
    }
}

/// A chat member's writer: sends what its queue receives, several messages per `write` when they
/// pile up, until the queue is closed (the member left) or the socket fails. Returns the bytes
/// written.
pub fn write_queue(stream: &TcpStream, rx: &Receiver<Msg>, written: &AtomicU64) {
    let mut batch = Vec::new();
    let mut out = stream;
    while let Ok(first) = rx.recv() {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.extend_from_slice(&m),
                Err(_) => break,
            }
        }
        if out.write_all(&batch).is_err() {
            // The reader sees the shut socket and ends the connection.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        written.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
}
