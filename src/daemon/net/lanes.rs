//! The work queue's policy, pure: which lane a waiting connection joins, when one has waited too
//! long, whose place a newcomer takes when the queue is full, and when the pool hires a worker.
//! `net::queue` carries it out over crossbeam channels; nothing here touches a socket or a clock.
//!
//! A connection joins a lane by what is known of its address group when it arrives
//! (`AddressLoad`), and workers take from the lightest lane first (`select_biased!` in lane
//! order): a client from a quiet address does not wait behind a crowd from a busy one, and a
//! newcomer (no connection held, hardly any made recently: `net::recent`) goes before addresses
//! that churn, so that 200 addresses reconnecting as fast as they can do not shut it out.

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
    /// The address holds no other connection.
    Light,
    /// The address holds others already.
    Heavy,
}

/// How many lanes there are.
pub const LANES: usize = 3;

impl Lane {
    /// Every lane, lightest first.
    pub const ALL: [Lane; LANES] = [Lane::Fresh, Lane::Light, Lane::Heavy];

    /// The lane's place in `ALL`.
    pub fn index(self) -> usize {
        match self {
            Lane::Fresh => 0,
            Lane::Light => 1,
            Lane::Heavy => 2,
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
/// someone and is heavier than the newcomer's; `None` refuses the newcomer instead.
pub fn displace(newcomer: Lane, waiting: [usize; LANES]) -> Option<Lane> {
    Lane::ALL
        .into_iter()
        .rev()
        .find(|&l| l > newcomer && waiting[l.index()] > 0)
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
        assert!(Lane::Fresh < Lane::Light && Lane::Light < Lane::Heavy);
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
        use Lane::{Fresh, Heavy, Light};
        let table = [
            (Light, [0, 0, 3], Some(Heavy)),
            (Light, [0, 5, 1], Some(Heavy)),
            (Light, [0, 5, 0], None),
            (Light, [2, 0, 0], None),
            (Heavy, [0, 5, 3], None),
            (Heavy, [0, 0, 0], None),
            (Light, [0, 0, 0], None),
            (Fresh, [4, 2, 1], Some(Heavy)),
            (Fresh, [4, 2, 0], Some(Light)),
            (Fresh, [4, 0, 0], None),
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
