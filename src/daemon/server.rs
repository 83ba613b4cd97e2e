//! The TCP server from start to stop: binding (the upload directory, the key, the sockets), the
//! run (the accept thread of `net::accept`, fed into the bounded queue of `net::queue` and the
//! on-demand workers of `net::pool`), and the control paths that reach it: shutdown, reload and
//! systemd notifications. The thread count is at most `max_connections` workers plus a
//! constant, whatever the load.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::auth::{Key, KeyError};
use crate::config::{self, Config, Origin};
use crate::daemon::access::addrgroup;
use crate::daemon::control::{Control, ControlError};
use crate::daemon::files::hooks::{self, Hooks};
use crate::daemon::files::store::{Store, StoreError};
use crate::daemon::files::streamhash::HashPool;
use crate::daemon::net::accept::{Acceptor, TICK};
use crate::daemon::net::activation::Activated;
use crate::daemon::net::fdlimit;
use crate::daemon::net::listener::{self, BindError};
use crate::daemon::net::queue::Queue;
use crate::daemon::net::refuse::refuse;
use crate::daemon::net::udp;
use crate::daemon::shared::{Shared, Snapshot, worker_stack_bytes};
use crate::daemon::stats::Stats;
use crate::daemon::system::notify::Notifier;
use crate::logger;
use crate::proto::wire::ERR_SHUTDOWN;
use crate::reload;

/// Errors that keep the server from starting.
#[derive(Debug)]
pub enum ServerError {
    Bind(BindError),
    /// The upload directory cannot be used.
    Store(StoreError),
    /// The upload key cannot be read.
    Key(KeyError),
    /// The control socket cannot be created.
    Control(ControlError),
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
            ServerError::Control(e) => write!(f, "{e}"),
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
    control: Option<Control>,
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
        let hash_pool = start_hash_pool(&config);
        let store = open_store(&config)?;
        let activated_by_systemd = activated.is_some();
        let (tcp, passed_udp) = match activated {
            Some(a) => {
                for line in &a.described {
                    logger::info!("socket activation: {line}");
                }
                (a.tcp, a.udp)
            }
            None => (None, None),
        };
        let udp = udp_socket(&config, passed_udp, activated_by_systemd)?;
        let (listener, local_addr, owns_listener) = tcp_listener(&config, tcp)?;
        let control = Control::bind(&config.control).map_err(ServerError::Control)?;
        let hooks = Hooks::new(&config, worker_stack_bytes(&config));
        Ok(Server {
            handle: Handle {
                shared: Arc::new(Shared::new(
                    Snapshot {
                        config: Arc::new(config),
                        store: Arc::new(store),
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
            control,
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
        let mut queue = Queue::new(cfg.queue_depth, n_workers);
        // Before any other thread exists: every thread shares the limit.
        fdlimit::log_outcome(&fdlimit::ensure(fdlimit::needed(&shared.config())));
        let control_thread = start_control(self.control.take(), shared, self.udp.as_ref())?;
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
            logger::warn!(
                "cannot set the listener's wake-up timeout: {e}; the watchdog is fed only when clients connect"
            );
        }
        logger::info!(
            "listening on {} (mode {}, up to {} workers, queue {}, idle timeout {} s)",
            self.local_addr,
            cfg.mode.as_str(),
            n_workers,
            cfg.queue_depth,
            cfg.idle_timeout.as_secs()
        );
        self.handle.notifier.ready(&shared.status());

        let handle = &self.handle;
        Acceptor::new(shared, &handle.listener, &handle.notifier, &mut queue).run();

        // Stopping: no new connections; tell the queued ones and let the workers finish theirs.
        for job in queue.close() {
            Stats::sub(&shared.stats.queued, 1);
            refuse(&job.stream, ERR_SHUTDOWN);
        }
        let grace = shared.config().server.shutdown_grace;
        let started = queue.live_workers();
        let mut left = queue.wait_workers_gone(Instant::now() + grace);
        if left > 0 {
            logger::warn!(
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
        if let Some(t) = control_thread {
            let _ = t.join();
        }
        logger::info!(
            "stopped: {}; {} of {started} workers joined",
            shared.stats.summary(),
            started.saturating_sub(left)
        );
        Ok(())
    }
}

/// Starts the control socket's thread, with a clone of the UDP socket for `udp`.
fn start_control(
    control: Option<Control>,
    shared: &Arc<Shared>,
    udp: Option<&UdpSocket>,
) -> Result<Option<JoinHandle<()>>, ServerError> {
    let Some(control) = control else {
        return Ok(None);
    };
    let udp = udp.and_then(|u| match u.try_clone() {
        Ok(clone) => Some(clone),
        Err(e) => {
            logger::warn!("control socket: cannot share the UDP socket: {e}; no udp command");
            None
        }
    });
    control
        .spawn(Arc::clone(shared), udp)
        .map(Some)
        .map_err(|err| ServerError::Spawn {
            index: 1,
            total: 1,
            err,
        })
}

impl Handle {
    /// Begins the shutdown: stops accepting at once and wakes every worker blocked in `read`.
    /// Returns false if a shutdown had already begun.
    pub fn stop(&self) -> bool {
        if !self.shared.begin_stop() {
            return false;
        }
        self.notifier.stopping();
        logger::info!(
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
        logger::info!("reloading configuration from {}", self.origin);
        match config::load(&self.origin) {
            Ok(new) => self.apply(new),
            Err(e) => {
                logger::error!("reload refused, the running configuration stays in force: {e}")
            }
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
                logger::error!(
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
                    logger::error!(
                        "reload refused, the running configuration stays in force: files.dir: {e}"
                    );
                    return;
                }
            }
        };
        logger::init(plan.effective.log.level, plan.effective.log.format);
        addrgroup::set_ipv6_prefix_len(plan.effective.access.ipv6_prefix_len);
        addrgroup::set_ipv6_prefix_len(plan.effective.access.ipv6_prefix_len);
        // Config, store and key change together, in one swap.
        self.shared.replace(Snapshot {
            config: Arc::new(plan.effective),
            store,
            key,
        });
        for change in &plan.needs_restart {
            logger::warn!("reload: {change} needs a restart; the running value stays");
        }
        if plan.applied.is_empty() {
            logger::info!("reloaded: nothing that can change while running changed");
        } else {
            logger::info!("reloaded: {}", plan.applied.join(", "));
        }
    }
}

/// Starts the hashing threads. Without the pool, uploads are hashed on their worker: slower,
/// but they work.
fn start_hash_pool(config: &Config) -> Option<HashPool> {
    match HashPool::start(worker_stack_bytes(config)) {
        Ok(pool) => Some(pool),
        Err(e) => {
            logger::warn!(
                "cannot start the hashing threads: {e}; uploads are hashed by their worker"
            );
            None
        }
    }
}

/// Opens the upload directory, logging the stale entries it cleaned or left and the partial
/// uploads kept for resuming.
fn open_store(config: &Config) -> Result<Store, ServerError> {
    let opened = Store::open(&config.files, true).map_err(ServerError::Store)?;
    for name in &opened.stale_removed {
        logger::warn!(
            "removed stale partial upload {}/{name} (left by an earlier crash or kill)",
            config.files.dir.display()
        );
    }
    for (name, why) in &opened.stale_kept {
        logger::warn!(
            "cannot remove stale entry {}/{name}: {why}; left it in place (remove it by hand)",
            config.files.dir.display()
        );
    }
    // Partial bodies of resumable uploads survive a restart until they expire.
    match opened.store.sweep_partials() {
        Ok((removed, kept)) => {
            for name in &removed {
                logger::info!(
                    "removed expired partial upload {}/{name}",
                    config.files.dir.display()
                );
            }
            if kept > 0 {
                logger::info!("kept {kept} partial upload(s) for resuming");
            }
        }
        Err(e) => logger::warn!("partial uploads: {e}"),
    }
    logger::info!(
        "storing uploads in {} (on_conflict {}, max {} B per file)",
        opened.store.dir().display(),
        config.files.on_conflict.as_str(),
        config.files.max_file_size
    );
    Ok(opened.store)
}

/// The UDP echo's socket: the one systemd passed (if UDP is on), none when socket-activated
/// without one, or a new one bound to `udp.bind`/`udp.port`.
fn udp_socket(
    config: &Config,
    passed_udp: Option<(UdpSocket, SocketAddr)>,
    activated_by_systemd: bool,
) -> Result<Option<UdpSocket>, ServerError> {
    Ok(match passed_udp {
        Some((socket, addr)) if config.udp.enabled => {
            logger::info!(
                "udp echo on the socket passed by systemd ({addr}); udp.bind and udp.port are not used"
            );
            Some(socket)
        }
        Some((_, addr)) => {
            logger::info!("udp.enabled = false: closing the UDP socket passed by systemd ({addr})");
            None
        }
        // Socket-activated, ferryd binds nothing itself (under PrivateNetwork it could not be
        // reached anyway): no datagram socket passed means no UDP echo.
        None if activated_by_systemd => {
            if config.udp.enabled {
                logger::info!(
                    "udp echo off: systemd passed no datagram socket (add ListenDatagram= to the .socket unit)"
                );
            }
            None
        }
        None if config.udp.enabled => {
            let addr = SocketAddr::new(config.udp.bind, config.udp.port);
            let socket = udp::bind(addr).map_err(ServerError::Bind)?;
            logger::info!("udp echo on {}", socket.local_addr().unwrap_or(addr));
            Some(socket)
        }
        None => None,
    })
}

/// The listening socket: the one systemd passed, or a new one bound to
/// `server.bind`/`server.port`; its address, and whether ferryd owns it.
fn tcp_listener(
    config: &Config,
    tcp: Option<(TcpListener, SocketAddr)>,
) -> Result<(TcpListener, SocketAddr, bool), ServerError> {
    Ok(match tcp {
        Some((listener, addr)) => {
            logger::info!(
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
    })
}

/// Reads the upload key named by `files.token_file`, if any.
fn load_key(cfg: &Config) -> Result<Option<Arc<Key>>, KeyError> {
    let Some(path) = &cfg.files.token_file else {
        return Ok(None);
    };
    let (key, exposed) = Key::load(path)?;
    if exposed {
        logger::warn!(
            "files.token_file {} is readable by group or others; chmod 600 it",
            path.display()
        );
    }
    logger::info!(
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
