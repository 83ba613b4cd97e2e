//! A panic in a connection handler costs that connection only: the chat member leaves (the others
//! are told), the worker serves the next connection, and every count it held goes back down.
//! Uses the debug build's `FERRYD_DEBUG_PANIC_LINE` hook (a chat line equal to it panics).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{DaemonBuilder, connect_from, log_tail, wait_until};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

const PANIC_LINE: &str = "please panic now";

fn line(r: &mut BufReader<TcpStream>) -> String {
    let mut s = String::new();
    r.read_line(&mut s).expect("read a line");
    s
}

#[test]
fn a_panicking_chat_handler_leaves_the_room_and_frees_everything() {
    // One worker and one connection per address: the next connection is served only if the
    // worker survived, and admitted only if the per-address count went back down.
    let mut d = DaemonBuilder::new()
        .set("server", "mode = \"chat\"")
        .set("server", "max_connections = 2")
        .set("access", "max_per_ip = 1")
        .env("FERRYD_DEBUG_PANIC_LINE", PANIC_LINE)
        .start();
    let idle_threads = d.thread_count();
    // The witness connects from another loopback address.
    let witness = TcpStream::connect_timeout(&d.addr(), IO_TIMEOUT).unwrap();
    witness.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut witness = BufReader::new(witness);
    assert!(line(&mut witness).starts_with("* welcome"));
    let victim_ip = "127.0.0.2".parse().unwrap();
    let victim = connect_from(&d, victim_ip);
    let victim_label = format!("[{}]", victim.local_addr().unwrap());
    let mut victim_r = BufReader::new(victim.try_clone().unwrap());
    assert!(line(&mut victim_r).starts_with("* welcome"));
    assert_eq!(line(&mut witness), format!("* {victim_label} joined\n"));

    (&victim)
        .write_all(format!("{PANIC_LINE}\n").as_bytes())
        .unwrap();
    d.wait_log(
        "handler panicked; connection closed, worker continues",
        IO_TIMEOUT,
    );
    // The member left, and the others were told why.
    assert_eq!(
        line(&mut witness),
        format!("* {victim_label} left (server error)\n"),
        "{}",
        log_tail(&d)
    );
    // The worker and the per-address count are free again: the same address is served.
    let again = connect_from(&d, victim_ip);
    let mut again_r = BufReader::new(again.try_clone().unwrap());
    let welcome = line(&mut again_r);
    assert!(
        welcome.starts_with("* welcome"),
        "{welcome:?}{}",
        log_tail(&d)
    );
    drop((again, again_r, victim, victim_r, witness));
    // The writer thread of the panicked member is gone too.
    assert!(
        wait_until(Duration::from_secs(10), || d.thread_count() == idle_threads),
        "{} threads, {idle_threads} before{}",
        d.thread_count(),
        log_tail(&d)
    );
    d.signal("TERM");
    assert!(
        d.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    // Every count is back to zero in the final summary.
    let summary = d.wait_log("stopped: ", IO_TIMEOUT);
    assert!(summary.contains("open 0, queued 0"), "{summary}");
}
