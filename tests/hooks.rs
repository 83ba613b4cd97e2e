//! Integration tests of `files.on_stored`, the command run for each stored file: a real
//! mosquitto broker receives one message per stored file from a `mosquitto_pub` hook; the
//! placeholders and `FERRYD_*` variables arrive as documented; a failing hook is logged with
//! its status and escaped output and leaves the file alone; a hook that hangs is killed with its
//! whole process group at `files.hook_timeout_secs`; a reload changes the hook; and a flood of
//! uploads with a slow hook keeps the daemon's threads, child processes and memory bounded.

mod support;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::{
    DaemonBuilder, TempDir, constant_threads, frame, log_tail, need, read_line, run_ferryd,
    wait_until,
};

const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Sends one file on `s` and returns the answer line.
fn upload(s: &mut TcpStream, name: &str, body: &[u8]) -> String {
    s.write_all(&frame(name, body)).expect("write frame");
    read_line(s)
}

/// A TOML list of strings.
fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

fn on_stored(items: &[&str]) -> String {
    format!("on_stored = {}", toml_list(items))
}

/// The pids of the daemon's child processes (from /proc/PID/task/*/children).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Whether process `pid` is gone (or a zombie about to be reaped).
fn is_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines a child process writes to stdout, collected by a thread.
fn collect_lines(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().expect("stdout is piped");
    let sink = Arc::clone(&lines);
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

// ---------------------------------------------------------------------------------------------
// MQTT.

/// A mosquitto broker on a free loopback port with its own config, and a subscriber to
/// `ferryd/#` whose lines (`topic payload`) the test reads.
struct Broker {
    port: u16,
    _broker: Proc,
    _sub: Proc,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Broker {
    fn start() -> Broker {
        let (mosquitto, sub, publ) = (
            need("mosquitto", "mosquitto"),
            need("mosquitto_sub", "mosquitto-clients"),
            need("mosquitto_pub", "mosquitto-clients"),
        );
        let dir = TempDir::new();
        // Held (bound, not listening) until mosquitto listens on it: no other test takes it.
        let hold = support::reserve_port();
        let port = hold.port();
        let conf = dir.path().join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
            ),
        )
        .unwrap();
        let broker = Proc(
            Command::new(&mosquitto)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start mosquitto"),
        );
        assert!(
            wait_until(WAIT, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "mosquitto did not listen on 127.0.0.1:{port}"
        );
        drop(hold);
        let mut sub_child = Command::new(&sub)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                "ferryd/#",
                "-v",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_sub");
        let lines = collect_lines(&mut sub_child);
        let sub = Proc(sub_child);
        // The subscription is in place once a probe message comes back.
        let port_text = port.to_string();
        let ready = wait_until(WAIT, || {
            let _ = Command::new(&publ)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port_text,
                    "-t",
                    "ferryd/probe",
                    "-m",
                    "probe",
                ])
                .status();
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l == "ferryd/probe probe")
        });
        assert!(ready, "mosquitto_sub never received the probe message");
        Broker {
            port,
            _broker: broker,
            _sub: sub,
            lines,
            _dir: dir,
        }
    }

    fn stored_lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("ferryd/stored "))
            .cloned()
            .collect()
    }
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: mosquitto, mosquitto_pub (mosquitto, mosquitto-clients); run bash tests/real-peers.sh"
)]
fn each_stored_file_is_published_to_an_mqtt_broker() {
    let broker = Broker::start();
    let publ = need("mosquitto_pub", "mosquitto-clients");
    let port = broker.port.to_string();
    let d = DaemonBuilder::new()
        .set(
            "files",
            &on_stored(&[
                publ.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                "ferryd/stored",
                "-m",
                "{name} {size} {checksum}",
            ]),
        )
        .start();
    // Three files through the real client, one connection.
    let src = TempDir::new();
    let bodies: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            (
                format!("reading-{i}.csv"),
                format!("t,{i}\n").repeat(100 + i).into_bytes(),
            )
        })
        .collect();
    let mut args = vec!["send".to_string(), "--to".into(), d.addr().to_string()];
    for (name, body) in &bodies {
        let p = src.path().join(name);
        fs::write(&p, body).unwrap();
        args.push(p.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ferryd(&args, &[]);
    assert!(out.status.success(), "send failed: {out:?}{}", log_tail(&d));
    let mut want: Vec<String> = bodies
        .iter()
        .map(|(name, body)| {
            format!(
                "ferryd/stored {name} {} {}",
                body.len(),
                blake3::hash(body).to_hex()
            )
        })
        .collect();
    want.sort();
    let arrived = wait_until(WAIT, || broker.stored_lines().len() >= want.len());
    let mut got = broker.stored_lines();
    got.sort();
    assert!(
        arrived,
        "the broker got {got:?}, want {want:?}{}",
        log_tail(&d)
    );
    assert_eq!(got, want, "one message per stored file{}", log_tail(&d));
    d.wait_log("exited 0", WAIT);
}

// ---------------------------------------------------------------------------------------------
// Arguments, environment, failures.

#[test]
fn placeholders_and_environment_reach_the_hook_as_documented() {
    let out = TempDir::new();
    let record = out.path().join("record");
    // $1..$5 are the placeholders, each one argument even with spaces; then the environment.
    let script = "printf '%s\\n' \"$1\" \"$2\" \"$3\" \"$4\" \"$5\" \"$FERRYD_PATH\" \"$FERRYD_NAME\" \
                  \"$FERRYD_SIZE\" \"$FERRYD_CHECKSUM\" \"$FERRYD_PEER\" \"$6\" > \"$0\"";
    let d = DaemonBuilder::new()
        .set(
            "files",
            &on_stored(&[
                "/bin/sh",
                "-c",
                script,
                record.to_str().unwrap(),
                "{path}",
                "{name}",
                "{size}",
                "{checksum}",
                "{peer}",
                "{{literal}}",
            ]),
        )
        .start();
    let body = b"two words and more";
    let mut s = d.connect();
    let answer = upload(&mut s, "a name with spaces.txt", body);
    assert!(answer.starts_with("OK "), "{answer}{}", log_tail(&d));
    assert!(
        wait_until(WAIT, || fs::read_to_string(&record)
            .is_ok_and(|t| t.lines().count() == 11)),
        "the hook did not write its record{}",
        log_tail(&d)
    );
    let text = fs::read_to_string(&record).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let path = d.uploads().join("a name with spaces.txt");
    let hex = blake3::hash(body).to_hex().to_string();
    let local = s.local_addr().unwrap().to_string();
    let want = [
        path.to_str().unwrap(),
        "a name with spaces.txt",
        "18",
        &hex,
        &local,
    ];
    assert_eq!(&lines[..5], &want, "arguments");
    assert_eq!(&lines[5..10], &want, "FERRYD_* variables");
    assert_eq!(lines[10], "{literal}");
    assert_eq!(fs::read(&path).unwrap(), body);
}

#[test]
fn a_failing_hook_is_logged_escaped_and_the_file_stays() {
    let d = DaemonBuilder::new()
        .set(
            "files",
            &on_stored(&[
                "/bin/sh",
                "-c",
                "echo 'first line'; printf '\\033[31mred\\n' >&2; i=0; while [ $i -lt 50 ]; do echo line $i; i=$((i+1)); done; exit 3",
            ]),
        )
        .start();
    let body = b"keep me";
    let mut s = d.connect();
    let answer = upload(&mut s, "kept.bin", body);
    assert!(
        answer.starts_with("OK kept.bin 7 "),
        "{answer}{}",
        log_tail(&d)
    );
    let log = d.wait_log("more bytes not logged", WAIT);
    assert!(
        log.contains("hook for \"kept.bin\": /bin/sh exited 3"),
        "{log}"
    );
    assert!(
        log.contains("hook for \"kept.bin\" output: first line"),
        "{log}"
    );
    assert!(log.contains("output: \\x1b[31mred"), "escaped: {log}");
    let output_lines = log.lines().filter(|l| l.contains("output: ")).count();
    assert_eq!(
        output_lines, 6,
        "5 output lines and the count of the rest:\n{log}"
    );
    assert_eq!(fs::read(d.uploads().join("kept.bin")).unwrap(), body);
}

#[test]
fn a_missing_program_is_logged_and_the_file_stays() {
    let d = DaemonBuilder::new()
        .set(
            "files",
            &on_stored(&["/nonexistent/hook-program", "{path}"]),
        )
        .start();
    let mut s = d.connect();
    let answer = upload(&mut s, "x.txt", b"x");
    assert!(answer.starts_with("OK x.txt 1 "), "{answer}");
    let log = d.wait_log("cannot run /nonexistent/hook-program", WAIT);
    assert!(log.contains("hook for \"x.txt\""), "{log}");
    assert_eq!(fs::read(d.uploads().join("x.txt")).unwrap(), b"x");
}

// ---------------------------------------------------------------------------------------------
// Time limit.

#[test]
fn a_hanging_hook_and_what_it_started_are_killed_at_the_timeout() {
    let out = TempDir::new();
    let (sh_pid, sleep_pid) = (out.path().join("sh.pid"), out.path().join("sleep.pid"));
    // The shell records its pid, starts a sleeper in the background (same process group) and
    // waits for it: without the time limit this would hang for 1000 s.
    let script = "echo $$ > \"$0\"; sleep 1000 & echo $! > \"$1\"; echo hanging; wait";
    let d = DaemonBuilder::new()
        .set(
            "files",
            &on_stored(&[
                "/bin/sh",
                "-c",
                script,
                sh_pid.to_str().unwrap(),
                sleep_pid.to_str().unwrap(),
            ]),
        )
        .set("files", "hook_timeout_secs = 2")
        .start();
    let mut s = d.connect();
    let sent = Instant::now();
    let answer = upload(&mut s, "slow.txt", b"payload");
    // The client's answer does not wait for the hook.
    assert!(answer.starts_with("OK slow.txt 7 "), "{answer}");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "OK took {:?}",
        sent.elapsed()
    );
    assert!(
        wait_until(WAIT, || read_pid(&sh_pid).is_some()
            && read_pid(&sleep_pid).is_some()),
        "the hook did not start{}",
        log_tail(&d)
    );
    let (shell, sleeper) = (read_pid(&sh_pid).unwrap(), read_pid(&sleep_pid).unwrap());
    let log = d.wait_log("killed its process group", WAIT);
    let took = sent.elapsed();
    assert!(
        log.contains("still running after files.hook_timeout_secs = 2 s"),
        "{log}"
    );
    // The output is logged right after the verdict line: wait for it rather than race it.
    d.wait_log("hook for \"slow.txt\" output: hanging", WAIT);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "killed after {took:?}"
    );
    assert!(
        wait_until(WAIT, || is_gone(shell) && is_gone(sleeper)),
        "the hook's shell ({shell}) or its background sleep ({sleeper}) survived"
    );
    assert_eq!(fs::read(d.uploads().join("slow.txt")).unwrap(), b"payload");
    // The hook thread is free again: the next file's hook runs (and is killed) too.
    let answer = upload(&mut s, "next.txt", b"n");
    assert!(answer.starts_with("OK next.txt"), "{answer}");
    assert!(
        wait_until(WAIT, || d.log().matches("killed its process group").count()
            == 2),
        "{}",
        log_tail(&d)
    );
}

// ---------------------------------------------------------------------------------------------
// Reload.

#[test]
fn a_reload_sets_the_hook_for_new_connections() {
    let out = TempDir::new();
    let marker = out.path().join("ran");
    let builder = DaemonBuilder::new();
    let d = builder.clone().start();
    let mut s = d.connect();
    assert!(upload(&mut s, "before.txt", b"1").starts_with("OK "));
    drop(s);
    let hook = on_stored(&[
        "/bin/sh",
        "-c",
        "echo \"$1\" >> \"$0\"",
        marker.to_str().unwrap(),
        "{name}",
    ]);
    let uploads = format!("dir = {:?}", d.uploads().display().to_string());
    let text = builder
        .set("files", &uploads)
        .set("files", &hook)
        .set("access", "max_per_ip = 60000")
        .config_text(d.port());
    fs::write(d.dir().join("config.toml"), text).unwrap();
    d.signal("HUP");
    d.wait_log("reloaded: files.on_stored", WAIT);
    let mut s = d.connect();
    assert!(upload(&mut s, "after.txt", b"2").starts_with("OK "));
    assert!(
        wait_until(WAIT, || fs::read_to_string(&marker)
            .is_ok_and(|t| t == "after.txt\n")),
        "the hook set by the reload did not run (or ran for the earlier file){}",
        log_tail(&d)
    );
}

// ---------------------------------------------------------------------------------------------
// Bounds.

#[test]
fn a_flood_with_a_slow_hook_keeps_threads_processes_and_memory_bounded() {
    const FILES: usize = 60;
    const WORKERS: usize = 2;
    const MAX_CONNS: usize = 4;
    let d = DaemonBuilder::new()
        .set("server", &format!("max_connections = {MAX_CONNS}"))
        .set("files", &on_stored(&["/bin/sleep", "5"]))
        .set("files", &format!("hook_workers = {WORKERS}"))
        .set("files", "hook_queue_depth = 4")
        .start();
    let idle_threads = d.thread_count();
    let rss_before = d.rss_kib();
    let bound = MAX_CONNS + constant_threads() + WORKERS;
    let mut max_threads = 0;
    let mut max_children = 0;
    let mut s = d.connect();
    for i in 0..FILES {
        let answer = upload(&mut s, &format!("f{i}.bin"), &[i as u8; 4096]);
        assert!(answer.starts_with("OK "), "{answer}{}", log_tail(&d));
        max_threads = max_threads.max(d.thread_count());
        max_children = max_children.max(children(d.pid()).len());
    }
    for _ in 0..20 {
        max_threads = max_threads.max(d.thread_count());
        max_children = max_children.max(children(d.pid()).len());
        thread::sleep(Duration::from_millis(10));
    }
    let rss_after = d.rss_kib();
    println!(
        "threads: {idle_threads} idle, at most {max_threads} (bound {bound}); hook processes at most {max_children}; RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(max_threads <= bound, "{max_threads} threads, bound {bound}");
    assert!(
        max_children <= WORKERS,
        "{max_children} hook processes at once"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // Every file is stored; the hooks that found the queue full are logged as skipped.
    for i in 0..FILES {
        assert!(d.uploads().join(format!("f{i}.bin")).exists(), "f{i}.bin");
    }
    let log = d.log();
    let skipped = log.matches("files already wait for a hook").count();
    assert!(
        skipped >= FILES - 2 * (WORKERS + 4),
        "only {skipped} hooks skipped of {FILES}:\n{log}"
    );
    assert!(
        log.contains("(files.hook_queue_depth); the file stays stored"),
        "{log}"
    );
}
