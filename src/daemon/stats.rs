//! Daemon-wide counters, updated with relaxed atomics and read for the shutdown summary (and, with
//! systemd, the `STATUS=` line).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections being served by a worker now.
    pub open: AtomicU64,
    /// Connections accepted and waiting for a worker now.
    pub queued: AtomicU64,
    /// Connections refused because the work queue was full.
    pub refused_busy: AtomicU64,
    /// Connections refused by the access rules or `max_per_ip`.
    pub refused_access: AtomicU64,
    /// Bytes received from and sent to TCP peers.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Files stored, and frames that ended in an `ERR`.
    pub files_stored: AtomicU64,
    pub files_failed: AtomicU64,
    /// UDP datagrams received.
    pub udp_in: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// Counts one in `counter` until the returned guard is dropped (on every path, unwinding
    /// included).
    pub fn hold(counter: &AtomicU64) -> Held<'_> {
        Stats::add(counter, 1);
        Held(counter)
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// One line for logs, e.g. `accepted 12, open 3, queued 0, refused busy 1, …`.
    pub fn summary(&self) -> String {
        format!(
            "accepted {}, open {}, queued {}, refused busy {}, files stored {}, files failed {}, in {} B, out {} B",
            Stats::get(&self.accepted),
            Stats::get(&self.open),
            Stats::get(&self.queued),
            Stats::get(&self.refused_busy),
            Stats::get(&self.files_stored),
            Stats::get(&self.files_failed),
            Stats::get(&self.bytes_in),
            Stats::get(&self.bytes_out),
        )
    }
}

/// One counted unit; see `Stats::hold`.
#[must_use = "the count goes down again when the guard is dropped"]
pub struct Held<'a>(&'a AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        Stats::sub(self.0, 1);
    }
}
