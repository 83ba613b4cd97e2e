//! Connections open per address, for `access.max_per_ip`: a counted `Slot` per connection whose
//! drop uncounts it. An address is its group (`addrgroup`: an IPv6 peer's /64 by default).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::config::Config;
use crate::daemon::access::addrgroup;

/// Connections open per address.
#[derive(Debug, Default)]
pub struct PerIp {
    /// Counts as u64 (they never pass `u32::MAX`, the largest cap): the same map type as the
    /// refusal log's, so the hash table code is in the binary once for both.
    counts: Mutex<HashMap<IpAddr, u64>>,
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// Counts a connection from `ip` unless `max` are open already; returns how many are.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Result<Slot, u32> {
        let ip = addrgroup::of(ip);
        let mut counts = self.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= u64::from(max) {
            return Err(u32::try_from(*n).unwrap_or(u32::MAX));
        }
        *n += 1;
        Ok(Slot {
            owner: Arc::clone(self),
            ip,
        })
    }

    /// Connections open (served or queued) from `ip`.
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        let n = self.lock().get(&addrgroup::of(ip)).copied().unwrap_or(0);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, u64>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `max_per_ip` cap for `ip`: none for loopback peers under `access.exempt_loopback`.
pub fn cap(cfg: &Config, ip: IpAddr) -> u32 {
    if cfg.access.exempt_loopback && ip.is_loopback() {
        u32::MAX
    } else {
        cfg.access.max_per_ip
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.owner.lock();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_counts_and_releases() {
        let p = Arc::new(PerIp::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let slots: Vec<Slot> = (0..3).map(|_| p.acquire(a, 3).unwrap()).collect();
        assert_eq!(p.acquire(a, 3).unwrap_err(), 3);
        assert!(p.acquire(b, 3).is_ok(), "another address has its own count");
        drop(slots);
        assert_eq!(p.open_from(a), 0);
        assert!(p.acquire(a, 3).is_ok());
    }
}
