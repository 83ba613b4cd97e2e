//! Integration tests with the clients people already have: the Qt console programs of the
//! tutorials in `shared/seeds/` (built here with qmake and make, once per test run), a Python
//! client using only `hashlib`, the README's shell recipe run as written, and `ferryd send` with
//! the non-default frame forms (SHA-256, trailing checksum, stdin). Every stored file is compared
//! byte for byte with its source. Every test drives the real binary over loopback (see `support`).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};

use ferryd::auth::{Key, NONCE_LEN};
use ferryd::proto::{Algo, HEADER_LEN, Header};

use support::{
    Daemon, DaemonBuilder, Rng, TempDir, expect_err_then_eof, log_tail, names_in, need, read_line,
    run_ferryd_for, run_for,
};

/// How long a client run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Asserts that `dir/name` holds exactly `want`.
fn assert_stored(d: &Daemon, dir: &Path, name: &str, want: &[u8], what: &str) {
    let got = fs::read(dir.join(name)).unwrap_or_else(|e| {
        panic!(
            "{what}: {name} not stored ({e}); upload dir has {:?}{}",
            names_in(dir),
            log_tail(d)
        )
    });
    assert!(
        got == want,
        "{what}: {name} differs from its source ({} B stored, {} B sent){}",
        got.len(),
        want.len(),
        log_tail(d)
    );
}

/// `ferryd send` of a file whose name is Chinese: the log shows the name as it is, so that
/// `grep 照片` finds it, in the human and the JSON format, and the stored file is the source; a
/// name with a right-to-left override is escaped.
#[test]
fn log_shows_a_chinese_name_as_written() {
    for format in ["human", "json"] {
        log_shows_names(format);
    }
}

fn log_shows_names(format: &str) {
    let d = DaemonBuilder::new()
        .set("log", &format!("format = \"{format}\""))
        .start();
    let src = TempDir::new();
    let path = src.path().join("照片.jpg");
    let body = Rng::new(11).bytes(70_001);
    fs::write(&path, &body).unwrap();
    let out = run_ferryd_for(
        &[
            "send",
            "--to",
            &d.addr().to_string(),
            path.to_str().unwrap(),
        ],
        &[],
        RUN_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "ferryd send failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&d)
    );
    // The only line naming the file at level info is the one that says it was stored.
    let log = d.wait_log("照片.jpg", Duration::from_secs(10));
    let line = log
        .lines()
        .find(|l| l.contains("stored") && l.contains("照片.jpg"));
    assert!(line.is_some(), "{format}: no stored line:\n{log}");
    assert!(!log.contains("\\xe7"), "the log escaped the name:\n{log}");
    assert_stored(&d, &d.uploads(), "照片.jpg", &body, "send 照片.jpg");
    // A name with U+202E (right-to-left override), which a terminal shows as "photoexe.jpg",
    // is logged escaped.
    let sneaky = "photo\u{202e}gpj.exe";
    let path = src.path().join(sneaky);
    fs::write(&path, b"x").unwrap();
    ferryd_ok(
        &d,
        &[
            "send",
            "--to",
            &d.addr().to_string(),
            path.to_str().unwrap(),
        ],
    );
    let log = d.wait_log("u{202e}gpj.exe", Duration::from_secs(10));
    assert!(
        !log.contains('\u{202e}'),
        "{format}: the override reached the log"
    );
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn sha256(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// Runs `ferryd ARGS` and asserts it exited 0; returns its stdout.
fn ferryd_ok(d: &Daemon, args: &[&str]) -> String {
    let out = run_ferryd_for(args, &[], RUN_TIMEOUT);
    assert!(
        out.status.success(),
        "ferryd {args:?} failed: {}{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log_tail(d)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ferryd send` in each checksum algorithm and place: the answer's hex is the checksum in the
/// algorithm the frame named, the log names it, and the stored file is the source.
#[test]
fn send_in_every_hash_and_place() {
    let d = DaemonBuilder::new().start();
    let src = TempDir::new();
    let to = d.addr().to_string();
    let mut rng = Rng::new(21);
    let cases = [
        ("blake3", "trailing", 0usize),
        ("blake3", "header", 3 << 20),
        ("sha256", "trailing", (5 << 20) + 3),
        ("sha256", "header", 1),
        ("blake3", "trailing", (9 << 20) + 7),
        ("sha256", "trailing", 4096),
    ];
    for (i, (algo, place, len)) in cases.into_iter().enumerate() {
        let name = format!("f{i}-{algo}-{place}.bin");
        let body = rng.bytes(len);
        let path = src.path().join(&name);
        fs::write(&path, &body).unwrap();
        let out = ferryd_ok(
            &d,
            &[
                "send",
                "--to",
                &to,
                "--hash",
                algo,
                "--checksum",
                place,
                path.to_str().unwrap(),
            ],
        );
        let want = match algo {
            "sha256" => hex(&sha256(&body)),
            _ => blake3::hash(&body).to_hex().to_string(),
        };
        assert!(
            out.trim_end().ends_with(&format!("OK {name} {len} {want}")),
            "{algo} {place}: {out}{}",
            log_tail(&d)
        );
        let trailing = if place == "trailing" {
            ", trailing checksum"
        } else {
            ""
        };
        d.wait_log(
            &format!("stored \"{name}\" as \"{name}\" ({len} B, {algo} {want}{trailing}, "),
            Duration::from_secs(10),
        );
        assert_stored(&d, &d.uploads(), &name, &body, &format!("{algo} {place}"));
    }
}

/// A raw trailing frame: header (checksum field zero), name, body, then the checksum.
fn trailing_frame(algo: Algo, name: &str, body: &[u8], sum: &[u8; 32]) -> Vec<u8> {
    let header = Header {
        algo,
        trailing: true,
        name_len: name.len() as u16,
        size: body.len() as u64,
        ..Header::default()
    };
    [&header.encode()[..], name.as_bytes(), body, sum].concat()
}

/// A wrong trailing checksum stores nothing and keeps the connection; a trailing frame with a
/// non-zero header checksum is refused before its body.
#[test]
fn trailing_checksum_is_verified_before_commit() {
    let d = DaemonBuilder::new().start();
    let body = Rng::new(5).bytes(300_000);
    let mut s = d.connect();
    let mut bad = sha256(&body);
    bad[0] ^= 1;
    s.write_all(&trailing_frame(Algo::Sha256, "bad.bin", &body, &bad))
        .unwrap();
    let line = read_line(&mut s);
    assert!(line.starts_with("ERR checksum "), "{line}{}", log_tail(&d));
    // The connection goes on: the next frame, a good one, is stored.
    s.write_all(&trailing_frame(
        Algo::Sha256,
        "good.bin",
        &body,
        &sha256(&body),
    ))
    .unwrap();
    let line = read_line(&mut s);
    assert_eq!(
        line,
        format!("OK good.bin {} {}\n", body.len(), hex(&sha256(&body))),
        "{}",
        log_tail(&d)
    );
    assert_eq!(names_in(&d.uploads()), ["good.bin"]);
    assert_stored(&d, &d.uploads(), "good.bin", &body, "good trailing frame");
    drop(s);
    // Flag bit 2 with a checksum in the header: bad-header, before any body.
    let mut s = d.connect();
    let header = Header {
        trailing: true,
        name_len: 5,
        size: 10,
        checksum: [1; 32],
        ..Header::default()
    };
    s.write_all(&header.encode()).unwrap();
    expect_err_then_eof(
        &d,
        &mut s,
        "bad-header",
        "trailing frame with a header checksum",
    );
}

/// With an upload key, `ferryd send` (trailing, both algorithms) is stored; a raw trailing
/// frame whose second tag does not match is refused with nothing stored.
#[test]
fn trailing_frames_with_an_upload_key() {
    let dir = TempDir::new();
    let key_path = dir.path().join("key");
    fs::write(&key_path, "0123456789abcdef0123456789abcdef\n").unwrap();
    let d = DaemonBuilder::new()
        .set(
            "files",
            &format!("token_file = {:?}", key_path.to_str().unwrap()),
        )
        .start();
    let to = d.addr().to_string();
    let body = Rng::new(8).bytes((2 << 20) + 5);
    let path = dir.path().join("keyed.bin");
    fs::write(&path, &body).unwrap();
    for algo in ["sha256", "blake3"] {
        let out = ferryd_ok(
            &d,
            &[
                "send",
                "--to",
                &to,
                "--key-file",
                key_path.to_str().unwrap(),
                "--hash",
                algo,
                path.to_str().unwrap(),
            ],
        );
        assert!(out.contains(": OK keyed"), "{out}");
    }
    assert_stored(&d, &d.uploads(), "keyed.bin", &body, "keyed trailing");
    assert_stored(&d, &d.uploads(), "keyed (1).bin", &body, "keyed trailing");
    // By hand: a good first tag, a wrong second one.
    let key = Key::from_bytes(b"0123456789abcdef0123456789abcdef");
    let mut s = d.connect();
    let nonce_line = read_line(&mut s);
    let nonce: [u8; NONCE_LEN] = ferryd::auth::from_hex(
        nonce_line
            .trim_end()
            .strip_prefix("NONCE ")
            .expect("a NONCE line"),
    )
    .and_then(|n| n.try_into().ok())
    .expect("64 hex digits");
    let header = Header {
        authenticated: true,
        algo: Algo::Sha256,
        trailing: true,
        name_len: 8,
        size: body.len() as u64,
        ..Header::default()
    }
    .encode();
    let tag = key.upload_tag(&nonce, 0, &header, b"evil.bin");
    let sum = sha256(&body);
    let mut wrong = key.trailer_tag(&tag, &sum);
    wrong[3] ^= 0x40;
    let frame = [&header[..], b"evil.bin", &tag, &body, &sum, &wrong].concat();
    s.write_all(&frame).unwrap();
    expect_err_then_eof(&d, &mut s, "unauthorized", "wrong trailer tag");
    assert!(!d.uploads().join("evil.bin").exists());
    assert_eq!(HEADER_LEN, header.len());
}

/// `ferryd send --name NAME -` from a pipe and from a redirected file, and `ferryd pack --name
/// NAME -` from a pipe, its stream carried to the daemon as `nc -N` would (files.rs runs `pack |
/// nc` with the real netcat): all stored as sent, and no spool file left in $TMPDIR.
#[test]
fn stdin_uploads() {
    let d = DaemonBuilder::new().start();
    let tmp = TempDir::new();
    let src = TempDir::new();
    let to = d.addr().to_string();
    let body = Rng::new(9).bytes((3 << 20) + 17);
    let path = src.path().join("source.bin");
    fs::write(&path, &body).unwrap();
    let sh = |script: &str| -> Output {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script, support::bin(), path.to_str().unwrap(), &to])
            .env("TMPDIR", tmp.path())
            .env_remove("FERRYD_CONFIG");
        let out = run_for(cmd, script, RUN_TIMEOUT);
        assert!(
            out.status.success(),
            "{script}: {}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log_tail(&d)
        );
        out
    };
    // The last one's stdout is the packed stream, which `carry` takes to the daemon.
    let cases = [
        (
            "piped.bin",
            "cat \"$1\" | \"$0\" send --to \"$2\" --name piped.bin -",
            false,
        ),
        (
            "piped-sha.bin",
            "cat \"$1\" | \"$0\" send --to \"$2\" --hash sha256 --checksum header --name piped-sha.bin -",
            false,
        ),
        (
            "redirected.bin",
            "\"$0\" send --to \"$2\" --name redirected.bin - < \"$1\"",
            false,
        ),
        (
            "packed.bin",
            "cat \"$1\" | \"$0\" pack --name packed.bin -",
            true,
        ),
    ];
    for (name, script, packed) in cases {
        let out = sh(script);
        let answer = if packed {
            carry(&d, &out.stdout)
        } else {
            out.stdout
        };
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.contains(&format!("OK {name} {}", body.len())),
            "{script}: {text}"
        );
        assert_stored(&d, &d.uploads(), name, &body, script);
    }
    assert_eq!(
        names_in(tmp.path()),
        Vec::<String>::new(),
        "spool files left"
    );
    // An empty pipe is an empty file.
    let out = sh("printf '' | \"$0\" send --to \"$2\" --name empty.bin -");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK empty.bin 0 "));
    assert_stored(&d, &d.uploads(), "empty.bin", b"", "empty stdin");
    // A TMPDIR that cannot hold the pipe: a clear error, nothing sent.
    let mut cmd = Command::new(support::bin());
    cmd.args(["send", "--to", &to, "--name", "x.bin", "-"])
        .env("TMPDIR", tmp.path().join("missing"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // ferryd may have given up (and closed the pipe) before this write: that is fine.
    let _ = child.stdin.take().unwrap().write_all(b"data");
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("cannot hold standard input in") && text.contains("TMPDIR"),
        "{text}"
    );
}

/// What `nc -N` does with `ferryd pack`'s output: writes all of it to the daemon, shuts the write
/// side, and returns what the daemon answers until it closes.
fn carry(d: &Daemon, packed: &[u8]) -> Vec<u8> {
    let mut s = d.connect();
    s.write_all(packed)
        .unwrap_or_else(|e| panic!("writing the packed stream: {e}{}", log_tail(d)));
    s.shutdown(std::net::Shutdown::Write).unwrap();
    support::read_to_eof(&mut s, RUN_TIMEOUT)
}

/// `[compat] starstar_uploads = true`: the seed client's `NAME**SIZE` head, then (after the
/// client's pause, here: once the daemon has logged the head) the body and the close. Stored
/// byte for byte, including a body that starts with digits; OK line sent, nothing echoed.
#[test]
fn starstar_uploads_are_stored_unverified() {
    let d = DaemonBuilder::new()
        .set("compat", "starstar_uploads = true")
        .start();
    let mut rng = Rng::new(4);
    let mut digits = b"31415926".to_vec();
    digits.extend(rng.bytes(10_000));
    let cases: [(&str, Vec<u8>); 4] = [
        ("photo.jpg", rng.bytes(200_031)),
        ("digits first.bin", digits),
        ("照片.txt", "你好\n".repeat(1000).into_bytes()),
        ("empty.txt", Vec::new()),
    ];
    for (name, body) in &cases {
        let mut s = d.connect();
        s.write_all(format!("{name}**{}", body.len()).as_bytes())
            .unwrap();
        d.wait_log(
            &format!(
                "\"{name}\" ({} B): no checksum, storing unverified",
                body.len()
            ),
            Duration::from_secs(10),
        );
        for chunk in body.chunks(4096) {
            s.write_all(chunk).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let (got, err) = support::read_until_eof(&mut s, Duration::from_secs(10));
        let want = format!("OK {name} {} {}\n", body.len(), blake3::hash(body).to_hex());
        assert_eq!(
            String::from_utf8_lossy(&got),
            want,
            "{name}: {err:?}{}",
            log_tail(&d)
        );
        assert_stored(&d, &d.uploads(), name, body, name);
        d.wait_log(
            &format!("stored \"{name}\" as \"{name}\" ({} B, blake3 ", body.len()),
            Duration::from_secs(10),
        );
    }
    assert!(
        d.log()
            .contains("unverified (NAME**SIZE upload, no checksum)")
    );
    // The usual rules: a reserved name is refused, and so is a size over max_file_size.
    let mut s = d.connect();
    s.write_all(b".ferryd-x**3abc").unwrap();
    expect_err_then_eof(&d, &mut s, "bad-name", "reserved starstar name");
    let mut s = d.connect();
    s.write_all(b"big.bin**99999999999999").unwrap();
    expect_err_then_eof(&d, &mut s, "too-large", "starstar over max_file_size");
    assert_eq!(names_in(&d.uploads()).len(), cases.len());
}

/// `starstar_uploads = false` (the default): the same head gets one `ERR legacy-header` line
/// saying how to turn it on, a warning in the log, and the close; in chat mode nothing reaches
/// the room.
#[test]
fn starstar_uploads_off_refuse_with_legacy_header() {
    for mode in ["echo", "chat"] {
        let d = DaemonBuilder::new()
            .set("server", &format!("mode = \"{mode}\""))
            .start();
        let mut other = d.connect();
        if mode == "chat" {
            read_line(&mut other);
        }
        let mut s = d.connect();
        if mode == "chat" {
            read_line(&mut s);
        }
        s.write_all(b"photo.jpg**200031").unwrap();
        let line = expect_err_then_eof(&d, &mut s, "legacy-header", mode);
        assert!(line.contains("starstar_uploads = true"), "{line}");
        d.wait_log(
            "refused: legacy-header: the connection opened with a NAME**SIZE upload (\"photo.jpg\", 200031 B) and compat.starstar_uploads is off",
            Duration::from_secs(10),
        );
        assert!(names_in(&d.uploads()).is_empty());
        if mode == "chat" {
            // The other member hears the join and the leave, nothing else.
            let joined = read_line(&mut other);
            assert!(joined.contains("joined"), "{joined}");
            let left = read_line(&mut other);
            assert!(left.contains("left"), "{left}");
        }
    }
}

/// Chat: text without a newline is delivered as a line after `server.chat_flush_ms`; the newline
/// that follows it does not make an empty line; an unterminated last line is delivered at EOF.
/// Echo is unchanged.
#[test]
fn chat_delivers_text_without_newline() {
    let d = DaemonBuilder::new()
        .set("server", "mode = \"chat\"")
        .set("server", "chat_flush_ms = 100")
        .start();
    let mut a = d.connect();
    read_line(&mut a);
    let mut b = d.connect();
    read_line(&mut b);
    let joined = read_line(&mut a);
    let la = a.local_addr().unwrap().to_string();
    assert!(joined.contains("joined"), "{joined}");
    a.write_all("你好，服务器".as_bytes()).unwrap();
    assert_eq!(read_line(&mut b), format!("[{la}] 你好，服务器\n"));
    a.write_all(b"\n").unwrap();
    a.write_all(b"next\n").unwrap();
    assert_eq!(read_line(&mut b), format!("[{la}] next\n"));
    a.write_all(b"last words").unwrap();
    a.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_line(&mut b), format!("[{la}] last words\n"));
    assert!(read_line(&mut b).contains("left (eof)"));
    // With the flush off, the last line still arrives at EOF.
    let d = DaemonBuilder::new()
        .set("server", "mode = \"chat\"")
        .set("server", "chat_flush_ms = 0")
        .start();
    let mut a = d.connect();
    read_line(&mut a);
    let mut b = d.connect();
    read_line(&mut b);
    read_line(&mut a);
    let la = a.local_addr().unwrap().to_string();
    a.write_all(b"one ").unwrap();
    a.write_all(b"line").unwrap();
    a.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_line(&mut b), format!("[{la}] one line\n"));
    // Echo: bytes come back as they are, no newline added.
    let d = DaemonBuilder::new().start();
    let mut e = d.connect();
    e.write_all(b"no newline").unwrap();
    let mut buf = [0u8; 10];
    std::io::Read::read_exact(&mut e, &mut buf).unwrap();
    assert_eq!(&buf, b"no newline");
    e.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(support::read_to_eof(&mut e, Duration::from_secs(10)).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Qt programs in the tutorials' style, from tests/qt/NAME/, built once per test run.

/// What to install when the Qt toolchain is missing.
const QT_APT: &str = "apt-get install -y qtbase5-dev qt5-qmake g++ make";

/// Builds `tests/qt/NAME` with qmake and make into `target/qt/NAME` (make rebuilds only what
/// changed, so later runs cost little) and returns the program's path. Builds are serialised:
/// they take CPU on a small machine. Fails, never skips, when the toolchain is missing.
fn qt_program(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    need("qmake", "qtbase5-dev qt5-qmake");
    need("make", "make");
    need("g++", "g++");
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/qt")
        .join(name)
        .join(format!("{name}.pro"));
    // support::bin() is <target>/debug/ferryd.
    let target = Path::new(support::bin())
        .parent()
        .and_then(Path::parent)
        .expect("the binary lives in <target>/<profile>/");
    let dir = target.join("qt").join(name);
    fs::create_dir_all(&dir).unwrap();
    for (prog, args) in [
        ("qmake", vec![src.to_str().unwrap().to_string()]),
        ("make", vec!["-s".to_string()]),
    ] {
        let mut cmd = Command::new(prog);
        cmd.args(&args).current_dir(&dir);
        let out = run_for(cmd, &format!("{prog} for {name}"), Duration::from_secs(300));
        assert!(
            out.status.success(),
            "{prog} for tests/qt/{name} failed (is Qt installed? {QT_APT}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = dir.join(name);
    assert!(path.exists(), "make did not produce {}", path.display());
    built.insert(name.to_string(), path.clone());
    path
}

/// Runs a built Qt program with `args` (offscreen, no display needed).
fn run_qt(name: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(qt_program(name));
    cmd.args(args).env("QT_QPA_PLATFORM", "offscreen");
    run_for(cmd, &format!("{name} {}", args.join(" ")), RUN_TIMEOUT)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The tutorials' echo client writes without a newline and gets its bytes back unchanged.
#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: qmake, g++, make (qtbase5-dev, qt5-qmake, g++, make); run bash tests/real-peers.sh"
)]
fn qt_echo_client() {
    let d = DaemonBuilder::new().start();
    let port = d.port().to_string();
    let out = run_qt("echo_client", &["127.0.0.1", &port, "你好, ferryd"]);
    assert!(out.status.success(), "{}{}", text(&out), log_tail(&d));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "你好, ferryd");
}

/// Two of the tutorials' chat clients, each writing one message without a newline: each gets
/// the other's message as a line.
#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: qmake, g++, make (qtbase5-dev, qt5-qmake, g++, make); run bash tests/real-peers.sh"
)]
fn qt_chat_pair() {
    let d = DaemonBuilder::new()
        .set("server", "mode = \"chat\"")
        .start();
    let port = d.port().to_string();
    qt_program("chat_client");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_qt("chat_client", &["127.0.0.1", &port, "来自A的消息"]));
        // B connects once A is in the room, so A is told B joined.
        d.wait_log("online", Duration::from_secs(10));
        let b = s.spawn(|| run_qt("chat_client", &["127.0.0.1", &port, "message from B"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.status.success(), "A: {}{}", text(&a), log_tail(&d));
    assert!(b.status.success(), "B: {}{}", text(&b), log_tail(&d));
    let (a_out, b_out) = (
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout),
    );
    assert!(
        a_out.starts_with("[127.0.0.1:") && a_out.ends_with("] message from B\n"),
        "A got {a_out:?}"
    );
    assert!(
        b_out.starts_with("[127.0.0.1:") && b_out.ends_with("] 来自A的消息\n"),
        "B got {b_out:?}"
    );
}

/// The seed 004 file client, unchanged: stored byte for byte with `starstar_uploads = true`
/// (also a file that starts with digits), refused with `ERR legacy-header` without it.
#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: qmake, g++, make (qtbase5-dev, qt5-qmake, g++, make); run bash tests/real-peers.sh"
)]
fn qt_seed_file_client() {
    let src = TempDir::new();
    let mut rng = Rng::new(404);
    let photo = src.path().join("photo.jpg");
    let photo_body = rng.bytes(200_031);
    fs::write(&photo, &photo_body).unwrap();
    let digits = src.path().join("数字.txt");
    let mut digits_body = b"2026-11-28 1234567890\n".repeat(300);
    digits_body.extend(rng.bytes(5000));
    fs::write(&digits, &digits_body).unwrap();

    let d = DaemonBuilder::new()
        .set("compat", "starstar_uploads = true")
        .start();
    let port = d.port().to_string();
    for (path, body, name) in [
        (&photo, &photo_body, "photo.jpg"),
        (&digits, &digits_body, "数字.txt"),
    ] {
        let out = run_qt(
            "starstar_client",
            &["127.0.0.1", &port, path.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}{}", text(&out), log_tail(&d));
        d.wait_log(
            &format!("stored \"{name}\" as \"{name}\" ({} B, blake3 ", body.len()),
            Duration::from_secs(10),
        );
        assert_stored(&d, &d.uploads(), name, body, "seed 004 client, starstar on");
    }
    assert!(d.log().contains("unverified"));

    let d = DaemonBuilder::new().start();
    let port = d.port().to_string();
    let out = run_qt(
        "starstar_client",
        &["127.0.0.1", &port, photo.to_str().unwrap()],
    );
    // The client cannot tell (it never reads); the server refused and stored nothing.
    d.wait_log("refused: legacy-header", Duration::from_secs(10));
    assert!(names_in(&d.uploads()).is_empty(), "{}", text(&out));
    assert!(!d.log().contains("stored"));
}

/// A Qt client sending a trailing SHA-256 frame read in 4 KiB chunks (QCryptographicHash), in
/// echo and chat mode (where notices come before the answer): stored byte for byte, OK line with
/// the SHA-256.
#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: qmake, g++, make (qtbase5-dev, qt5-qmake, g++, make); run bash tests/real-peers.sh"
)]
fn qt_trailing_sha256_frame() {
    let src = TempDir::new();
    let path = src.path().join("from qt.bin");
    let body = Rng::new(77).bytes((3 << 20) + 1234);
    fs::write(&path, &body).unwrap();
    let want = format!("OK from qt.bin {} {}\n", body.len(), hex(&sha256(&body)));
    for mode in ["echo", "chat"] {
        let d = DaemonBuilder::new()
            .set("server", &format!("mode = \"{mode}\""))
            .start();
        let port = d.port().to_string();
        let out = run_qt(
            "frame_client",
            &["127.0.0.1", &port, path.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{mode}: {}{}",
            text(&out),
            log_tail(&d)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{mode}");
        assert_stored(&d, &d.uploads(), "from qt.bin", &body, mode);
        d.wait_log(", trailing checksum, ", Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------------------------------------
// The README's Python and shell clients, extracted from README.md and run as written.

/// The fenced code block of docs/clients.md whose first lines start with `first_lines`.
fn readme_block(lang: &str, first_lines: &str) -> String {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/clients.md"))
        .expect("docs/clients.md");
    let start = format!("```{lang}\n{first_lines}");
    let at = readme
        .find(&start)
        .unwrap_or_else(|| panic!("docs/clients.md has no block starting {start:?}"));
    let body = &readme[at + lang.len() + 4..];
    let end = body.find("\n```").expect("the block ends");
    body[..=end].to_string()
}

/// Runs a README client (`interpreter script HOST PORT FILE`) for each file and checks the
/// answer and the stored bytes.
fn run_readme_client(interpreter: &str, script: &str, algo_hex: fn(&[u8]) -> String) {
    let d = DaemonBuilder::new().start();
    let dir = TempDir::new();
    let script_path = dir.path().join("client");
    fs::write(&script_path, script).unwrap();
    let mut rng = Rng::new(3);
    let files = [
        ("照片 1.jpg", rng.bytes(150_001)),
        ("notes.txt", b"plain text\n".repeat(100)),
        ("empty", Vec::new()),
    ];
    let port = d.port().to_string();
    for (name, body) in &files {
        let path = dir.path().join(name);
        fs::write(&path, body).unwrap();
        let mut cmd = Command::new(interpreter);
        cmd.arg(&script_path)
            .args(["127.0.0.1", &port])
            .arg(&path)
            .env("LC_ALL", "C.UTF-8");
        let out = run_for(cmd, &format!("{interpreter} README client"), RUN_TIMEOUT);
        assert!(
            out.status.success(),
            "{interpreter} {name}: {}{}",
            text(&out),
            log_tail(&d)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("OK {name} {} {}\n", body.len(), algo_hex(body)),
            "{interpreter} {name}"
        );
        assert_stored(&d, &d.uploads(), name, body, interpreter);
    }
}

/// README's Python client (hashlib only, trailing SHA-256), run as written.
#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: python3 (python3); run bash tests/real-peers.sh"
)]
fn readme_python_client() {
    need("python3", "python3");
    let script = readme_block("python", "#!/usr/bin/env python3\n# ferry_send.py");
    assert!(!script.contains("import blake3"));
    run_readme_client("python3", &script, |b| hex(&sha256(b)));
}

/// README's shell recipe (coreutils `sha256sum`, `basenc`, and `nc`), run as written.
#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: nc (netcat-openbsd); run bash tests/real-peers.sh"
)]
fn readme_shell_recipe() {
    need("nc", "netcat-openbsd");
    need("basenc", "coreutils");
    let script = readme_block("sh", "#!/bin/sh\n# ferry-send.sh");
    run_readme_client("sh", &script, |b| hex(&sha256(b)));
}
