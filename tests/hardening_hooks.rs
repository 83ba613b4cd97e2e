//! Issue 20 point 2 against the real binary: a hook never outlives its limit. What it leaves
//! running (in its process group, escaped with setsid, or escaped with its environment cleared)
//! is killed at `files.hook_timeout_secs` although the hook itself exited at once; at daemon
//! stop the running hook is killed after a short grace and the queued ones are counted.

mod support;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use support::{DaemonBuilder, TempDir, frame, log_tail, read_line, wait_until};

const WAIT: Duration = Duration::from_secs(15);

/// Whether process `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|st| st != "Z")
        })
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn on_stored(script: &str, dir: &Path) -> String {
    format!(
        "on_stored = [\"/bin/sh\", \"-c\", {script:?}, {:?}]",
        dir.to_str().unwrap()
    )
}

/// `sleep 41 &` stays in the hook's group; a `setsid` child leaves it (keeping the hook's
/// environment); one started with `env -i` leaves it and forgets the environment too. The hook
/// exits 0 at once.
const LEAVES_THREE: &str = "sleep 41 & echo $! > \"$0/group\"; \
    setsid sh -c 'echo $$ > \"$0/setsid\"; exec sleep 42' \"$0\" & \
    env -i /usr/bin/setsid /bin/sh -c 'echo $$ > \"$0/bare\"; exec /bin/sleep 43' \"$0\" & \
    exit 0";

#[test]
fn what_a_hook_leaves_running_is_killed_at_its_limit() {
    let out = TempDir::new();
    let d = DaemonBuilder::new()
        .set("files", &on_stored(LEAVES_THREE, out.path()))
        .set("files", "hook_timeout_secs = 3")
        .start();
    let mut s = d.connect();
    let sent = Instant::now();
    s.write_all(&frame("left.txt", b"payload")).unwrap();
    let answer = read_line(&mut s);
    assert!(answer.starts_with("OK left.txt 7 "), "{answer}");
    let pid = |name: &str| read_pid(&out.path().join(name));
    assert!(
        wait_until(WAIT, || ["group", "setsid", "bare"]
            .iter()
            .all(|n| pid(n).is_some())),
        "the hook did not start all three{}",
        log_tail(&d)
    );
    let (group, setsid, bare) = (
        pid("group").unwrap(),
        pid("setsid").unwrap(),
        pid("bare").unwrap(),
    );
    // The one that cleared its environment cannot be held to the limit: killed on sight.
    assert!(
        wait_until(WAIT, || !alive(bare)),
        "the bare escapee {bare} still runs{}",
        log_tail(&d)
    );
    d.wait_log("cleared FERRYD_HOOK_RUN", WAIT);
    // The two others run until the limit, and not past it.
    assert!(
        sent.elapsed() < Duration::from_secs(3) && alive(group) && alive(setsid),
        "killed before the limit, or the machine is too slow: {:?}{}",
        sent.elapsed(),
        log_tail(&d)
    );
    let log = d.wait_log("killed it all", WAIT);
    let took = sent.elapsed();
    assert!(
        log.contains(
            "hook for \"left.txt\": /bin/sh exited 0 but what it started was still running after files.hook_timeout_secs = 3 s"
        ),
        "{log}"
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "killed after {took:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || !alive(group) && !alive(setsid)),
        "left running past the limit: group {group} {}, setsid {setsid} {}{}",
        alive(group),
        alive(setsid),
        log_tail(&d)
    );
}

#[test]
fn at_daemon_stop_the_running_hook_is_killed_and_queued_ones_are_counted() {
    let out = TempDir::new();
    let script = "echo $$ >> \"$0/pids\"; exec sleep 30";
    let mut d = DaemonBuilder::new()
        .set("files", &on_stored(script, out.path()))
        .set("files", "hook_workers = 1")
        .set("files", "hook_timeout_secs = 60")
        .start();
    for i in 0..5 {
        let mut s = d.connect();
        s.write_all(&frame(format!("q{i}.txt"), b"x")).unwrap();
        let answer = read_line(&mut s);
        assert!(answer.starts_with("OK "), "{answer}");
    }
    let pids = out.path().join("pids");
    assert!(
        wait_until(WAIT, || read_pid(&pids).is_some()),
        "no hook started{}",
        log_tail(&d)
    );
    let running = read_pid(&pids).unwrap();
    let stopped = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(WAIT);
    assert!(status.is_some(), "the daemon did not stop{}", log_tail(&d));
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(8), "stopping took {took:?}");
    let log = d.log();
    // Hooks are queued after each `OK` is sent, so two uploads in a row may queue theirs in
    // either order: the one running and the four named as not run are the five files, once each.
    let running_name = between(
        &log,
        "hook for \"",
        "\": /bin/sh still running at daemon stop; killed",
    )
    .unwrap_or_else(|| panic!("no running hook killed at stop{log}"));
    let listed = between(
        &log,
        "daemon stopping: 4 queued hook(s) not run (files.on_stored), for ",
        "; the files stay stored",
    )
    .unwrap_or_else(|| panic!("no line for the 4 queued hooks{log}"));
    let mut names: Vec<&str> = listed.split(", ").map(|n| n.trim_matches('"')).collect();
    names.push(running_name);
    names.sort_unstable();
    assert_eq!(
        names,
        ["q0.txt", "q1.txt", "q2.txt", "q3.txt", "q4.txt"],
        "{log}"
    );
    assert!(
        !alive(running),
        "the running hook {running} outlived the daemon"
    );
    assert_eq!(
        fs::read_to_string(&pids).unwrap().lines().count(),
        1,
        "a queued hook ran after the stop began"
    );
}

/// The text in `log` between `start` and the next `end` after it.
fn between<'a>(log: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = log.find(start)? + start.len();
    let len = log[from..].find(end)?;
    Some(&log[from..from + len])
}
