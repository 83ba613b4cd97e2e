//! Who holds each partial body in this process: the holding upload's connection and when a byte
//! last came from it, so that a resumable frame that finds its partial held by a connection gone
//! quiet (a link dropped without a FIN) ends that connection and takes the partial over.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A holder silent this long is taken for gone when another upload asks for its partial: a
/// sender that is still there writes far more often (its socket buffer drains in milliseconds),
/// and the new upload exists because the sender gave up on the old connection.
pub const QUIET: Duration = Duration::from_secs(1);

/// When a connection last delivered body bytes; updated by the reading side, read by others.
#[derive(Debug)]
pub struct Heard {
    base: Instant,
    /// Milliseconds from `base`.
    at_ms: AtomicU64,
}

impl Heard {
    pub fn now() -> Arc<Heard> {
        Arc::new(Heard {
            base: Instant::now(),
            at_ms: AtomicU64::new(0),
        })
    }

    /// Bytes came just now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since bytes last came.
    pub fn quiet_for(&self) -> Duration {
        let at = Duration::from_millis(self.at_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(at)
    }
}

/// An upload that may hold a partial: its connection and its peer (for the log).
#[derive(Debug, Clone)]
pub struct Holder {
    pub stream: Arc<TcpStream>,
    pub peer: String,
    pub heard: Arc<Heard>,
}

/// The partials held in this process, by file name. Shared by the stores a reload makes.
#[derive(Debug, Default)]
pub struct Holders {
    held: Mutex<HashMap<String, Holder>>,
}

/// Keeps a partial listed as held until dropped.
#[must_use = "the partial is unlisted when the guard is dropped"]
#[derive(Debug)]
pub struct Held {
    holders: Arc<Holders>,
    file_name: String,
}

/// What `take_over_if_quiet` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// The holder was silent this long: its connection has been ended.
    Ended { peer: String, quiet: Duration },
    /// The holder is still sending (or is not in this process): leave it.
    Alive,
}

impl Holders {
    /// Lists `file_name` as held by `holder` until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, file_name: &str, holder: Holder) -> Held {
        self.lock().insert(file_name.to_string(), holder);
        Held {
            holders: Arc::clone(self),
            file_name: file_name.to_string(),
        }
    }

    /// Ends the connection holding `file_name` if it has been silent for `QUIET` or longer: its
    /// worker's read ends at once, it keeps what it wrote for a resume and lets the lock go.
    pub fn take_over_if_quiet(&self, file_name: &str) -> TakeOver {
        let mut held = self.lock();
        let Some(holder) = held.get(file_name) else {
            return TakeOver::Alive;
        };
        let quiet = holder.heard.quiet_for();
        if quiet < QUIET {
            return TakeOver::Alive;
        }
        let _ = holder.stream.shutdown(Shutdown::Both);
        let peer = holder.peer.clone();
        // Ended once: the guard's drop would remove it anyway, but a second newcomer must not
        // log a second ending.
        held.remove(file_name);
        TakeOver::Ended { peer, quiet }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Holder>> {
        // Every critical section is one insert, lookup or remove: the map stays consistent.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.holders.lock().remove(&self.file_name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn a_quiet_holder_is_ended_and_a_live_one_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let stream = Arc::new(server);
        let holders = Arc::new(Holders::default());
        let heard = Heard::now();
        heard.touch();
        let holder = Holder {
            stream: Arc::clone(&stream),
            peer: "[127.0.0.1]:1".into(),
            heard: Arc::clone(&heard),
        };
        let guard = holders.hold("p", holder);
        assert_eq!(holders.take_over_if_quiet("p"), TakeOver::Alive);
        assert_eq!(holders.take_over_if_quiet("other"), TakeOver::Alive);
        // Quiet since the start: back-date the last byte by moving the base.
        let old = Arc::new(Heard {
            base: Instant::now() - QUIET * 2,
            at_ms: AtomicU64::new(0),
        });
        drop(guard);
        let _guard = holders.hold(
            "p",
            Holder {
                stream: Arc::clone(&stream),
                peer: "[127.0.0.1]:1".into(),
                heard: old,
            },
        );
        match holders.take_over_if_quiet("p") {
            TakeOver::Ended { peer, quiet } => {
                assert_eq!(peer, "[127.0.0.1]:1");
                assert!(quiet >= QUIET * 2);
            }
            other => panic!("expected the holder ended, got {other:?}"),
        }
        // Its read side is shut: a read ends at once.
        let mut buf = [0u8; 1];
        assert_eq!((&*stream).read(&mut buf).unwrap(), 0);
        assert_eq!(holders.take_over_if_quiet("p"), TakeOver::Alive);
    }
}
