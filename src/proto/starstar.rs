//! Recognising the upload head of the Qt tutorial file client (`shared/seeds/004`), `NAME**SIZE`,
//! and finding where SIZE ends. The client writes the head in one `write`, pauses 20 ms, writes
//! the body and closes the connection. Pure: bytes in, a verdict out.
//!
//! Two steps. `detect` looks at a connection's first bytes: a head is recognised once NAME (1 to
//! 255 bytes of UTF-8 without control characters, everything before the first `**`), the
//! separator and one digit have arrived. `size` then says where SIZE ends, from the bytes after
//! the separator. A head split in transit, or read late together with a body that starts with a
//! digit, makes the first digits seen an unsafe guess, so the rule is the stream's own:
//!
//! *The bytes after `**` are the digits of SIZE (no leading zero; `0` alone is an empty file)
//! followed by exactly SIZE bytes, and then the stream ends.*
//!
//! At most one way of splitting a digit run satisfies this (a candidate with one more digit
//! promises at least ten times the bytes), so a stream that ends where a candidate says is
//! resolved exactly. While the stream goes on, candidates die as bytes pass their promised
//! length; `size` asks for more bytes (up to `LOOKAHEAD` after the separator) while more than one
//! is alive. Past the look-ahead, the digits the first read held win if still alive (the
//! client's pause put the head alone in it), else the whole digit run. A pause with nothing
//! after a run of digits ends SIZE there. The caller then receives SIZE bytes and must see the
//! end of the stream right after them, or refuse: never a wrong file.

use std::fmt;

use super::header::MAX_NAME_LEN;

/// The separator between name and size.
pub const SEPARATOR: &[u8] = b"**";
/// Most digits in a size (u64::MAX has 20).
pub const MAX_SIZE_DIGITS: usize = 20;
/// The longest head: name, separator, digits.
pub const MAX_HEAD_LEN: usize = MAX_NAME_LEN as usize + SEPARATOR.len() + MAX_SIZE_DIGITS;
/// Bytes after the separator that may be read ahead, while several sizes remain possible, before
/// one is chosen: heads whose SIZE is up to about ten times this are resolved exactly however
/// they arrive.
pub const LOOKAHEAD: usize = 64 * 1024;

/// A recognised head's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StarHead<'a> {
    /// The raw name (UTF-8, no control characters; not yet checked against the name rules).
    pub name: &'a [u8],
    /// Bytes from the start to the end of the separator: SIZE's digits start here.
    pub len: usize,
    /// Digits right after the separator in the bytes given (at least 1, at most 20).
    pub digits: usize,
}

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect<'a> {
    /// A starstar head: a name, the separator and at least one digit.
    Complete(StarHead<'a>),
    /// They could still become one.
    Partial,
    /// Not a starstar head: text or a frame.
    NotStarstar,
}

/// Looks at the first bytes a connection has received. With `name_may_continue`, a plausible
/// name with no `*` yet is `Partial` too (the caller waits a moment for a head split inside its
/// name); without it only a name followed by `*` or `**` is.
pub fn detect(buf: &[u8], name_may_continue: bool) -> Detect<'_> {
    let sep = buf.windows(SEPARATOR.len()).position(|w| w == SEPARATOR);
    let name_end = match sep {
        Some(i) => i,
        // A name then "*": the second asterisk may be on its way.
        None if buf.last() == Some(&b'*') => buf.len() - 1,
        None if buf.is_empty() => return Detect::Partial,
        None if name_may_continue && name_prefix(buf) => return Detect::Partial,
        None => return Detect::NotStarstar,
    };
    let name = &buf[..name_end];
    if !plausible_name(name) {
        return Detect::NotStarstar;
    }
    let Some(i) = sep else {
        return Detect::Partial;
    };
    let after = &buf[i + SEPARATOR.len()..];
    match digit_run(after) {
        _ if after.is_empty() => Detect::Partial,
        0 => Detect::NotStarstar,
        digits => Detect::Complete(StarHead {
            name,
            len: i + SEPARATOR.len(),
            digits,
        }),
    }
}

/// What is known so far of the bytes after the separator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct After<'a> {
    /// Every byte received after the separator (at most `LOOKAHEAD` of them are looked at).
    pub bytes: &'a [u8],
    /// The stream ended right after `bytes`.
    pub ended: bool,
    /// Nothing arrived for a moment after `bytes` (the client's pause after its head).
    pub paused: bool,
    /// Digits after the separator in the first read that held any (`StarHead::digits`).
    pub first_digits: usize,
}

/// Where SIZE ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// SIZE is the first `digits` bytes after the separator; the body is the next `size` bytes,
    /// and the stream must end after them. `exact`: the stream has ended there already.
    Known {
        digits: usize,
        size: u64,
        exact: bool,
    },
    /// More bytes (or the end of the stream, or a pause) are needed to tell.
    More,
    /// No reading of the head fits the stream.
    Wrong(SizeError),
}

/// Why a stream is not a `NAME**SIZE` upload after all (its head was recognised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// No digit after the separator, or more than 20, or a number over u64::MAX.
    NoSize,
    /// The stream ended where no size puts the end of a body.
    Length(usize),
    /// More bytes came than any size the digits can say.
    TooMany,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::NoSize => f.write_str("NAME**SIZE head without a size of 1 to 20 digits"),
            SizeError::Length(n) => write!(
                f,
                "the {n} bytes after ** are not the digits of SIZE followed by SIZE bytes"
            ),
            SizeError::TooMany => {
                f.write_str("more bytes follow ** than the digits of SIZE and SIZE bytes")
            }
        }
    }
}

/// Says where SIZE ends (see the module comment for the rule).
pub fn size(after: After<'_>) -> Size {
    let bytes = &after.bytes[..after.bytes.len().min(LOOKAHEAD)];
    let run = digit_run(bytes);
    if run == 0 {
        return match bytes.is_empty() && !after.ended {
            true => Size::More,
            false => Size::Wrong(SizeError::NoSize),
        };
    }
    // The run may go on: wait for a byte that ends it, the end, or the client's pause.
    let open = run == bytes.len() && run < MAX_SIZE_DIGITS && bytes[0] != b'0';
    if open && !after.ended && !after.paused {
        return Size::More;
    }
    if open && after.paused && !after.ended {
        return known(bytes, run, false);
    }
    let seen = after.bytes.len() as u128;
    let mut live = candidates(bytes, run).filter(|&(k, n)| k as u128 + u128::from(n) >= seen);
    if after.ended {
        return match live.find(|&(k, n)| k as u128 + u128::from(n) == seen) {
            Some((k, _)) => known(bytes, k, true),
            None => Size::Wrong(SizeError::Length(after.bytes.len())),
        };
    }
    let live: Vec<(usize, u64)> = live.collect();
    match live.as_slice() {
        [] => Size::Wrong(SizeError::TooMany),
        [(k, _)] => known(bytes, *k, false),
        _ if after.bytes.len() < LOOKAHEAD => Size::More,
        _ => {
            let k = match live.iter().find(|(k, _)| *k == after.first_digits) {
                Some(&(k, _)) => k,
                None => live.last().map_or(run, |&(k, _)| k),
            };
            known(bytes, k, false)
        }
    }
}

fn known(bytes: &[u8], digits: usize, exact: bool) -> Size {
    match number(&bytes[..digits]) {
        Some(size) => Size::Known {
            digits,
            size,
            exact,
        },
        None => Size::Wrong(SizeError::NoSize),
    }
}

/// Every way SIZE can end in the digit run of `bytes` (`run` digits): (digits, size), shortest
/// first. A leading `0` is only ever the size 0.
fn candidates(bytes: &[u8], run: usize) -> impl Iterator<Item = (usize, u64)> + '_ {
    let most = if bytes[0] == b'0' { 1 } else { run };
    (1..=most).map_while(|k| number(&bytes[..k]).map(|n| (k, n)))
}

/// Digits at the start of `bytes`, at most `MAX_SIZE_DIGITS`.
fn digit_run(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take(MAX_SIZE_DIGITS)
        .take_while(|b| b.is_ascii_digit())
        .count()
}

/// The decimal number `digits` spell, unless it overflows.
fn number(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// 1 to 255 bytes of UTF-8 without control characters.
fn plausible_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= usize::from(MAX_NAME_LEN)
        && std::str::from_utf8(name).is_ok_and(|s| !s.chars().any(char::is_control))
}

/// The start of a plausible name: under 255 bytes, UTF-8 (a character may be cut at the end)
/// without control characters.
fn name_prefix(buf: &[u8]) -> bool {
    let valid = match std::str::from_utf8(buf) {
        Ok(s) => s,
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&buf[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return false,
    };
    buf.len() < usize::from(MAX_NAME_LEN) && !valid.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(name: &[u8], len: usize, digits: usize) -> Detect<'_> {
        Detect::Complete(StarHead { name, len, digits })
    }

    #[test]
    fn heads_and_not_heads() {
        let long_name = [b'n'; 255];
        let long_head = [&long_name[..], b"**7"].concat();
        let too_long = [&long_name[..], b"n**7"].concat();
        let cases: [(&[u8], bool, Detect); 33] = [
            // The seed client's head, alone (the body comes 20 ms later).
            (b"photo.jpg**200031", false, head(b"photo.jpg", 11, 6)),
            (
                "照片.jpg**14".as_bytes(),
                false,
                head("照片.jpg".as_bytes(), 12, 2),
            ),
            (b"a b.txt**0", false, head(b"a b.txt", 9, 1)),
            (b"a.txt**5hello", false, head(b"a.txt", 7, 1)),
            (b"a.txt**01", false, head(b"a.txt", 7, 2)),
            (&long_head, false, head(&long_name, 257, 1)),
            // A name may hold single asterisks; the first "**" ends it.
            (b"a*b**3", false, head(b"a*b", 5, 1)),
            (b"a**b**3", false, Detect::NotStarstar),
            // Not yet whole.
            (b"", false, Detect::Partial),
            (b"photo.jpg*", false, Detect::Partial),
            (b"photo.jpg**", false, Detect::Partial),
            // A head split inside its name: only worth waiting for when asked to.
            (b"s4.", true, Detect::Partial),
            (b"s4.", false, Detect::NotStarstar),
            (&"照".as_bytes()[..2], true, Detect::Partial),
            ("照".as_bytes(), false, Detect::NotStarstar),
            (b"hello\n", true, Detect::NotStarstar),
            (b"bad\xff", true, Detect::NotStarstar),
            (&long_name, true, Detect::NotStarstar),
            // Text, frames and other things.
            (b"hello", false, Detect::NotStarstar),
            (b"hello\n", false, Detect::NotStarstar),
            (b"**5", false, Detect::NotStarstar),
            (b"**5", true, Detect::NotStarstar),
            (b"a\n**5", false, Detect::NotStarstar),
            (b"a\tb**5", false, Detect::NotStarstar),
            (b"\xF5FRY\x01**5", false, Detect::NotStarstar),
            (b"\xF5FRY\x01", true, Detect::NotStarstar),
            (b"bad\xff**5", false, Detect::NotStarstar),
            (b"a.txt**x", false, Detect::NotStarstar),
            (b"a.txt** 5", false, Detect::NotStarstar),
            (&too_long, false, Detect::NotStarstar),
            (b"\n*", false, Detect::NotStarstar),
            (b"*", false, Detect::NotStarstar),
            (b"*", true, Detect::NotStarstar),
        ];
        for (buf, may_continue, want) in cases {
            let got = detect(buf, may_continue);
            assert_eq!(
                got,
                want,
                "{:?} {may_continue}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    fn after(bytes: &[u8], ended: bool, paused: bool, first_digits: usize) -> Size {
        size(After {
            bytes,
            ended,
            paused,
            first_digits,
        })
    }

    fn known(digits: usize, size: u64, exact: bool) -> Size {
        Size::Known {
            digits,
            size,
            exact,
        }
    }

    #[test]
    fn where_size_ends() {
        let late = [b"12345".as_slice(), &[b'x'; 12_345]].concat();
        let digit_body = [b"5".as_slice(), b"12345"].concat();
        let big = [b"100000".as_slice(), &[b'7'; 70_000]].concat();
        let cases: [(&[u8], bool, bool, usize, Size); 25] = [
            // Digits alone: wait for the end of the run, the end of the stream or a pause.
            (b"", false, false, 0, Size::More),
            (b"12", false, false, 2, Size::More),
            (b"12", false, true, 2, known(2, 12, false)),
            // Ended: "12" is one byte, "2"; "52" fits no size.
            (b"12", true, false, 2, known(1, 1, true)),
            (b"52", true, false, 2, Size::Wrong(SizeError::Length(2))),
            // "0" is an empty file, never a leading zero.
            (b"0", false, false, 1, known(1, 0, false)),
            (b"0", true, false, 1, known(1, 0, true)),
            (b"01", false, false, 2, Size::Wrong(SizeError::TooMany)),
            (b"x", false, false, 0, Size::Wrong(SizeError::NoSize)),
            (b"", true, false, 0, Size::Wrong(SizeError::NoSize)),
            // A head split after "12": 12, 123 and 1234 die as bytes pass their lengths.
            (&late[..6], false, false, 2, Size::More),
            (&late[..1238], false, false, 2, Size::More),
            (&late[..1239], false, false, 2, known(5, 12_345, false)),
            (&late, true, false, 2, known(5, 12_345, true)),
            (
                &late[..5 + 12_344],
                true,
                false,
                2,
                Size::Wrong(SizeError::Length(12_349)),
            ),
            // A body that starts with digits, read together with the head: resolved at the end.
            (&digit_body, false, false, 6, Size::More),
            (&digit_body, true, false, 6, known(1, 5, true)),
            (b"3abc", true, false, 1, known(1, 3, true)),
            (b"3abcd", true, false, 1, Size::Wrong(SizeError::Length(5))),
            (b"3abcd", false, false, 1, Size::Wrong(SizeError::TooMany)),
            // Past the look-ahead: the first read's digits win while they are possible.
            (&big[..LOOKAHEAD], false, false, 6, known(6, 100_000, false)),
            (
                &big[..LOOKAHEAD],
                false,
                false,
                3,
                known(20, 10_000_077_777_777_777_777, false),
            ),
            // 20 digits at most, and no number over u64::MAX.
            (b"18446744073709551615", true, false, 20, known(2, 18, true)),
            (
                b"28446744073709551615",
                true,
                false,
                20,
                Size::Wrong(SizeError::Length(20)),
            ),
            (
                b"99999999999999999999x",
                true,
                false,
                20,
                Size::Wrong(SizeError::Length(21)),
            ),
        ];
        for (i, (bytes, ended, paused, first, want)) in cases.into_iter().enumerate() {
            assert_eq!(after(bytes, ended, paused, first), want, "case {i}");
        }
    }

    /// A head and body split at every point: what each prefix says is `More` or the right size,
    /// and the whole stream, ended, is always resolved exactly, whichever read held what.
    #[test]
    fn every_split_point_and_truncated_prefix() {
        for body in [b"hello world".as_slice(), b"2024 figures", b"0", b""] {
            let len = body.len().to_string();
            let stream = [b"s4.bin**".as_slice(), len.as_bytes(), body].concat();
            let sep_end = 8;
            for cut in 0..=stream.len() {
                let first = &stream[..cut];
                match detect(first, true) {
                    Detect::Partial => assert!(cut <= sep_end, "{cut}"),
                    Detect::Complete(h) => {
                        assert_eq!((h.name, h.len), (b"s4.bin".as_slice(), sep_end));
                        for cut2 in h.len..=stream.len() {
                            let got = after(&stream[h.len..cut2], false, false, h.digits);
                            let right = known(len.len(), body.len() as u64, false);
                            let ok = got == Size::More || got == right;
                            assert!(ok, "{cut}/{cut2}: {got:?}");
                        }
                        let whole = after(&stream[h.len..], true, false, h.digits);
                        assert_eq!(whole, known(len.len(), body.len() as u64, true), "{cut}");
                    }
                    Detect::NotStarstar => panic!("{cut}: {:?}", String::from_utf8_lossy(first)),
                }
            }
        }
    }
}
