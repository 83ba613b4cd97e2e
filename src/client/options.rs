//! What `ferryd send` and `ferryd pack` are asked to do (`SendOptions`, `PackOptions`, the
//! `Form` of their frames) and how they fail (`ClientError`).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::KeyError;
use crate::client::stdin;
use crate::proto::decimal::Secs;
use crate::proto::{Algo, name};

/// Files at least this large are sent resumable (header flag bit 3) by default: the server keeps
/// what arrived if the connection is cut, and the next `send` of the same file continues from
/// there, at the cost of one round trip (the `RESUME <offset>` line) before the body. With the
/// trailing checksum (the default) the file is still read once, the header carrying a resume id
/// for this version of the file (`resume_id`) in place of the checksum; with `--checksum header`
/// it is hashed first. Smaller files and standard input are sent one-pass, not resumable.
pub const RESUME_MIN: u64 = 1 << 20;

/// `--retry`'s default: retries after a cut, per file, counted again from zero each time a try
/// gets further into the file. With `retry::backoff`'s pauses (0.5 s doubling to 8 s) the last
/// one starts about 40 s after the first cut: a Wi-Fi roam, a restarted server or a short outage
/// is ridden out, a server gone for good is reported within the minute.
pub const DEFAULT_RETRIES: u32 = 8;

/// What `ferryd send` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOptions {
    pub to: String,
    pub timeout: Duration,
    pub files: Vec<PathBuf>,
    /// The shared upload key, for servers with `files.token_file`.
    pub key_file: Option<PathBuf>,
    /// How the frames are made.
    pub form: Form,
    /// `-r`: directories among `files` are sent whole, each file named by its path relative to
    /// the directory's parent (`client::walk`).
    pub recursive: bool,
    /// `--retry N`: after a cut (or `ERR busy`, `ERR shutdown`, a stall), send the file again up
    /// to this many times, pausing longer each time, resuming a resumable one; 0: never.
    pub retries: u32,
}

/// What `ferryd pack` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    pub files: Vec<PathBuf>,
    pub form: Form,
}

/// How frames are made: the checksum's algorithm and place, and the name to send under.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Form {
    pub algo: Algo,
    /// The checksum follows the body (hashed while it is sent) instead of standing in the
    /// header (hashed before it is sent).
    pub trailing: bool,
    /// The name to send under instead of the file's own (required for `-`, standard input).
    pub name: Option<String>,
    /// Files of `RESUME_MIN` bytes or more (not standard input) are sent resumable (`send`).
    pub resume: bool,
}

/// A client failure, with the reason a user can act on.
#[derive(Debug)]
pub enum ClientError {
    Resolve {
        to: String,
        err: io::Error,
    },
    Refused {
        to: String,
    },
    ConnectTimeout {
        to: String,
        timeout: Duration,
    },
    Connect {
        to: String,
        err: io::Error,
    },
    File {
        path: PathBuf,
        err: io::Error,
    },
    BadName {
        path: PathBuf,
        err: name::NameError,
    },
    Key(KeyError),
    Stdin(stdin::StdinError),
    /// With `--key-file`, the server did not open with a `NONCE` line.
    NoNonce {
        to: String,
    },
    Io(io::Error),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Resolve { to, err } => write!(f, "cannot resolve {to}: {err}"),
            ClientError::Refused { to } => {
                write!(
                    f,
                    "connection refused by {to} (is ferryd running and listening there?)"
                )
            }
            ClientError::ConnectTimeout { to, timeout } => {
                write!(f, "timed out after {} s connecting to {to}", Secs(*timeout))
            }
            ClientError::Connect { to, err } => write!(f, "cannot connect to {to}: {err}"),
            ClientError::File { path, err } => write!(f, "{}: {err}", path.display()),
            ClientError::BadName { path, err } => {
                write!(
                    f,
                    "{}: cannot be sent under this name: {err}",
                    path.display()
                )
            }
            ClientError::Key(e) => write!(f, "--key-file: {e}"),
            ClientError::Stdin(e) => write!(f, "{e}"),
            ClientError::NoNonce { to } => write!(
                f,
                "{to} sent no NONCE line: it does not take upload keys (try without --key-file)"
            ),
            ClientError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// Whether this is a failure to reach the server (not a file's or the key's).
    pub(super) fn is_connect(&self) -> bool {
        matches!(
            self,
            ClientError::Refused { .. }
                | ClientError::ConnectTimeout { .. }
                | ClientError::Connect { .. }
                | ClientError::Resolve { .. }
                | ClientError::Io(_)
        )
    }

    /// The error without the file's path, for lines that already start with it.
    pub(super) fn detail(&self) -> String {
        match self {
            ClientError::File { err, .. } => err.to_string(),
            ClientError::BadName { err, .. } => format!("cannot be sent under this name: {err}"),
            other => other.to_string(),
        }
    }
}
