//! The wire protocol, without I/O: the fixed file header, the rules for file names, where a frame
//! may start in a stream of text, the whole frame head, and every line the server sends.
//! Everything here takes bytes and returns a `Result`; only the daemon and the client touch
//! sockets and files. Nothing here imports from the rest of the crate.
//!
//! A connection is a stream of *messages*: text lines and file frames, in any order. A frame may
//! start where a message may start: at the beginning of the connection, right after a `\n`, or
//! right after the previous frame. Its first byte, 0xF5, never occurs in UTF-8 text, so a person
//! typing into `nc` is never taken for a file.
//!
//! ```text
//! offset size  field
//!      0    4  magic      F5 46 52 59   ("\xF5FRY")
//!      4    1  version    01
//!      5    1  flags      bit 0: a 32-byte auth tag follows the name
//!                         bit 1: the checksum is SHA-256 (else BLAKE3)
//!                         bit 2: the checksum follows the body (the field below is zero)
//!                         bits 3-7: zero
//!      6    2  name_len   u16, big-endian, 1..=255
//!      8    8  size       u64, big-endian, body length in bytes
//!     16   32  checksum   BLAKE3-256 or SHA-256 of the body; zero with bit 2
//!     48       name       name_len bytes of UTF-8 (see `name::validate`)
//!              tag        32 bytes, only with flag bit 0 (HMAC-SHA256, see `crate::auth`)
//!              body       exactly `size` bytes
//!              checksum   32 bytes, only with flag bit 2
//!              tag        32 bytes, only with flag bits 0 and 2 (binds the trailing checksum)
//! ```
//!
//! The server answers every frame with one line: `OK <stored-name> <size> <checksum-hex>` or
//! `ERR <code> <reason>` (codes in `Code`).

pub mod control;
pub mod decimal;
pub mod head;
pub mod header;
pub mod name;
pub mod proxy;
pub mod starstar;
pub mod wire;

pub use head::{FrameHead, MAX_HEAD_LEN};
pub use header::{Algo, FrameError, HEADER_LEN, Header, MAGIC, Parsed};
pub use wire::Code;

/// How many leading bytes of `data` are text, i.e. come before the first place a frame starts.
/// `at_message_start` says whether `data[0]` begins a message (start of connection, after a
/// newline, or after a frame). Returns `data.len()` when no frame starts in `data`.
pub fn text_len(data: &[u8], at_message_start: bool) -> usize {
    let mut from = 0;
    while let Some(i) = data[from..].iter().position(|&b| b == MAGIC[0]) {
        let i = from + i;
        let starts_message = if i == 0 {
            at_message_start
        } else {
            data[i - 1] == b'\n'
        };
        if starts_message {
            return i;
        }
        from = i + 1;
    }
    data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_frames_start() {
        let cases: [(&[u8], bool, usize); 9] = [
            (b"hello\n", true, 6),
            (b"\xF5FRY", true, 0),
            (b"\xF5FRY", false, 4),
            (b"hi\n\xF5FRY", false, 3),
            (b"hi \xF5 there\n", true, 11),
            (b"a\xF5\n\xF5", true, 3),
            (b"", true, 0),
            (b"\n\n\xF5", false, 2),
            (b"caf\xC3\xA9\n", true, 6),
        ];
        for (data, start, want) in cases {
            assert_eq!(
                text_len(data, start),
                want,
                "{data:?} at_message_start={start}"
            );
        }
    }
}
