//! The fixed 48-byte file header: parsing a possibly incomplete prefix (rejecting bad bytes as
//! soon as they arrive) and encoding one, both with `byteorder` in big-endian.

use std::fmt;

use byteorder::{BigEndian, ByteOrder};

/// The four magic bytes that open every frame.
pub const MAGIC: [u8; 4] = [0xF5, b'F', b'R', b'Y'];
/// The only protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 48;
/// Longest file name, in bytes (the common file-system limit, NAME_MAX).
pub const MAX_NAME_LEN: u16 = 255;
/// Flag bit 0: an HMAC-SHA256 tag of `TAG_LEN` bytes follows the name (see `crate::auth`).
pub const FLAG_AUTH: u8 = 0x01;
/// Flag bit 1: the checksum is SHA-256 of the body instead of BLAKE3.
pub const FLAG_SHA256: u8 = 0x02;
/// Flag bit 2: the checksum follows the body (`CHECKSUM_LEN` bytes right after its last byte)
/// and the header's checksum field is zero, or, with `FLAG_RESUME`, the sender's resume id.
pub const FLAG_TRAILING: u8 = 0x04;
/// Every flag bit this build knows; the others must be zero.
pub const KNOWN_FLAGS: u8 = FLAG_AUTH | FLAG_SHA256 | FLAG_TRAILING | FLAG_RESUME;
/// Length of a checksum, either algorithm.
pub const CHECKSUM_LEN: usize = 32;
/// Length of the tag of an authenticated frame.
pub const TAG_LEN: usize = 32;
/// Flag bit 3: the frame may be resumed. After the head the server answers `RESUME <offset>`
/// (`wire::resume_line`) and the body on the wire is only its bytes from `offset` on; the header
/// still gives the whole file's size, and its checksum field identifies the partial body the
/// server kept: the checksum itself, or, with `FLAG_TRAILING`, a 32-byte resume id the sender
/// chose for this version of the file (the checksum then follows the body, and covers the whole
/// file, kept prefix included).
pub const FLAG_RESUME: u8 = 0x08;

const VERSION_AT: usize = 4;
const FLAGS_AT: usize = 5;
const NAME_LEN_AT: usize = 6;
const SIZE_AT: usize = 8;
const CHECKSUM_AT: usize = 16;

/// The hash a frame's checksum is made with (flag bit 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algo {
    /// BLAKE3-256, the default 32-byte hash (as `b3sum` prints it).
    #[default]
    Blake3,
    /// SHA-256 (as `sha256sum` prints it), in every language's standard library.
    Sha256,
}

impl Algo {
    /// The name used in logs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Algo::Blake3 => "blake3",
            Algo::Sha256 => "sha256",
        }
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A complete, checked header. The name (and tag) and body follow it on the wire, and with
/// `trailing` the checksum after the body. `Default` is a BLAKE3 header-checksum frame, to
/// build on with `..Header::default()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Flag bit 0: the frame carries an authentication tag after its name.
    pub authenticated: bool,
    /// Flag bit 1: which hash the checksum is.
    pub algo: Algo,
    /// Flag bit 2: the checksum follows the body; `checksum` is then all zero.
    pub trailing: bool,
    pub name_len: u16,
    pub size: u64,
    pub checksum: [u8; 32],
}

/// A parse that needs more bytes is not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<T> {
    Complete(T),
    /// Every byte so far is valid; more are needed.
    Partial,
}

/// What is wrong with a header. Small and `Copy`, with static lowercase messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The first byte announced a frame but the rest of the magic is wrong.
    Magic,
    /// A version this build does not speak.
    Version(u8),
    /// Flag bits outside `KNOWN_FLAGS` were set.
    Flags(u8),
    /// A trailing-checksum frame, not resumable, whose header checksum field is not zero.
    TrailingChecksum,
    /// The name length is 0 or over 255.
    NameLength(u16),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Magic => f.write_str("bad magic: a frame starts with F5 46 52 59"),
            FrameError::Version(v) => {
                write!(
                    f,
                    "unsupported version {v}; this server speaks version {VERSION}"
                )
            }
            FrameError::Flags(b) => write!(f, "reserved flag bits set: {b:#04x}"),
            FrameError::TrailingChecksum => f.write_str(
                "flag bit 2 (trailing checksum) is set without bit 3 (resumable) but the header's checksum field is not zero",
            ),
            FrameError::NameLength(0) => f.write_str("empty name"),
            FrameError::NameLength(n) => {
                write!(f, "name length {n} is over {MAX_NAME_LEN} bytes")
            }
        }
    }
}

impl std::error::Error for FrameError {}

impl Header {
    /// Parses the header at the start of `buf`, which may be shorter than `HEADER_LEN`. Each field
    /// is checked as soon as its bytes are present, so garbage is refused without waiting for 48
    /// bytes that may never come. Bytes past `HEADER_LEN` are ignored.
    pub fn parse(buf: &[u8]) -> Result<Parsed<Header>, FrameError> {
        let have = buf.len().min(HEADER_LEN);
        let magic_have = have.min(MAGIC.len());
        if buf[..magic_have] != MAGIC[..magic_have] {
            return Err(FrameError::Magic);
        }
        if let Some(&v) = buf.get(VERSION_AT) {
            if v != VERSION {
                return Err(FrameError::Version(v));
            }
        }
        if let Some(&flags) = buf.get(FLAGS_AT) {
            if flags & !KNOWN_FLAGS != 0 {
                return Err(FrameError::Flags(flags));
            }
        }
        if let Some(b) = buf.get(NAME_LEN_AT..NAME_LEN_AT + 2) {
            let n = BigEndian::read_u16(b);
            if n == 0 || n > MAX_NAME_LEN {
                return Err(FrameError::NameLength(n));
            }
        }
        let Some(buf) = buf.get(..HEADER_LEN) else {
            return Ok(Parsed::Partial);
        };
        let mut checksum = [0u8; 32];
        checksum.copy_from_slice(&buf[CHECKSUM_AT..HEADER_LEN]);
        let flags = buf[FLAGS_AT];
        let trailing = flags & FLAG_TRAILING != 0;
        // A resumable trailing frame carries its resume id there.
        if trailing && flags & FLAG_RESUME == 0 && checksum != [0; 32] {
            return Err(FrameError::TrailingChecksum);
        }
        Ok(Parsed::Complete(Header {
            authenticated: flags & FLAG_AUTH != 0,
            algo: if flags & FLAG_SHA256 != 0 {
                Algo::Sha256
            } else {
                Algo::Blake3
            },
            trailing,
            name_len: BigEndian::read_u16(&buf[NAME_LEN_AT..SIZE_AT]),
            size: BigEndian::read_u64(&buf[SIZE_AT..CHECKSUM_AT]),
            checksum,
        }))
    }

    /// Whether the encoded header `raw` asks for a resumable upload (flag bit 3). Kept out of
    /// `Header` so that its fields, which many callers build, stay as they are.
    pub fn resume_flag(raw: &[u8; HEADER_LEN]) -> bool {
        raw[FLAGS_AT] & FLAG_RESUME != 0
    }

    /// `raw` with the resume flag set.
    pub fn with_resume_flag(mut raw: [u8; HEADER_LEN]) -> [u8; HEADER_LEN] {
        raw[FLAGS_AT] |= FLAG_RESUME;
        raw
    }

    /// The flags byte.
    pub fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.authenticated {
            flags |= FLAG_AUTH;
        }
        if self.algo == Algo::Sha256 {
            flags |= FLAG_SHA256;
        }
        if self.trailing {
            flags |= FLAG_TRAILING;
        }
        flags
    }

    /// Encodes the header (a trailing frame's checksum field as given: zero on the wire, or the
    /// resume id of a resumable one).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[VERSION_AT] = VERSION;
        out[FLAGS_AT] = self.flags();
        BigEndian::write_u16(&mut out[NAME_LEN_AT..SIZE_AT], self.name_len);
        BigEndian::write_u64(&mut out[SIZE_AT..CHECKSUM_AT], self.size);
        out[CHECKSUM_AT..].copy_from_slice(&self.checksum);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            authenticated: false,
            algo: Algo::Blake3,
            trailing: false,
            name_len: 9,
            size: 0x0102_0304_0506_0708,
            checksum: *blake3::hash(b"hello").as_bytes(),
        }
    }

    #[test]
    fn encodes_the_documented_layout() {
        let bytes = sample().encode();
        assert_eq!(&bytes[..8], b"\xF5FRY\x01\x00\x00\x09");
        assert_eq!(&bytes[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&bytes[16..], blake3::hash(b"hello").as_bytes());
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::parse(&h.encode()), Ok(Parsed::Complete(h)));
        let mut longer = h.encode().to_vec();
        longer.extend_from_slice(b"photo.jpg and body");
        assert_eq!(Header::parse(&longer), Ok(Parsed::Complete(h)));
    }

    #[test]
    fn the_resume_flag_is_known_and_read_from_the_raw_bytes() {
        let plain = sample().encode();
        assert!(!Header::resume_flag(&plain));
        let resumable = Header::with_resume_flag(plain);
        assert!(Header::resume_flag(&resumable));
        assert_eq!(resumable[5], FLAG_RESUME);
        assert_eq!(Header::parse(&resumable), Ok(Parsed::Complete(sample())));
        let mut both = Header::with_resume_flag(
            Header {
                authenticated: true,
                ..sample()
            }
            .encode(),
        );
        assert_eq!(both[5], FLAG_AUTH | FLAG_RESUME);
        // Resumable and trailing: the checksum field is the sender's resume id, any 32 bytes;
        // without the resume flag a trailing frame's field must be zero.
        both[5] = FLAG_RESUME | FLAG_TRAILING;
        let id = [0xA5; 32];
        both[CHECKSUM_AT..].copy_from_slice(&id);
        let want = Header {
            trailing: true,
            checksum: id,
            ..sample()
        };
        assert_eq!(Header::parse(&both), Ok(Parsed::Complete(want)));
        assert_eq!(Header::parse(&both[..=FLAGS_AT]), Ok(Parsed::Partial));
        both[5] = FLAG_TRAILING;
        assert_eq!(Header::parse(&both), Err(FrameError::TrailingChecksum));
    }

    #[test]
    fn every_truncated_prefix_is_partial() {
        let bytes = sample().encode();
        for len in 0..HEADER_LEN {
            assert_eq!(
                Header::parse(&bytes[..len]),
                Ok(Parsed::Partial),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn bad_bytes_are_refused_as_soon_as_they_arrive() {
        let good = sample().encode();
        let cases: [(usize, u8, FrameError); 11] = [
            (1, b'f', FrameError::Magic),
            (2, b'X', FrameError::Magic),
            (3, 0, FrameError::Magic),
            (4, 0, FrameError::Version(0)),
            (4, 2, FrameError::Version(2)),
            (5, 0x20, FrameError::Flags(0x20)),
            (5, 0x81, FrameError::Flags(0x81)),
            (5, 0x10, FrameError::Flags(0x10)),
            (5, 0xff, FrameError::Flags(0xff)),
            (7, 0, FrameError::NameLength(0)),
            (6, 1, FrameError::NameLength(0x0109)),
        ];
        for (at, byte, want) in cases {
            let mut bad = good;
            bad[at] = byte;
            let field_end = if at == 6 || at == 7 { 8 } else { at + 1 };
            // Refused with exactly the bytes up to the bad field, and with every longer prefix.
            for len in field_end..=HEADER_LEN {
                assert_eq!(
                    Header::parse(&bad[..len]),
                    Err(want),
                    "byte {at} = {byte:#x}, {len} bytes"
                );
            }
            // A shorter prefix that stops before the bad field is still partial.
            assert_eq!(Header::parse(&bad[..at.min(6)]), Ok(Parsed::Partial));
        }
    }

    #[test]
    fn name_length_limits() {
        for (n, ok) in [
            (0u16, false),
            (1, true),
            (255, true),
            (256, false),
            (u16::MAX, false),
        ] {
            let h = Header {
                name_len: n,
                ..sample()
            };
            let got = Header::parse(&h.encode());
            assert_eq!(got.is_ok(), ok, "name_len {n}: {got:?}");
        }
    }

    #[test]
    fn auth_flag_round_trips() {
        let h = Header {
            authenticated: true,
            ..sample()
        };
        let bytes = h.encode();
        assert_eq!(bytes[5], FLAG_AUTH);
        assert_eq!(Header::parse(&bytes), Ok(Parsed::Complete(h)));
    }

    #[test]
    fn every_flag_combination() {
        for flags in 0..=u8::MAX {
            let mut bytes = sample().encode();
            bytes[FLAGS_AT] = flags;
            if flags & FLAG_TRAILING != 0 {
                bytes[CHECKSUM_AT..].fill(0);
            }
            let got = Header::parse(&bytes);
            if flags & !KNOWN_FLAGS != 0 {
                assert_eq!(got, Err(FrameError::Flags(flags)), "flags {flags:#04x}");
                // Refused as soon as the flags byte arrives.
                assert_eq!(Header::parse(&bytes[..=FLAGS_AT]), got);
                continue;
            }
            // The resume flag lives in the raw bytes only.
            let resume = flags & FLAG_RESUME != 0;
            let Ok(Parsed::Complete(h)) = got else {
                panic!("flags {flags:#04x}: {got:?}");
            };
            assert_eq!(h.authenticated, flags & FLAG_AUTH != 0);
            assert_eq!(h.algo == Algo::Sha256, flags & FLAG_SHA256 != 0);
            assert_eq!(h.trailing, flags & FLAG_TRAILING != 0);
            assert_eq!(h.flags(), flags & !FLAG_RESUME);
            assert_eq!(Header::resume_flag(&bytes), resume);
            let encoded = if resume {
                Header::with_resume_flag(h.encode())
            } else {
                h.encode()
            };
            assert_eq!(encoded, bytes);
            for len in 0..HEADER_LEN {
                assert_eq!(Header::parse(&bytes[..len]), Ok(Parsed::Partial), "{len}");
            }
        }
    }

    #[test]
    fn trailing_needs_a_zero_checksum_field() {
        let h = Header {
            trailing: true,
            algo: Algo::Sha256,
            ..sample()
        };
        // sample() has a non-zero checksum: refused only once the whole field is there.
        let bytes = h.encode();
        for len in 0..HEADER_LEN {
            assert_eq!(Header::parse(&bytes[..len]), Ok(Parsed::Partial), "{len}");
        }
        assert_eq!(Header::parse(&bytes), Err(FrameError::TrailingChecksum));
        let zero = Header {
            checksum: [0; 32],
            ..h
        };
        assert_eq!(Header::parse(&zero.encode()), Ok(Parsed::Complete(zero)));
        assert_eq!(zero.encode()[FLAGS_AT], FLAG_SHA256 | FLAG_TRAILING);
    }

    #[test]
    fn any_size_parses() {
        for size in [0, 1, u64::MAX] {
            let h = Header { size, ..sample() };
            assert_eq!(Header::parse(&h.encode()), Ok(Parsed::Complete(h)));
        }
    }

    /// A property test standing in for a fuzzer in `cargo test` (the cargo-fuzz target is in
    /// `fuzz/`): random bytes and damaged valid headers never panic, and the parser's answers
    /// for the prefixes of one input are consistent with each other.
    #[test]
    fn prefixes_agree_on_random_input() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20_000 {
            let mut buf = if round % 2 == 0 {
                let trailing = next() % 2 == 0;
                let h = Header {
                    authenticated: next() % 2 == 0,
                    algo: if next() % 2 == 0 {
                        Algo::Sha256
                    } else {
                        Algo::Blake3
                    },
                    trailing,
                    name_len: (next() % 300) as u16,
                    size: next(),
                    checksum: if trailing {
                        [0; 32]
                    } else {
                        [next() as u8; 32]
                    },
                };
                h.encode().to_vec()
            } else {
                (0..next() % 64).map(|_| next() as u8).collect()
            };
            for _ in 0..next() % 3 {
                if !buf.is_empty() {
                    let at = (next() % buf.len() as u64) as usize;
                    buf[at] ^= 1 << (next() % 8);
                }
            }
            let mut first_err = None;
            for len in 0..=buf.len() {
                match (Header::parse(&buf[..len]), first_err) {
                    (Err(e), None) => first_err = Some(e),
                    (Err(e), Some(first)) => assert_eq!(e, first, "{buf:?} at {len}"),
                    (Ok(_), Some(first)) => {
                        panic!("{buf:?}: {first:?} at a shorter prefix, then ok at {len}")
                    }
                    (Ok(Parsed::Partial), None) => assert!(len < HEADER_LEN, "{buf:?}"),
                    (Ok(Parsed::Complete(h)), None) => {
                        assert!(len >= HEADER_LEN);
                        // The resume flag lives in the raw bytes only.
                        let resume = buf.get(5).is_some_and(|f| f & FLAG_RESUME != 0);
                        let encoded = if resume {
                            Header::with_resume_flag(h.encode())
                        } else {
                            h.encode()
                        };
                        assert_eq!(encoded[..], buf[..HEADER_LEN]);
                    }
                }
            }
        }
    }
}
