//! The TCP server: one accept thread, a bounded work queue and a pool of worker threads started
//! on demand, plus the control paths that reach them: shutdown, reload and systemd
//! notifications.
//!
//! The accept thread never blocks on the workers: it puts each connection in the queue
//! (`waiting::Queue`) and, when the queue is full, answers `ERR busy` itself and closes (or
//! lets the newcomer take the place of a waiting connection from a heavier address). When
//! connections wait and every worker is busy, it chooses served connections whose peers keep
//! them waiting to make room (`evict::Board`); a connection that waited `queue_timeout_secs`
//! is told `ERR busy`. A worker is started when a connection is queued and no worker is idle,
//! up to `max_connections`; one left without a connection for `WORKER_KEEP` ends, so an idle
//! daemon holds no worker stacks. The thread count is therefore at most `max_connections`
//! workers plus a constant, whatever the load. The accept thread also wakes every `TICK` (the listener's
//! receive timeout) to feed the systemd watchdog, refresh `STATUS=`, and do the above, so a
//! hung accept loop stops the watchdog and gets the service restarted.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::auth::{Key, KeyError};
use crate::config::{self, Config, Origin};
use crate::daemon::activation::Activated;
use crate::daemon::addrgroup;
use crate::daemon::conn;
use crate::daemon::fdlimit::{self, Spare};
use crate::daemon::hooks::{self, Hooks};
use crate::daemon::listener::{self, BindError};
use crate::daemon::notify::Notifier;
use crate::daemon::refusals::Why;
use crate::daemon::shared::{Job, Shared, Snapshot, worker_stack_bytes};
use crate::daemon::stats::Stats;
use crate::daemon::store::{Store, StoreError};
use crate::daemon::streamhash::HashPool;
use crate::daemon::udp;
use crate::daemon::waiting::{Queue, Worker};
use crate::deadline::is_timeout;
use crate::logger;
use crate::peer::Peer;
use crate::proto::wire::{ERR_BUSY, ERR_NOT_ALLOWED, ERR_SHUTDOWN, ERR_TOO_MANY};
use crate::reload;

/// How long the accept loop waits after a failed `accept` before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often the accept loop wakes when no connection arrives. It bounds how long a stop takes
/// to be noticed on a socket passed by systemd, which ferryd must not shut down (see `stop`).
const TICK: Duration = Duration::from_millis(250);
/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// A served connection is chosen to make room only once its peer has kept it waiting this long
/// (for a line, or to take what was written), so that a conversation in progress is not cut.
const EVICT_AFTER: Duration = Duration::from_secs(1);
/// At most this many reads of 4 KiB drop what a refused peer already sent (without waiting).
const REFUSE_DRAIN_READS: usize = 16;
/// How long a worker without a connection waits for one before its thread ends. Long enough
/// that a steady trickle of connections reuses threads; short enough that the stacks of a
/// burst's workers are given back soon after it.
const WORKER_KEEP: Duration = Duration::from_secs(5);
/// At most one warning per this interval when a worker thread cannot be started.
const SPAWN_WARN_EVERY: Duration = Duration::from_secs(10);
/// Errors that keep the server from starting.
#[derive(Debug)]
pub enum ServerError {
    Bind(BindError),
    /// The upload directory cannot be used.
    Store(StoreError),
    /// The upload key cannot be read.
    Key(KeyError),
    /// A thread could not be started (usually a process or memory limit).
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
            ServerError::Key(e) => write!(f, "files.token_file: {e}"),
            ServerError::Spawn { index, total, err } => write!(
                f,
                "cannot start thread {index} of {total}: {err} (lower server.max_connections or raise the process/thread limits)"
            ),
        }
    }
}

impl std::error::Error for ServerError {}

/// A bound server, ready to run.
pub struct Server {
    handle: Handle,
    local_addr: SocketAddr,
    udp: Option<UdpSocket>,
}

/// A cheap handle for the control paths: stop (SIGINT/SIGTERM) and reload (SIGHUP).
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    notifier: Arc<Notifier>,
    origin: Arc<Origin>,
    /// False when systemd passed the listening socket: it is systemd's to keep listening on.
    owns_listener: bool,
}

impl Server {
    /// Opens the upload directory and takes the listening socket (the one systemd passed, or a
    /// new one bound to `server.bind`/`server.port`). Nothing is served until `run`.
    pub fn bind(
        config: Config,
        origin: Origin,
        activated: Option<Activated>,
        notifier: Notifier,
    ) -> Result<Server, ServerError> {
        let key = load_key(&config).map_err(ServerError::Key)?;
        // Every per-address table groups IPv6 peers alike; a reload may change it (`apply`).
        addrgroup::set_ipv6_prefix_len(config.access.ipv6_prefix_len);
        // Without the pool, uploads are hashed on their worker: slower, but they work.
        let hash_pool = match HashPool::start(worker_stack_bytes(&config)) {
            Ok(pool) => Some(pool),
            Err(e) => {
                log::warn!(
                    "cannot start the hashing threads: {e}; uploads are hashed by their worker"
                );
                None
            }
        };
        let opened = Store::open(&config.files, true).map_err(ServerError::Store)?;
        for name in &opened.stale_removed {
            log::warn!(
                "removed stale partial upload {}/{name} (left by an earlier crash or kill)",
                config.files.dir.display()
            );
        }
        for (name, why) in &opened.stale_kept {
            log::warn!(
                "cannot remove stale entry {}/{name}: {why}; left it in place (remove it by hand)",
                config.files.dir.display()
            );
        }
        // Partial bodies of resumable uploads survive a restart until they expire.
        match opened.store.sweep_partials() {
            Ok((removed, kept)) => {
                for name in &removed {
                    log::info!(
                        "removed expired partial upload {}/{name}",
                        config.files.dir.display()
                    );
                }
                if kept > 0 {
                    log::info!("kept {kept} partial upload(s) for resuming");
                }
            }
            Err(e) => log::warn!("partial uploads: {e}"),
        }
        log::info!(
            "storing uploads in {} (on_conflict {}, max {} B per file)",
            opened.store.dir().display(),
            config.files.on_conflict.as_str(),
            config.files.max_file_size
        );
        let activated_by_systemd = activated.is_some();
        let (tcp, passed_udp) = match activated {
            Some(a) => {
                for line in &a.described {
                    log::info!("socket activation: {line}");
                }
                (a.tcp, a.udp)
            }
            None => (None, None),
        };
        let udp = match passed_udp {
            Some((socket, addr)) if config.udp.enabled => {
                log::info!(
                    "udp echo on the socket passed by systemd ({addr}); udp.bind and udp.port are not used"
                );
                Some(socket)
            }
            Some((_, addr)) => {
                log::info!(
                    "udp.enabled = false: closing the UDP socket passed by systemd ({addr})"
                );
                None
            }
            // Socket-activated, ferryd binds nothing itself (under PrivateNetwork it could not be
            // reached anyway): no datagram socket passed means no UDP echo.
            None if activated_by_systemd => {
                if config.udp.enabled {
                    log::info!(
                        "udp echo off: systemd passed no datagram socket (add ListenDatagram= to the .socket unit)"
                    );
                }
                None
            }
            None if config.udp.enabled => {
                let addr = SocketAddr::new(config.udp.bind, config.udp.port);
                let socket = udp::bind(addr).map_err(ServerError::Bind)?;
                log::info!("udp echo on {}", socket.local_addr().unwrap_or(addr));
                Some(socket)
            }
            None => None,
        };
        let (listener, local_addr, owns_listener) = match tcp {
            Some((listener, addr)) => {
                log::info!(
                    "serving on the socket passed by systemd ({addr}); server.bind and server.port are not used"
                );
                (listener, addr, false)
            }
            None => {
                let addr = SocketAddr::new(config.server.bind, config.server.port);
                let listener =
                    listener::bind_tcp(addr, config.server.backlog).map_err(ServerError::Bind)?;
                let local = listener.local_addr().unwrap_or(addr);
                (listener, local, true)
            }
        };
        let hooks = Hooks::new(&config, worker_stack_bytes(&config));
        Ok(Server {
            handle: Handle {
                shared: Arc::new(Shared::new(
                    Snapshot {
                        config: Arc::new(config),
                        store: Arc::new(opened.store),
                        key,
                    },
                    hash_pool,
                    hooks,
                )),
                listener: Arc::new(listener),
                notifier: Arc::new(notifier),
                origin: Arc::new(origin),
                owns_listener,
            },
            local_addr,
            udp,
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves until a `Handle` stops the server, then closes every connection and waits up to
    /// `shutdown_grace_secs` for the workers.
    pub fn run(mut self) -> Result<(), ServerError> {
        let shared = &self.handle.shared;
        let cfg = shared.config();
        let cfg = &cfg.server;
        let n_workers = cfg.max_connections;
        let queue = Arc::new(Queue::new(n_workers));
        // Before any other thread exists: every thread shares the limit.
        fdlimit::log_outcome(&fdlimit::ensure(fdlimit::needed(&shared.config())));
        let udp_thread =
            match self.udp.take() {
                Some(socket) => Some(udp::spawn(socket, Arc::clone(shared)).map_err(|err| {
                    ServerError::Spawn {
                        index: 1,
                        total: 1,
                        err,
                    }
                })?),
                None => None,
            };
        // The accept loop wakes every TICK even when nobody connects.
        if let Err(e) = SockRef::from(&*self.handle.listener).set_read_timeout(Some(TICK)) {
            log::warn!(
                "cannot set the listener's wake-up timeout: {e}; the watchdog is fed only when clients connect"
            );
        }
        log::info!(
            "listening on {} (mode {}, up to {} workers, queue {}, idle timeout {} s)",
            self.local_addr,
            cfg.mode.as_str(),
            n_workers,
            cfg.queue_depth,
            cfg.idle_timeout.as_secs()
        );
        self.handle.notifier.ready(&shared.status());

        self.accept_loop(&queue);

        // Stopping: no new connections; tell the queued ones and let the workers finish theirs.
        for job in queue.close() {
            Stats::sub(&shared.stats.queued, 1);
            refuse(&job.stream, ERR_SHUTDOWN);
        }
        let grace = shared.config().server.shutdown_grace;
        let started = queue.live_workers();
        let mut left = queue.wait_workers_gone(Instant::now() + grace);
        if left > 0 {
            log::warn!(
                "{left} connection(s) still open after the {} s grace period; closing them",
                grace.as_secs()
            );
            shared.conns.close_all();
            left = queue.wait_workers_gone(Instant::now() + Duration::from_millis(500));
        }
        // Hooks last, so that uploads finished in the grace period have queued theirs.
        shared.hooks.stop(hooks::STOP_GRACE);
        if let Some(t) = udp_thread {
            let _ = t.join();
        }
        log::info!(
            "stopped: {}; {} of {started} workers joined",
            shared.stats.summary(),
            started.saturating_sub(left)
        );
        Ok(())
    }

    fn accept_loop(&self, queue: &Arc<Queue>) {
        let shared = &self.handle.shared;
        let listener = &*self.handle.listener;
        let notifier = &self.handle.notifier;
        let watchdog = notifier.watchdog_interval();
        let mut last_watchdog = Instant::now();
        let mut last_status = Instant::now();
        let mut spare = Spare::new(listener);
        let mut hiring = Hiring::default();
        if watchdog.is_some() {
            notifier.watchdog();
        }
        loop {
            let accepted = listener.accept();
            if shared.is_stopping() {
                if let Ok((stream, _)) = accepted {
                    refuse(&stream, ERR_SHUTDOWN);
                }
                return;
            }
            // Feed the watchdog from this thread: if accepting hangs, systemd notices.
            if let Some(every) = watchdog {
                if last_watchdog.elapsed() >= every {
                    notifier.watchdog();
                    last_watchdog = Instant::now();
                }
            }
            if notifier.is_active() && last_status.elapsed() >= STATUS_EVERY {
                notifier.status(&shared.status());
                last_status = Instant::now();
            }
            let cfg = shared.config();
            shared.summarise_refusals(cfg.log.refusal_summary);
            make_room(shared, queue, cfg.server.queue_timeout);
            let (stream, addr) = match accepted {
                Ok(pair) => pair,
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    continue;
                }
                Err(e) if fdlimit::is_exhaustion(&e) => {
                    // Out of descriptors: free the spare one to take the connection and tell it
                    // so, rather than leave it waiting in the backlog with no answer.
                    spare.release();
                    if let Ok((stream, addr)) = listener.accept() {
                        Stats::add(&shared.stats.refused_busy, 1);
                        refuse(&stream, ERR_BUSY);
                        let peer = Peer::new(addr);
                        shared.refused(Why::Descriptors, Some(peer.ip()), || {
                            format!("{peer} refused: busy (out of file descriptors: {e})")
                        });
                    }
                    if !spare.retake(listener) {
                        shared.refused(Why::AcceptError, None, || {
                            format!(
                                "accept failed: {e}; retrying in {} ms",
                                ACCEPT_BACKOFF.as_millis()
                            )
                        });
                        thread::sleep(ACCEPT_BACKOFF);
                    }
                    continue;
                }
                Err(e) => {
                    // E.g. ECONNABORTED: the loop must survive all of them.
                    shared.refused(Why::AcceptError, None, || {
                        format!(
                            "accept failed: {e}; retrying in {} ms",
                            ACCEPT_BACKOFF.as_millis()
                        )
                    });
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            Stats::add(&shared.stats.accepted, 1);
            let peer = Peer::new(addr);
            queue.arrived(peer.ip(), Instant::now());
            if let Err(refusal) = cfg.access.rules.check(peer.ip()) {
                Stats::add(&shared.stats.refused_access, 1);
                refuse(&stream, ERR_NOT_ALLOWED);
                shared.refused(Why::NotAllowed, Some(peer.ip()), || {
                    format!("{peer} refused: not allowed: the address {refusal}")
                });
                continue;
            }
            let slot = match shared
                .per_ip
                .acquire(peer.ip(), per_ip_cap(&cfg, peer.ip()))
            {
                Ok(slot) => slot,
                Err(open) => {
                    Stats::add(&shared.stats.refused_access, 1);
                    refuse(&stream, ERR_TOO_MANY);
                    shared.refused(Why::TooMany, Some(peer.ip()), || {
                        format!(
                            "{peer} refused: {open} connections from this address are open, the limit of access.max_per_ip"
                        )
                    });
                    continue;
                }
            };
            // The queue is full (workers about to take a connection count as room): a newcomer
            // from an address holding fewer connections than the heaviest waiting one takes that
            // one's place; otherwise it is refused.
            let room = cfg.server.queue_depth + queue.free_workers();
            if queue.len() >= room {
                let mine = shared.per_ip.open_from(peer.ip());
                match queue.displace(|ip| shared.per_ip.open_from(ip), mine, peer.ip()) {
                    Some(w) => refuse_waiting(shared, w, "displaced by a lighter address"),
                    None => {
                        Stats::add(&shared.stats.refused_busy, 1);
                        refuse(&stream, ERR_BUSY);
                        let cfg = &cfg.server;
                        shared.refused(Why::Busy, Some(peer.ip()), || {
                            format!(
                                "{peer} refused: busy ({} connections served, the limit of server.max_connections, and {} waiting, the limit of server.queue_depth)",
                                cfg.max_connections, cfg.queue_depth
                            )
                        });
                        continue;
                    }
                }
            }
            Stats::add(&shared.stats.queued, 1);
            if let Some(worker) = queue.push(Job { stream, peer, slot }, Instant::now()) {
                hiring.start(shared, queue, worker);
            }
            make_room(shared, queue, cfg.server.queue_timeout);
        }
    }
}

/// Tells `ERR busy` to the queued connections that waited `queue_timeout` for a worker, and, while
/// connections wait and no worker is free, chooses served connections to make room for them
/// (`evict::Board`): one per waiting connection, among those whose peer has kept them waiting
/// `EVICT_AFTER` or longer.
fn make_room(shared: &Shared, queue: &Queue, queue_timeout: Duration) {
    for w in queue.expired(Instant::now(), queue_timeout) {
        refuse_waiting(
            shared,
            w,
            "no worker freed up within server.queue_timeout_secs",
        );
    }
    let waiting = queue.len();
    let free = queue.free_workers() + shared.board.evicting();
    for _ in free..waiting {
        // The chosen connection's `offline` line says why it ended.
        match shared.board.evict_one(EVICT_AFTER) {
            Some(e) => log::debug!(
                "making room for a waiting connection: ending one from {} that {}",
                e.ip,
                if e.writing {
                    "does not take what is written to it"
                } else {
                    "waited longest for its peer"
                }
            ),
            None => break,
        }
    }
}

/// Tells a queued connection `ERR busy` and ends it.
fn refuse_waiting(shared: &Shared, w: Job, why: &str) {
    Stats::sub(&shared.stats.queued, 1);
    Stats::add(&shared.stats.refused_busy, 1);
    refuse(&w.stream, ERR_BUSY);
    let peer = w.peer;
    shared.refused(Why::Busy, Some(peer.ip()), || {
        format!("{peer} refused: busy (waited in the queue: {why})")
    });
}

/// The `max_per_ip` cap for `ip`: none for loopback peers under `access.exempt_loopback`.
fn per_ip_cap(cfg: &Config, ip: IpAddr) -> u32 {
    if cfg.access.exempt_loopback && ip.is_loopback() {
        u32::MAX
    } else {
        cfg.access.max_per_ip
    }
}

impl Handle {
    /// Begins the shutdown: stops accepting at once and wakes every worker blocked in `read`.
    /// Returns false if a shutdown had already begun.
    pub fn stop(&self) -> bool {
        if !self.shared.begin_stop() {
            return false;
        }
        self.notifier.stopping();
        log::info!(
            "shutting down: closing {} connection(s)",
            self.shared.conns.count()
        );
        // Our own socket is shut at once: accept returns and new connections are refused. A
        // socket systemd passed stays open and listening (shutting it would break it for the
        // next activation); the accept loop notices the stop within one TICK, and connections
        // still in its backlog wait there for the next start.
        if self.owns_listener {
            listener::stop_listening(&self.listener);
        }
        self.shared.conns.wake_readers();
        true
    }

    /// Re-reads the configuration file and applies what can change while running; an invalid
    /// file is refused and the running configuration stays in force.
    pub fn reload(&self) {
        self.notifier.reloading();
        log::info!("reloading configuration from {}", self.origin);
        match config::load(&self.origin) {
            Ok(new) => self.apply(new),
            Err(e) => log::error!("reload refused, the running configuration stays in force: {e}"),
        }
        self.notifier.ready(&self.shared.status());
    }

    fn apply(&self, new: Config) {
        let old = self.shared.config();
        let plan = reload::plan(&old, &new);
        // The key file is read again on every reload, so a new key takes effect on SIGHUP.
        let key = match load_key(&plan.effective) {
            Ok(k) => k,
            Err(e) => {
                log::error!(
                    "reload refused, the running configuration stays in force: files.token_file: {e}"
                );
                return;
            }
        };
        let store = if plan.effective.files == old.files {
            self.shared.snapshot().store.clone()
        } else {
            // In-flight uploads keep the store they started with; the new store goes on counting
            // the space they reserved.
            match self.shared.snapshot().store.reopen(&plan.effective.files) {
                Ok(opened) => Arc::new(opened.store),
                Err(e) => {
                    log::error!(
                        "reload refused, the running configuration stays in force: files.dir: {e}"
                    );
                    return;
                }
            }
        };
        logger::init(plan.effective.log.level, plan.effective.log.format);
        addrgroup::set_ipv6_prefix_len(plan.effective.access.ipv6_prefix_len);
        // Config, store and key change together, in one swap.
        self.shared.replace(Snapshot {
            config: Arc::new(plan.effective),
            store,
            key,
        });
        for change in &plan.needs_restart {
            log::warn!("reload: {change} needs a restart; the running value stays");
        }
        if plan.applied.is_empty() {
            log::info!("reloaded: nothing that can change while running changed");
        } else {
            log::info!("reloaded: {}", plan.applied.join(", "));
        }
    }
}

/// Reads the upload key named by `files.token_file`, if any.
fn load_key(cfg: &Config) -> Result<Option<Arc<Key>>, KeyError> {
    let Some(path) = &cfg.files.token_file else {
        return Ok(None);
    };
    let (key, exposed) = Key::load(path)?;
    if exposed {
        log::warn!(
            "files.token_file {} is readable by group or others; chmod 600 it",
            path.display()
        );
    }
    log::info!(
        "uploads need the key in {}{}",
        path.display(),
        if cfg.access.require_token {
            "; so does text (access.require_token)"
        } else {
            ""
        }
    );
    Ok(Some(Arc::new(key)))
}

/// Writes a one-line refusal without ever blocking the caller, then ends the sending side and
/// drops what the peer already sent, so that the close that follows is a clean end of stream
/// rather than a reset that could destroy the line.
fn refuse(stream: &TcpStream, line: &[u8]) {
    // A fresh socket's send buffer is empty, so a non-blocking write of a short line succeeds; if
    // it does not, the peer is gone and there is nobody to tell.
    let _ = stream.set_nonblocking(true);
    let _ = (&*stream).write_all(line);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut scratch = [0u8; 4096];
    for _ in 0..REFUSE_DRAIN_READS {
        match (&*stream).read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Starting worker threads for the accept thread.
#[derive(Default)]
struct Hiring {
    /// Threads started so far, for their names.
    n_started: u64,
    /// When a failure to start one was last logged.
    last_warning: Option<Instant>,
}

impl Hiring {
    /// Starts `worker` on its own thread. If the thread cannot start, the worker is dropped (its
    /// counts given back) and the connection waits for a busy worker, or its queue timeout.
    fn start(&mut self, shared: &Arc<Shared>, queue: &Queue, worker: Worker) {
        let stack = worker_stack_bytes(&shared.config());
        let thread_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("worker-{}", self.n_started))
            .stack_size(stack)
            .spawn(move || work(&thread_shared, worker));
        match spawned {
            Ok(_) => self.n_started += 1,
            Err(e) => {
                if self
                    .last_warning
                    .is_none_or(|t| t.elapsed() >= SPAWN_WARN_EVERY)
                {
                    self.last_warning = Some(Instant::now());
                    log::warn!(
                        "cannot start a worker thread: {e}; {} worker(s) serve, the connection waits (lower server.max_connections or raise the process/thread limits)",
                        queue.live_workers()
                    );
                }
            }
        }
    }
}

/// A worker thread: serves connections from the queue until it closes, or until none came for
/// `WORKER_KEEP`.
fn work(shared: &Shared, mut worker: Worker) {
    while let Some(job) = worker.next(|ip| shared.per_ip.open_from(ip), WORKER_KEEP) {
        Stats::sub(&shared.stats.queued, 1);
        serve_caught(shared, job);
    }
}

/// Serves one connection; a panic in its handling is caught and logged, so that a bug in one
/// connection's handling does not cost the daemon a worker. Not inlined: the handler's large
/// stack frame exists only while a connection is served, never under an idle worker.
#[inline(never)]
fn serve_caught(shared: &Shared, job: Job) {
    let peer = job.peer;
    if panic::catch_unwind(AssertUnwindSafe(|| conn::serve(shared, job))).is_err() {
        log::error!("{peer} handler panicked; connection closed, worker continues");
    }
}
