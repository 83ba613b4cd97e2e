//! The operator's console (issue 21) against the real binary: `ferryd ctl list` shows a real echo
//! client, a throttled upload and a chat pair with their states and figures; `say` reaches echo
//! clients (never inside a line they are being sent) and the chat room as `[server]`; `kick` ends
//! a connection with `ERR kicked by operator` and the log names the operator's uid; `udp` sends
//! from the daemon's UDP socket; an ordinary user is refused; oversize and slow control requests
//! are cut while the daemon goes on serving.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{
    Daemon, DaemonBuilder, TempDir, bin, describe, echo_round_trip, frame, ok_line, path_str,
    peer_label, read_line, read_to_eof, run_ferryd, stdout_of, wait_until,
};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A daemon with its control socket in a directory of the test's own.
struct Console {
    d: Daemon,
    sock: PathBuf,
    _dir: TempDir,
}

fn console(builder: DaemonBuilder) -> Console {
    let dir = TempDir::new();
    let sock = dir.path().join("control.sock");
    let d = builder
        .set("control", &format!("socket = {:?}", path_str(&sock)))
        .start();
    d.wait_log("control socket on", IO_TIMEOUT);
    Console { d, sock, _dir: dir }
}

impl Console {
    /// `ferryd ctl --socket … WORDS`: its output, asserting it succeeded.
    fn ctl(&self, words: &[&str]) -> String {
        let out = self.run(words);
        assert!(
            out.status.success(),
            "ferryd ctl {words:?}: {}",
            describe(&out)
        );
        stdout_of(&out)
    }

    fn run(&self, words: &[&str]) -> std::process::Output {
        let mut args = vec!["ctl", "--socket", path_str(&self.sock)];
        args.extend_from_slice(words);
        run_ferryd(&args, &[])
    }

    /// The `list --json` row of `peer` once `ok` holds for it (polling), or a panic with the list.
    fn row_when(&self, peer: &str, ok: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let found = wait_until(IO_TIMEOUT, || {
            last = self.ctl(&["list", "--json"]);
            row_of(&last, peer).is_some_and(|r| ok(&r))
        });
        assert!(found, "no row for {peer} as expected in {last}");
        row_of(&last, peer).unwrap_or_default()
    }
}

/// The JSON object of `peer` in a `list --json` answer (the rows are flat but for `file`).
fn row_of(json: &str, peer: &str) -> Option<String> {
    let at = json.find(&format!("{{\"peer\":\"{peer}\""))?;
    let rest = &json[at..];
    let end = rest.find("},{\"peer\"").or_else(|| rest.find("}]}"))?;
    Some(rest[..=end].to_string())
}

/// The number after `"key":` in a JSON row.
fn num(row: &str, key: &str) -> f64 {
    let at = row
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {row}"));
    let rest = &row[at + key.len() + 3..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {row}"))
}

fn connect(d: &Daemon) -> TcpStream {
    let s = d.connect();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

#[test]
fn list_shows_an_echo_client_and_a_throttled_upload_with_their_figures() {
    let c = console(DaemonBuilder::new());
    let mut echo = connect(&c.d);
    echo_round_trip(&mut echo, b"hello console\n");
    let echo_peer = peer_label(&echo);
    let row = c.row_when(&echo_peer, |r| r.contains("\"bytes_out\":14"));
    assert!(row.contains("\"state\":\"echo\""), "{row}");
    assert_eq!(num(&row, "bytes_in"), 14.0, "{row}");
    assert!(row.contains("\"file\":null"), "{row}");

    // A throttled upload: the header and a third of the body, then nothing until the list has
    // been read.
    let body: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    let whole = frame("big \"one\".bin", &body);
    let head_len = whole.len() - body.len();
    let first = head_len + (1 << 20);
    let mut up = connect(&c.d);
    up.write_all(&whole[..first]).unwrap();
    let up_peer = peer_label(&up);
    let row = c.row_when(&up_peer, |r| r.contains("\"received\":1048576"));
    assert!(row.contains("\"state\":\"receiving\""), "{row}");
    assert!(
        row.contains("\"name\":\"big \\\"one\\\".bin\""),
        "the name is JSON-escaped: {row}"
    );
    assert_eq!(num(&row, "size"), body.len() as f64, "{row}");
    assert!(num(&row, "bytes_per_sec") > 0.0, "{row}");
    assert!(num(&row, "bytes_in") >= first as f64, "{row}");

    // The text form: a heading, one line each, the file with its progress.
    let text = c.ctl(&["list"]);
    let line = text
        .lines()
        .find(|l| l.starts_with(&up_peer))
        .unwrap_or_else(|| panic!("{up_peer} in {text}"));
    assert!(line.contains("receiving"), "{text}");
    assert!(
        line.contains("\"big \"one\".bin\" 1.0 MiB of 3.0 MiB (33%) at "),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with(&echo_peer) && l.contains(" echo "))
    );
    assert!(text.starts_with("peer "), "{text}");

    // The rest of the body: stored, and the connection is back to echo.
    up.write_all(&whole[first..]).unwrap();
    assert_eq!(read_line(&mut up), ok_line("big \"one\".bin", &body));
    c.row_when(&up_peer, |r| {
        r.contains("\"state\":\"echo\"") && r.contains("\"file\":null")
    });
}

#[test]
fn say_reaches_echo_clients_between_lines_and_kick_ends_one() {
    let c = console(DaemonBuilder::new());
    let mut a = connect(&c.d);
    let mut b = connect(&c.d);
    echo_round_trip(&mut a, b"a\n");
    echo_round_trip(&mut b, b"b\n");
    let out = c.ctl(&["say", "hello", "from", "the", "operator"]);
    assert!(out.starts_with("sent 2,"), "{out}");
    assert_eq!(read_line(&mut a), "[server] hello from the operator\n");
    assert_eq!(read_line(&mut b), "[server] hello from the operator\n");

    // `a` is in the middle of a line: the operator's line waits for its end.
    echo_round_trip(&mut a, b"half a ");
    let peer_a = peer_label(&a);
    let out = c.ctl(&["say", "--to", &peer_a, "after your line"]);
    assert!(out.starts_with("sent 0, queued 1,"), "{out}");
    echo_round_trip(&mut a, b"line\n");
    assert_eq!(read_line(&mut a), "[server] after your line\n");

    // Control bytes in the text are escaped: one line reaches the client.
    c.ctl(&["say", "--to", &peer_a, "bell\u{7}"]);
    assert_eq!(read_line(&mut a), "[server] bell\\x07\n");

    let out = c.ctl(&["kick", &peer_a]);
    assert_eq!(out, format!("kicked {peer_a}\n"));
    let rest = read_to_eof(&mut a, IO_TIMEOUT);
    assert_eq!(String::from_utf8_lossy(&rest), "ERR kicked by operator\n");
    let uid = rustix_uid();
    c.d.wait_log(
        &format!("{peer_a} kicked by the operator with uid {uid}"),
        IO_TIMEOUT,
    );
    let log =
        c.d.wait_log(&format!("{peer_a} offline (in 14 B"), IO_TIMEOUT);
    assert!(
        log.contains(&format!("reason: kicked by operator (uid {uid}))")),
        "{log}"
    );
    // `b` is untouched.
    echo_round_trip(&mut b, b"still here\n");

    // Unknown peers and bad requests are refused with a reason, exit 1 or 64.
    let out = c.run(&["kick", "[127.0.0.1:1]"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(support::stderr_of(&out).contains("no connection from 127.0.0.1:1"));
    let out = c.run(&["dance"]);
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
}

/// The uid this test runs as (the operator's uid in the log).
fn rustix_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn chat_members_are_listed_hear_the_server_and_one_is_kicked() {
    let c = console(DaemonBuilder::new().set("server", "mode = \"chat\""));
    let a = connect(&c.d);
    let mut a = BufReader::new(a);
    let mut line = String::new();
    a.read_line(&mut line).unwrap();
    assert!(line.starts_with("* welcome"), "{line}");
    let b = connect(&c.d);
    let peer_b = peer_label(&b);
    let mut b = BufReader::new(b);
    line.clear();
    b.read_line(&mut line).unwrap();
    assert!(line.starts_with("* welcome"), "{line}");
    line.clear();
    a.read_line(&mut line).unwrap();
    assert!(line.contains("joined"), "{line}");
    b.get_mut().write_all(b"hi all\n").unwrap();
    line.clear();
    a.read_line(&mut line).unwrap();
    assert_eq!(line, format!("{peer_b} hi all\n"));

    let row = c.row_when(&peer_b, |r| r.contains("\"bytes_in\":7"));
    assert!(row.contains("\"state\":\"chat\""), "{row}");
    let peer_a = peer_label(a.get_ref());
    let row = c.row_when(&peer_a, |r| r.contains("\"state\":\"chat\""));
    // `a` was sent its welcome, the join notice and b's line.
    assert!(num(&row, "bytes_out") > 0.0, "{row}");

    let out = c.ctl(&["say", "the room closes at noon"]);
    assert!(out.ends_with("chat members 2\n"), "{out}");
    for r in [&mut a, &mut b] {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "[server] the room closes at noon\n");
    }
    c.ctl(&["say", "--to", &peer_b, "just you"]);
    line.clear();
    b.read_line(&mut line).unwrap();
    assert_eq!(line, "[server] just you\n");

    c.ctl(&["kick", &peer_b]);
    let mut rest = String::new();
    b.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "ERR kicked by operator\n");
    line.clear();
    a.read_line(&mut line).unwrap();
    assert!(
        line.starts_with(&format!("* {peer_b} left (kicked by operator")),
        "{line}"
    );
    c.d.wait_log("kicked by the operator with uid", IO_TIMEOUT);
}

#[test]
fn stats_and_a_datagram_from_the_daemons_udp_socket() {
    let c = console(DaemonBuilder::new());
    let mut e = connect(&c.d);
    echo_round_trip(&mut e, b"x\n");
    let out = c.ctl(&["stats"]);
    assert!(out.contains("status: 1 open, 0 queued"), "{out}");
    assert!(out.contains("summary: accepted 1, open 1"), "{out}");

    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let to = rx.local_addr().unwrap().to_string();
    let out = c.ctl(&["udp", &to, "ping from the console"]);
    assert_eq!(out, format!("sent 21 B to {to}\n"));
    let mut buf = [0u8; 64];
    let (n, from) = rx.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping from the console");
    assert_eq!(from.port(), c.d.port(), "sent from the daemon's UDP port");
}

#[test]
fn oversize_and_slow_requests_are_cut_and_the_daemon_goes_on() {
    let c = console(DaemonBuilder::new());
    let mut echo = connect(&c.d);

    // Too long: cut at 4096 bytes without waiting for a newline.
    let mut big = UnixStream::connect(&c.sock).unwrap();
    big.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = big.write_all(&[b'x'; 5000]);
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert_eq!(answer, "ERR request too long: over 4096 bytes\n");

    // Stuck: a client that connects and says nothing holds only the control thread, and only
    // for the request's time limit; echo is served meanwhile.
    let started = Instant::now();
    let mut stuck = UnixStream::connect(&c.sock).unwrap();
    stuck.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stuck.write_all(b"li").unwrap();
    echo_round_trip(&mut echo, b"served while the console waits\n");
    let mut answer = String::new();
    stuck.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "ERR request not complete within 2 s\n");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The next request is served at once.
    let out = c.ctl(&["list"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    c.d.wait_log("request not complete within 2 s", IO_TIMEOUT);
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: runs ferryd ctl as uid 65534, as root; run bash tests/real-peers.sh"
)]
fn an_ordinary_user_is_refused() {
    assert_eq!(
        rustix_uid(),
        0,
        "this test needs root: it runs a client as uid 65534"
    );
    let c = console(DaemonBuilder::new());
    let meta = std::fs::metadata(&c.sock).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // A copy of the binary that uid 65534 may run.
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl_bin = dir.path().join("ferryd");
    std::fs::copy(bin(), &ctl_bin).unwrap();
    let as_nobody = |sock: &Path| {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&ctl_bin);
        cmd.args(["ctl", "--socket", path_str(sock), "list"])
            .uid(65534)
            .gid(65534);
        support::run_for(cmd, "ferryd ctl as uid 65534", IO_TIMEOUT)
    };
    // The socket's mode keeps it out.
    let out = as_nobody(&c.sock);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        support::stderr_of(&out).contains("Permission denied"),
        "{}",
        describe(&out)
    );
    // Past the mode (an admin's chmod), the daemon's credential check does.
    std::fs::set_permissions(&c.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&c.sock);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        support::stderr_of(&out).contains("the daemon refused: permission denied"),
        "{}",
        describe(&out)
    );
    c.d.wait_log("control socket: refused uid 65534", IO_TIMEOUT);
    // Root still gets its answer.
    assert!(c.ctl(&["list"]).starts_with("peer "));
}

#[test]
fn a_connection_waiting_for_a_worker_is_listed_queued() {
    // One worker, held by an upload (a connection in a frame is never evicted to make room).
    let c = console(
        DaemonBuilder::new()
            .set("server", "max_connections = 1")
            .set("server", "queue_timeout_secs = 60"),
    );
    let body = vec![7u8; 1 << 20];
    let whole = frame("held.bin", &body);
    let head_len = whole.len() - body.len();
    let mut up = connect(&c.d);
    up.write_all(&whole[..head_len + 1000]).unwrap();
    let up_peer = peer_label(&up);
    c.row_when(&up_peer, |r| r.contains("\"state\":\"receiving\""));

    let mut waiting = connect(&c.d);
    let waiting_peer = peer_label(&waiting);
    let row = c.row_when(&waiting_peer, |r| r.contains("\"state\":\"queued\""));
    assert_eq!(num(&row, "bytes_in"), 0.0, "{row}");
    let out = c.run(&["kick", &waiting_peer]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        support::stderr_of(&out).contains("is queued, not served yet"),
        "{}",
        describe(&out)
    );

    // The upload ends; the worker takes the waiting connection, which echoes.
    up.write_all(&whole[head_len + 1000..]).unwrap();
    assert_eq!(read_line(&mut up), ok_line("held.bin", &body));
    drop(up);
    echo_round_trip(&mut waiting, b"my turn\n");
    c.row_when(&waiting_peer, |r| r.contains("\"state\":\"echo\""));
}

#[test]
fn kicking_an_upload_midway_stores_nothing() {
    let c = console(DaemonBuilder::new());
    let body = vec![3u8; 1 << 20];
    let whole = frame("cut.bin", &body);
    let head_len = whole.len() - body.len();
    let mut up = connect(&c.d);
    up.write_all(&whole[..head_len + 4096]).unwrap();
    let peer = peer_label(&up);
    c.row_when(&peer, |r| r.contains("\"received\":4096"));
    c.ctl(&["kick", &peer]);
    let rest = read_to_eof(&mut up, IO_TIMEOUT);
    assert_eq!(String::from_utf8_lossy(&rest), "ERR kicked by operator\n");
    c.d.wait_log(&format!("{peer} offline"), IO_TIMEOUT);
    assert!(
        support::names_in(&c.d.uploads()).is_empty(),
        "{:?}",
        support::names_in(&c.d.uploads())
    );
}
