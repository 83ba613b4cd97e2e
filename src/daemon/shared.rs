//! What the accept thread, the workers, the UDP thread and the control paths share: the settings
//! in force as one snapshot (config, store and key, swapped together by a reload), the counters,
//! the registry of open connections, the chat room and the per-address counts.

use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::auth::Key;
use crate::config::Config;
use crate::daemon::access::evict::Board;
use crate::daemon::access::per_ip::{PerIp, Slot};
use crate::daemon::access::refusals::{Refusals, Why};
use crate::daemon::chat::Room;
use crate::daemon::files::hooks::Hooks;
use crate::daemon::files::store::Store;
use crate::daemon::files::streamhash::HashPool;
use crate::daemon::registry::{Registration, Registry};
use crate::daemon::stats::Stats;
use crate::logger;
use crate::peer::Peer;

/// Smallest worker stack in a debug build, in KiB.
const DEBUG_MIN_STACK_KIB: usize = 64;

/// The settings in force, taken whole: a connection takes one snapshot when it starts and keeps
/// it to the end, so it never sees a new key with an old `require_token`, or a new store with an
/// old `max_file_size`.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    /// The upload key, when `files.token_file` is set.
    pub key: Option<Arc<Key>>,
}

/// State shared by the accept thread, the workers and the control paths.
#[derive(Debug)]
pub struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    pub stats: Stats,
    pub conns: Registry,
    /// Chat mode's members.
    pub room: Room,
    /// Connections open per address.
    pub per_ip: Arc<PerIp>,
    /// The served connections, for making room when every worker is busy.
    pub board: Board,
    hash_pool: Option<HashPool>,
    /// The `files.on_stored` queue and its threads.
    pub hooks: Hooks,
    stopping: AtomicBool,
    /// Refused connections, counted and logged within a budget per reason.
    refusals: Mutex<Refusals>,
}

impl Shared {
    pub fn new(snapshot: Snapshot, hash_pool: Option<HashPool>, hooks: Hooks) -> Shared {
        let refusal_summary = snapshot.config.log.refusal_summary;
        Shared {
            snapshot: RwLock::new(Arc::new(snapshot)),
            stats: Stats::default(),
            conns: Registry::default(),
            room: Room::default(),
            per_ip: Arc::new(PerIp::default()),
            board: Board::default(),
            hash_pool,
            hooks,
            stopping: AtomicBool::new(false),
            refusals: Mutex::new(Refusals::new(refusal_summary, Instant::now())),
        }
    }

    /// The settings in force now, whole.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The configuration in force now (a reload may replace it; holders keep their snapshot).
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.snapshot().config)
    }

    /// Puts a new snapshot in force: one swap, so no reader ever sees half of a reload.
    pub fn replace(&self, snapshot: Snapshot) {
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
    }

    /// The threads that hash large uploads, if they could be started.
    pub fn hash_pool(&self) -> Option<&HashPool> {
        self.hash_pool.as_ref()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Counts a refused connection and logs `line()` as a warning if the reason's line budget
    /// allows; otherwise the refusal shows in the reason's next summary.
    pub fn refused(&self, why: Why, ip: Option<IpAddr>, line: impl FnOnce() -> String) {
        let log_it = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .note(why, ip, Instant::now());
        if log_it {
            logger::warn!("{}", line());
        }
    }

    /// Logs the refusal summaries that are due, one per `interval`.
    pub fn summarise_refusals(&self, interval: Duration) {
        let lines = {
            let mut r = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
            r.set_interval(interval);
            r.due(Instant::now())
        };
        for line in lines {
            logger::warn!("{line}");
        }
    }

    /// Marks the daemon as stopping; false if it already was.
    pub fn begin_stop(&self) -> bool {
        !self.stopping.swap(true, Ordering::SeqCst)
    }

    /// The live counts, for `STATUS=` and the logs.
    pub fn status(&self) -> String {
        let s = &self.stats;
        format!(
            "{} open, {} queued, {} refused busy, {} files stored, {} accepted",
            Stats::get(&s.open),
            Stats::get(&s.queued),
            Stats::get(&s.refused_busy),
            Stats::get(&s.files_stored),
            Stats::get(&s.accepted)
        )
    }
}

/// An accepted connection waiting for a worker.
pub struct Job {
    /// Shared with its registry entry once a worker reads from it (shutdown reaches it there).
    pub stream: Arc<TcpStream>,
    /// Its address: the socket's, or the client's once a worker has read its PROXY header.
    pub peer: Peer,
    /// Whose connection it is, as far as is known, and its count against `access.max_per_ip`.
    pub client: Client,
    /// Its entry in the registry, with its live state.
    pub listed: Registration,
}

/// Whose connection a job is, as far as is known.
pub enum Client {
    /// A direct connection: its peer is the client, counted against `max_per_ip` by the
    /// accept thread (the slot keeps it counted until the job or its session ends).
    Direct(Slot),
    /// From a balancer in `access.proxy_protocol_from`, its PROXY header not read yet: the
    /// client is unknown and not counted.
    Unread,
    /// From a balancer, its header read by a worker, which checked and counted the client.
    Proxied(Box<Proxied>),
}

/// What a worker learnt from a balancer connection's PROXY header, kept while the connection
/// waits again (`net::lanes::wait_again`) and then served by.
pub struct Proxied {
    /// The client's count against `max_per_ip`.
    pub slot: Slot,
    /// The balancer's end of the connection.
    pub via: Peer,
    /// The header's version (1 or 2).
    pub version: u8,
    /// The settings the connection took when its header was read, which it keeps.
    pub snapshot: Arc<Snapshot>,
}

/// The stack size of worker threads (and chat writer threads), from `server.thread_stack_kib`.
pub fn worker_stack_bytes(cfg: &Config) -> usize {
    // Unoptimised code has much larger stack frames; a debug build must not overflow where a
    // release build does not.
    let kib = if cfg!(debug_assertions) {
        cfg.server.thread_stack_kib.max(DEBUG_MIN_STACK_KIB)
    } else {
        cfg.server.thread_stack_kib
    };
    kib * 1024
}
