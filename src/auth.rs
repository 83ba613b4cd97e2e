//! Upload authorization with a shared key: the key file, the per-connection nonce, and
//! HMAC-SHA256 tags, compared in constant time.
//!
//! When `files.token_file` is set, the server opens every connection with `NONCE <64 hex>\n`.
//! An authenticated frame sets header flag bit 0 and carries, right after its name, the 32-byte
//! tag `HMAC-SHA256(key, "ferryd upload v1\0" ‖ nonce ‖ seq ‖ header ‖ name)`, where `seq` is the
//! number of authenticated frames the connection has carried before (u64, big-endian). The
//! header holds the body's BLAKE3, so the tag covers the body too; the nonce ties it to one
//! connection and `seq` to one place in it, so a recorded frame cannot be replayed. The key never
//! crosses the wire. With `access.require_token`, text is refused until the line
//! `AUTH <hex of HMAC-SHA256(key, "ferryd auth v1\0" ‖ nonce)>` has been sent.
//!
//! A frame with a trailing checksum (header flag bit 2) has a zero checksum field, so its first
//! tag authorizes the frame (nonce, seq, header, name) before any body is stored but cannot cover
//! the body; a second tag right after the trailing checksum binds the checksum to the first tag:
//! `HMAC-SHA256(key, "ferryd trailer v1\0" ‖ first tag ‖ checksum)`. The first tag already names
//! the nonce and seq, so the second inherits its protection against replay.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::proto::HEADER_LEN;

pub const NONCE_LEN: usize = 32;
pub const TAG_LEN: usize = 32;
/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

const UPLOAD_CONTEXT: &[u8] = b"ferryd upload v1\0";
const AUTH_CONTEXT: &[u8] = b"ferryd auth v1\0";
const TRAILER_CONTEXT: &[u8] = b"ferryd trailer v1\0";

type HmacSha256 = Hmac<Sha256>;

/// The shared key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

#[derive(Debug)]
pub enum KeyError {
    Read { path: PathBuf, err: std::io::Error },
    TooShort { path: PathBuf, len: usize },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Read { path, err } => {
                write!(f, "cannot read the key file {}: {err}", path.display())
            }
            KeyError::TooShort { path, len } => write!(
                f,
                "the key in {} is {len} bytes; at least {MIN_KEY_LEN} are needed (e.g. head -c 32 /dev/urandom | base64 > {})",
                path.display(),
                path.display()
            ),
        }
    }
}

impl std::error::Error for KeyError {}

impl Key {
    /// Reads a key file: its contents without surrounding whitespace. Returns the key and
    /// whether the file is readable by group or others (worth a warning).
    pub fn load(path: &Path) -> Result<(Key, bool), KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let read_err = |err| KeyError::Read {
            path: path.to_path_buf(),
            err,
        };
        let bytes = std::fs::read(path).map_err(read_err)?;
        let exposed = std::fs::metadata(path)
            .map_err(read_err)?
            .permissions()
            .mode()
            & 0o077
            != 0;
        let key = bytes.trim_ascii().to_vec();
        if key.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                path: path.to_path_buf(),
                len: key.len(),
            });
        }
        Ok((Key(key), exposed))
    }

    pub fn from_bytes(bytes: &[u8]) -> Key {
        Key(bytes.to_vec())
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; this cannot fail.
        <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    fn upload_mac(
        &self,
        nonce: &[u8; NONCE_LEN],
        seq: u64,
        header: &[u8; HEADER_LEN],
        name: &[u8],
    ) -> HmacSha256 {
        let mut mac = self.mac();
        mac.update(UPLOAD_CONTEXT);
        mac.update(nonce);
        mac.update(&seq.to_be_bytes());
        mac.update(header);
        mac.update(name);
        mac
    }

    /// The tag a client sends after the name of its `seq`-th authenticated frame.
    pub fn upload_tag(
        &self,
        nonce: &[u8; NONCE_LEN],
        seq: u64,
        header: &[u8; HEADER_LEN],
        name: &[u8],
    ) -> [u8; TAG_LEN] {
        self.upload_mac(nonce, seq, header, name)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a frame's tag in constant time.
    pub fn verify_upload(
        &self,
        nonce: &[u8; NONCE_LEN],
        seq: u64,
        header: &[u8; HEADER_LEN],
        name: &[u8],
        tag: &[u8],
    ) -> bool {
        self.upload_mac(nonce, seq, header, name)
            .verify_slice(tag)
            .is_ok()
    }

    fn trailer_mac(&self, first_tag: &[u8; TAG_LEN], checksum: &[u8; 32]) -> HmacSha256 {
        let mut mac = self.mac();
        mac.update(TRAILER_CONTEXT);
        mac.update(first_tag);
        mac.update(checksum);
        mac
    }

    /// The tag a client sends after the trailing checksum of a frame whose first tag was
    /// `first_tag`.
    pub fn trailer_tag(&self, first_tag: &[u8; TAG_LEN], checksum: &[u8; 32]) -> [u8; TAG_LEN] {
        self.trailer_mac(first_tag, checksum)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a trailer tag in constant time.
    pub fn verify_trailer(
        &self,
        first_tag: &[u8; TAG_LEN],
        checksum: &[u8; 32],
        tag: &[u8],
    ) -> bool {
        self.trailer_mac(first_tag, checksum)
            .verify_slice(tag)
            .is_ok()
    }

    /// The tag of the `AUTH` line.
    pub fn auth_tag(&self, nonce: &[u8; NONCE_LEN]) -> [u8; TAG_LEN] {
        let mut mac = self.mac();
        mac.update(AUTH_CONTEXT);
        mac.update(nonce);
        mac.finalize().into_bytes().into()
    }

    /// Checks an `AUTH` line's tag in constant time.
    pub fn verify_auth(&self, nonce: &[u8; NONCE_LEN], tag: &[u8]) -> bool {
        let mut mac = self.mac();
        mac.update(AUTH_CONTEXT);
        mac.update(nonce);
        mac.verify_slice(tag).is_ok()
    }
}

/// A fresh random nonce from the kernel.
pub fn new_nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < NONCE_LEN {
        filled +=
            rustix::rand::getrandom(&mut nonce[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(nonce)
}

/// Decodes lowercase or uppercase hex; `None` for anything else.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_bind_nonce_seq_header_and_name() {
        let key = Key::from_bytes(b"0123456789abcdef-secret");
        let nonce = [7u8; NONCE_LEN];
        let header = [1u8; HEADER_LEN];
        let tag = key.upload_tag(&nonce, 0, &header, b"a.txt");
        assert!(key.verify_upload(&nonce, 0, &header, b"a.txt", &tag));
        let mut other_header = header;
        other_header[20] ^= 1;
        type Case<'a> = (&'a [u8; NONCE_LEN], u64, &'a [u8; HEADER_LEN], &'a [u8]);
        let cases: [Case; 4] = [
            (&[8u8; NONCE_LEN], 0, &header, b"a.txt"),
            (&nonce, 1, &header, b"a.txt"),
            (&nonce, 0, &other_header, b"a.txt"),
            (&nonce, 0, &header, b"b.txt"),
        ];
        for (n, seq, h, name) in cases {
            assert!(!key.verify_upload(n, seq, h, name, &tag), "seq {seq}");
        }
        assert!(
            !Key::from_bytes(b"another key, also long")
                .verify_upload(&nonce, 0, &header, b"a.txt", &tag)
        );
        assert!(!key.verify_upload(&nonce, 0, &header, b"a.txt", &tag[..31]));
    }

    #[test]
    fn trailer_tags_bind_the_first_tag_and_the_checksum() {
        let key = Key::from_bytes(b"0123456789abcdef-secret");
        let first = [5u8; TAG_LEN];
        let sum = [9u8; 32];
        let tag = key.trailer_tag(&first, &sum);
        assert!(key.verify_trailer(&first, &sum, &tag));
        let mut other_sum = sum;
        other_sum[31] ^= 1;
        let mut other_first = first;
        other_first[0] ^= 1;
        let cases: [(&[u8; TAG_LEN], &[u8; 32], &[u8]); 3] = [
            (&other_first, &sum, &tag),
            (&first, &other_sum, &tag),
            (&first, &sum, &tag[..31]),
        ];
        for (f, c, t) in cases {
            assert!(!key.verify_trailer(f, c, t));
        }
        assert!(!Key::from_bytes(b"another key, also long").verify_trailer(&first, &sum, &tag));
        // Known answer: HMAC-SHA256("0123456789abcdef-secret", "ferryd trailer v1\0" ‖
        // 32 × 0x05 ‖ 32 × 0x09), as computed by Python's hmac module.
        assert_eq!(crate::proto::wire::hex(&tag), KNOWN_TRAILER_TAG);
    }

    const KNOWN_TRAILER_TAG: &str =
        "03ee8c1b91ed4aef031ccce93724ce02d7dae233a78c3591ab95b30a074b65bc";

    #[test]
    fn auth_line_tag() {
        let key = Key::from_bytes(b"0123456789abcdef");
        let nonce = [3u8; NONCE_LEN];
        let tag = key.auth_tag(&nonce);
        assert!(key.verify_auth(&nonce, &tag));
        assert!(!key.verify_auth(&[4u8; NONCE_LEN], &tag));
        // Known answer: HMAC-SHA256("0123456789abcdef", "ferryd auth v1\0" ‖ 32 × 0x03), as
        // computed by Python's hmac module.
        assert_eq!(crate::proto::wire::hex(&tag), KNOWN_AUTH_TAG);
    }

    const KNOWN_AUTH_TAG: &str = "8dcaf8043ae4f967301f544b739d33c1bd465a98aee85ebcff99a55f7f706cfd";

    #[test]
    fn hex() {
        assert_eq!(from_hex("00ff7A"), Some(vec![0, 255, 122]));
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(""), Some(vec![]));
    }
}
