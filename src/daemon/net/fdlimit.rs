//! The descriptor limit: at start-up, raising the soft `RLIMIT_NOFILE` (up to the hard one) to
//! what the configured limits need and warning when even that is too small; while serving, the
//! spare descriptor that lets the accept loop take a connection and tell it `ERR busy` when the
//! process is out of descriptors, instead of leaving it in the backlog unanswered.

use std::io;
use std::net::TcpListener;
use std::os::fd::OwnedFd;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::config::Config;
use crate::logger;

/// Descriptors the daemon holds whatever the load: stdio, the listener and the UDP socket, the
/// spare, the signal and notify sockets, a log pipe, and a margin.
const CONSTANT: u64 = 32;

/// Descriptors the configured limits need: each served connection holds its socket and, while
/// it uploads, a temp file; each queued connection its socket.
pub fn needed(cfg: &Config) -> u64 {
    let s = &cfg.server;
    2 * s.max_connections as u64 + s.queue_depth as u64 + CONSTANT
}

/// What `ensure` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The soft limit was enough already.
    Enough { soft: u64 },
    /// The soft limit was raised to `to`, enough.
    Raised { from: u64, to: u64 },
    /// Even the hard limit (or the raise) falls short: connections beyond it get `ERR busy`.
    Short {
        soft: u64,
        hard: Option<u64>,
        need: u64,
    },
}

/// Raises the soft descriptor limit to `need` if it is lower, as far as the hard limit allows.
pub fn ensure(need: u64) -> Outcome {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    // None means unlimited.
    let soft = current.unwrap_or(u64::MAX);
    if soft >= need {
        return Outcome::Enough { soft };
    }
    let target = maximum.map_or(need, |hard| hard.min(need));
    if target > soft {
        let raised = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum,
            },
        );
        if raised.is_ok() && target >= need {
            return Outcome::Raised {
                from: soft,
                to: target,
            };
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    Outcome::Short {
        soft,
        hard: maximum,
        need,
    }
}

/// Logs what `ensure` did: a warning when the limit is short.
pub fn log_outcome(outcome: &Outcome) {
    match outcome {
        Outcome::Enough { .. } => {}
        Outcome::Raised { from, to } => {
            logger::info!("raised the descriptor limit (RLIMIT_NOFILE) from {from} to {to}");
        }
        Outcome::Short { soft, hard, need } => {
            let hard = hard.map_or("unlimited".to_string(), |h| h.to_string());
            logger::warn!(
                "the descriptor limit (RLIMIT_NOFILE) is {soft} (hard {hard}), but server.max_connections and server.queue_depth need about {need}; connections beyond it are refused with ERR busy (raise LimitNOFILE= or ulimit -n, or lower those limits)"
            );
        }
    }
}

/// One descriptor kept in reserve: released to accept a connection when the process is out of
/// descriptors, so that the connection can be told `ERR busy` and closed, then taken back.
pub struct Spare(Option<OwnedFd>);

impl Spare {
    /// Reserves a descriptor (a duplicate of the listening socket, which needs no file system).
    pub fn new(listener: &TcpListener) -> Spare {
        Spare(rustix::io::dup(listener).ok())
    }

    /// Releases the reserve for a moment.
    pub fn release(&mut self) {
        self.0 = None;
    }

    /// Takes the reserve back; false if no descriptor was free.
    pub fn retake(&mut self, listener: &TcpListener) -> bool {
        if self.0.is_none() {
            self.0 = rustix::io::dup(listener).ok();
        }
        self.0.is_some()
    }
}

/// An `accept` error meaning the process or the system is out of descriptors.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_grows_with_the_limits() {
        let mut c = Config::default();
        assert_eq!(needed(&c), 2 * 64 + 16 + CONSTANT);
        c.server.max_connections = 1000;
        c.server.queue_depth = 100;
        assert_eq!(needed(&c), 2100 + CONSTANT);
    }

    #[test]
    fn exhaustion_errors() {
        let cases = [
            (io::Error::from_raw_os_error(24), true),
            (io::Error::from_raw_os_error(23), true),
            (io::Error::from_raw_os_error(103), false),
            (io::Error::other("x"), false),
        ];
        for (e, want) in cases {
            assert_eq!(is_exhaustion(&e), want, "{e}");
        }
    }

    #[test]
    fn a_small_need_is_already_met() {
        assert!(matches!(ensure(8), Outcome::Enough { .. }));
    }
}
