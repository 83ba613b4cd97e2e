//! Where a test daemon listens, without a race for the port: sockets the test binds itself and
//! hands to the daemon at fd 3 and 4 the way systemd socket activation does, or a TCP port the
//! test holds (bound, not listening) while a daemon that binds its own port starts.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use socket2::{Domain, Protocol, Socket, Type};

/// How many ports to try before giving up on finding one whose UDP side is free too.
const ATTEMPTS: usize = 100;
/// The first descriptor systemd passes (SD_LISTEN_FDS_START); the UDP socket follows it.
const FIRST_FD: RawFd = 3;

/// A listening TCP socket and, if asked for, a UDP socket on the same port, bound by the test.
/// `pass_to` hands them to a child as fds 3 and 4; the test's own copies close on drop, after
/// which only the daemon holds them.
#[derive(Debug)]
pub struct Handoff {
    tcp: Socket,
    udp: Option<Socket>,
    addr: SocketAddr,
}

impl Handoff {
    /// Binds a TCP listener (with `backlog`) on `ip` and a free port the kernel picks, and a UDP
    /// socket on the same port if `with_udp`; sockets on the unspecified IPv6 address are
    /// dual-stack, as the daemon makes them.
    pub fn bind(ip: IpAddr, backlog: u32, with_udp: bool) -> Handoff {
        for _ in 0..ATTEMPTS {
            let tcp = new_socket(ip, Type::STREAM);
            bind(&tcp, SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("binding {ip}:0: {e}"));
            let addr = local_addr(&tcp);
            let udp = if with_udp {
                let udp = new_socket(ip, Type::DGRAM);
                match bind(&udp, addr) {
                    Ok(()) => Some(udp),
                    // Some other process has this UDP port: pick another.
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                    Err(e) => panic!("binding UDP {addr}: {e}"),
                }
            } else {
                None
            };
            tcp.listen(i32::try_from(backlog).unwrap_or(i32::MAX))
                .unwrap_or_else(|e| panic!("listening on {addr}: {e}"));
            return Handoff { tcp, udp, addr };
        }
        panic!("no port on {ip} had both its TCP and UDP side free in {ATTEMPTS} tries");
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many sockets `pass_to` passes (`$LISTEN_FDS`).
    pub fn n_fds(&self) -> usize {
        1 + usize::from(self.udp.is_some())
    }

    /// Makes `cmd`'s child start with the TCP listener at fd 3 and the UDP socket at fd 4, both
    /// without close-on-exec. Every other descriptor of the test keeps close-on-exec, so the
    /// child inherits nothing else, and no other child (tests run in parallel) inherits these.
    /// The caller sets `$LISTEN_PID` and `$LISTEN_FDS` for the final process.
    pub fn pass_to(&self, cmd: &mut Command) {
        let tcp = self.tcp.as_raw_fd();
        let udp = self.udp.as_ref().map(AsRawFd::as_raw_fd);
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe calls (fcntl, dup2), no allocation and no locking. The descriptors it
        // names stay open in the parent until after `spawn` (the caller keeps `self` alive), so
        // they are open in the child too.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || place(tcp, udp));
        }
    }
}

/// A TCP port held by the test, for a daemon that binds its own port: a socket bound to it with
/// SO_REUSEADDR but not listening. The daemon (which sets SO_REUSEADDR on its listener too) can
/// bind and listen on the port meanwhile; nobody else gets it from the kernel, and a connect to
/// it is refused until the daemon listens. Release it by dropping it once the daemon listens.
///
/// Only TCP: ferryd binds its UDP socket without SO_REUSEADDR, so that no other program can
/// share that port, and no hold can be handed over to it. A daemon that binds its own port runs
/// without the UDP echo unless its test asks for it (see `DaemonBuilder::bind_own_port`).
#[derive(Debug)]
pub struct Reservation {
    _tcp: Socket,
    addr: SocketAddr,
}

impl Reservation {
    pub fn new(ip: IpAddr) -> Reservation {
        let tcp = new_socket(ip, Type::STREAM);
        bind(&tcp, SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("binding {ip}:0: {e}"));
        let addr = local_addr(&tcp);
        Reservation { _tcp: tcp, addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// A port on 127.0.0.1 that nothing listens on, for as long as the reservation is held: a
/// connect there is refused.
pub fn reserve_port() -> Reservation {
    Reservation::new(Ipv4Addr::LOCALHOST.into())
}

/// A close-on-exec socket made as the daemon makes its own: SO_REUSEADDR on TCP only (UDP
/// without it, so that no other program can share the port), dual-stack on `::`.
fn new_socket(ip: IpAddr, kind: Type) -> Socket {
    let tcp = kind == Type::STREAM;
    let protocol = if tcp { Protocol::TCP } else { Protocol::UDP };
    let socket = Socket::new(
        Domain::for_address(SocketAddr::new(ip, 0)),
        kind,
        Some(protocol),
    )
    .unwrap_or_else(|e| panic!("cannot make a socket for {ip}: {e}"));
    if tcp {
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
    }
    if ip.is_ipv6() && ip.is_unspecified() {
        socket.set_only_v6(false).expect("IPV6_V6ONLY off");
    }
    socket
}

fn bind(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    socket.bind(&addr.into())
}

fn local_addr(socket: &Socket) -> SocketAddr {
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("an IP socket has an IP address")
}

/// In the child between fork and exec: `tcp` to fd 3 and `udp` to fd 4, without close-on-exec.
fn place(tcp: RawFd, udp: Option<RawFd>) -> io::Result<()> {
    let mut udp = udp;
    if udp == Some(FIRST_FD) {
        // Moving the TCP socket to fd 3 would close it: keep a copy above fd 4 first.
        // SAFETY: fcntl on an open descriptor; no memory is involved.
        #[allow(unsafe_code)]
        let copy = unsafe { libc::fcntl(FIRST_FD, libc::F_DUPFD_CLOEXEC, FIRST_FD + 2) };
        udp = Some(check(copy)?);
    }
    move_to(tcp, FIRST_FD)?;
    if let Some(udp) = udp {
        move_to(udp, FIRST_FD + 1)?;
    }
    Ok(())
}

/// Makes `target` a copy of `fd` that survives exec.
fn move_to(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 and fcntl on descriptors that are open in this process; no memory is involved.
    #[allow(unsafe_code)]
    let rc = unsafe {
        if fd == target {
            // dup2 onto itself would leave close-on-exec set.
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            // The copy dup2 makes never has close-on-exec.
            libc::dup2(fd, target)
        }
    };
    check(rc).map(|_| ())
}

fn check(rc: libc::c_int) -> io::Result<RawFd> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
