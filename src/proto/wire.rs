//! Every line the server sends, and the client's reading of them: the answers to a frame
//! (`OK <stored-name> <size> <checksum-hex>` or `ERR <code> <reason>`), the connection-level
//! refusals (`ERR busy …`, `ERR shutdown …`, `ERR idle …`), `NONCE` and `OK authenticated`.
//!
//! Every `ERR` line is `ERR <code> <reason>`: the code is one word for programs, the reason the
//! readable words a person at `nc` sees. Each `Code` says, once, whether the connection stays open
//! after it (`Code::keeps_connection`); server and client both go by that.
//!
//! A stored name may contain spaces (`photo (1).jpg`), so a client reads an `OK` line from the
//! right: the last two words are the size and the checksum, everything between `OK ` and them is
//! the name. Names never contain control characters, so an answer is always one line.

use std::fmt;
use std::time::Duration;

use super::decimal::Fixed;

/// Why something was refused. The `as_str` form is the second word of the `ERR` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    // Connection-level: the connection is refused or ended as a whole.
    /// Every worker is busy and the queue is full. Closed.
    Busy,
    /// The daemon is stopping. Closed.
    Shutdown,
    /// The peer was silent for `idle_timeout_secs`. Closed.
    Idle,
    /// The access rules refuse the peer's address. Closed.
    NotAllowed,
    /// The peer's address already has `access.max_per_ip` connections open. Closed.
    TooManyConnections,
    /// Chat: a line over `max_line_bytes`; it is not delivered. The connection stays open.
    LineTooLong,
    // Frame-level: the answer to one file frame.
    /// The magic after the 0xF5 byte is wrong. Closed.
    BadMagic,
    /// Unsupported protocol version. Closed.
    BadVersion,
    /// Reserved header bits set. Closed.
    BadHeader,
    /// The name breaks the rules in `name::validate`. Closed.
    BadName,
    /// `size` is over `files.max_file_size`. Closed.
    TooLarge,
    /// `size` does not fit in the free space minus `files.min_free_bytes`. Closed.
    NoSpace,
    /// The name exists and `files.on_conflict = "reject"`. Found before the body (the usual
    /// case) the connection is closed; found only at the final rename (another upload took the
    /// name meanwhile) the body has been read and the connection stays open.
    Exists,
    /// The body arrived whole but its checksum differs from the header's. Nothing is stored; the
    /// connection stays open for the next message.
    Checksum,
    /// The peer stopped sending in the middle of the body (end of stream). Closed.
    ShortBody,
    /// The frame head or the body stalled past its time limit. Closed.
    Timeout,
    /// The server could not write or sync the file (e.g. a disk error). Found after the whole
    /// body (the sync or the rename failed) the connection stays open; in the middle of the body
    /// it is closed.
    Io,
    /// The frame or text lacks a valid authentication tag (`files.token_file` is set). Closed.
    Unauthorized,
    /// The connection already carried `access.max_files_per_connection` frames. Closed.
    TooManyFiles,
    /// The connection opened with a `NAME**SIZE` upload head and `compat.starstar_uploads` is
    /// off. Closed.
    LegacyHeader,
    /// The operator ended the connection (`ferryd ctl kick`). Closed.
    Kicked,
}

/// Every code, for `Code::parse`.
const ALL: [Code; 21] = [
    Code::Busy,
    Code::Shutdown,
    Code::Idle,
    Code::NotAllowed,
    Code::TooManyConnections,
    Code::LineTooLong,
    Code::BadMagic,
    Code::BadVersion,
    Code::BadHeader,
    Code::BadName,
    Code::TooLarge,
    Code::NoSpace,
    Code::Exists,
    Code::Checksum,
    Code::ShortBody,
    Code::Timeout,
    Code::Io,
    Code::Unauthorized,
    Code::TooManyFiles,
    Code::LegacyHeader,
    Code::Kicked,
];

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Busy => "busy",
            Code::Shutdown => "shutdown",
            Code::Idle => "idle",
            Code::NotAllowed => "not-allowed",
            Code::TooManyConnections => "too-many-connections",
            Code::LineTooLong => "line-too-long",
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
            Code::LegacyHeader => "legacy-header",
            Code::Kicked => "kicked",
        }
    }

    /// The code named by the second word of an `ERR` line.
    pub fn parse(word: &str) -> Option<Code> {
        ALL.iter().copied().find(|c| c.as_str() == word)
    }

    /// Whether the connection stays open after `ERR <code>`. `body_read` says whether the
    /// frame's whole body had been read when the error was found: only then is the stream back
    /// in step (otherwise the unread body would be taken for text), so only then can a frame
    /// error leave the connection open.
    pub fn keeps_connection(self, body_read: bool) -> bool {
        match self {
            Code::LineTooLong | Code::Checksum => true,
            Code::Exists | Code::Io => body_read,
            _ => false,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `ERR legacy-header …`: a `NAME**SIZE` upload while `compat.starstar_uploads` is off; says
/// how to turn it on and where frames are described.
pub fn err_legacy_header() -> String {
    err_line(
        Code::LegacyHeader,
        &"NAME**SIZE uploads are off on this server: its admin can set [compat] starstar_uploads = true in config.toml, or send a verified frame (README, section Protocol)",
    )
}

/// `ERR busy …`: every worker busy and the queue full.
pub const ERR_BUSY: &[u8] = b"ERR busy server busy, try again later\n";
/// `ERR shutdown …`: the daemon is stopping.
/// `ERR kicked …`: the operator ended the connection (`ferryd ctl kick`).
pub const ERR_KICKED: &[u8] = b"ERR kicked by operator\n";

/// A line of the operator's (`ferryd ctl say`), already escaped to one line of printable text.
pub fn server_say(shown: &str) -> String {
    format!("[server] {shown}\n")
}

pub const ERR_SHUTDOWN: &[u8] = b"ERR shutdown server shutting down\n";
/// `ERR not-allowed …`: the access rules refuse the address.
pub const ERR_NOT_ALLOWED: &[u8] = b"ERR not-allowed not allowed\n";
/// `ERR too-many-connections …`: the address has `access.max_per_ip` connections open.
pub const ERR_TOO_MANY: &[u8] =
    b"ERR too-many-connections too many connections from your address\n";
/// `ERR busy …` to a connection ended to make room for a newcomer when every worker was busy.
pub const ERR_EVICTED: &[u8] =
    b"ERR busy server full: this connection waited longest and makes room for another\n";
/// The answer to a good `AUTH` line.
pub const OK_AUTH: &[u8] = b"OK authenticated\n";

/// `ERR idle …`: silent for the idle timeout.
pub fn err_idle(secs: u64) -> String {
    err_line(
        Code::Idle,
        &format_args!("timeout: nothing received for {secs} s"),
    )
}

/// `ERR idle …`: a text line not complete within `line_timeout_secs` of its first byte.
pub fn err_line_timeout(secs: u64) -> String {
    err_line(
        Code::Idle,
        &format_args!("line not complete within {secs} s of its first byte"),
    )
}

/// `ERR line-too-long …`: a chat line over `max_line_bytes`, not delivered.
pub fn err_line_too_long(max: usize) -> String {
    err_line(
        Code::LineTooLong,
        &format_args!("line too long: over {max} bytes; not delivered"),
    )
}

/// Chat: the newcomer's first line, naming who is there (`more` beyond those listed).
pub fn chat_welcome(peer: &dyn fmt::Display, here: &[String], more: usize) -> String {
    match (here.len(), more) {
        (0, _) => format!("* welcome {peer}; nobody else is here\n"),
        (_, 0) => format!("* welcome {peer}; here: {}\n", here.join(", ")),
        _ => format!(
            "* welcome {peer}; here: {} and {more} more\n",
            here.join(", ")
        ),
    }
}

/// Chat: a member joined.
pub fn chat_joined(peer: &dyn fmt::Display) -> String {
    format!("* {peer} joined\n")
}

/// Chat: a member left, and why.
pub fn chat_left(peer: &dyn fmt::Display, reason: &dyn fmt::Display) -> String {
    format!("* {peer} left ({reason})\n")
}

/// Chat: the joins and leaves not shown one by one (notices are rate-limited).
pub fn chat_summary(joined: u64, left: u64, window: Duration) -> String {
    format!(
        "* {joined} more joined and {left} more left in the last {} s (too many to list)\n",
        Fixed::secs(window, 1)
    )
}

/// Chat: a member stored a file; `shown_name` is already escaped for the room.
pub fn chat_uploaded(peer: &dyn fmt::Display, shown_name: &str, size: u64) -> String {
    format!("* {peer} uploaded {shown_name} ({size} B)\n")
}

/// `NONCE <hex>`: the first line of a connection when uploads need a key.
pub fn nonce_line(nonce: &[u8]) -> String {
    format!("NONCE {}\n", hex(nonce))
}

/// `RESUME <offset>\n`: the answer to a resumable frame's head (flag bit 3): the body that
/// follows on the wire starts at byte `offset` of the file (0: the server holds nothing of it).
pub fn resume_line(offset: u64) -> String {
    format!("RESUME {offset}\n")
}

/// The offset of a `RESUME <offset>` line (with or without its newline).
pub fn parse_resume(line: &str) -> Option<u64> {
    let digits = line
        .trim_end_matches(['\n', '\r'])
        .strip_prefix("RESUME ")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
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
    /// Any `ERR <code> <reason>` line, a frame's or a connection's.
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
    fn resume_lines_round_trip() {
        for n in [0, 1, 123_456_789, u64::MAX] {
            assert_eq!(parse_resume(&resume_line(n)), Some(n));
        }
        for bad in [
            "RESUME",
            "RESUME ",
            "RESUME -1",
            "RESUME 1x",
            "RESUME  1",
            "OK a 1 b",
            "RESUME 99999999999999999999",
        ] {
            assert_eq!(parse_resume(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_server_line_is_code_then_reason() {
        let lines: [(&[u8], &str); 5] = [
            (ERR_BUSY, "busy"),
            (ERR_SHUTDOWN, "shutdown"),
            (ERR_KICKED, "kicked"),
            (ERR_NOT_ALLOWED, "not-allowed"),
            (ERR_TOO_MANY, "too-many-connections"),
        ];
        let idle = err_idle(300);
        let long = err_line_too_long(100);
        let all = lines
            .iter()
            .map(|&(l, c)| (std::str::from_utf8(l).unwrap(), c))
            .chain([(idle.as_str(), "idle"), (long.as_str(), "line-too-long")]);
        for (line, code) in all {
            assert!(
                line.ends_with('\n') && line.matches('\n').count() == 1,
                "{line:?}"
            );
            match parse_answer(line) {
                Some(Answer::Err { code: got, reason }) => {
                    assert_eq!(got, code, "{line:?}");
                    assert!(!reason.is_empty(), "{line:?} has no readable reason");
                }
                other => panic!("{line:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn which_codes_keep_the_connection() {
        use Code::*;
        let cases = [
            (Busy, false, false),
            (Shutdown, false, false),
            (Idle, false, false),
            (NotAllowed, false, false),
            (TooManyConnections, false, false),
            (LineTooLong, true, true),
            (BadMagic, false, false),
            (BadName, false, false),
            (TooLarge, false, false),
            (NoSpace, false, false),
            (Exists, false, true),
            (Checksum, true, true),
            (ShortBody, false, false),
            (Timeout, false, false),
            (Io, false, true),
            (Unauthorized, false, false),
            (TooManyFiles, false, false),
        ];
        for code in ALL {
            assert_eq!(Code::parse(code.as_str()), Some(code));
        }
        assert_eq!(Code::parse("nonsense"), None);
        for (code, before_body, after_body) in cases {
            assert_eq!(
                code.keeps_connection(false),
                before_body,
                "{code} before the body"
            );
            assert_eq!(
                code.keeps_connection(true),
                after_body,
                "{code} after the body"
            );
        }
    }

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
            (
                "ERR shutdown server shutting down\n",
                "shutdown",
                "server shutting down",
            ),
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
