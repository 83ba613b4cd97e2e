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

#[cfg(test)]
mod tests {
    use super::*;

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
