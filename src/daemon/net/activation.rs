//! Socket activation: the listening sockets systemd passes (`$LISTEN_PID`, `$LISTEN_FDS`,
//! `$LISTEN_FDNAMES`, fds from 3 up), taken over instead of binding our own. This file holds the
//! crate's only `unsafe` line: turning an inherited descriptor number into an owned socket.

use std::fmt;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Socket, Type};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const FIRST_FD: RawFd = 3;
/// More passed descriptors than this is not a plausible ferryd setup.
const MAX_FDS: usize = 16;

/// The sockets systemd passed.
#[derive(Debug, Default)]
pub struct Activated {
    pub tcp: Option<(TcpListener, SocketAddr)>,
    pub udp: Option<(UdpSocket, SocketAddr)>,
    /// What was passed and how it was used, one entry per descriptor, for the log.
    pub described: Vec<String>,
}

#[derive(Debug)]
pub enum ActivationError {
    BadCount(String),
    NotASocket { fd: RawFd, err: std::io::Error },
    Unusable { fd: RawFd, what: String },
    NoListener,
}

impl fmt::Display for ActivationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActivationError::BadCount(v) => write!(
                f,
                "LISTEN_FDS={v} is not a number of descriptors (1–{MAX_FDS})"
            ),
            ActivationError::NotASocket { fd, err } => {
                write!(f, "passed descriptor {fd} is not a socket: {err}")
            }
            ActivationError::Unusable { fd, what } => {
                write!(f, "passed descriptor {fd} cannot be used: {what}")
            }
            ActivationError::NoListener => f.write_str(
                "systemd passed no listening TCP socket (check ListenStream= in the .socket unit)",
            ),
        }
    }
}

impl std::error::Error for ActivationError {}

/// Takes the sockets systemd passed to this process, if any. `Ok(None)` when this process was
/// not socket-activated (`$LISTEN_PID` unset or naming another process).
pub fn from_env() -> Result<Option<Activated>, ActivationError> {
    let var = |k: &str| std::env::var(k).ok();
    if var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(None);
    }
    let Some(count) = var("LISTEN_FDS") else {
        return Ok(None);
    };
    let n = match count.parse::<usize>() {
        Ok(n) if (1..=MAX_FDS).contains(&n) => n,
        _ => return Err(ActivationError::BadCount(count)),
    };
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(String::from).collect())
        .unwrap_or_default();
    let mut activated = Activated::default();
    for i in 0..n {
        let fd = FIRST_FD + i as RawFd;
        let socket = Socket::from(take_inherited(fd)?);
        let name = names.get(i).map_or(String::new(), |n| format!(" ({n})"));
        let kind = socket
            .r#type()
            .map_err(|err| ActivationError::NotASocket { fd, err })?;
        let local = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| ActivationError::Unusable {
                fd,
                what: "not an IPv4 or IPv6 socket".into(),
            })?;
        let _ = socket.set_cloexec(true);
        if kind == Type::STREAM && activated.tcp.is_none() {
            if !socket.is_listener().unwrap_or(false) {
                return Err(ActivationError::Unusable {
                    fd,
                    what: "a stream socket that is not listening (use Accept=no)".into(),
                });
            }
            activated
                .described
                .push(format!("fd {fd}{name}: TCP listener on {local}"));
            activated.tcp = Some((socket.into(), local));
        } else if kind == Type::DGRAM && activated.udp.is_none() {
            activated
                .described
                .push(format!("fd {fd}{name}: UDP socket on {local}"));
            activated.udp = Some((socket.into(), local));
        } else {
            // Dropping the socket closes it: an extra descriptor would only leak.
            activated
                .described
                .push(format!("fd {fd}{name}: extra socket on {local}, closed"));
        }
    }
    if activated.tcp.is_none() {
        return Err(ActivationError::NoListener);
    }
    Ok(Some(activated))
}

/// Claims an inherited descriptor, at most once per process.
#[allow(unsafe_code)]
fn take_inherited(fd: RawFd) -> Result<OwnedFd, ActivationError> {
    static TAKEN: [AtomicBool; MAX_FDS] = [const { AtomicBool::new(false) }; MAX_FDS];
    let slot = usize::try_from(fd - FIRST_FD)
        .ok()
        .and_then(|i| TAKEN.get(i));
    if slot.is_none_or(|s| s.swap(true, Ordering::SeqCst)) {
        return Err(ActivationError::Unusable {
            fd,
            what: "already taken".into(),
        });
    }
    // `from_raw_fd` needs an open descriptor: /proc tells without touching it.
    if std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
        return Err(ActivationError::Unusable {
            fd,
            what: "not open".into(),
        });
    }
    // SAFETY: systemd (or a stand-in) opened descriptors FIRST_FD..FIRST_FD+LISTEN_FDS for this
    // process ($LISTEN_PID was checked to be ours), and nothing in this process owns them: ferryd
    // opens nothing before taking them, never takes one twice (the TAKEN flags), and from here
    // on the returned OwnedFd is the only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(owned)
}
