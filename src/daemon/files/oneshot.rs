//! One value handed from a hashing job back to the upload that submitted it: a mutex-guarded slot
//! and a condition variable. A `crossbeam-channel` per value type carried the code of all three
//! of its channel flavors for each (about 4 KiB; issue 24); this carries one value, once.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// The sending half: `send` fills the slot; dropped unsent, it tells the receiver none comes.
pub struct Sender<T>(Arc<Slot<T>>);

/// The receiving half.
pub struct Receiver<T>(Arc<Slot<T>>);

struct Slot<T> {
    /// The value once sent, and whether the sender is gone.
    state: Mutex<(Option<T>, bool)>,
    ready: Condvar,
}

/// A connected pair.
pub fn pair<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new((None, false)),
        ready: Condvar::new(),
    });
    (Sender(Arc::clone(&slot)), Receiver(slot))
}

impl<T> Sender<T> {
    /// Hands `value` over (the receiver may be gone: then it is dropped).
    pub fn send(self, value: T) {
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 = Some(value);
        // Dropping `self` after the lock is released marks the sender gone and wakes the receiver.
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.1 = true;
        drop(state);
        self.0.ready.notify_one();
    }
}

impl<T> Receiver<T> {
    /// Waits for the value; `None` if the sender was dropped without sending one.
    pub fn recv(self) -> Option<T> {
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(value) = state.0.take() {
                return Some(value);
            }
            if state.1 {
                return None;
            }
            state = self
                .0
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_arrives_and_a_dropped_sender_says_none_comes() {
        let (tx, rx) = pair();
        let t = std::thread::spawn(move || tx.send(7u32));
        assert_eq!(rx.recv(), Some(7));
        t.join().unwrap();

        let (tx, rx) = pair::<u32>();
        let t = std::thread::spawn(move || drop(tx));
        assert_eq!(rx.recv(), None);
        t.join().unwrap();

        // Sent before anyone waits, and sent to a receiver already gone.
        let (tx, rx) = pair();
        tx.send("early");
        assert_eq!(rx.recv(), Some("early"));
        let (tx, rx) = pair();
        drop(rx);
        tx.send(1u8);
    }
}
