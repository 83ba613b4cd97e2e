//! Escaping peer bytes for humans: logs and chat lines show printable ASCII as is and everything
//! else as `\n`, `\r`, `\t`, `\\` or `\xNN`, so no peer can forge a log line or drive a terminal.

use std::fmt::{self, Write};

/// Displays at most `width` escaped bytes of `bytes`, then how many were cut.
pub struct Escaped<'a> {
    bytes: &'a [u8],
    width: usize,
}

/// Escapes `bytes`, showing at most `width` of them.
pub fn escaped(bytes: &[u8], width: usize) -> Escaped<'_> {
    Escaped { bytes, width }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.bytes.len().min(self.width);
        for &b in &self.bytes[..shown] {
            push_escaped(f, b)?;
        }
        if shown < self.bytes.len() {
            write!(f, "…(+{} B)", self.bytes.len() - shown)?;
        }
        Ok(())
    }
}

/// Writes one byte in escaped form.
pub fn push_escaped<W: Write>(out: &mut W, b: u8) -> fmt::Result {
    match b {
        b'\n' => out.write_str("\\n"),
        b'\r' => out.write_str("\\r"),
        b'\t' => out.write_str("\\t"),
        b'\\' => out.write_str("\\\\"),
        0x20..=0x7e => out.write_char(b as char),
        _ => write!(out, "\\x{b:02x}"),
    }
}

/// Appends `bytes` for a chat line: printable text as is (UTF-8 included, as people write it),
/// control characters other than tab and bytes that are not UTF-8 as `\xNN` (C1 controls as
/// `\u{NN}`), so that no client can send escape sequences to the others' terminals.
pub fn push_chat_text(out: &mut String, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\t' => out.push(c),
                c if (c as u32) < 0x80 && c.is_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() => {
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

/// `s` as a double-quoted string literal valid both as a TOML basic string and as a JSON
/// string: `"` and `\\` escaped, newline, return and tab as `\\n`, `\\r`, `\\t`, every other
/// control character as `\\uXXXX`.
pub fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_text_keeps_utf8_and_escapes_the_rest() {
        let cases: [(&[u8], &str); 5] = [
            (b"hello", "hello"),
            ("café ☕".as_bytes(), "café ☕"),
            (b"a\tb", "a\tb"),
            (b"\x1b[2Jbell\x07\x7f", "\\x1b[2Jbell\\x07\\x7f"),
            (b"bad \xff\xc3 utf8 \xc2\x85", "bad \\xff\\xc3 utf8 \\u{85}"),
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
        let cases: [(&[u8], usize, &str); 5] = [
            (b"hello\n", 80, "hello\\n"),
            (b"a\r\n\t\\", 80, "a\\r\\n\\t\\\\"),
            (b"\x1b[2J\xff\x00", 80, "\\x1b[2J\\xff\\x00"),
            (b"abcdef", 3, "abc…(+3 B)"),
            (b"", 3, ""),
        ];
        for (input, width, want) in cases {
            assert_eq!(escaped(input, width).to_string(), want);
        }
    }
}
