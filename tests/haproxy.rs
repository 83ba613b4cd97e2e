//! A real HAProxy (Debian's `haproxy`, started by the test with the `haproxy.cfg` that
//! docs/scaling-out.md shows) in front of three ferryd instances over one upload directory, with
//! `send-proxy-v2`: client addresses (several loopback sources 127.0.0.x) are right in every
//! instance's log and rules through the balancer, a denied one refused and another served; an
//! upload cut by stopping (`kill -9`) the instance that was receiving it resumes through HAProxy
//! on another; 200 uploads through HAProxy land once each.

mod support;

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::{
    Daemon, DaemonBuilder, Rng, TempDir, accept_queue, echo_round_trip, expect_err_then_eof, frame,
    ip, need, ok_line, read_line, resumable_head, try_connect_from, wait_until,
};

const WAIT: Duration = Duration::from_secs(20);
/// Uploads in the "land once each" run, and the clients sending them at once.
const UPLOADS: usize = 200;
const SENDERS: usize = 8;

/// The `haproxy.cfg` of the test and of docs/scaling-out.md: TCP mode, round robin over the
/// instances, the PROXY v2 header on every connection to them (health checks included), and a
/// connection that fails to reach an instance tried again on another.
fn haproxy_cfg(front: u16, servers: &[u16]) -> String {
    let mut cfg = format!(
        "global
    maxconn 4096

defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1

frontend ferryd
    bind 127.0.0.1:{front}
    default_backend ferryds

backend ferryds
    balance roundrobin
"
    );
    for (i, port) in servers.iter().enumerate() {
        cfg.push_str(&format!(
            "    server ferryd{} 127.0.0.1:{port} send-proxy-v2 check check-send-proxy inter 1s fall 2 rise 1\n",
            i + 1
        ));
    }
    cfg
}

/// HAProxy in the foreground, killed on drop; its output goes to a file in its temp dir.
struct Haproxy {
    child: Child,
    front: SocketAddr,
    dir: TempDir,
}

impl Haproxy {
    fn start(servers: &[u16]) -> Haproxy {
        need("haproxy", "haproxy");
        let dir = TempDir::new();
        // A free port for the frontend: bound, read, closed; HAProxy binds it right after.
        let front = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        fs::write(&cfg, haproxy_cfg(front.port(), servers)).unwrap();
        let out = fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        let h = Haproxy { child, front, dir };
        assert!(
            wait_until(WAIT, || accept_queue(front).is_some()),
            "haproxy does not listen on {front}: {}",
            h.log()
        );
        h
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    /// A client connection to the balancer from the loopback address `from`.
    fn connect_from(&self, from: &str) -> TcpStream {
        try_connect_from(ip(from), self.front)
            .unwrap_or_else(|e| panic!("connect from {from} to haproxy: {e}\n{}", self.log()))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- haproxy log ---\n{}", self.log());
        }
    }
}

/// Three instances over `uploads`, trusting PROXY headers from 127.0.0.1 (HAProxy's source
/// address towards them), denying 127.0.0.66.
fn instances(uploads: &Path) -> Vec<Daemon> {
    (0..3)
        .map(|_| {
            DaemonBuilder::new()
                .set("access", "proxy_protocol_from = [\"127.0.0.1/32\"]")
                .set("access", "deny = [\"127.0.0.66\"]")
                .set(
                    "files",
                    &format!("dir = {:?}", uploads.display().to_string()),
                )
                .start()
        })
        .collect()
}

fn ports(ds: &[Daemon]) -> Vec<u16> {
    ds.iter().map(Daemon::port).collect()
}

/// Which instances' logs hold `needle`.
fn logged_by(ds: &[Daemon], needle: &str) -> Vec<usize> {
    (0..ds.len())
        .filter(|&i| ds[i].log().contains(needle))
        .collect()
}

/// The label ferryd logs for the client end of `s`: `[127.0.0.x:port]`.
fn label(s: &TcpStream) -> String {
    format!("[{}]", s.local_addr().unwrap())
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: haproxy (haproxy); run bash tests/real-peers.sh"
)]
fn client_addresses_and_rules_hold_through_haproxy_and_200_uploads_land_once() {
    let uploads = TempDir::new();
    let ds = instances(uploads.path());
    let h = Haproxy::start(&ports(&ds));
    // Served from 127.0.0.10 and 127.0.0.11, each logged under its own address and port by
    // whichever instance took it.
    for from in ["127.0.0.10", "127.0.0.11"] {
        let mut s = h.connect_from(from);
        echo_round_trip(&mut s, format!("hello from {from}\n").as_bytes());
        let online = format!("{} online (through [127.0.0.1:", label(&s));
        assert!(
            wait_until(WAIT, || logged_by(&ds, &online).len() == 1),
            "no instance logged {online:?}"
        );
    }
    // Refused from 127.0.0.66 by the instance that took it, under the client's address.
    let mut denied = h.connect_from("127.0.0.66");
    expect_err_then_eof(&ds[0], &mut denied, "not-allowed", "127.0.0.66");
    let refused = format!(
        "{} refused: not allowed: the address matches access.deny rule 127.0.0.66/32",
        label(&denied)
    );
    assert!(wait_until(WAIT, || logged_by(&ds, &refused).len() == 1));

    // 200 uploads from 8 clients at once (sources 127.0.0.20-27), one connection each.
    let bodies: Vec<Vec<u8>> = (0..UPLOADS)
        .map(|i| Rng::new(i as u64).bytes(1000 + i * 97))
        .collect();
    let started = Instant::now();
    thread::scope(|scope| {
        for sender in 0..SENDERS {
            let (h, bodies) = (&h, &bodies);
            scope.spawn(move || {
                let from = format!("127.0.0.{}", 20 + sender);
                for i in (sender..UPLOADS).step_by(SENDERS) {
                    let name = format!("u{i:03}.bin");
                    let mut s = h.connect_from(&from);
                    s.write_all(&frame(&name, &bodies[i])).unwrap();
                    assert_eq!(read_line(&mut s), ok_line(&name, &bodies[i]), "{name}");
                }
            });
        }
    });
    let took = started.elapsed();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let mut want: Vec<String> = (0..UPLOADS).map(|i| format!("u{i:03}.bin")).collect();
    want.sort();
    assert_eq!(support::names_in(uploads.path()), want, "each file once");
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            &fs::read(uploads.path().join(format!("u{i:03}.bin"))).unwrap(),
            body
        );
    }
    // Each instance's log is read from its pipe by a thread: the last lines may still be on
    // their way when the last answer arrives.
    let stored = || -> Vec<usize> {
        ds.iter()
            .map(|d| d.log().matches(" stored \"u").count())
            .collect()
    };
    wait_until(WAIT, || stored().iter().sum::<usize>() == UPLOADS);
    let per_instance = stored();
    println!(
        "{UPLOADS} uploads ({bytes} B) from {SENDERS} clients through haproxy in {:.2} s ({:.0} uploads/s); stored per instance {per_instance:?}",
        took.as_secs_f64(),
        UPLOADS as f64 / took.as_secs_f64()
    );
    assert_eq!(per_instance.iter().sum::<usize>(), UPLOADS);
    assert!(per_instance.iter().all(|&n| n > 0), "{per_instance:?}");
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: haproxy (haproxy); run bash tests/real-peers.sh"
)]
fn an_upload_cut_by_stopping_its_instance_resumes_through_haproxy_on_another() {
    const SIZE: usize = 8 << 20;
    let uploads = TempDir::new();
    let mut ds = instances(uploads.path());
    let h = Haproxy::start(&ports(&ds));
    let body = Rng::new(22).bytes(SIZE);
    let head = resumable_head("cut.bin", &body);
    // Half the body, then the instance receiving it is killed.
    let mut first = h.connect_from("127.0.0.30");
    first.write_all(&head).unwrap();
    assert_eq!(read_line(&mut first), "RESUME 0\n");
    first.write_all(&body[..SIZE / 2]).unwrap();
    let me = label(&first);
    let receiving = format!("{me} online");
    assert!(wait_until(WAIT, || logged_by(&ds, &receiving).len() == 1));
    let victim = logged_by(&ds, &receiving)[0];
    let partial_len = || {
        fs::read_dir(uploads.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .map(|e| e.metadata().unwrap().len())
            .max()
    };
    assert!(
        wait_until(WAIT, || partial_len()
            .is_some_and(|n| n >= (SIZE / 4) as u64)),
        "the partial did not grow: {:?}",
        partial_len()
    );
    ds[victim].signal("KILL");
    ds[victim]
        .wait_exit(WAIT)
        .expect("the killed instance exits");
    drop(first);
    let kept = partial_len().expect("the partial stays after the kill");
    // Again through HAProxy: another instance continues the partial.
    let mut again = h.connect_from("127.0.0.30");
    again.write_all(&head).unwrap();
    let line = read_line(&mut again);
    assert_eq!(line, format!("RESUME {kept}\n"));
    again.write_all(&body[kept as usize..]).unwrap();
    assert_eq!(read_line(&mut again), ok_line("cut.bin", &body));
    let resumed = format!(
        "{} resuming \"cut.bin\" at {kept} of {SIZE} B",
        label(&again)
    );
    wait_until(WAIT, || !logged_by(&ds, &resumed).is_empty());
    let by = logged_by(&ds, &resumed);
    assert!(
        by.len() == 1 && by[0] != victim,
        "resumed by {by:?}, killed {victim}"
    );
    println!(
        "cut at {kept} of {SIZE} B on instance {victim}, resumed on instance {}",
        by[0]
    );
    assert_eq!(fs::read(uploads.path().join("cut.bin")).unwrap(), body);
    assert_eq!(support::names_in(uploads.path()), ["cut.bin"]);
}

#[test]
fn the_documented_haproxy_cfg_is_the_one_the_test_uses() {
    let doc = fs::read_to_string("docs/scaling-out.md").unwrap();
    let cfg = haproxy_cfg(7000, &[7001, 7002, 7003]);
    assert!(
        doc.contains(&cfg),
        "docs/scaling-out.md must hold, verbatim:\n{cfg}"
    );
}
