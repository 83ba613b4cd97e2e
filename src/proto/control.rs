//! The control socket's vocabulary, pure: a request line parsed into a `Request`, the rows of
//! `list` rendered as text columns or as JSON (hand-written, every string escaped), and the last
//! line of every answer (`OK …` or `ERR …`). One request per connection: the daemon answers with
//! zero or more lines, then `OK <summary>` or `ERR <reason>`, and closes.

use std::fmt::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use super::decimal::Fixed;

/// The longest request line, its newline included.
pub const MAX_REQUEST: usize = 4096;

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `list` or `list --json`.
    List { json: bool },
    /// `say TEXT`, or `say --to PEER TEXT`.
    Say {
        to: Option<SocketAddr>,
        text: &'a str,
    },
    /// `kick PEER`.
    Kick { peer: SocketAddr },
    /// `stats`.
    Stats,
    /// `udp HOST:PORT TEXT`.
    Udp { to: SocketAddr, text: &'a str },
}

/// Why a request line was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    NotUtf8,
    Empty,
    UnknownCommand,
    MissingText,
    BadPeer,
    BadAddress,
    Extra,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestError::NotUtf8 => "request is not UTF-8",
            RequestError::Empty => "empty request",
            RequestError::UnknownCommand => {
                "unknown command (list [--json], say [--to PEER] TEXT, kick PEER, stats, udp HOST:PORT TEXT)"
            }
            RequestError::MissingText => "missing text",
            RequestError::BadPeer => "not a peer address (e.g. 127.0.0.1:5000 or [::1]:5000)",
            RequestError::BadAddress => "not an IP address and port (e.g. 127.0.0.1:7878)",
            RequestError::Extra => "unexpected words after the command",
        })
    }
}

impl Request<'_> {
    /// Parses one request line (without its newline; a trailing `\r` is ignored).
    pub fn parse(line: &[u8]) -> Result<Request<'_>, RequestError> {
        let line = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let (word, rest) = split_word(line);
        match word {
            "" => Err(RequestError::Empty),
            "list" => match rest.trim() {
                "" => Ok(Request::List { json: false }),
                "--json" => Ok(Request::List { json: true }),
                _ => Err(RequestError::Extra),
            },
            "stats" if rest.trim().is_empty() => Ok(Request::Stats),
            "stats" => Err(RequestError::Extra),
            "kick" => {
                let (peer, extra) = split_word(rest);
                if !extra.trim().is_empty() {
                    return Err(RequestError::Extra);
                }
                Ok(Request::Kick {
                    peer: parse_peer(peer)?,
                })
            }
            "say" => {
                let (to, text) = match split_word(rest) {
                    ("--to", after) => {
                        let (peer, text) = split_word(after);
                        (Some(parse_peer(peer)?), text)
                    }
                    _ => (None, rest),
                };
                if text.is_empty() {
                    return Err(RequestError::MissingText);
                }
                Ok(Request::Say { to, text })
            }
            "udp" => {
                let (addr, text) = split_word(rest);
                let to = addr.parse().map_err(|_| RequestError::BadAddress)?;
                if text.is_empty() {
                    return Err(RequestError::MissingText);
                }
                Ok(Request::Udp { to, text })
            }
            _ => Err(RequestError::UnknownCommand),
        }
    }
}

/// The first word of `s` (spaces before it skipped) and what follows the one space after it.
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start_matches(' ');
    match s.split_once(' ') {
        Some((word, rest)) => (word, rest),
        None => (s, ""),
    }
}

/// A peer as `ferryd` prints it (`[127.0.0.1:5000]`, `[::1]:5000`) or as a plain socket address.
pub fn parse_peer(s: &str) -> Result<SocketAddr, RequestError> {
    let inner = s
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .filter(|t| !t.contains(']'));
    inner
        .unwrap_or(s)
        .parse()
        .or_else(|_| s.parse())
        .map_err(|_| RequestError::BadPeer)
}

/// One connection in `list`. Text fields are shown as given (the daemon escapes peer bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub peer: String,
    pub state: &'static str,
    /// How long ago the connection was accepted.
    pub age: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub file: Option<FileRow>,
}

/// The file a connection is receiving.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub name: String,
    pub received: u64,
    pub size: u64,
    /// How long ago the body began (the rate shown is `received` over it).
    pub elapsed: Duration,
}

/// Nanoseconds in a second.
const NANOS: u128 = 1_000_000_000;

impl FileRow {
    /// Body bytes per second since the body began, the fraction cut off; zero before any time
    /// has passed.
    fn whole_per_sec(&self) -> u64 {
        let nanos = self.elapsed.as_nanos();
        if nanos == 0 {
            return 0;
        }
        u64::try_from(u128::from(self.received) * NANOS / nanos).unwrap_or(u64::MAX)
    }
}

/// `list` as text: a heading, then one line per connection.
pub fn list_text(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<24} {:<9} {:>8} {:>10} {:>10}  file\n",
        "peer", "state", "age", "in", "out"
    );
    for r in rows {
        let _ = write!(
            out,
            "{:<24} {:<9} {:>8} {:>10} {:>10}",
            r.peer,
            r.state,
            age(r.age),
            bytes(r.bytes_in),
            bytes(r.bytes_out)
        );
        if let Some(f) = &r.file {
            let _ = write!(
                out,
                "  \"{}\" {} of {} ({}%) at {}/s",
                f.name,
                bytes(f.received),
                bytes(f.size),
                Fixed::percent(f.received, f.size),
                bytes(f.whole_per_sec())
            );
        }
        out.push('\n');
    }
    out
}

/// `list --json`: one object, `{"connections":[…]}`, on one line.
pub fn list_json(rows: &[Row]) -> String {
    let mut out = String::from("{\"connections\":[");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"peer\":{},\"state\":{},\"age_secs\":{},\"bytes_in\":{},\"bytes_out\":{}",
            json_string(&r.peer),
            json_string(r.state),
            Fixed::secs(r.age, 3),
            r.bytes_in,
            r.bytes_out
        );
        match &r.file {
            Some(f) => {
                let _ = write!(
                    out,
                    ",\"file\":{{\"name\":{},\"received\":{},\"size\":{},\"bytes_per_sec\":{}}}}}",
                    json_string(&f.name),
                    f.received,
                    f.size,
                    Fixed::ratio(u128::from(f.received) * NANOS, f.elapsed.as_nanos(), 0)
                );
            }
            None => out.push_str(",\"file\":null}"),
        }
    }
    out.push_str("]}\n");
    out
}

/// `s` as a JSON string literal, also valid as a TOML basic string: quotes, backslashes, every
/// control character and the line and paragraph separators escaped (`escape::quoted` is this).
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The last line of a good answer.
pub fn ok_line(summary: &str) -> String {
    if summary.is_empty() {
        "OK\n".to_string()
    } else {
        format!("OK {summary}\n")
    }
}

/// The last line of a refused request.
pub fn err_line(reason: &dyn fmt::Display) -> String {
    format!("ERR {reason}\n")
}

/// A byte count the way people read it: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut den = 1024u128;
    let mut unit = 0;
    while u128::from(n) >= den * 1024 && unit + 1 < UNITS.len() {
        den *= 1024;
        unit += 1;
    }
    format!("{} {}", Fixed::ratio(u128::from(n), den, 1), UNITS[unit])
}

/// An age: `4.2s`, `12m05s`, `3h07m`.
fn age(age: Duration) -> String {
    let whole = age.as_secs();
    match whole {
        0..60 => format!("{}s", Fixed::secs(age, 1)),
        60..3600 => format!("{}m{:02}s", whole / 60, whole % 60),
        _ => format!("{}h{:02}m", whole / 3600, whole / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let v6: SocketAddr = "[::1]:7".parse().unwrap();
        let good: [(&[u8], Request); 10] = [
            (b"list", Request::List { json: false }),
            (b"list --json\r", Request::List { json: true }),
            (b"stats", Request::Stats),
            (b"kick [127.0.0.1:5000]", Request::Kick { peer: a }),
            (b"kick 127.0.0.1:5000", Request::Kick { peer: a }),
            (b"kick [::1]:7", Request::Kick { peer: v6 }),
            (
                b"say hello  there",
                Request::Say {
                    to: None,
                    text: "hello  there",
                },
            ),
            (
                b"say --to [127.0.0.1:5000] hi",
                Request::Say {
                    to: Some(a),
                    text: "hi",
                },
            ),
            (
                b"udp 127.0.0.1:5000 ping",
                Request::Udp {
                    to: a,
                    text: "ping",
                },
            ),
            (
                b"say --tomorrow",
                Request::Say {
                    to: None,
                    text: "--tomorrow",
                },
            ),
        ];
        for (line, want) in good {
            assert_eq!(Request::parse(line), Ok(want), "{line:?}");
        }
        let bad: [(&[u8], RequestError); 10] = [
            (b"", RequestError::Empty),
            (b"\xff", RequestError::NotUtf8),
            (b"lists", RequestError::UnknownCommand),
            (b"list --yaml", RequestError::Extra),
            (b"stats now", RequestError::Extra),
            (b"kick", RequestError::BadPeer),
            (b"kick 1.2.3.4:5 6", RequestError::Extra),
            (b"say", RequestError::MissingText),
            (b"say --to nobody hi", RequestError::BadPeer),
            (b"udp host:1 hi", RequestError::BadAddress),
        ];
        for (line, want) in bad {
            assert_eq!(Request::parse(line), Err(want), "{line:?}");
        }
        assert!(matches!(
            Request::parse(b"udp 127.0.0.1:9"),
            Err(RequestError::MissingText)
        ));
    }

    #[test]
    fn json_strings_are_escaped() {
        let cases = [
            ("plain", "\"plain\""),
            ("a\"b\\c", "\"a\\\"b\\\\c\""),
            ("l1\nl2\t\r", "\"l1\\nl2\\t\\r\""),
            ("\u{1}\u{7f}\u{2028}", "\"\\u0001\\u007f\\u2028\""),
            ("日本", "\"日本\""),
        ];
        for (s, want) in cases {
            assert_eq!(json_string(s), want);
        }
    }

    #[test]
    fn list_renders() {
        let rows = [
            Row {
                peer: "[127.0.0.1:5000]".into(),
                state: "echo",
                age: Duration::from_secs(75),
                bytes_in: 12,
                bytes_out: 2048,
                file: None,
            },
            Row {
                peer: "[::1]:6".into(),
                state: "receiving",
                age: Duration::from_millis(2500),
                bytes_in: 600,
                bytes_out: 0,
                file: Some(FileRow {
                    name: "a\"b".into(),
                    received: 512,
                    size: 1024,
                    elapsed: Duration::from_millis(2500),
                }),
            },
        ];
        let text = list_text(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("echo") && lines[1].contains("1m15s"));
        assert!(lines[1].contains("2.0 KiB"), "{text}");
        assert!(
            lines[2].ends_with("\"a\"b\" 512 B of 1.0 KiB (50%) at 204 B/s"),
            "{text}"
        );
        assert_eq!(
            list_json(&rows),
            "{\"connections\":[{\"peer\":\"[127.0.0.1:5000]\",\"state\":\"echo\",\"age_secs\":75.000,\"bytes_in\":12,\"bytes_out\":2048,\"file\":null},\
             {\"peer\":\"[::1]:6\",\"state\":\"receiving\",\"age_secs\":2.500,\"bytes_in\":600,\"bytes_out\":0,\"file\":{\"name\":\"a\\\"b\",\"received\":512,\"size\":1024,\"bytes_per_sec\":205}}]}\n"
        );
    }

    #[test]
    fn sizes_and_ages() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(age(Duration::from_millis(4250)), "4.2s");
        assert_eq!(age(Duration::from_secs(3725)), "1h02m");
    }
}
