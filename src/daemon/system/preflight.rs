//! The checks the daemon makes before it serves, which `ferryd check-config` runs too, so that
//! both refuse the same files with the same message and exit code (78, a bad configuration):
//! the upload key can be read and is long enough, the upload directory is (or can be created
//! as) a directory this user can write, and the listening addresses belong to this machine.
//! Nothing here writes a file or keeps a socket; whether a port is free is only known by binding
//! it, which the daemon does next (and a running daemon holds it while `check-config` validates
//! its reload).

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use rustix::fs::Access;
use socket2::{Domain, Socket, Type};

use crate::auth::{Key, KeyError};
use crate::config::Config;

/// A configuration the daemon would refuse at start.
#[derive(Debug)]
pub enum PreflightError {
    /// `files.token_file` cannot be read or is too short.
    Key(KeyError),
    /// `files.dir` is not, and cannot become, a writable directory.
    Dir { dir: PathBuf, why: String },
    /// `server.bind` or `udp.bind` is no address of this machine.
    Addr {
        key: &'static str,
        addr: IpAddr,
        err: io::Error,
    },
    /// More than one of the above, in the order checked.
    Several(Vec<PreflightError>),
}

impl fmt::Display for PreflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PreflightError::Key(e) => write!(f, "files.token_file: {e}"),
            PreflightError::Dir { dir, why } => write!(f, "files.dir = {}: {why}", dir.display()),
            PreflightError::Addr { key, addr, err } => write!(
                f,
                "{key} = {addr}: cannot listen there: {err} (no interface of this machine has that address)"
            ),
            PreflightError::Several(all) => {
                let all: Vec<String> = all.iter().map(ToString::to_string).collect();
                write!(f, "{} problems: {}", all.len(), all.join("; "))
            }
        }
    }
}

impl std::error::Error for PreflightError {}

/// Runs every check and reports every failure (`Several` when more than one); `own_sockets` is
/// false when systemd passed the sockets (the addresses in the file are then not used).
pub fn check(config: &Config, own_sockets: bool) -> Result<(), PreflightError> {
    let mut failed = Vec::new();
    if let Some(path) = &config.files.token_file {
        failed.extend(Key::load(path).err().map(PreflightError::Key));
    }
    failed.extend(
        check_dir(&config.files.dir)
            .err()
            .map(|why| PreflightError::Dir {
                dir: config.files.dir.clone(),
                why,
            }),
    );
    if own_sockets {
        failed.extend(check_addr("server.bind", config.server.bind, Type::STREAM).err());
        if config.udp.enabled {
            failed.extend(check_addr("udp.bind", config.udp.bind, Type::DGRAM).err());
        }
    }
    match failed.len() {
        0 => Ok(()),
        1 => Err(failed.remove(0)),
        _ => Err(PreflightError::Several(failed)),
    }
}

/// `dir` is a directory this user may write, or its nearest existing ancestor is (so the daemon
/// can create it).
fn check_dir(dir: &Path) -> Result<(), String> {
    let mut probe = dir;
    loop {
        let shown = if probe.as_os_str().is_empty() {
            Path::new(".")
        } else {
            probe
        };
        match fs::metadata(shown) {
            Ok(m) if m.is_dir() => {
                return rustix::fs::access(shown, Access::WRITE_OK | Access::EXEC_OK).map_err(
                    |e| {
                        let e = io::Error::from(e);
                        if shown == dir {
                            format!("the directory is not writable by this user: {e}")
                        } else {
                            format!(
                                "missing, and cannot be created: {} is not writable by this user: {e}",
                                shown.display()
                            )
                        }
                    },
                );
            }
            Ok(_) if shown == dir => return Err("exists and is not a directory".to_string()),
            Ok(_) => {
                return Err(format!(
                    "missing, and cannot be created: {} is not a directory",
                    shown.display()
                ));
            }
            // Missing, or under something that is not a directory (found one level up).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                match probe.parent() {
                    Some(parent) => probe = parent,
                    None => return Err(format!("cannot be created: {e}")),
                }
            }
            Err(e) => return Err(format!("cannot look at {}: {e}", shown.display())),
        }
    }
}

/// Binds a throw-away socket to `addr` on port 0: refused with "address not available" when no
/// interface has the address. Where sockets of that family cannot be made at all (a sandbox such
/// as the socket-activated unit's), nothing can be known and nothing is reported.
fn check_addr(key: &'static str, addr: IpAddr, ty: Type) -> Result<(), PreflightError> {
    let sa = SocketAddr::new(addr, 0);
    let Ok(socket) = Socket::new(Domain::for_address(sa), ty, None) else {
        return Ok(());
    };
    match socket.bind(&sa.into()) {
        Err(err) if err.kind() == io::ErrorKind::AddrNotAvailable => {
            Err(PreflightError::Addr { key, addr, err })
        }
        _ => Ok(()),
    }
}
