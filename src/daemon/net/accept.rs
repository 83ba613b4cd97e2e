//! The accept thread: takes each connection, decides on the spot whether it may wait for a worker
//! (access rules, `max_per_ip`, room in the queue) and queues it, never blocking on a worker.
//! When the queue is full it answers `ERR busy` itself and closes (or lets the newcomer take the
//! place of a waiting connection from a heavier lane). When connections wait and every worker is
//! busy, it chooses served connections whose peers keep them waiting to make room
//! (`evict::Board`); a connection that waited `queue_timeout_secs` is told `ERR busy`. It wakes
//! every `TICK` (the listener's receive timeout) to feed the systemd watchdog, refresh `STATUS=`,
//! and do the above, so a hung accept loop stops the watchdog and gets the service restarted.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::daemon::access::addrgroup;
use crate::daemon::access::per_ip::{self, Slot};
use crate::daemon::access::refusals::Why;
use crate::daemon::net::fdlimit::{self, Spare};
use crate::daemon::net::lanes;
use crate::daemon::net::pool::{Hiring, lane_of};
use crate::daemon::net::queue::Queue;
use crate::daemon::net::refuse::{refuse, refuse_waiting};
use crate::daemon::shared::{Client, Job, Shared};
use crate::daemon::stats::Stats;
use crate::daemon::system::notify::Notifier;
use crate::deadline::is_timeout;
use crate::logger;
use crate::peer::Peer;
use crate::proto::wire::{ERR_BUSY, ERR_NOT_ALLOWED, ERR_SHUTDOWN, ERR_TOO_MANY};

/// How often the accept loop wakes when no connection arrives. It bounds how long a stop takes
/// to be noticed on a socket passed by systemd, which ferryd must not shut down (see
/// `server::Handle::stop`).
pub const TICK: Duration = Duration::from_millis(250);
/// How long the accept loop waits after a failed `accept` before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// A served connection is chosen to make room only once its peer has kept it waiting this long
/// (for a line, or to take what was written), so that a conversation in progress is not cut.
const EVICT_AFTER: Duration = Duration::from_secs(1);

/// The accept thread's state between connections.
pub struct Acceptor<'a> {
    shared: &'a Arc<Shared>,
    listener: &'a TcpListener,
    notifier: &'a Notifier,
    queue: &'a mut Queue,
    spare: Spare,
    hiring: Hiring,
    watchdog: Option<Duration>,
    last_watchdog: Instant,
    last_status: Instant,
}

impl<'a> Acceptor<'a> {
    pub fn new(
        shared: &'a Arc<Shared>,
        listener: &'a TcpListener,
        notifier: &'a Notifier,
        queue: &'a mut Queue,
    ) -> Acceptor<'a> {
        Acceptor {
            shared,
            listener,
            notifier,
            queue,
            spare: Spare::new(listener),
            hiring: Hiring::default(),
            watchdog: notifier.watchdog_interval(),
            last_watchdog: Instant::now(),
            last_status: Instant::now(),
        }
    }

    /// Accepts connections until the server stops.
    pub fn run(&mut self) {
        let shared = self.shared;
        if self.watchdog.is_some() {
            self.notifier.watchdog();
        }
        loop {
            let accepted = self.listener.accept();
            if shared.is_stopping() {
                if let Ok((stream, _)) = accepted {
                    refuse(&stream, ERR_SHUTDOWN);
                }
                return;
            }
            self.tick();
            match accepted {
                Ok((stream, addr)) => self.admit(stream, addr),
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.accept_failed(&e),
            }
        }
    }

    /// What the accept thread does on every wake-up: the watchdog, `STATUS=`, the refusal
    /// summary, and room for the waiting connections.
    fn tick(&mut self) {
        let (shared, notifier) = (self.shared, self.notifier);
        // Feed the watchdog from this thread: if accepting hangs, systemd notices.
        if let Some(every) = self.watchdog {
            if self.last_watchdog.elapsed() >= every {
                notifier.watchdog();
                self.last_watchdog = Instant::now();
            }
        }
        if notifier.is_active() && self.last_status.elapsed() >= STATUS_EVERY {
            notifier.status(&shared.status());
            self.last_status = Instant::now();
        }
        let cfg = shared.config();
        shared.summarise_refusals(cfg.log.refusal_summary);
        self.make_room(cfg.server.queue_timeout);
    }

    /// A failed `accept`: out of descriptors, the newcomer is told `ERR busy` through the spare
    /// one; any other error (e.g. ECONNABORTED) is logged and retried after a back-off. The
    /// loop survives all of them.
    fn accept_failed(&mut self, e: &io::Error) {
        let (shared, listener) = (self.shared, self.listener);
        if fdlimit::is_exhaustion(e) {
            // Out of descriptors: free the spare one to take the connection and tell it
            // so, rather than leave it waiting in the backlog with no answer.
            self.spare.release();
            if let Ok((stream, addr)) = listener.accept() {
                Stats::add(&shared.stats.refused_busy, 1);
                refuse(&stream, ERR_BUSY);
                let peer = Peer::new(addr);
                shared.refused(Why::Descriptors, Some(peer.ip()), || {
                    format!("{peer} refused: busy (out of file descriptors: {e})")
                });
            }
            if self.spare.retake(listener) {
                return;
            }
        }
        shared.refused(Why::AcceptError, None, || {
            format!(
                "accept failed: {e}; retrying in {} ms",
                ACCEPT_BACKOFF.as_millis()
            )
        });
        thread::sleep(ACCEPT_BACKOFF);
    }

    /// A new connection: refused at once (access rules, `max_per_ip`, no room), or queued for
    /// a worker, hiring one if none is idle.
    fn admit(&mut self, stream: TcpStream, addr: SocketAddr) {
        let shared = self.shared;
        let cfg = shared.config();
        Stats::add(&shared.stats.accepted, 1);
        let peer = Peer::new(addr);
        let (client, lane) = if cfg.access.proxy_from.iter().any(|r| r.contains(peer.ip())) {
            // From a balancer: its client is known once a worker has read the PROXY header,
            // and checked, counted and sorted into its lane there (`net::pool`). Until then it
            // waits in the unread lane, and the balancer's own address is not counted as recent
            // connections (it would weigh as every client behind it together).
            (Client::Unread, lanes::Lane::Unread)
        } else {
            // Every direct connection counts, refused ones too: a crowd that churns is seen.
            let rank = self.queue.record(addrgroup::of(peer.ip()), Instant::now());
            match self.check(&stream, peer) {
                Some(slot) => (Client::Direct(slot), lane_of(shared, peer, rank)),
                None => return,
            }
        };
        // The queue is full (workers about to take a connection count as room): a newcomer
        // from a lighter lane than a waiting one takes the oldest one's place; otherwise it is
        // refused.
        let queue = &mut *self.queue;
        let full = lanes::is_full(queue.len(), cfg.server.queue_depth, queue.free_workers());
        // Listed from here: `ferryd ctl list` shows it queued until a worker takes it.
        let listed = shared.conns.register(peer);
        let job = Job {
            stream: Arc::new(stream),
            peer,
            client,
            listed,
        };
        let pushed = if full {
            match queue.displace(lane) {
                Some(w) => {
                    refuse_waiting(shared, w, "displaced by a lighter address");
                    queue.push(lane, job, Instant::now())
                }
                None => Err(job),
            }
        } else {
            queue.push(lane, job, Instant::now())
        };
        match pushed {
            Ok(hired) => {
                Stats::add(&shared.stats.queued, 1);
                if let Some(worker) = hired {
                    self.hiring.start(shared, queue, worker);
                }
            }
            Err(job) => refuse_full(shared, &cfg, job),
        }
        self.make_room(cfg.server.queue_timeout);
    }

    /// The access rules and `max_per_ip` for a direct connection: its slot, or `None` once it
    /// has been refused.
    fn check(&self, stream: &TcpStream, peer: Peer) -> Option<Slot> {
        let shared = self.shared;
        let cfg = shared.config();
        if let Err(refusal) = cfg.access.rules.check(peer.ip()) {
            Stats::add(&shared.stats.refused_access, 1);
            refuse(stream, ERR_NOT_ALLOWED);
            shared.refused(Why::NotAllowed, Some(peer.ip()), || {
                format!("{peer} refused: not allowed: the address {refusal}")
            });
            return None;
        }
        match shared
            .per_ip
            .acquire(peer.ip(), per_ip::cap(&cfg, peer.ip()))
        {
            Ok(slot) => Some(slot),
            Err(open) => {
                Stats::add(&shared.stats.refused_access, 1);
                refuse(stream, ERR_TOO_MANY);
                shared.refused(Why::TooMany, Some(peer.ip()), || {
                    format!(
                        "{peer} refused: {open} connections from this address are open, the limit of access.max_per_ip"
                    )
                });
                None
            }
        }
    }

    /// Tells `ERR busy` to the queued connections that waited `queue_timeout` for a worker, and,
    /// while connections wait and no worker is free, chooses served connections to make room
    /// for them (`evict::Board`): one per waiting connection, among those whose peer has kept
    /// them waiting `EVICT_AFTER` or longer. A worker that could not be started before is
    /// tried again.
    fn make_room(&mut self, queue_timeout: Duration) {
        let shared = self.shared;
        let queue = &mut *self.queue;
        for w in queue.expired(Instant::now(), queue_timeout) {
            refuse_waiting(
                shared,
                w,
                "no worker freed up within server.queue_timeout_secs",
            );
        }
        if let Some(worker) = queue.hire() {
            self.hiring.start(shared, queue, worker);
        }
        let waiting = queue.len();
        let free = queue.free_workers() + shared.board.evicting();
        for _ in free..waiting {
            // The chosen connection's `offline` line says why it ended.
            match shared.board.evict_one(EVICT_AFTER) {
                Some(e) => logger::debug!(
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
}

/// Tells a newcomer `ERR busy` because the queue is full.
fn refuse_full(shared: &Shared, cfg: &Config, job: Job) {
    let peer = job.peer;
    Stats::add(&shared.stats.refused_busy, 1);
    refuse(&job.stream, ERR_BUSY);
    let cfg = &cfg.server;
    shared.refused(Why::Busy, Some(peer.ip()), || {
        format!(
            "{peer} refused: busy ({} connections served, the limit of server.max_connections, and {} waiting, the limit of server.queue_depth)",
            cfg.max_connections, cfg.queue_depth
        )
    });
}
