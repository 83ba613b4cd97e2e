//! The whole head of a frame, parsed from one byte slice: the 48-byte header, the name and, on an
//! authenticated frame, the tag. Like httparse's `Request::parse`, it answers `Partial` until
//! every byte of the head is there, and refuses bad bytes as soon as they arrive; the connection
//! code only fills a buffer and calls it again.

use crate::proto::header::{FrameError, HEADER_LEN, Header, MAX_NAME_LEN, Parsed, TAG_LEN};

/// The longest head: header, a 255-byte name and a tag.
pub const MAX_HEAD_LEN: usize = HEADER_LEN + MAX_NAME_LEN as usize + TAG_LEN;

/// A complete frame head, borrowing the name from the parsed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead<'a> {
    pub header: Header,
    /// The header's 48 bytes as they arrived (an upload tag covers them).
    pub raw_header: [u8; HEADER_LEN],
    /// The raw name, `header.name_len` bytes; its rules are checked by `name::validate`.
    pub name: &'a [u8],
    /// The tag, present exactly when `header.authenticated`.
    pub tag: Option<[u8; TAG_LEN]>,
    /// How many bytes of the input the head took; the body starts right after.
    pub len: usize,
}

impl FrameHead<'_> {
    /// The frame asks to be resumable (flag bit 3, `header::FLAG_RESUME`).
    pub fn resumable(&self) -> bool {
        Header::resume_flag(&self.raw_header)
    }

    /// Parses the head at the start of `buf`. Bytes past the head (the body) are left alone.
    pub fn parse(buf: &[u8]) -> Result<Parsed<FrameHead<'_>>, FrameError> {
        let header = match Header::parse(buf)? {
            Parsed::Complete(h) => h,
            Parsed::Partial => return Ok(Parsed::Partial),
        };
        let name_end = HEADER_LEN + usize::from(header.name_len);
        let len = name_end + if header.authenticated { TAG_LEN } else { 0 };
        let (Some(raw_header), Some(name), Some(tag)) = (
            buf.get(..HEADER_LEN),
            buf.get(HEADER_LEN..name_end),
            buf.get(name_end..len),
        ) else {
            return Ok(Parsed::Partial);
        };
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(raw_header);
        let tag = header.authenticated.then(|| {
            let mut t = [0u8; TAG_LEN];
            t.copy_from_slice(tag);
            t
        });
        Ok(Parsed::Complete(FrameHead {
            header,
            raw_header: head,
            name,
            tag,
            len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(authenticated: bool, name: &[u8]) -> Vec<u8> {
        let header = Header {
            authenticated,
            name_len: u16::try_from(name.len()).unwrap(),
            size: 3,
            checksum: *blake3::hash(b"abc").as_bytes(),
            ..Header::default()
        };
        let mut out = header.encode().to_vec();
        out.extend_from_slice(name);
        if authenticated {
            out.extend_from_slice(&[0xAA; TAG_LEN]);
        }
        out.extend_from_slice(b"abc");
        out
    }

    #[test]
    fn complete_heads() {
        let long = [b'n'; MAX_NAME_LEN as usize];
        let cases: [(bool, &[u8]); 4] = [
            (false, b"a"),
            (false, "照片.jpg".as_bytes()),
            (true, b"photo.jpg"),
            (true, &long),
        ];
        for (auth, name) in cases {
            let bytes = frame(auth, name);
            let Ok(Parsed::Complete(head)) = FrameHead::parse(&bytes) else {
                panic!("{name:?}: not complete");
            };
            assert_eq!(head.name, name);
            assert_eq!(head.tag.is_some(), auth);
            assert_eq!(head.len, bytes.len() - 3, "the body is left alone");
            assert_eq!(&head.raw_header, &bytes[..HEADER_LEN]);
            assert!(head.len <= MAX_HEAD_LEN);
        }
    }

    #[test]
    fn every_truncated_prefix_is_partial() {
        for auth in [false, true] {
            let bytes = frame(auth, b"photo.jpg");
            let head_len = bytes.len() - 3;
            for len in 0..head_len {
                assert_eq!(
                    FrameHead::parse(&bytes[..len]),
                    Ok(Parsed::Partial),
                    "auth {auth}, prefix of {len} bytes"
                );
            }
        }
    }

    #[test]
    fn header_errors_come_through() {
        let mut bytes = frame(false, b"x");
        bytes[4] = 9;
        assert_eq!(FrameHead::parse(&bytes), Err(FrameError::Version(9)));
        assert_eq!(FrameHead::parse(&bytes[..5]), Err(FrameError::Version(9)));
        assert_eq!(FrameHead::parse(&bytes[..4]), Ok(Parsed::Partial));
    }

    /// The fuzz target's properties in `cargo test`: random and damaged heads never panic, a
    /// complete head matches its bytes, its every prefix is partial, and an error stays one.
    #[test]
    fn random_heads_keep_the_fuzz_properties() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..5_000 {
            let mut buf = if round % 2 == 0 {
                let name_len = usize::try_from(next() % 300).unwrap();
                let mut b = frame(next() % 2 == 0, &vec![b'a'; name_len.max(1)]);
                b.truncate(usize::try_from(next()).unwrap() % (b.len() + 1));
                b
            } else {
                let len = usize::try_from(next() % 400).unwrap();
                (0..len).map(|_| next().to_le_bytes()[0]).collect()
            };
            if !buf.is_empty() && next() % 3 == 0 {
                let at = usize::try_from(next()).unwrap() % buf.len();
                buf[at] ^= 1 << (next() % 8);
            }
            match FrameHead::parse(&buf) {
                Ok(Parsed::Complete(head)) => {
                    assert_eq!(head.raw_header[..], buf[..HEADER_LEN]);
                    assert_eq!(head.name.len(), usize::from(head.header.name_len));
                    for len in 0..head.len {
                        assert_eq!(FrameHead::parse(&buf[..len]), Ok(Parsed::Partial));
                    }
                }
                Ok(Parsed::Partial) => assert!(buf.len() < MAX_HEAD_LEN, "{buf:?}"),
                Err(e) => {
                    let mut longer = buf.clone();
                    longer.extend_from_slice(&[0u8; 64]);
                    assert_eq!(FrameHead::parse(&longer), Err(e));
                }
            }
        }
    }
}
