//! The PROXY protocol header (v1 text, v2 binary) a balancer sends before its client's bytes:
//! how many more bytes to read before it is whole, and the client address it carries. Pure: the
//! caller reads exactly the bytes `step` asks for, so not one byte of the client's own is taken;
//! the parsing itself is the `ppp` crate's.

use std::fmt;
use std::net::SocketAddr;

use ppp::v1;
use ppp::v2;

/// The 12 bytes a v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What a v1 header starts with.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, `\r\n` included (the specification's limit).
pub const V1_MAX_LEN: usize = 107;
/// v2: the signature, version and command, family and protocol, and the 16-bit length.
const V2_FIXED: usize = 16;
/// The longest v2 header accepted, TLVs included. HAProxy's `send-proxy-v2` sends 28 bytes for
/// IPv4 and 52 for IPv6, plus the TLVs it is told to add; 512 leaves room for those.
pub const MAX_LEN: usize = 512;

/// What the bytes read so far call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read exactly this many more bytes (never past the end of the header).
    Need(usize),
    /// The header is whole: it was all the bytes given.
    Done(Proxied),
}

/// A whole header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    /// 1 or 2.
    pub version: u8,
    /// The client's address and port; `None` for a v2 `LOCAL` command (the balancer's own health
    /// check) or a v1 `UNKNOWN` or v2 unspecified or UNIX address: the connection is then the
    /// balancer's own.
    pub source: Option<SocketAddr>,
}

/// Why the bytes are not a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The first bytes are neither a v1 nor a v2 signature.
    NotProxy,
    /// Longer than `V1_MAX_LEN` (v1) or `MAX_LEN` (v2).
    TooLong,
    /// The signature is right but the rest is not a valid header.
    Invalid,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyError::NotProxy => "no PROXY protocol signature",
            ProxyError::TooLong => "PROXY header too long",
            ProxyError::Invalid => "invalid PROXY header",
        })
    }
}

/// Given the bytes read so far (`buf` holds nothing after the header, since only what `Need`
/// asked for is read), says how many more to read, or what the whole header carries.
pub fn step(buf: &[u8]) -> Result<Step, ProxyError> {
    match buf.first() {
        None => Ok(Step::Need(1)),
        Some(b'\r') => step_v2(buf),
        Some(b'P') => step_v1(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

fn step_v2(buf: &[u8]) -> Result<Step, ProxyError> {
    let sig = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig] != V2_SIGNATURE[..sig] {
        return Err(ProxyError::NotProxy);
    }
    let Some(len) = buf.get(14..V2_FIXED) else {
        return Ok(Step::Need(V2_FIXED - buf.len()));
    };
    let total = V2_FIXED + usize::from(u16::from_be_bytes([len[0], len[1]]));
    if total > MAX_LEN {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < total {
        return Ok(Step::Need(total - buf.len()));
    }
    let header = v2::Header::try_from(buf).map_err(|_| ProxyError::Invalid)?;
    let source = match (header.command, header.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
    };
    Ok(Step::Done(Proxied { version: 2, source }))
}

fn step_v1(buf: &[u8]) -> Result<Step, ProxyError> {
    let pre = buf.len().min(V1_PREFIX.len());
    if buf[..pre] != V1_PREFIX[..pre] {
        return Err(ProxyError::NotProxy);
    }
    if !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyError::TooLong);
        }
        // The line's end is not known in advance: one byte at a time, at most 107 of them.
        return Ok(Step::Need(1));
    }
    let header = v1::Header::try_from(buf).map_err(|_| ProxyError::Invalid)?;
    let source = match header.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    };
    Ok(Step::Done(Proxied { version: 1, source }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` as a reader would: only what each step asks for. Returns the result and how
    /// many bytes were taken.
    fn drive(bytes: &[u8]) -> (Result<Proxied, ProxyError>, usize) {
        let mut n = 0;
        loop {
            match step(&bytes[..n]) {
                Ok(Step::Done(p)) => return (Ok(p), n),
                Ok(Step::Need(k)) => {
                    assert!(k > 0);
                    if n + k > bytes.len() {
                        return (Err(ProxyError::Invalid), usize::MAX);
                    }
                    n += k;
                }
                Err(e) => return (Err(e), n),
            }
        }
    }

    fn v2_header(cmd: u8, fam: u8, addr: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(cmd);
        h.push(fam);
        h.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        h.extend_from_slice(addr);
        h
    }

    fn v2_ipv4() -> Vec<u8> {
        // 203.0.113.7:4242 -> 127.0.0.1:7000, TCP over IPv4.
        v2_header(
            0x21,
            0x11,
            &[203, 0, 113, 7, 127, 0, 0, 1, 0x10, 0x92, 0x1b, 0x58],
        )
    }

    #[test]
    fn whole_headers_carry_the_client_and_take_no_byte_more() {
        let mut v6 = vec![0u8; 36];
        v6[15] = 1; // ::1
        v6[31] = 1;
        v6[32..34].copy_from_slice(&5000u16.to_be_bytes());
        let cases: Vec<(Vec<u8>, Proxied)> = vec![
            (
                b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 7000\r\n".to_vec(),
                Proxied {
                    version: 1,
                    source: Some("198.51.100.9:40000".parse().unwrap()),
                },
            ),
            (
                b"PROXY TCP6 2001:db8::5 ::1 40001 7000\r\n".to_vec(),
                Proxied {
                    version: 1,
                    source: Some("[2001:db8::5]:40001".parse().unwrap()),
                },
            ),
            (
                b"PROXY UNKNOWN\r\n".to_vec(),
                Proxied {
                    version: 1,
                    source: None,
                },
            ),
            (
                v2_ipv4(),
                Proxied {
                    version: 2,
                    source: Some("203.0.113.7:4242".parse().unwrap()),
                },
            ),
            (
                v2_header(0x21, 0x21, &v6),
                Proxied {
                    version: 2,
                    source: Some("[::1]:5000".parse().unwrap()),
                },
            ),
            (
                v2_header(0x20, 0x00, &[]),
                Proxied {
                    version: 2,
                    source: None,
                },
            ),
        ];
        for (bytes, want) in cases {
            let mut with_data = bytes.clone();
            with_data.extend_from_slice(b"hello\n\xF5FRY");
            let (got, taken) = drive(&with_data);
            assert_eq!(got, Ok(want), "{bytes:?}");
            assert_eq!(taken, bytes.len(), "{bytes:?}");
        }
    }

    #[test]
    fn mutated_headers_never_ask_past_the_limit() {
        // A small xorshift, so that the run is the same every time.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = [
            v2_ipv4(),
            b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 7000\r\n".to_vec(),
        ];
        for _ in 0..20_000 {
            let mut bytes = seeds[(next() % 2) as usize].clone();
            for _ in 0..=next() % 4 {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            bytes.extend((0..next() % 600).map(|_| next() as u8));
            let mut have = 0;
            while let Ok(Step::Need(n)) = step(&bytes[..have]) {
                assert!(n > 0 && have + n <= MAX_LEN, "{bytes:?}");
                if have + n > bytes.len() {
                    break;
                }
                have += n;
            }
        }
    }

    #[test]
    fn every_truncated_prefix_asks_for_more() {
        let v1 = b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 7000\r\n".to_vec();
        for whole in [v1, v2_ipv4()] {
            for n in 0..whole.len() {
                assert!(
                    matches!(step(&whole[..n]), Ok(Step::Need(k)) if n + k <= whole.len()),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn other_bytes_are_refused_before_a_byte_too_many() {
        let cases: [(&[u8], ProxyError); 6] = [
            (b"hello\n", ProxyError::NotProxy),
            (b"PRONTO", ProxyError::NotProxy),
            (b"\r\n\r\nXXXXXXXXXXXXXXXX", ProxyError::NotProxy),
            (b"\xF5FRY\x01", ProxyError::NotProxy),
            (b"PROXY TCP4 not an address\r\n", ProxyError::Invalid),
            (b"PROXY TCP9 1.2.3.4 1.2.3.4 1 2\r\n", ProxyError::Invalid),
        ];
        for (bytes, want) in cases {
            assert_eq!(drive(bytes).0, Err(want), "{bytes:?}");
        }
        let long = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(drive(&long), (Err(ProxyError::TooLong), V1_MAX_LEN));
        let mut big = v2_header(0x21, 0x11, &[]);
        big[14..16].copy_from_slice(&(MAX_LEN as u16).to_be_bytes());
        assert_eq!(drive(&big).0, Err(ProxyError::TooLong));
        // A v2 version other than 2, and a short address block for its family.
        assert_eq!(
            drive(&v2_header(0x31, 0x11, &[0; 12])).0,
            Err(ProxyError::Invalid)
        );
        assert_eq!(
            drive(&v2_header(0x21, 0x11, &[0; 4])).0,
            Err(ProxyError::Invalid)
        );
    }
}
