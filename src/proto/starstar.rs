//! Recognising the upload head of the Qt tutorial file client (`shared/seeds/004`): the first
//! bytes of a connection are `NAME**SIZE` (the file name, two asterisks, the size in decimal,
//! written in one `write`), then the client pauses 20 ms and sends the body and closes. Pure:
//! bytes in, `Partial`, `Complete` or `NotStarstar` out.
//!
//! Where SIZE ends: at the first byte that is not an ASCII digit, or at the end of the bytes
//! given, whichever comes first. The caller passes exactly the bytes received so far, and the
//! client's 20 ms pause after the head means those bytes end where its head ends, so a body that
//! starts with a digit is not taken for part of the size. SIZE has 1 to 20 digits and no leading
//! zero (Qt's `QString::number` writes none), so `0` followed by digits is a size of 0. Should a
//! late reader get head and body in one piece and the body start with a digit, the size read is
//! too large and the upload ends short (refused, nothing stored), never stored wrong.
//!
//! NAME is everything before the first `**`: 1 to 255 bytes of UTF-8 without control
//! characters (a line of text someone types starts the same way only if it holds `**` followed
//! by a digit). Whether NAME is acceptable as a file name is for `name::validate` to say later,
//! so that a bad name is refused like a frame's, not taken for text.

use super::header::MAX_NAME_LEN;

/// The separator between name and size.
pub const SEPARATOR: &[u8] = b"**";
/// Most digits in a size (u64::MAX has 20).
pub const MAX_SIZE_DIGITS: usize = 20;
/// The longest head: name, separator, digits.
pub const MAX_HEAD_LEN: usize = MAX_NAME_LEN as usize + SEPARATOR.len() + MAX_SIZE_DIGITS;

/// A recognised head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StarHead<'a> {
    /// The raw name (UTF-8, no control characters; not yet checked against the name rules).
    pub name: &'a [u8],
    pub size: u64,
    /// Bytes the head took; the body starts right after.
    pub len: usize,
}

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect<'a> {
    /// A starstar head.
    Complete(StarHead<'a>),
    /// They could still become one: a plausible name followed by `*`, `**` or nothing more.
    Partial,
    /// Not a starstar head: text or a frame.
    NotStarstar,
}

/// Looks at the first bytes a connection has received (see the module comment for the rules).
pub fn detect(buf: &[u8]) -> Detect<'_> {
    let sep = buf.windows(SEPARATOR.len()).position(|w| w == SEPARATOR);
    let name_end = match sep {
        Some(i) => i,
        // A name then "*": the second asterisk may be on its way.
        None if buf.last() == Some(&b'*') => buf.len() - 1,
        None if buf.is_empty() => return Detect::Partial,
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
    let run = after.iter().take_while(|b| b.is_ascii_digit()).count();
    let digits = match after {
        [] => return Detect::Partial,
        [b'0', ..] => 1,
        _ if run == 0 || run > MAX_SIZE_DIGITS => return Detect::NotStarstar,
        _ => run,
    };
    let Some(size) = after[..digits].iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    }) else {
        return Detect::NotStarstar;
    };
    Detect::Complete(StarHead {
        name,
        size,
        len: i + SEPARATOR.len() + digits,
    })
}

/// 1 to 255 bytes of UTF-8 without control characters.
fn plausible_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= usize::from(MAX_NAME_LEN)
        && std::str::from_utf8(name).is_ok_and(|s| !s.chars().any(char::is_control))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(name: &[u8], size: u64, len: usize) -> Detect<'_> {
        Detect::Complete(StarHead { name, size, len })
    }

    #[test]
    fn heads_and_not_heads() {
        let long_name = [b'n'; 255];
        let long_head = [&long_name[..], b"**7"].concat();
        let too_long = [&long_name[..], b"n**7"].concat();
        let cases: [(&[u8], Detect); 27] = [
            // The seed client's head, alone (the body comes 20 ms later).
            (b"photo.jpg**200031", complete(b"photo.jpg", 200_031, 17)),
            (
                "照片.jpg**14".as_bytes(),
                complete("照片.jpg".as_bytes(), 14, 14),
            ),
            (b"a b.txt**0", complete(b"a b.txt", 0, 10)),
            // SIZE ends at the first non-digit: a body that starts with a letter.
            (b"a.txt**5hello", complete(b"a.txt", 5, 8)),
            // No leading zeros: "0" then a digit body is an empty file (and more bytes).
            (b"a.txt**01", complete(b"a.txt", 0, 8)),
            // 20 digits, the largest u64.
            (b"x**18446744073709551615", complete(b"x", u64::MAX, 23)),
            (&long_head, complete(&long_name, 7, 258)),
            // A name may hold single asterisks; the first "**" ends it.
            (b"a*b**3", complete(b"a*b", 3, 6)),
            (b"a**b**3", Detect::NotStarstar),
            // Not yet whole.
            (b"", Detect::Partial),
            (b"photo.jpg*", Detect::Partial),
            (b"photo.jpg**", Detect::Partial),
            ("照".as_bytes(), Detect::NotStarstar),
            // Text, frames and other things.
            (b"hello", Detect::NotStarstar),
            (b"hello\n", Detect::NotStarstar),
            (b"**5", Detect::NotStarstar),
            (b"a\n**5", Detect::NotStarstar),
            (b"a\tb**5", Detect::NotStarstar),
            (b"\xF5FRY\x01**5", Detect::NotStarstar),
            (b"bad\xff**5", Detect::NotStarstar),
            (b"a.txt**x", Detect::NotStarstar),
            (b"a.txt** 5", Detect::NotStarstar),
            (b"x**18446744073709551616", Detect::NotStarstar),
            (b"x**123456789012345678901", Detect::NotStarstar),
            (&too_long, Detect::NotStarstar),
            (b"\n*", Detect::NotStarstar),
            (b"*", Detect::NotStarstar),
        ];
        for (buf, want) in cases {
            assert_eq!(detect(buf), want, "{:?}", String::from_utf8_lossy(buf));
        }
    }

    /// The digit case: a body that starts with digits. Given the head alone (as the client's
    /// pause delivers it), the size is right; given head and body together, the size is misread
    /// as larger, which the caller turns into a short body (nothing stored).
    #[test]
    fn a_body_starting_with_a_digit() {
        assert_eq!(detect(b"n.txt**3"), complete(b"n.txt", 3, 8));
        assert_eq!(detect(b"n.txt**3123"), complete(b"n.txt", 3123, 11));
    }

    /// Every prefix of a head from its first asterisk on is `Partial`, or `Complete` with the
    /// digits so far; before it, the bytes are text (the head comes in one write).
    #[test]
    fn every_prefix_of_a_head() {
        let head = "照片 (1).jpg**200031".as_bytes();
        let sep = head.windows(2).position(|w| w == b"**").unwrap();
        for len in 0..=head.len() {
            let got = detect(&head[..len]);
            if len > sep + 2 {
                let Detect::Complete(h) = got else {
                    panic!("{len}: {got:?}");
                };
                assert_eq!(h.len, len);
            } else if len == 0 || len > sep {
                assert_eq!(got, Detect::Partial, "{len}");
            } else {
                // A name with no asterisk yet: the head is one write, so this is text.
                assert_eq!(got, Detect::NotStarstar, "{len}");
            }
        }
    }
}
