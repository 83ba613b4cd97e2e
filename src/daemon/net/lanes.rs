//! The work queue's policy, pure: which lane a waiting connection joins, when one has waited too
//! long, whose place a newcomer takes when the queue is full, and when the pool hires a worker.
//! `net::queue` carries it out over crossbeam channels; nothing here touches a socket or a clock.
//!
//! A connection joins a lane by what is known of its address when it arrives (`AddressLoad`), and
//! workers take from the lightest lane first (`select_biased!` in lane order). Today the lane
//! says only whether the address holds other connections: a client from a quiet address does not
//! wait behind a crowd from a busy one. A later rule may also weigh an address's recent connects.

use std::time::{Duration, Instant};

/// What is known of a newcomer's address when it is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressLoad {
    /// Connections the address holds besides this one: served or waiting.
    pub held: u32,
}

/// A lane of the work queue. Workers take from a lighter lane before a heavier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    /// The address holds no other connection.
    Light,
    /// The address holds others already.
    Heavy,
}

/// How many lanes there are.
pub const LANES: usize = 2;

impl Lane {
    /// Every lane, lightest first.
    pub const ALL: [Lane; LANES] = [Lane::Light, Lane::Heavy];

    /// The lane's place in `ALL`.
    pub fn index(self) -> usize {
        match self {
            Lane::Light => 0,
            Lane::Heavy => 1,
        }
    }
}

/// The lane a connection joins, from what is known of its address.
pub fn lane(load: AddressLoad) -> Lane {
    if load.held == 0 {
        Lane::Light
    } else {
        Lane::Heavy
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
    fn an_address_holding_nothing_else_goes_light() {
        for (held, want) in [(0, Lane::Light), (1, Lane::Heavy), (u32::MAX, Lane::Heavy)] {
            assert_eq!(lane(AddressLoad { held }), want, "held {held}");
        }
        assert!(Lane::Light < Lane::Heavy, "workers take light first");
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
        use Lane::{Heavy, Light};
        let table = [
            (Light, [0, 3], Some(Heavy)),
            (Light, [5, 1], Some(Heavy)),
            (Light, [5, 0], None),
            (Heavy, [5, 3], None),
            (Heavy, [0, 0], None),
            (Light, [0, 0], None),
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
