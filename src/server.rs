//! The TCP server: one accept thread, a bounded crossbeam work queue and a fixed pool of worker
//! threads, plus the shutdown sequence that ends them all.
//!
//! The accept thread never blocks on the workers: it `try_send`s each connection into the queue
//! and, when the queue is full, answers `ERR busy` itself and closes. The thread count is
//! therefore `max_connections` workers plus a constant, whatever the load.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::Config;
use crate::conn;
use crate::listener::{self, BindError};
use crate::peer::Peer;
use crate::registry::Registry;
use crate::stats::Stats;
use crate::store::{Store, StoreError};

/// The line a client is sent when the daemon stops.
pub const ERR_SHUTDOWN: &[u8] = b"ERR server shutting down\n";
/// The line a client is sent when every worker is busy and the queue is full.
pub const ERR_BUSY: &[u8] = b"ERR busy\n";

/// Smallest worker stack in a debug build, in KiB.
const DEBUG_MIN_STACK_KIB: usize = 64;
/// How long the accept loop waits after a failed `accept` before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// State shared by the accept thread, the workers and the signal handler.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub stats: Stats,
    pub conns: Registry,
    pub store: Store,
    stopping: AtomicBool,
}

impl Shared {
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// An accepted connection waiting for a worker.
pub struct Job {
    pub stream: TcpStream,
    pub peer: Peer,
}

/// Errors that keep the server from starting.
#[derive(Debug)]
pub enum ServerError {
    Bind(BindError),
    /// The upload directory cannot be used.
    Store(StoreError),
    /// A worker thread could not be started (usually a process or memory limit).
    Spawn {
        index: usize,
        total: usize,
        err: io::Error,
    },
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Bind(e) => write!(f, "{e}"),
            ServerError::Store(e) => write!(f, "files.dir: {e}"),
            ServerError::Spawn { index, total, err } => write!(
                f,
                "cannot start worker thread {index} of {total}: {err} (lower server.max_connections or raise the process/thread limits)"
            ),
        }
    }
}

impl std::error::Error for ServerError {}

/// A bound server, ready to run.
pub struct Server {
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    local_addr: SocketAddr,
}

/// A cheap handle that can stop a running server from another thread (the signal handler).
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
}

impl Server {
    /// Opens the upload directory and binds the listening socket. Nothing is served until `run`.
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let opened = Store::open(&config.files).map_err(ServerError::Store)?;
        for name in &opened.stale_removed {
            log::warn!(
                "removed stale partial upload {}/{name} (left by an earlier crash or kill)",
                config.files.dir.display()
            );
        }
        log::info!(
            "storing uploads in {} (on_conflict {}, max {} B per file)",
            opened.store.dir().display(),
            config.files.on_conflict.as_str(),
            config.files.max_file_size
        );
        let addr = SocketAddr::new(config.server.bind, config.server.port);
        let listener =
            listener::bind_tcp(addr, config.server.backlog).map_err(ServerError::Bind)?;
        let local_addr = listener.local_addr().unwrap_or(addr);
        Ok(Server {
            shared: Arc::new(Shared {
                config,
                stats: Stats::default(),
                conns: Registry::default(),
                store: opened.store,
                stopping: AtomicBool::new(false),
            }),
            listener: Arc::new(listener),
            local_addr,
        })
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shared: Arc::clone(&self.shared),
            listener: Arc::clone(&self.listener),
        }
    }

    /// Serves until a `StopHandle` stops the server, then closes every connection and waits up to
    /// `shutdown_grace_secs` for the workers.
    pub fn run(self) -> Result<(), ServerError> {
        let cfg = &self.shared.config.server;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.queue_depth);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<()>();
        let n_workers = cfg.max_connections;
        // Unoptimised code has much larger stack frames; a debug build must not overflow where a
        // release build does not.
        let stack_kib = if cfg!(debug_assertions) {
            cfg.thread_stack_kib.max(DEBUG_MIN_STACK_KIB)
        } else {
            cfg.thread_stack_kib
        };
        for index in 0..n_workers {
            let (shared, rx, done) = (Arc::clone(&self.shared), rx.clone(), done_tx.clone());
            thread::Builder::new()
                .name(format!("worker-{index}"))
                .stack_size(stack_kib * 1024)
                .spawn(move || worker(&shared, &rx, &done))
                .map_err(|err| {
                    // Workers already started end when the queue's sender is dropped below.
                    ServerError::Spawn {
                        index: index + 1,
                        total: n_workers,
                        err,
                    }
                })?;
        }
        drop(done_tx);
        log::info!(
            "listening on {} (mode {}, {} workers, queue {}, idle timeout {} s)",
            self.local_addr,
            cfg.mode.as_str(),
            n_workers,
            cfg.queue_depth,
            cfg.idle_timeout.as_secs()
        );

        self.accept_loop(&tx);

        // Stopping: no new connections; tell the queued ones and let the workers finish theirs.
        drop(tx);
        while let Ok(job) = rx.try_recv() {
            Stats::sub(&self.shared.stats.queued, 1);
            refuse(&job.stream, ERR_SHUTDOWN);
        }
        drop(rx);
        let grace = cfg.shutdown_grace;
        let mut finished = wait_for(&done_rx, n_workers, Instant::now() + grace);
        if finished < n_workers {
            log::warn!(
                "{} connection(s) still open after the {} s grace period; closing them",
                n_workers - finished,
                grace.as_secs()
            );
            self.shared.conns.close_all();
            finished += wait_for(
                &done_rx,
                n_workers - finished,
                Instant::now() + Duration::from_millis(500),
            );
        }
        log::info!(
            "stopped: {}; {finished} of {n_workers} workers joined",
            self.shared.stats.summary()
        );
        Ok(())
    }

    fn accept_loop(&self, tx: &Sender<Job>) {
        let shared = &self.shared;
        loop {
            let accepted = self.listener.accept();
            if shared.is_stopping() {
                if let Ok((stream, _)) = accepted {
                    refuse(&stream, ERR_SHUTDOWN);
                }
                return;
            }
            let (stream, addr) = match accepted {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Typically EMFILE/ENFILE (out of descriptors) or ECONNABORTED: the loop must
                    // survive all of them.
                    log::warn!(
                        "accept failed: {e}; retrying in {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            Stats::add(&shared.stats.accepted, 1);
            Stats::add(&shared.stats.queued, 1);
            let peer = Peer::new(addr);
            match tx.try_send(Job { stream, peer }) {
                Ok(()) => {}
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                    Stats::sub(&shared.stats.queued, 1);
                    Stats::add(&shared.stats.refused_busy, 1);
                    refuse(&job.stream, ERR_BUSY);
                    let cfg = &shared.config.server;
                    log::warn!(
                        "{peer} refused: busy ({} connections served, the limit of server.max_connections, and {} waiting, the limit of server.queue_depth)",
                        cfg.max_connections,
                        cfg.queue_depth
                    );
                }
            }
        }
    }
}

impl StopHandle {
    /// Begins the shutdown: stops accepting at once and wakes every worker blocked in `read`.
    /// Returns false if a shutdown had already begun.
    pub fn stop(&self) -> bool {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return false;
        }
        log::info!(
            "shutting down: closing {} connection(s)",
            self.shared.conns.count()
        );
        listener::stop_listening(&self.listener);
        self.shared.conns.wake_readers();
        true
    }
}

/// Writes a one-line refusal without ever blocking the caller, then closes the connection.
fn refuse(stream: &TcpStream, line: &[u8]) {
    // A fresh socket's send buffer is empty, so a non-blocking write of a short line succeeds; if
    // it does not, the peer is gone and there is nobody to tell.
    let _ = stream.set_nonblocking(true);
    let _ = (&*stream).write_all(line);
}

fn wait_for(done: &Receiver<()>, n: usize, deadline: Instant) -> usize {
    let mut got = 0;
    while got < n && done.recv_deadline(deadline).is_ok() {
        got += 1;
    }
    got
}

fn worker(shared: &Shared, rx: &Receiver<Job>, done: &Sender<()>) {
    for job in rx.iter() {
        Stats::sub(&shared.stats.queued, 1);
        let peer = job.peer;
        // A bug in one connection's handling must not cost the daemon a worker.
        if panic::catch_unwind(AssertUnwindSafe(|| conn::serve(shared, job))).is_err() {
            log::error!("{peer} handler panicked; connection closed, worker continues");
        }
    }
    let _ = done.send(());
}
