//! The one-line answers to a frame: `OK <stored-name> <size> <checksum-hex>` or
//! `ERR <code> <reason>`, formatted for the server and parsed for the client.
//!
//! A stored name may contain spaces (`photo (1).jpg`), so a client reads an `OK` line from the
//! right: the last two words are the size and the checksum, everything between `OK ` and them is
//! the name. Names never contain control characters, so an answer is always one line.

use std::fmt;

/// Why a frame was refused. The `as_str` form is the second word of the `ERR` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The magic after the 0xF5 byte is wrong. The connection is closed.
    BadMagic,
    /// Unsupported protocol version. The connection is closed.
    BadVersion,
    /// Reserved header bits set. The connection is closed.
    BadHeader,
    /// The name breaks the rules in `name::validate`. The connection is closed.
    BadName,
    /// `size` is over `files.max_file_size`. The connection is closed.
    TooLarge,
    /// `size` does not fit in the free space minus `files.min_free_bytes`. The connection is closed.
    NoSpace,
    /// The name exists and `files.on_conflict = "reject"`. Found before the body (the usual
    /// case) the connection is closed; found only at the final rename (another upload took the
    /// name meanwhile) the body has been read and the connection stays open.
    Exists,
    /// The body arrived whole but its BLAKE3 differs from the header's. Nothing is stored; the
    /// connection stays open for the next message.
    Checksum,
    /// The peer stopped sending in the middle of the body (end of stream).
    ShortBody,
    /// The body stalled for longer than the time limit. The connection is closed.
    Timeout,
    /// The server could not write or sync the file (e.g. a disk error). The connection is closed.
    Io,
    /// The frame lacks a valid authentication tag (`files.token_file` is set). The connection is
    /// closed.
    Unauthorized,
    /// The connection already carried `access.max_files_per_connection` frames. Closed.
    TooManyFiles,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadMagic => "bad-magic",
            Code::BadVersion => "bad-version",
            Code::BadHeader => "bad-header",
            Code::BadName => "bad-name",
            Code::TooLarge => "too-large",
            Code::NoSpace => "no-space",
            Code::Exists => "exists",
            Code::Checksum => "checksum",
            Code::ShortBody => "short-body",
            Code::Timeout => "timeout",
            Code::Io => "io",
            Code::Unauthorized => "unauthorized",
            Code::TooManyFiles => "too-many-files",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `OK <stored-name> <size> <checksum-hex>\n`.
pub fn ok_line(stored_name: &str, size: u64, checksum: &[u8; 32]) -> String {
    format!("OK {stored_name} {size} {}\n", hex(checksum))
}

/// `ERR <code> <reason>\n`, with any control character in the reason turned into a space.
pub fn err_line(code: Code, reason: &dyn fmt::Display) -> String {
    let reason: String = reason
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("ERR {code} {reason}\n")
}

/// Lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// An answer line as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok {
        stored_name: String,
        size: u64,
        checksum_hex: String,
    },
    /// Any `ERR` line: a frame's `ERR <code> <reason>`, or a connection-level line such as
    /// `ERR busy` or `ERR server shutting down`.
    Err { code: String, reason: String },
}

/// Parses one answer line (with or without its newline). `None` for anything else.
pub fn parse_answer(line: &str) -> Option<Answer> {
    let line = line.trim_end_matches(['\n', '\r']);
    if let Some(rest) = line.strip_prefix("OK ") {
        let (rest, checksum_hex) = rest.rsplit_once(' ')?;
        let (stored_name, size) = rest.rsplit_once(' ')?;
        if stored_name.is_empty() || checksum_hex.len() != 64 {
            return None;
        }
        return Some(Answer::Ok {
            stored_name: stored_name.to_string(),
            size: size.parse().ok()?,
            checksum_hex: checksum_hex.to_string(),
        });
    }
    let rest = line.strip_prefix("ERR ")?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(Answer::Err {
        code: code.to_string(),
        reason: reason.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_lines_round_trip_names_with_spaces() {
        let sum = [0xabu8; 32];
        for name in ["a", "photo (1).jpg", "two  spaces ", "x y z"] {
            let line = ok_line(name, 42, &sum);
            assert!(line.ends_with('\n'));
            assert_eq!(
                parse_answer(&line),
                Some(Answer::Ok {
                    stored_name: name.to_string(),
                    size: 42,
                    checksum_hex: "ab".repeat(32),
                })
            );
        }
    }

    #[test]
    fn err_lines() {
        let line = err_line(Code::BadName, &"name contains\na newline");
        assert_eq!(line, "ERR bad-name name contains a newline\n");
        let cases = [
            ("ERR busy\n", "busy", ""),
            ("ERR server shutting down\n", "server", "shutting down"),
            (
                "ERR too-large size 5 is over 4",
                "too-large",
                "size 5 is over 4",
            ),
        ];
        for (line, code, reason) in cases {
            assert_eq!(
                parse_answer(line),
                Some(Answer::Err {
                    code: code.into(),
                    reason: reason.into()
                })
            );
        }
        for junk in [
            "",
            "hello",
            "OK",
            "OK a 1 short",
            "OK a notanumber ".to_owned().as_str(),
        ] {
            assert_eq!(parse_answer(junk), None, "{junk:?}");
        }
    }
}
