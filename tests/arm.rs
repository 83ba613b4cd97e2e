//! ferryd on an emulated arm64 board (issue 24): the aarch64 binary that `.ci/cross` builds with
//! Debian's toolchain runs under `qemu-system-aarch64` (the `virt` machine, no KVM) on Debian's
//! cloud kernel with a busybox initramfs (tests/arm/make-initramfs.sh, tests/arm/init.sh), and
//! the host drives it through forwarded loopback ports with the host's own `ferryd send`: TCP and
//! UDP echo, a chat pair, an upload, and a resume after a cut (through the counting proxy of
//! tests/support). The board then powers off on request, both daemons stopping with status 0.
//!
//! A real-peer test (root, Debian packages, ~1 min of boot and emulation on 2 cores): run it with
//! `cargo test --features real-peers --test arm`. It builds the cross binary itself (`bash .ci/cross
//! --no-deb aarch64-unknown-linux-gnu`, a no-op when it is up to date), and fails naming the
//! package when a tool is missing.

mod support;

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{
    AtLimit, Proxy, Rng, TempDir, echo_round_trip, need, read_line, reserve_port, run_ferryd_for,
    run_for, signal, stderr_of, stdout_of, wait_until,
};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";
/// How long QEMU may run before boot.sh kills it, and how long the test waits for the boot.
const QEMU_SECS: u64 = 240;
const BOOT_WAIT: Duration = Duration::from_secs(150);
/// Waits for one step on the emulated board (an upload of a few MiB runs at a few MB/s there).
const STEP_WAIT: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// The emulated board: QEMU under boot.sh, its console file and the host ports forwarded to it.
struct Board {
    qemu: Child,
    console: PathBuf,
    echo: SocketAddr,
    udp: SocketAddr,
    chat: SocketAddr,
    stop: SocketAddr,
}

impl Board {
    fn boot(dir: &Path) -> Board {
        // TCP ports are held for QEMU as for a daemon (it binds with SO_REUSEADDR too); the UDP
        // port is one the kernel just handed out and took back.
        let (echo, chat, stop) = (reserve_port(), reserve_port(), reserve_port());
        let udp = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap();
        let ports = [echo.port(), udp.port(), chat.port(), stop.port()];
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("tests/arm/boot.sh")).arg(dir);
        cmd.args(ports.iter().map(u16::to_string));
        cmd.arg(QEMU_SECS.to_string());
        let qemu = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("qemu.err")).unwrap())
            .spawn()
            .expect("starting tests/arm/boot.sh");
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let board = Board {
            qemu,
            console: dir.join("console.log"),
            echo: at(ports[0]),
            udp: at(ports[1]),
            chat: at(ports[2]),
            stop: at(ports[3]),
        };
        for port in [7878, 7879] {
            board.wait_console(&format!("listening on 0.0.0.0:{port} "), BOOT_WAIT);
        }
        board
    }

    fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console shows `needle`, panicking with the console and QEMU's errors.
    fn wait_console(&self, needle: &str, timeout: Duration) {
        if !wait_until(timeout, || self.console().contains(needle)) {
            let errors = fs::read_to_string(self.console.with_file_name("qemu.err"));
            panic!(
                "the board's console did not show {needle:?} within {timeout:?}\n--- console ---\n{}\n--- qemu ---\n{}",
                self.console(),
                errors.unwrap_or_default()
            );
        }
    }

    fn connect(&self, addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect_timeout(&addr, STEP_WAIT)
            .unwrap_or_else(|e| panic!("connecting to the board at {addr}: {e}"));
        s.set_read_timeout(Some(STEP_WAIT)).unwrap();
        s.set_write_timeout(Some(STEP_WAIT)).unwrap();
        s
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        // boot.sh execs `timeout`, which passes SIGTERM on to QEMU.
        if self.qemu.try_wait().ok().flatten().is_none() {
            signal(self.qemu.id(), "TERM");
            let _ = self.qemu.wait();
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the aarch64 binary with `.ci/cross` (Debian's toolchain) and the board's kernel and
/// initramfs into `dir`.
fn build_board(dir: &Path) {
    let mut cross = Command::new("bash");
    cross
        .current_dir(repo())
        .args([".ci/cross", "--no-deb", TRIPLE])
        // The size is .ci/run's check (the footprint goal); this test boots what is built.
        .env("FERRYD_SIZE_LIMIT_KIB", "4096");
    let out = run_for(cross, "bash .ci/cross", Duration::from_secs(900));
    assert!(
        out.status.success(),
        "bash .ci/cross --no-deb {TRIPLE} failed:\n{}{}",
        stdout_of(&out),
        stderr_of(&out)
    );
    let cross_dir = std::env::var_os("FERRYD_CROSS_DIR")
        .map_or_else(|| repo().join("target/cross"), PathBuf::from);
    let ferryd = cross_dir.join(TRIPLE).join("embedded/ferryd.stripped");
    let mut make = Command::new("bash");
    make.arg(repo().join("tests/arm/make-initramfs.sh"))
        .arg(&ferryd)
        .arg(dir);
    let out = run_for(make, "make-initramfs.sh", Duration::from_secs(600));
    assert!(
        out.status.success(),
        "tests/arm/make-initramfs.sh failed:\n{}{}",
        stdout_of(&out),
        stderr_of(&out)
    );
}

/// `ferryd send` (the host's build) of `file` to `to`; whether it succeeded, and what it said.
fn send(to: SocketAddr, file: &Path) -> (bool, String) {
    let to = to.to_string();
    let args = [
        "send",
        "--to",
        &to,
        "--timeout",
        "30",
        file.to_str().unwrap(),
    ];
    let out = run_ferryd_for(&args, &[], STEP_WAIT * 2);
    let text = format!("{}{}", stdout_of(&out), stderr_of(&out));
    (out.status.success(), text)
}

fn check_echo(board: &Board) {
    let mut s = board.connect(board.echo);
    echo_round_trip(&mut s, b"hello from the host\n");
    echo_round_trip(&mut s, "ünïcode and a tab\t\n".as_bytes());
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // A datagram may be lost on its way through QEMU's user-mode stack: a few tries.
    let mut buf = [0u8; 64];
    let echoed = (0..10).any(|_| {
        udp.send_to(b"udp ping\n", board.udp).unwrap();
        matches!(udp.recv_from(&mut buf), Ok((9, _)) if &buf[..9] == b"udp ping\n")
    });
    assert!(echoed, "no UDP echo from the board\n{}", board.console());
}

fn check_chat_pair(board: &Board) {
    let mut a = board.connect(board.chat);
    let first = read_line(&mut a);
    assert!(
        first.starts_with("* welcome [10.0.2.2:") && first.ends_with("; nobody else is here\n"),
        "{first:?}"
    );
    let mut b = board.connect(board.chat);
    let second = read_line(&mut b);
    let b_label = second
        .strip_prefix("* welcome ")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("not a welcome line: {second:?}"))
        .to_string();
    assert_eq!(read_line(&mut a), format!("* {b_label} joined\n"));
    b.write_all(b"hello from b\n").unwrap();
    assert_eq!(read_line(&mut a), format!("{b_label} hello from b\n"));
    a.write_all(b"and back from a\n").unwrap();
    let relayed = read_line(&mut b);
    assert!(
        relayed.starts_with("[10.0.2.2:") && relayed.ends_with("] and back from a\n"),
        "{relayed:?}"
    );
}

fn check_upload(board: &Board, src: &TempDir) {
    let file = src.path().join("board.bin");
    fs::write(&file, Rng::new(24).bytes(MIB)).unwrap();
    let (ok, text) = send(board.echo, &file);
    assert!(ok, "{text}\n{}", board.console());
    board.wait_console(
        &format!("stored \"board.bin\" as \"board.bin\" ({MIB} B"),
        STEP_WAIT,
    );
}

fn check_resume(board: &Board, src: &TempDir) {
    let size = 4 * MIB;
    let file = src.path().join("firmware.img");
    fs::write(&file, Rng::new(25).bytes(size)).unwrap();
    let cut = (size / 2) as u64;
    let mut proxy = Proxy::start(board.echo, Some(cut), AtLimit::Cut);
    let (ok, text) = send(proxy.addr, &file);
    proxy.finish();
    assert!(!ok, "the cut upload should fail: {text}");
    board.wait_console("kept for a resume", STEP_WAIT);
    let (ok, text) = send(board.echo, &file);
    assert!(ok, "{text}\n{}", board.console());
    let at: u64 = text
        .split("resumed at ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the second send did not resume: {text}"));
    assert!(at > 0 && at <= cut, "resumed at {at} of a cut at {cut}");
    // The trailing BLAKE3 checksum covers the whole file: stored means stored byte for byte.
    board.wait_console(
        &format!("stored \"firmware.img\" as \"firmware.img\" ({size} B"),
        STEP_WAIT,
    );
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: qemu-system-aarch64 (qemu-system-arm), cpio (cpio), root; run bash tests/real-peers.sh"
)]
fn ferryd_serves_echo_chat_uploads_and_resumes_on_an_emulated_arm64_board() {
    need("qemu-system-aarch64", "qemu-system-arm");
    need("cpio", "cpio");
    need("dpkg-deb", "dpkg");
    let dir = TempDir::new();
    build_board(dir.path());
    let mut board = Board::boot(dir.path());
    let src = TempDir::new();
    check_echo(&board);
    check_chat_pair(&board);
    check_upload(&board, &src);
    check_resume(&board, &src);
    // Power off: both daemons stop on SIGTERM with status 0, then QEMU exits.
    drop(board.connect(board.stop));
    board.wait_console("ferryd-arm: power off: done", STEP_WAIT);
    let exited = wait_until(STEP_WAIT, || board.qemu.try_wait().ok().flatten().is_some());
    assert!(exited, "QEMU did not exit after the board powered off");
    let console = board.console();
    for name in ["echo", "chat"] {
        assert!(
            console.contains(&format!("ferryd-arm: {name} daemon exit status 0")),
            "{name} daemon did not stop cleanly\n{console}"
        );
    }
    assert!(
        !console.contains(" ERROR "),
        "errors on the board:\n{console}"
    );
}
