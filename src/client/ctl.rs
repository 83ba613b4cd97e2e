//! `ferryd ctl`: one request line to a running daemon's control socket, its answer printed. The
//! answer's lines go to stdout (through the escaper: a terminal never gets a control byte from
//! the socket); its last line, `OK …` or `ERR …`, says whether the request was done.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::escape::push_chat_text;

/// Where `ctl` looks without `--socket` or `$FERRYD_CONTROL`: what the systemd units set.
pub const DEFAULT_SOCKET: &str = "/run/ferryd/control.sock";
/// How long the daemon may take to answer (it serves one request at a time).
const ANSWER_TIME: Duration = Duration::from_secs(10);
/// The largest answer read (a `list` of many thousand connections fits).
const MAX_ANSWER: u64 = 64 << 20;

/// Why a request got no answer, or a refusal.
#[derive(Debug)]
pub enum CtlError {
    Connect(PathBuf, io::Error),
    Io(PathBuf, io::Error),
    /// The daemon answered `ERR <reason>`.
    Refused(String),
    /// The answer did not end with `OK` or `ERR`.
    Truncated,
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Connect(p, e) => write!(
                f,
                "cannot connect to the control socket {}: {e} (is control.socket set, and are you root or the daemon's user?)",
                p.display()
            ),
            CtlError::Io(p, e) => write!(f, "control socket {}: {e}", p.display()),
            CtlError::Refused(why) => write!(f, "the daemon refused: {why}"),
            CtlError::Truncated => f.write_str("the answer ended without OK or ERR"),
        }
    }
}

impl std::error::Error for CtlError {}

/// The socket `ctl` talks to: `--socket`, else `$FERRYD_CONTROL`, else `DEFAULT_SOCKET`.
pub fn control_socket(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("FERRYD_CONTROL").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Sends `request` to the socket at `path` and writes the answer's lines to `out` (the final
/// `OK` line's summary too, when nothing came before it).
pub fn ctl(path: &Path, request: &str, out: &mut dyn Write) -> Result<(), CtlError> {
    let io_err = |e| CtlError::Io(path.to_path_buf(), e);
    let mut stream =
        UnixStream::connect(path).map_err(|e| CtlError::Connect(path.to_path_buf(), e))?;
    stream
        .set_read_timeout(Some(ANSWER_TIME))
        .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIME)))
        .map_err(io_err)?;
    // A daemon that refuses us answers without reading: its answer says why, so a failed write
    // is reported only if no answer comes.
    let sent = stream.write_all(format!("{request}\n").as_bytes());
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(io_err)?;
    let text = String::from_utf8_lossy(&answer);
    let mut lines: Vec<&str> = text.lines().collect();
    let Some(last) = lines.pop() else {
        return Err(sent.err().map_or(CtlError::Truncated, io_err));
    };
    let mut shown = String::new();
    for line in &lines {
        push_chat_text(&mut shown, line.as_bytes());
        shown.push('\n');
    }
    if let Some(why) = last.strip_prefix("ERR ") {
        out.write_all(shown.as_bytes()).map_err(io_err)?;
        let mut reason = String::new();
        push_chat_text(&mut reason, why.as_bytes());
        return Err(CtlError::Refused(reason));
    }
    let summary = match last {
        "OK" => "",
        l => l.strip_prefix("OK ").ok_or(CtlError::Truncated)?,
    };
    if lines.is_empty() && !summary.is_empty() {
        push_chat_text(&mut shown, summary.as_bytes());
        shown.push('\n');
    }
    out.write_all(shown.as_bytes()).map_err(io_err)
}
