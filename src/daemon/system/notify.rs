//! The sd_notify protocol: datagrams such as `READY=1` to the Unix socket systemd names in
//! `$NOTIFY_SOCKET`, and the watchdog period from `$WATCHDOG_USEC`. Without `$NOTIFY_SOCKET`
//! nothing is sent.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::logger;

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` (the watchdog only applies if
    /// the latter is unset or names this process).
    pub fn from_env() -> Notifier {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Notifier::new(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// As `from_env`, with the variables given (for tests).
    pub fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Notifier {
        let target = socket.and_then(|s| match connect(s) {
            Ok(t) => Some(t),
            Err(e) => {
                logger::warn!("NOTIFY_SOCKET={s} unusable: {e}; not notifying systemd");
                None
            }
        });
        let for_us = watchdog_pid.is_none_or(|p| p.parse() == Ok(pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us && target.is_some())
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the period systemd asked for.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends one notification (newline-separated `KEY=value` assignments). Failures are logged
    /// at debug level only: systemd may be restarting, and the daemon must not care.
    pub fn send(&self, state: &str) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
            logger::debug!("sd_notify {state:?} failed: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// `RELOADING=1` with the CLOCK_MONOTONIC time in microseconds, as systemd 253+ requires
    /// for `Type=notify-reload` (and older versions accept).
    pub fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }
}

/// `/path/to/socket` or `@abstract-name`.
fn connect(socket: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(socket)?,
    };
    Ok((UnixDatagram::unbound()?, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_applies_only_to_our_pid() {
        let sock = std::env::temp_dir().join(format!("ferryd-notify-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixDatagram::bind(&sock).unwrap();
        let path = sock.to_str().unwrap();
        let cases = [
            (Some("2000000"), None, Some(Duration::from_secs(1))),
            (Some("2000000"), Some("42"), Some(Duration::from_secs(1))),
            (Some("2000000"), Some("43"), None),
            (Some("0"), None, None),
            (Some("junk"), None, None),
            (None, None, None),
        ];
        for (usec, pid, want) in cases {
            let n = Notifier::new(Some(path), usec, pid, 42);
            assert_eq!(n.watchdog_interval(), want, "{usec:?} {pid:?}");
        }
        assert_eq!(
            Notifier::new(None, Some("2000000"), None, 42).watchdog_interval(),
            None
        );
        Notifier::new(Some(path), None, None, 1).send("READY=1");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_file(&sock);
    }
}
