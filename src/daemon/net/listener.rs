//! Making the listening socket: `socket2` for the options std does not expose (SO_REUSEADDR, the
//! backlog, IPV6_V6ONLY off for a dual-stack `::`), then a plain `std::net::TcpListener`.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// A listening socket that could not be made, naming the address.
#[derive(Debug)]
pub struct BindError {
    /// "tcp" or "udp".
    pub proto: &'static str,
    pub addr: SocketAddr,
    pub err: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = match self.err.kind() {
            io::ErrorKind::AddrInUse => {
                " (another process, perhaps another ferryd, has that port; pick another port or stop it)"
            }
            io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
            io::ErrorKind::AddrNotAvailable => {
                " (no interface of this machine has that address; check server.bind)"
            }
            _ => "",
        };
        write!(
            f,
            "cannot listen on {} {}: {}{hint}",
            self.proto, self.addr, self.err
        )
    }
}

impl std::error::Error for BindError {}

/// Binds and listens on `addr` with the given backlog.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> Result<TcpListener, BindError> {
    let make = || -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // SO_REUSEADDR on a TCP listener only lets it bind past connections in TIME_WAIT; Linux
        // never lets a second socket listen on the same port with it (that takes SO_REUSEPORT).
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(backlog.min(i32::MAX as u32) as i32)?;
        Ok(socket.into())
    };
    make().map_err(|err| BindError {
        proto: "tcp",
        addr,
        err,
    })
}

/// Stops a listener from accepting: a thread blocked in `accept` returns at once with an error and
/// further connection attempts are refused by the kernel.
pub fn stop_listening(listener: &TcpListener) {
    // On Linux, shutdown(2) on a listening socket wakes a blocked accept(2) with EINVAL.
    let _ = SockRef::from(listener).shutdown(std::net::Shutdown::Both);
}
