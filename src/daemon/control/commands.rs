//! What the control socket's requests do: `list` reads the registry's live state, `say` writes
//! through each connection's wire lock (echo) or the room (chat), `kick` marks a connection and
//! wakes its worker, `stats` reads the counters, `udp` sends a datagram from the daemon's socket.
//! Every answer ends with `OK …` or `ERR …`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use crate::daemon::registry::{Live, Said, State};
use crate::daemon::shared::Shared;
use crate::escape::push_chat_text;
use crate::logger;
use crate::proto::control::{self, FileRow, Request, Row};
use crate::proto::wire;

/// Carries out `req` for the operator `uid`; the whole answer, its last line `OK` or `ERR`.
pub fn run(shared: &Shared, udp: Option<&UdpSocket>, req: &Request<'_>, uid: u32) -> String {
    match req {
        Request::List { json } => list(shared, *json),
        Request::Say { to, text } => say(shared, *to, text, uid),
        Request::Kick { peer } => kick(shared, *peer, uid),
        Request::Stats => stats(shared),
        Request::Udp { to, text } => send_udp(udp, *to, text, uid),
    }
}

fn list(shared: &Shared, json: bool) -> String {
    let now = Instant::now();
    let rows: Vec<Row> = shared
        .conns
        .snapshot()
        .iter()
        .map(|l| row(l, now))
        .collect();
    let mut out = if json {
        control::list_json(&rows)
    } else {
        control::list_text(&rows)
    };
    out.push_str(&control::ok_line(&format!("{} connection(s)", rows.len())));
    out
}

fn row(live: &Live, now: Instant) -> Row {
    let file = live.upload().map(|(up, received)| FileRow {
        name: up.name,
        received,
        size: up.size,
        elapsed: now.saturating_duration_since(up.started),
    });
    Row {
        peer: live.peer().to_string(),
        state: live.state().as_str(),
        age: now.saturating_duration_since(live.since),
        bytes_in: live.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
        bytes_out: live.sent(),
        file,
    }
}

/// Tallies of a `say`.
#[derive(Default)]
struct Tally {
    sent: usize,
    queued: usize,
    busy: usize,
    dropped: usize,
}

impl Tally {
    fn note(&mut self, said: Said) {
        match said {
            Said::Sent => self.sent += 1,
            Said::Queued => self.queued += 1,
            Said::Busy => self.busy += 1,
            Said::Dropped => self.dropped += 1,
        }
    }
}

fn say(shared: &Shared, to: Option<SocketAddr>, text: &str, uid: u32) -> String {
    let mut shown = String::new();
    push_chat_text(&mut shown, text.as_bytes());
    let line = wire::server_say(&shown);
    let conns = shared.conns.snapshot();
    let mut tally = Tally::default();
    let mut room = 0;
    match to {
        Some(addr) => {
            let Some(live) = find(&conns, addr) else {
                return control::err_line(&format_args!("no connection from {addr}"));
            };
            match live.state() {
                State::Queued => tally.note(Said::Dropped),
                State::Chat => match shared.room.tell_peer(live.peer(), line.as_bytes()) {
                    true => tally.note(Said::Sent),
                    false => tally.note(Said::Dropped),
                },
                State::Echo => tally.note(live.say_echo(line.as_bytes())),
                State::Receiving => {
                    return control::err_line(&format_args!(
                        "{} is receiving a file; say it after the answer",
                        live.peer()
                    ));
                }
            }
        }
        None => {
            for live in &conns {
                // Not to a connection in the middle of a file: its client waits for the answer.
                if live.state() == State::Echo {
                    tally.note(live.say_echo(line.as_bytes()));
                }
            }
            room = shared.room.announce(line.as_bytes());
        }
    }
    logger::info!(
        "control: uid {uid} said {:?} to {}",
        shown,
        to.map_or_else(|| "everyone".to_string(), |a| a.to_string())
    );
    control::ok_line(&format!(
        "sent {}, queued {}, busy {}, dropped {}, chat members {room}",
        tally.sent, tally.queued, tally.busy, tally.dropped
    ))
}

fn find(conns: &[Arc<Live>], addr: SocketAddr) -> Option<&Arc<Live>> {
    let want = crate::peer::Peer::new(addr);
    conns.iter().find(|l| l.peer() == want)
}

fn kick(shared: &Shared, addr: SocketAddr, uid: u32) -> String {
    let conns = shared.conns.snapshot();
    let Some(live) = find(&conns, addr) else {
        return control::err_line(&format_args!("no connection from {addr}"));
    };
    if !live.kick(uid) {
        return control::err_line(&format_args!(
            "{} is queued, not served yet; kick it once a worker takes it",
            live.peer()
        ));
    }
    logger::info!("control: uid {uid} kicks {}", live.peer());
    control::ok_line(&format!("kicked {}", live.peer()))
}

fn stats(shared: &Shared) -> String {
    format!(
        "status: {}\nsummary: {}\n{}",
        shared.status(),
        shared.stats.summary(),
        control::ok_line("")
    )
}

fn send_udp(udp: Option<&UdpSocket>, to: SocketAddr, text: &str, uid: u32) -> String {
    let Some(socket) = udp else {
        return control::err_line(&"this daemon has no UDP socket (udp.enabled)");
    };
    // The socket is non-blocking only if the UDP thread made it so: a full send buffer fails
    // here rather than waiting.
    match socket.send_to(text.as_bytes(), to) {
        Ok(n) => {
            logger::info!("control: uid {uid} sent a {n} B datagram to {to}");
            control::ok_line(&format!("sent {n} B to {to}"))
        }
        Err(e) => control::err_line(&format_args!("cannot send to {to}: {e}")),
    }
}
