//! Escaping peer bytes for humans: logs and chat lines show printable text as is, in any language,
//! and escape what could forge a line or mislead a reader: control characters (`\n`, `\r`, `\t`,
//! `\xNN`, `\u{NN}`), bytes that are not UTF-8 (`\xNN`), and the invisible or direction-changing
//! format characters (`\u{202e}`, `\u{200b}`, …) that let a name pretend to be another.

use std::fmt::{self, Write};

/// Displays at most `width` bytes of `bytes`, escaped, then how many were cut.
pub struct Escaped<'a> {
    bytes: &'a [u8],
    width: usize,
}

/// Escapes `bytes` for a log line, showing at most `width` of them (never half a character).
pub fn escaped(bytes: &[u8], width: usize) -> Escaped<'_> {
    Escaped { bytes, width }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = 0;
        for chunk in self.bytes.utf8_chunks() {
            for c in chunk.valid().chars() {
                if shown + c.len_utf8() > self.width {
                    return cut(f, self.bytes.len() - shown);
                }
                shown += c.len_utf8();
                match c {
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    '\\' => f.write_str("\\\\")?,
                    c if (c as u32) < 0x80 && c.is_control() => write!(f, "\\x{:02x}", c as u32)?,
                    c if is_hidden(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                    c => f.write_char(c)?,
                }
            }
            for &b in chunk.invalid() {
                if shown + 1 > self.width {
                    return cut(f, self.bytes.len() - shown);
                }
                shown += 1;
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

fn cut(f: &mut fmt::Formatter<'_>, left: usize) -> fmt::Result {
    write!(f, "…(+{left} B)")
}

/// Whether `c` must be escaped wherever a peer's text is shown: control characters (C0, DEL,
/// C1), the bidirectional controls that reorder what follows (U+202A–U+202E, U+2066–U+2069,
/// U+200E/F, U+061C), and invisible characters that make two different strings look alike
/// (zero-width space and joiners, word joiner and invisible operators, the byte-order mark,
/// soft hyphen, fillers, the line and paragraph separators, interlinear annotations and tags).
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c as u32,
            0x00AD
                | 0x034F
                | 0x061C
                | 0x115F..=0x1160
                | 0x17B4..=0x17B5
                | 0x180B..=0x180F
                | 0x200B..=0x200F
                | 0x2028..=0x202E
                | 0x2060..=0x206F
                | 0x3164
                | 0xFEFF
                | 0xFFA0
                | 0xFFF9..=0xFFFB
                | 0x1D173..=0x1D17A
                | 0xE0000..=0xE007F
        )
}

/// Appends `bytes` for a chat line: printable text as is (UTF-8 included, as people write it),
/// tab as is, control characters below 0x80 and bytes that are not UTF-8 as `\xNN`, other hidden
/// characters (`is_hidden`) as `\u{NN}`, so that no client can send escape sequences to the
/// others' terminals or disguise what it wrote.
pub fn push_chat_text(out: &mut String, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        let mut rest = chunk.valid();
        while !rest.is_empty() {
            // Printable ASCII (and tab), the bulk of most lines, goes in as one slice.
            let plain = rest
                .bytes()
                .position(|b| !is_plain(b))
                .unwrap_or(rest.len());
            out.push_str(&rest[..plain]);
            rest = &rest[plain..];
            let Some(c) = rest.chars().next() else {
                break;
            };
            rest = &rest[c.len_utf8()..];
            match c {
                c if (c as u32) < 0x80 && c.is_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if is_hidden(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// A byte that `push_chat_text` copies as it is without looking further: printable ASCII or tab.
fn is_plain(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b)
}

/// `s` as a double-quoted string literal valid both as a TOML basic string and as a JSON
/// string: `"` and `\\` escaped, newline, return and tab as `\\n`, `\\r`, `\\t`, every other
/// control character (and the line and paragraph separators) as `\\uXXXX`. One rule for logs,
/// rendered config and the control socket's JSON: `proto::control::json_string`.
pub fn quoted(s: &str) -> String {
    crate::proto::control::json_string(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_text_keeps_utf8_and_escapes_the_rest() {
        let cases: [(&[u8], &str); 9] = [
            (b"hello", "hello"),
            ("café ☕".as_bytes(), "café ☕"),
            (b"a\tb", "a\tb"),
            (b"\x1b[2Jbell\x07\x7f", "\\x1b[2Jbell\\x07\\x7f"),
            (b"bad \xff\xc3 utf8 \xc2\x85", "bad \\xff\\xc3 utf8 \\u{85}"),
            ("照片.jpg".as_bytes(), "照片.jpg"),
            ("evil\u{202e}gpj.exe".as_bytes(), "evil\\u{202e}gpj.exe"),
            ("a\u{200b}b\u{feff}".as_bytes(), "a\\u{200b}b\\u{feff}"),
            ("back\\slash".as_bytes(), "back\\slash"),
        ];
        for (input, want) in cases {
            let mut out = String::new();
            push_chat_text(&mut out, input);
            assert_eq!(out, want, "{input:?}");
        }
    }

    #[test]
    fn quoted_strings() {
        let cases = [
            ("plain", "\"plain\""),
            ("a \"q\" \\ b", "\"a \\\"q\\\" \\\\ b\""),
            (
                "l1\nl2\r\t\u{1}\u{7f}\u{85}é",
                "\"l1\\nl2\\r\\t\\u0001\\u007f\\u0085é\"",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(quoted(input), want);
        }
    }

    #[test]
    fn escapes_controls_and_cuts() {
        let cases: [(&[u8], usize, &str); 19] = [
            (b"hello\n", 80, "hello\\n"),
            (b"a\r\n\t\\", 80, "a\\r\\n\\t\\\\"),
            (b"\x1b[2J\xff\x00\x7f", 80, "\\x1b[2J\\xff\\x00\\x7f"),
            (b"abcdef", 3, "abc…(+3 B)"),
            (b"", 3, ""),
            // Printable text in any script stays readable (and greppable).
            ("照片.jpg".as_bytes(), 80, "照片.jpg"),
            (
                "café Привет مرحبا 🙂".as_bytes(),
                80,
                "café Привет مرحبا 🙂",
            ),
            // A cut never splits a character: 照 is 3 bytes.
            ("照片".as_bytes(), 4, "照…(+3 B)"),
            ("照片".as_bytes(), 2, "…(+6 B)"),
            // C1 controls, invalid and truncated UTF-8.
            (b"\xc2\x85\xc2\x9b", 80, "\\u{85}\\u{9b}"),
            (b"\xe7\x85", 80, "\\xe7\\x85"),
            (b"\xc0\xaf \xed\xa0\x80", 80, "\\xc0\\xaf \\xed\\xa0\\x80"),
            // Bidi controls: a name that shows as "photo.jpg" but is an .exe.
            (
                "photo\u{202e}gpj.exe".as_bytes(),
                80,
                "photo\\u{202e}gpj.exe",
            ),
            (
                "\u{202a}\u{202b}\u{202c}\u{202d}".as_bytes(),
                80,
                "\\u{202a}\\u{202b}\\u{202c}\\u{202d}",
            ),
            (
                "\u{2066}\u{2067}\u{2068}\u{2069}".as_bytes(),
                80,
                "\\u{2066}\\u{2067}\\u{2068}\\u{2069}",
            ),
            (
                "\u{200e}\u{200f}\u{61c}".as_bytes(),
                80,
                "\\u{200e}\\u{200f}\\u{61c}",
            ),
            // Zero-width and invisible characters.
            (
                "a\u{200b}b\u{200c}c\u{200d}d".as_bytes(),
                80,
                "a\\u{200b}b\\u{200c}c\\u{200d}d",
            ),
            (
                "\u{2060}\u{feff}x\u{ad}\u{3164}".as_bytes(),
                80,
                "\\u{2060}\\u{feff}x\\u{ad}\\u{3164}",
            ),
            (
                "line\u{2028}sep\u{e0041}".as_bytes(),
                80,
                "line\\u{2028}sep\\u{e0041}",
            ),
        ];
        for (input, width, want) in cases {
            assert_eq!(escaped(input, width).to_string(), want);
        }
    }
}
