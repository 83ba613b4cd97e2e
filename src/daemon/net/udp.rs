//! The UDP echo: one thread, one fixed 64 KiB buffer, every datagram sent back to its sender
//! unless it is oversize or its address has used up its token bucket. Counts are logged every
//! `SUMMARY_EVERY` at info, each datagram at debug.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::daemon::access::addrgroup;
use crate::daemon::access::ratelimit::Limiter;
use crate::daemon::net::listener::BindError;
use crate::daemon::shared::Shared;
use crate::daemon::stats::Stats;
use crate::deadline::is_timeout;
use crate::escape::escaped;
use crate::logger;
use crate::peer::Peer;
use crate::threads;

/// The receive buffer: larger than any UDP payload, so nothing is ever truncated unseen.
const BUF: usize = 64 * 1024;
/// How often the thread wakes when nothing arrives, to notice a shutdown or a reload.
const TICK: Duration = Duration::from_millis(250);
/// How often the counts are logged (when there was traffic).
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// How many bytes of a datagram a debug line shows.
const LOG_WIDTH: usize = 60;
/// The kernel receive buffer asked for (Linux caps it at `net.core.rmem_max` and doubles it for
/// its bookkeeping). Datagrams that arrive while the thread is not scheduled wait there; each
/// small datagram costs about 1 KiB of it, so the default 208 KiB holds only about 200, and a
/// script's burst of a few hundred would overflow it.
const RCVBUF: usize = 4 << 20;

/// Binds the UDP socket (dual-stack for `::`, like the TCP listener). Without SO_REUSEADDR (and
/// SO_REUSEPORT): on UDP that option would let another process bind the same port and take
/// datagrams meant for ferryd; without it, such a bind fails, and a second ferryd fails at start.
pub fn bind(addr: SocketAddr) -> Result<UdpSocket, BindError> {
    let make = || -> io::Result<UdpSocket> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.bind(&addr.into())?;
        Ok(socket.into())
    };
    make().map_err(|err| BindError {
        proto: "udp",
        addr,
        err,
    })
}

/// Starts the echo thread; it ends once the daemon is stopping.
pub fn spawn(socket: UdpSocket, shared: Arc<Shared>) -> io::Result<JoinHandle<()>> {
    socket.set_read_timeout(Some(TICK))?;
    let sock = SockRef::from(&socket);
    if let Err(e) = sock.set_recv_buffer_size(RCVBUF) {
        logger::warn!("udp: cannot enlarge the receive buffer: {e}; bursts may be dropped");
    }
    if let Ok(got) = sock.recv_buffer_size() {
        logger::info!(
            "udp receive buffer {} KiB (asked {} KiB; the kernel caps it at net.core.rmem_max)",
            got / 1024,
            RCVBUF * 2 / 1024
        );
    }
    threads::spawn(
        "udp".into(),
        Some(128 * 1024),
        Box::new(move || run(&socket, &shared)),
    )
}

#[derive(Default)]
struct Counts {
    echoed: u64,
    refused: u64,
    limited: u64,
    oversize: u64,
    failed: u64,
}

fn run(socket: &UdpSocket, shared: &Shared) {
    let mut cfg = shared.config();
    let mut limiter = Limiter::new(cfg.udp.rate_per_sec, cfg.udp.burst, cfg.udp.max_peers);
    let mut buf = vec![0u8; BUF];
    let mut counts = Counts::default();
    let mut last_summary = Instant::now();
    let mut last_config_check = Instant::now();
    while !shared.is_stopping() {
        let now = Instant::now();
        if now.duration_since(last_config_check) >= TICK {
            last_config_check = now;
            let latest = shared.config();
            if !Arc::ptr_eq(&latest, &cfg) {
                cfg = latest;
                limiter.set_limits(cfg.udp.rate_per_sec, cfg.udp.burst, cfg.udp.max_peers);
            }
        }
        if now.duration_since(last_summary) >= SUMMARY_EVERY {
            last_summary = now;
            summarise(&mut counts, &limiter);
        }
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(pair) => pair,
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                continue;
            }
            Err(e) => {
                // E.g. ECONNREFUSED reported for an earlier send: it concerns that datagram only.
                logger::debug!("udp receive failed: {e}");
                continue;
            }
        };
        let peer = Peer::new(from);
        Stats::add(&shared.stats.udp_in, 1);
        // No answer to a refused address: a datagram's source can be forged, and answering would
        // make ferryd a reflector.
        if let Err(refusal) = cfg.access.rules.check(peer.ip()) {
            counts.refused += 1;
            logger::debug!("{peer} udp {n} B dropped: not allowed: the address {refusal}");
            continue;
        }
        if n > cfg.udp.max_datagram_bytes {
            counts.oversize += 1;
            logger::debug!(
                "{peer} udp {n} B dropped: over udp.max_datagram_bytes = {}",
                cfg.udp.max_datagram_bytes
            );
            continue;
        }
        // One bucket per address group (an IPv6 peer's /64 by default).
        if !limiter.allow(addrgroup::of(peer.ip()), Instant::now()) {
            counts.limited += 1;
            continue;
        }
        let data = &buf[..n];
        logger::debug!("{peer} udp {n} B: {}", escaped(data, LOG_WIDTH));
        match socket.send_to(data, from) {
            Ok(_) => counts.echoed += 1,
            Err(e) => {
                counts.failed += 1;
                logger::debug!("{peer} udp echo failed: {e}");
            }
        }
    }
    summarise(&mut counts, &limiter);
}

fn summarise(counts: &mut Counts, limiter: &Limiter) {
    let c = std::mem::take(counts);
    if c.echoed + c.refused + c.limited + c.oversize + c.failed == 0 {
        return;
    }
    logger::info!(
        "udp: {} datagrams echoed, {} refused by the access rules, {} dropped by the rate limit, {} oversize, {} failed to send ({} addresses tracked)",
        c.echoed,
        c.refused,
        c.limited,
        c.oversize,
        c.failed,
        limiter.tracked()
    );
}
