//! Which addresses count as one peer: an IPv4 address on its own, an IPv6 address together with
//! every other in its `/access.ipv6_prefix_len` (default /64, what one host or home usually
//! holds). Every per-address count and share keys on `of(ip)`: `max_per_ip` (`access`), the
//! queue's fair order and the recent-connection weights (`waiting`, `recent`), the choice of a
//! connection to end (`evict`), the chat room's shares and the UDP token buckets.
//!
//! The prefix length is process-wide, so every table agrees on the groups: set from
//! `access.ipv6_prefix_len` before the first connection and again at each reload. A count keeps
//! the group it was made in (a `Slot` remembers its key), so a change never unbalances one.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU8, Ordering};

/// The default and the bounds of `access.ipv6_prefix_len`.
pub const DEFAULT_IPV6_PREFIX_LEN: u8 = 64;
const MIN_LEN: u8 = 32;
const MAX_LEN: u8 = 128;

static IPV6_PREFIX_LEN: AtomicU8 = AtomicU8::new(DEFAULT_IPV6_PREFIX_LEN);

/// Sets the prefix length (clamped to 32..=128, the key's range).
pub fn set_ipv6_prefix_len(len: u32) {
    let len = u8::try_from(len).unwrap_or(MAX_LEN).clamp(MIN_LEN, MAX_LEN);
    IPV6_PREFIX_LEN.store(len, Ordering::Relaxed);
}

/// The group `ip` belongs to, as an address: itself for IPv4 (and IPv4-mapped IPv6), its
/// network address for IPv6.
pub fn of(ip: IpAddr) -> IpAddr {
    of_with(ip, IPV6_PREFIX_LEN.load(Ordering::Relaxed))
}

/// `of` with an explicit prefix length.
pub fn of_with(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(u32::from(128 - len.min(128)))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups() {
        let cases: [(&str, u8, &str); 7] = [
            ("192.0.2.7", 64, "192.0.2.7"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 48, "2001:db8:1::"),
            (
                "2001:db8:1:2:aaaa:bbbb:cccc:dddd",
                128,
                "2001:db8:1:2:aaaa:bbbb:cccc:dddd",
            ),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 32, "2001:db8::"),
            ("::ffff:192.0.2.7", 64, "192.0.2.7"),
            ("::1", 64, "::"),
        ];
        for (ip, len, want) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                of_with(ip, len),
                want.parse::<IpAddr>().unwrap(),
                "{ip}/{len}"
            );
        }
    }
}
