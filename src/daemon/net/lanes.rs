//! The work queue's policy, pure: which lane a waiting connection joins, when one has waited too
//! long, whose place a newcomer takes when the queue is full, and when the pool hires a worker.
//! `net::queue` carries it out over crossbeam channels; nothing here touches a socket or a clock.
//!
//! A connection joins a lane by what is known of its address group when it arrives
//! (`AddressLoad`), and workers take from the lightest lane first (a biased `Select` in lane
//! order): a client from a quiet address does not wait behind a crowd from a busy one, and a
//! newcomer (no connection held, hardly any made recently: `net::recent`) goes before addresses
//! that churn, so that 200 addresses reconnecting as fast as they can do not shut it out.
//!
//! A connection from a balancer (`access.proxy_protocol_from`) arrives with its client unknown:
//! it waits in its own lane (`Lane::Unread`) until a worker has read its PROXY header, which
//! names the client; then the worker sorts it by its client as above (`wait_again`): served at
//! once, or back in its client's lane, behind whoever may be lighter.

use std::time::{Duration, Instant};

/// What is known of a newcomer's address when it is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressLoad {
    /// Connections the address group holds besides this one: served or waiting.
    pub held: u32,
    /// The group's recent connections, this one included, as `net::recent::Recent::rank` gives
    /// them (a decaying count, times four).
    pub recent: u64,
}

/// The highest `AddressLoad::recent` of a newcomer: this connection and at most half of one more
/// in the last half-life (`net::recent::HALF_LIFE`).
pub const FRESH_RANK: u64 = 6;

/// A lane of the work queue. Workers take from a lighter lane before a heavier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    /// The address holds no other connection and made hardly any recently: a newcomer.
    Fresh,
    /// From a balancer, its PROXY header not read yet: its client, so its lane, is unknown.
    /// A worker takes these after the newcomers, reads the header and sorts the connection by
    /// its client (`wait_again`).
    Unread,
    /// The address holds no other connection.
    Light,
    /// The address holds others already.
    Heavy,
}

/// How many lanes there are.
pub const LANES: usize = 4;

impl Lane {
    /// Every lane, in the order workers take from them.
    pub const ALL: [Lane; LANES] = [Lane::Fresh, Lane::Unread, Lane::Light, Lane::Heavy];

    /// The lane's place in `ALL`.
    pub fn index(self) -> usize {
        match self {
            Lane::Fresh => 0,
            Lane::Unread => 1,
            Lane::Light => 2,
            Lane::Heavy => 3,
        }
    }

    /// The lane's name in the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Fresh => "fresh",
            Lane::Unread => "unread",
            Lane::Light => "light",
            Lane::Heavy => "heavy",
        }
    }

    /// What a connection of this lane weighs when the full queue chooses whom to refuse: an
    /// unread one from a balancer as much as one from an address holding nothing else (as
    /// before its header is read nothing more is known of it).
    fn weight(self) -> u8 {
        match self {
            Lane::Fresh => 0,
            Lane::Unread | Lane::Light => 1,
            Lane::Heavy => 2,
        }
    }

    /// The lightest lane a connection waiting here may turn out to belong to: an unread one's
    /// client may be a newcomer.
    fn at_best(self) -> Lane {
        match self {
            Lane::Unread => Lane::Fresh,
            l => l,
        }
    }
}

/// The lane a connection joins, from what is known of its address.
pub fn lane(load: AddressLoad) -> Lane {
    match (load.held, load.recent) {
        (0, r) if r <= FRESH_RANK => Lane::Fresh,
        (0, _) => Lane::Light,
        _ => Lane::Heavy,
    }
}

/// Whether a connection queued at `since` has waited `timeout` or longer at `now`.
pub fn expired(since: Instant, now: Instant, timeout: Duration) -> bool {
    now.saturating_duration_since(since) >= timeout
}

/// Whether the queue is full: `waiting` connections wait, and the room is `depth` places plus the
/// workers that could take a connection now or soon (`free_workers`).
pub fn is_full(waiting: usize, depth: usize, free_workers: usize) -> bool {
    waiting >= depth + free_workers
}

/// When the queue is full: the lane from which the oldest waiting connection is told `ERR busy`
/// so that a newcomer of lane `newcomer` can wait in its place. The heaviest lane that holds
/// someone and weighs more than the newcomer's (among equals, a known light address before an
/// unread balancer connection); `None` refuses the newcomer instead.
pub fn displace(newcomer: Lane, waiting: [usize; LANES]) -> Option<Lane> {
    [Lane::Heavy, Lane::Light, Lane::Unread, Lane::Fresh]
        .into_iter()
        .find(|&l| l.weight() > newcomer.weight() && waiting[l.index()] > 0)
}

/// Once a worker has read a balancer connection's PROXY header and found its client's lane
/// `client` (from `lane`, as for a direct connection): whether the connection waits again, at
/// the back of that lane, instead of being served now, while `waiting` connections wait in each
/// lane (itself not counted). It waits again when someone who may be lighter waits: in a lighter
/// lane, or unread (a newcomer, perhaps) unless its own client is a newcomer. A worker serves a
/// connection whose header was read when it takes it again, so each waits again at most once.
pub fn wait_again(client: Lane, waiting: [usize; LANES]) -> bool {
    Lane::ALL
        .into_iter()
        .any(|l| waiting[l.index()] > 0 && l.at_best() < client)
}

/// Whether the pool hires one more worker: more connections wait than workers are idle, and the
/// pool holds fewer than its maximum.
pub fn should_hire(waiting: usize, idle: usize, live: usize, max_workers: usize) -> bool {
    waiting > idle && live < max_workers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newcomer_goes_first_then_an_address_holding_nothing_else() {
        let table = [
            (0, 4, Lane::Fresh),
            (0, FRESH_RANK, Lane::Fresh),
            (0, FRESH_RANK + 1, Lane::Light),
            (0, u64::MAX, Lane::Light),
            (1, 0, Lane::Heavy),
            (1, 4, Lane::Heavy),
            (u32::MAX, u64::MAX, Lane::Heavy),
        ];
        for (held, recent, want) in table {
            assert_eq!(lane(AddressLoad { held, recent }), want, "{held} {recent}");
        }
        assert!(Lane::Fresh < Lane::Unread && Lane::Unread < Lane::Light);
        assert!(Lane::Light < Lane::Heavy);
        for (i, l) in Lane::ALL.into_iter().enumerate() {
            assert_eq!(l.index(), i);
        }
    }

    #[test]
    fn expiry_is_at_the_timeout_not_before() {
        let t0 = Instant::now();
        let two = Duration::from_secs(2);
        for (after, want) in [(0, false), (1999, false), (2000, true), (5000, true)] {
            let now = t0 + Duration::from_millis(after);
            assert_eq!(expired(t0, now, two), want, "after {after} ms");
        }
        // A clock read before the push (another thread's) is not an expiry.
        assert!(!expired(t0 + two, t0, two));
    }

    #[test]
    fn the_room_counts_free_workers() {
        for (waiting, depth, free, want) in [
            (0, 1, 0, false),
            (1, 1, 0, true),
            (1, 1, 1, false),
            (2, 1, 1, true),
            (0, 0, 0, true),
        ] {
            assert_eq!(
                is_full(waiting, depth, free),
                want,
                "{waiting} {depth} {free}"
            );
        }
    }

    #[test]
    fn a_newcomer_displaces_only_a_heavier_lane() {
        use Lane::{Fresh, Heavy, Light, Unread};
        // Waiting in [fresh, unread, light, heavy].
        let table = [
            (Light, [0, 0, 0, 3], Some(Heavy)),
            (Light, [0, 0, 5, 1], Some(Heavy)),
            (Light, [0, 0, 5, 0], None),
            (Light, [2, 0, 0, 0], None),
            (Heavy, [0, 0, 5, 3], None),
            (Heavy, [0, 0, 0, 0], None),
            (Light, [0, 0, 0, 0], None),
            (Fresh, [4, 0, 2, 1], Some(Heavy)),
            (Fresh, [4, 0, 2, 0], Some(Light)),
            (Fresh, [4, 0, 0, 0], None),
            // An unread balancer connection weighs as a light address, either way.
            (Light, [0, 3, 0, 0], None),
            (Unread, [0, 0, 3, 0], None),
            (Unread, [0, 2, 0, 1], Some(Heavy)),
            (Unread, [5, 0, 0, 0], None),
            (Fresh, [0, 3, 0, 0], Some(Unread)),
            (Fresh, [0, 3, 1, 0], Some(Light)),
        ];
        for (newcomer, waiting, want) in table {
            assert_eq!(
                displace(newcomer, waiting),
                want,
                "{newcomer:?} {waiting:?}"
            );
        }
    }

    #[test]
    fn a_proxied_connection_waits_again_only_behind_someone_who_may_be_lighter() {
        use Lane::{Fresh, Heavy, Light};
        // Waiting in [fresh, unread, light, heavy], the connection itself aside.
        let table = [
            // Its client is a newcomer: served at once, whoever waits.
            (Fresh, [0, 0, 0, 0], false),
            (Fresh, [3, 3, 3, 3], false),
            // An address holding nothing else, but not new: behind a newcomer, or behind an
            // unread connection (which may be one), not behind its equals or heavier.
            (Light, [0, 0, 0, 0], false),
            (Light, [1, 0, 0, 0], true),
            (Light, [0, 1, 0, 0], true),
            (Light, [0, 0, 4, 4], false),
            // An address holding others: behind anyone not heavy.
            (Heavy, [0, 0, 0, 0], false),
            (Heavy, [0, 0, 0, 7], false),
            (Heavy, [1, 0, 0, 7], true),
            (Heavy, [0, 1, 0, 0], true),
            (Heavy, [0, 0, 1, 7], true),
        ];
        for (client, waiting, want) in table {
            assert_eq!(wait_again(client, waiting), want, "{client:?} {waiting:?}");
        }
    }

    #[test]
    fn workers_are_hired_while_connections_outnumber_the_idle_up_to_the_limit() {
        for (waiting, idle, live, max, want) in [
            (1, 0, 0, 2, true),
            (2, 1, 1, 2, true),
            (1, 1, 1, 2, false),
            (3, 0, 2, 2, false),
            (0, 0, 0, 2, false),
        ] {
            assert_eq!(
                should_hire(waiting, idle, live, max),
                want,
                "{waiting} {idle} {live} {max}"
            );
        }
    }
}
