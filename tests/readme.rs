//! The README's first screen against a real run: the real binary on its built-in defaults in a
//! temp dir, the netcat session of the README done from Rust, and its log compared line by line
//! with the README's sample; then the two upload commands and their answers.
//!
//! What may differ is normalised on both sides: the timestamps, the client's ephemeral port,
//! the time online in the `offline` line (a person types slower than a test) and the size of
//! the UDP receive buffer (the kernel caps it at `net.core.rmem_max`, which differs between
//! machines). When 127.0.0.1:7878 is taken (another ferryd, say), the daemon runs on a free port
//! with a config file that sets only `server.port`; the port and the first line's config origin
//! are then normalised too, and every other line is compared as it is.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use support::{
    Captured, TempDir, bin, read_to_eof, reserve_port, run_ferryd, signal, stdout_of, wait_until,
};

/// The port of the built-in defaults.
const DEFAULT_PORT: u16 = 7878;
const WAIT: Duration = Duration::from_secs(20);
/// The README's marker line above the log sample, and above the upload commands.
const LOG_MARKER: &str = "<!-- tests/readme.rs: the log of the session above -->";
const UPLOAD_MARKER: &str = "<!-- tests/readme.rs: uploads -->";
/// How the first log line names the built-in defaults.
const BUILTIN: &str = "using config: built-in defaults (same as the shipped config/config.toml)";

fn readme() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md")
}

/// The lines of the fenced block that follows `marker` in `text`.
fn block_after(text: &str, marker: &str) -> Vec<String> {
    let rest = text
        .split_once(marker)
        .unwrap_or_else(|| panic!("README.md has no line {marker:?}"))
        .1;
    let body = rest
        .trim_start()
        .split_once('\n')
        .filter(|(fence, _)| fence.starts_with("```"))
        .unwrap_or_else(|| panic!("no fenced block right after {marker:?}"))
        .1;
    let end = body.find("\n```").expect("the block ends");
    body[..end].lines().map(str::to_string).collect()
}

/// The typed lines of the README's `nc 127.0.0.1 7878` session: each is echoed on the next
/// line, until `^C`.
fn session_lines(text: &str) -> Vec<String> {
    let start = text
        .split_once("```console\n$ nc 127.0.0.1 7878\n")
        .expect("README.md has the nc session")
        .1;
    let session = start
        .split_once("^C\n")
        .expect("the session ends with ^C")
        .0;
    let lines: Vec<&str> = session.lines().collect();
    assert!(
        !lines.is_empty() && lines.len() % 2 == 0,
        "the session alternates typed and echoed lines: {lines:?}"
    );
    lines
        .chunks(2)
        .map(|pair| {
            assert_eq!(pair[0], pair[1], "the echo of a typed line is the line");
            pair[0].to_string()
        })
        .collect()
}

/// A running daemon: its process, its log and its port.
struct Run {
    child: Child,
    log: Arc<Captured>,
    port: u16,
    /// The first line's config origin when it is not the built-in defaults.
    origin: Option<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the daemon in `dir` with `args`; waits until it listens (`Some`) or exits (`None`).
fn spawn(dir: &Path, args: &[&str], port: u16, origin: Option<String>) -> Option<Run> {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("FERRYD_CONFIG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start ferryd");
    let log = Captured::capture(child.stderr.take().expect("stderr is piped"));
    let mut run = Run {
        child,
        log,
        port,
        origin,
    };
    let mut exited = false;
    let up = wait_until(WAIT, || {
        exited = matches!(run.child.try_wait(), Ok(Some(_)));
        exited || run.log.text().contains("listening on")
    });
    assert!(up, "ferryd neither listened nor exited: {}", run.log.text());
    if exited {
        run.log.wait_eof(WAIT);
        let text = run.log.text();
        assert!(
            text.contains("Address already in use"),
            "ferryd on its built-in defaults exited for another reason than a taken port:\n{text}"
        );
        return None;
    }
    Some(run)
}

/// The daemon on its built-in defaults or, if 127.0.0.1:7878 is taken or /etc/ferryd has a
/// config, on a free port with a config that sets only the port.
fn start(dir: &Path) -> Run {
    if !Path::new("/etc/ferryd/config.toml").exists() {
        if let Some(run) = spawn(dir, &[], DEFAULT_PORT, None) {
            return run;
        }
    }
    for _ in 0..10 {
        let held = reserve_port();
        let port = held.port();
        let config = dir.join("port.toml");
        fs::write(&config, format!("[server]\nport = {port}\n")).expect("write port.toml");
        let origin = format!("using config: {} (from --config)", config.display());
        let path = config.to_str().expect("temp paths are UTF-8");
        // The daemon sets SO_REUSEADDR and may bind the held TCP port; its UDP side is free unless
        // another program took it meanwhile (then try another port).
        if let Some(run) = spawn(dir, &["--config", path], port, Some(origin)) {
            drop(held);
            return run;
        }
    }
    panic!("no free port for ferryd in 10 tries");
}

/// A log line without its timestamp, its client port, its time online and UDP buffer size; the
/// daemon's port as the default's and its config origin as the built-in defaults'.
fn normalise(line: &str, port: u16, origin: Option<&str>) -> String {
    let mut line = match line.split_once(' ') {
        Some((ts, rest)) if ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T' => {
            rest.to_string()
        }
        _ => line.to_string(),
    };
    if let Some(origin) = origin {
        line = line.replace(origin, BUILTIN);
    }
    line = line.replace(
        &format!("127.0.0.1:{port} "),
        &format!("127.0.0.1:{DEFAULT_PORT} "),
    );
    if line.ends_with(&format!("127.0.0.1:{port}")) {
        line = line.replace(
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{DEFAULT_PORT}"),
        );
    }
    line = blank_number_after(&line, "[127.0.0.1:");
    line = blank_number_after(&line, "udp receive buffer ");
    if let Some(at) = line.find(" s, reason: ") {
        let start = line[..at]
            .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
            .map_or(0, |i| i + 1);
        line.replace_range(start..at, "N");
    }
    line
}

/// `line` with the digits right after `prefix` replaced by `N`.
fn blank_number_after(line: &str, prefix: &str) -> String {
    let Some(at) = line.find(prefix) else {
        return line.to_string();
    };
    let start = at + prefix.len();
    let len = line[start..]
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(line.len() - start);
    let mut out = line.to_string();
    out.replace_range(start..start + len, "N");
    out
}

#[test]
fn the_first_screen_is_what_a_run_prints() {
    let text = readme();
    let want_log = block_after(&text, LOG_MARKER);
    let typed = session_lines(&text);
    let dir = TempDir::new();
    let run = start(dir.path());
    let origin = run.origin.as_deref();

    // The netcat session: each line typed comes back; then nc ends (Ctrl-C) and closes.
    let mut nc = TcpStream::connect(("127.0.0.1", run.port)).expect("connect");
    nc.set_read_timeout(Some(WAIT)).unwrap();
    for line in &typed {
        nc.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut echo = vec![0u8; line.len() + 1];
        nc.read_exact(&mut echo).expect("the echo");
        assert_eq!(echo, format!("{line}\n").as_bytes());
    }
    drop(nc);
    assert!(
        wait_until(WAIT, || run.log.text().contains("] offline (")),
        "no offline line: {}",
        run.log.text()
    );
    let got: Vec<String> = run.log.text().lines().map(str::to_string).collect();
    assert_eq!(
        got.len(),
        want_log.len(),
        "the README's log sample has {} lines, the run printed {}:\n{}",
        want_log.len(),
        got.len(),
        got.join("\n")
    );
    for (want, got) in want_log.iter().zip(&got) {
        assert_eq!(
            normalise(want, DEFAULT_PORT, None),
            normalise(got, run.port, origin),
            "README line vs the run's line (normalised)"
        );
    }

    check_uploads(&text, &run, dir.path());
    signal(run.child.id(), "INT");
    let mut run = run;
    let mut status = None;
    assert!(wait_until(WAIT, || {
        status = run.child.try_wait().ok().flatten();
        status.is_some()
    }));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "Ctrl-C exits 0");
}

/// The README's `printf`, `pack | nc -N` and `send` lines, run against `run`.
fn check_uploads(text: &str, run: &Run, dir: &Path) {
    let block = block_after(text, UPLOAD_MARKER);
    let after = |cmd: &str| -> String {
        let at = block
            .iter()
            .position(|l| l == cmd)
            .unwrap_or_else(|| panic!("the uploads block has no line {cmd:?}: {block:?}"));
        block.get(at + 1).cloned().expect("an answer line")
    };
    let body = b"hello, ferryd\n";
    assert!(
        block
            .iter()
            .any(|l| l == "$ printf 'hello, ferryd\\n' > note.txt")
    );
    let note: PathBuf = dir.join("note.txt");
    fs::write(&note, body).unwrap();
    let note_arg = note.to_str().expect("UTF-8 path");

    // `ferryd pack note.txt | nc -N`: the frames, a half-close, the answer.
    let packed = run_ferryd(&["pack", note_arg], &[]);
    assert!(packed.status.success(), "pack: {packed:?}");
    let mut s = TcpStream::connect(("127.0.0.1", run.port)).expect("connect");
    s.write_all(&packed.stdout).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let answer = String::from_utf8(read_to_eof(&mut s, WAIT)).unwrap();
    assert_eq!(
        answer.trim_end(),
        after("$ ferryd pack note.txt | nc -N 127.0.0.1 7878")
    );

    let to = format!("127.0.0.1:{}", run.port);
    let sent = run_ferryd(&["send", "--to", &to, note_arg], &[]);
    assert!(sent.status.success(), "send: {sent:?}");
    let printed = stdout_of(&sent).replace(note_arg, "note.txt");
    assert_eq!(
        printed.trim_end(),
        after("$ ferryd send --to 127.0.0.1:7878 note.txt")
    );
    for name in ["note.txt", "note (1).txt"] {
        assert_eq!(fs::read(dir.join("uploads").join(name)).unwrap(), body);
    }
}

#[test]
fn normalising_keeps_what_matters() {
    let line = "2026-12-07T12:29:52.190Z INFO  [127.0.0.1:43892] offline (in 18 B, out 18 B, 8.6 s, reason: eof)";
    assert_eq!(
        normalise(line, DEFAULT_PORT, None),
        "INFO  [127.0.0.1:N] offline (in 18 B, out 18 B, N s, reason: eof)"
    );
    let other = "2026-12-07T12:29:40.579Z INFO  listening on 127.0.0.1:40001 (mode echo, up to 64 workers, queue 16, idle timeout 300 s)";
    assert_eq!(
        normalise(other, 40001, None),
        "INFO  listening on 127.0.0.1:7878 (mode echo, up to 64 workers, queue 16, idle timeout 300 s)"
    );
    let buf = "x INFO  udp receive buffer 416 KiB (asked 8192 KiB; the kernel caps it at net.core.rmem_max)";
    assert_eq!(
        normalise(buf, DEFAULT_PORT, None),
        "x INFO  udp receive buffer N KiB (asked 8192 KiB; the kernel caps it at net.core.rmem_max)"
    );
    // A byte count is not a duration: only the figure before " s, reason" is blanked.
    assert_ne!(
        normalise(line, DEFAULT_PORT, None),
        normalise(&line.replace("18 B, out", "19 B, out"), DEFAULT_PORT, None)
    );
}
