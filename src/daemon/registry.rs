//! The connections being served now, so that shutdown can reach every one of them: it wakes each
//! worker blocked in `read` by shutting the socket's read side, and, past the grace period, closes
//! what is left.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, Arc<TcpStream>>,
}

/// Keeps a connection listed until dropped.
#[must_use = "the connection is unlisted when the registration is dropped"]
pub struct Registration<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Registry {
    pub fn register(&self, stream: Arc<TcpStream>) -> Registration<'_> {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.conns.insert(id, stream);
        Registration { registry: self, id }
    }

    pub fn count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Shuts the read side of every listed connection: a worker blocked in `read` sees end of
    /// input at once, and can still write its goodbye line.
    pub fn wake_readers(&self) {
        for stream in self.lock().conns.values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
    }

    /// Shuts both directions of every listed connection, waking workers blocked in `write` too.
    pub fn close_all(&self) {
        for stream in self.lock().conns.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked: every critical section is a single
        // insert, remove or iteration.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().conns.remove(&self.id);
    }
}
