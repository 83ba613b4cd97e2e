//! The operator's control socket (`control.socket`): a Unix stream socket served by one thread,
//! one request at a time. Each request is one line of at most `proto::control::MAX_REQUEST`
//! bytes that must arrive within `REQUEST_TIME`, and the answer must be taken within
//! `ANSWER_TIME`, so a stuck `nc -U` holds the thread for seconds at most and nothing else at
//! all. Only root, the daemon's own user and (with `control.group`) that group's members are
//! answered, checked by the peer's credentials (`SO_PEERCRED`). `commands` carries out what is
//! asked.

mod commands;

use std::fs;
use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::config::ControlConfig;
use crate::daemon::shared::Shared;
use crate::logger;
use crate::proto::control::{self, MAX_REQUEST, Request};
use crate::threads;

/// How long a control client has to send its whole request line.
const REQUEST_TIME: Duration = Duration::from_secs(2);
/// How long each write of the answer may block on a control client that does not read.
const ANSWER_TIME: Duration = Duration::from_secs(2);
/// How often the control thread looks at the shutdown flag while nobody connects.
const TICK: Duration = Duration::from_millis(250);

/// Why the control socket could not be opened.
#[derive(Debug)]
pub struct ControlError {
    path: PathBuf,
    what: &'static str,
    err: io::Error,
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "control.socket {}: {}: {}",
            self.path.display(),
            self.what,
            self.err
        )
    }
}

impl std::error::Error for ControlError {}

/// Who may use the socket besides root.
struct Allowed {
    uid: u32,
    gid: Option<u32>,
}

/// The control socket, bound and ready to serve.
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
    allowed: Allowed,
}

impl Control {
    /// Creates the socket at `cfg.socket` (replacing a stale one left by a crash), mode 0600,
    /// or 0660 owned by `cfg.group`. `None` when no socket is configured.
    pub fn bind(cfg: &ControlConfig) -> Result<Option<Control>, ControlError> {
        let Some(path) = &cfg.socket else {
            return Ok(None);
        };
        let fail = |what, err| ControlError {
            path: path.clone(),
            what,
            err,
        };
        let gid = match &cfg.group {
            Some(name) => Some(group_id(name).map_err(|e| fail("control.group", e))?),
            None => None,
        };
        remove_stale(path).map_err(|e| fail("cannot replace the old socket", e))?;
        let listener = UnixListener::bind(path).map_err(|e| fail("cannot bind", e))?;
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| fail("cannot set its mode", e))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(|e| fail("cannot give it to control.group", e))?;
        }
        let uid = rustix::process::getuid().as_raw();
        Ok(Some(Control {
            listener,
            path: path.clone(),
            allowed: Allowed { uid, gid },
        }))
    }

    /// Serves requests on a thread of its own until the daemon stops, then removes the socket.
    /// `udp` is a clone of the daemon's UDP socket, for `udp HOST:PORT TEXT`.
    pub fn spawn(self, shared: Arc<Shared>, udp: Option<UdpSocket>) -> io::Result<JoinHandle<()>> {
        logger::info!("control socket on {}", self.path.display());
        threads::spawn(
            "control".into(),
            None,
            Box::new(move || self.run(&shared, udp.as_ref())),
        )
    }

    fn run(self, shared: &Shared, udp: Option<&UdpSocket>) {
        let tick = Timespec {
            tv_sec: 0,
            tv_nsec: i64::try_from(TICK.as_nanos()).unwrap_or(0),
        };
        while !shared.is_stopping() {
            let mut fds = [PollFd::new(&self.listener, PollFlags::IN)];
            match poll(&mut fds, Some(&tick)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    logger::warn!("control socket: poll: {e}");
                    thread::sleep(TICK);
                    continue;
                }
            }
            match self.listener.accept() {
                Ok((stream, _)) => self.serve(shared, udp, stream),
                Err(e) => {
                    logger::warn!("control socket: accept: {e}");
                    thread::sleep(TICK);
                }
            }
        }
        let _ = fs::remove_file(&self.path);
    }

    /// One control connection: credentials, one request line, the answer.
    fn serve(&self, shared: &Shared, udp: Option<&UdpSocket>, mut stream: UnixStream) {
        let cred = match rustix::net::sockopt::socket_peercred(stream.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                logger::warn!("control socket: cannot read the peer's credentials: {e}");
                return;
            }
        };
        let (uid, gid) = (cred.uid.as_raw(), cred.gid.as_raw());
        if stream.set_write_timeout(Some(ANSWER_TIME)).is_err() {
            return;
        }
        if !(uid == 0 || uid == self.allowed.uid || self.allowed.gid == Some(gid)) {
            logger::warn!(
                "control socket: refused uid {uid} (pid {}): only root and uid {} may use it",
                cred.pid.as_raw_nonzero(),
                self.allowed.uid
            );
            let _ = stream.write_all(control::err_line(&"permission denied").as_bytes());
            // Take the request (bounded as any) before closing: closing on unread bytes would
            // reset the connection and lose the answer.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = read_request(&mut stream);
            return;
        }
        let answer = match read_request(&mut stream) {
            Ok(line) => match Request::parse(&line) {
                Ok(req) => commands::run(shared, udp, &req, uid),
                Err(e) => control::err_line(&e),
            },
            Err(why) => {
                logger::warn!("control socket: uid {uid}: {why}");
                control::err_line(&why)
            }
        };
        if let Err(e) = stream.write_all(answer.as_bytes()) {
            logger::warn!("control socket: uid {uid} did not take its answer: {e}");
        }
    }
}

/// Reads one request line, its newline excluded, within `MAX_REQUEST` bytes and `REQUEST_TIME`.
fn read_request(stream: &mut UnixStream) -> Result<Vec<u8>, String> {
    let until = Instant::now() + REQUEST_TIME;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        if let Some(i) = buf[..len].iter().position(|&b| b == b'\n') {
            buf.truncate(i);
            return Ok(buf);
        }
        if len == MAX_REQUEST {
            return Err(format!("request too long: over {MAX_REQUEST} bytes"));
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "request not complete within {} s",
                REQUEST_TIME.as_secs()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf[len..]) {
            // A request without its newline counts when the client shuts its side.
            Ok(0) if len > 0 => {
                buf.truncate(len);
                return Ok(buf);
            }
            Ok(0) => return Err("empty request".into()),
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if crate::deadline::is_timeout(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Removes a socket left at `path` by an earlier run; refuses to remove anything else, or a
/// socket another process still answers on.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "something other than a socket is there",
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process serves it (is another ferryd running?)",
        ));
    }
    fs::remove_file(path)
}

/// A group's id from its name (or its number).
fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group named {name}"),
        )),
        Err(e) => Err(io::Error::from(e)),
    }
}
