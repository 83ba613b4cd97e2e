//! Who may connect: allow and deny lists of addresses and CIDR ranges (deny wins). Pure: an
//! address in, a verdict out.

use std::fmt;
use std::net::IpAddr;

use crate::peer::canonical_ip;

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or a single address (a /32 or /128).
/// IPv4-mapped IPv6 ranges (`::ffff:10.0.0.0/104`) are stored as the IPv4 range they cover, so
/// that they match IPv4 peers, which is what peers of a dual-stack socket are reported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr` or `addr/prefix`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{s:?}: the prefix length must be 0–{max}")),
            },
        };
        // An IPv4-mapped range with a prefix inside the IPv4 part becomes that IPv4 range.
        if let (IpAddr::V6(v6), true) = (addr, prefix >= 96) {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Ok(Cidr::new(IpAddr::V4(v4), prefix - 96));
            }
        }
        Ok(Cidr::new(addr, prefix))
    }

    fn new(addr: IpAddr, prefix: u8) -> Cidr {
        // Store the network address, so `10.1.2.3/8` displays as `10.0.0.0/8`.
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(prefix)).into()),
        };
        Cidr { addr, prefix }
    }

    /// Whether `ip` (already canonical: IPv4-mapped turned into IPv4) is in this range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                u32::from(a) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                u128::from(a) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// The allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Empty means everyone (not denied) may connect.
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

/// Why a peer may not connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A deny rule matched.
    Denied(Cidr),
    /// An allow list exists and no rule in it matched.
    NotAllowed,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Denied(rule) => write!(f, "matches access.deny rule {rule}"),
            Refusal::NotAllowed => f.write_str("matches no access.allow rule"),
        }
    }
}

impl Rules {
    /// Deny wins: a peer in a deny range is refused even if an allow range also holds it.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical_ip(ip);
        if let Some(rule) = self.deny.iter().find(|r| r.contains(ip)) {
            return Err(Refusal::Denied(*rule));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|r| r.contains(ip)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> Rules {
        Rules {
            allow: allow.iter().map(|s| Cidr::parse(s).unwrap()).collect(),
            deny: deny.iter().map(|s| Cidr::parse(s).unwrap()).collect(),
        }
    }

    #[test]
    fn parse_and_display() {
        let cases = [
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("192.168.1.7", "192.168.1.7/32"),
            ("2001:db8::1/32", "2001:db8::/32"),
            ("::1", "::1/128"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:127.0.0.1", "127.0.0.1/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::/0", "::/0"),
        ];
        for (input, want) in cases {
            assert_eq!(Cidr::parse(input).unwrap().to_string(), want, "{input}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "host.example",
            "10.0.0.0/x",
            "1.2.3.4/-1",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_deny_table() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let r = rules(
            &["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"],
            &["10.9.0.0/16", "2001:db8:bad::/48"],
        );
        let cases: [(&str, Result<(), Refusal>); 10] = [
            ("10.1.2.3", Ok(())),
            (
                "10.9.1.1",
                Err(Refusal::Denied(Cidr::parse("10.9.0.0/16").unwrap())),
            ),
            ("11.0.0.1", Err(Refusal::NotAllowed)),
            ("127.0.0.1", Ok(())),
            ("127.0.0.2", Err(Refusal::NotAllowed)),
            ("2001:db8::5", Ok(())),
            (
                "2001:db8:bad::5",
                Err(Refusal::Denied(Cidr::parse("2001:db8:bad::/48").unwrap())),
            ),
            ("::1", Err(Refusal::NotAllowed)),
            // IPv4-mapped peers match the IPv4 rules.
            ("::ffff:10.1.2.3", Ok(())),
            (
                "::ffff:10.9.0.1",
                Err(Refusal::Denied(Cidr::parse("10.9.0.0/16").unwrap())),
            ),
        ];
        for (peer, want) in cases {
            assert_eq!(r.check(ip(peer)), want, "{peer}");
        }
        // No allow list: everyone not denied.
        let open = rules(&[], &["192.0.2.0/24", "::ffff:198.51.100.0/120"]);
        assert_eq!(open.check(ip("8.8.8.8")), Ok(()));
        assert!(open.check(ip("192.0.2.9")).is_err());
        assert!(
            open.check(ip("198.51.100.4")).is_err(),
            "a mapped deny rule matches IPv4 peers"
        );
        assert!(open.check(ip("::ffff:192.0.2.9")).is_err());
        // Deny wins over an allow of the same address.
        assert!(
            rules(&["1.2.3.4"], &["1.2.3.4"])
                .check(ip("1.2.3.4"))
                .is_err()
        );
    }
}
