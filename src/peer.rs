//! How a peer is named in logs and notices: `[127.0.0.1:5000]` for IPv4 (including IPv4 clients
//! of a dual-stack `::` listener, which the kernel reports as `::ffff:a.b.c.d`) and `[::1]:5000`
//! for IPv6.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A connected peer's address, normalised so that IPv4-mapped IPv6 addresses are plain IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer(SocketAddr);

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = canonical_ip(addr.ip());
        Peer(SocketAddr::new(ip, addr.port()))
    }

    /// The address, IPv4-mapped addresses already turned into IPv4.
    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }

    /// The address with its port, IPv4-mapped addresses already turned into IPv4.
    pub fn addr(&self) -> SocketAddr {
        self.0
    }
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; every other address is unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            SocketAddr::V4(a) => write!(f, "[{a}]"),
            SocketAddr::V6(a) => write!(f, "{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let cases = [
            ("127.0.0.1:5000", "[127.0.0.1:5000]"),
            ("[::1]:5000", "[::1]:5000"),
            ("[::ffff:10.0.0.7]:42", "[10.0.0.7:42]"),
            ("[fe80::1]:7", "[fe80::1]:7"),
        ];
        for (addr, want) in cases {
            let peer = Peer::new(addr.parse().unwrap());
            assert_eq!(peer.to_string(), want);
        }
    }
}
