//! Several ferryd processes over one upload directory, as behind a balancer (issue 22), without
//! the balancer (`tests/haproxy.rs` has it): commits from two instances never clobber each other;
//! a partial begun on one instance resumes on another once the first is gone, and is never
//! written by two at once while the first holds it; an instance starting over the directory
//! leaves the temp files of another's uploads in progress alone.

mod support;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use support::{
    Daemon, DaemonBuilder, Rng, TempDir, frame, is_part, ok_line, read_line, resumable_head,
    wait_until,
};

const WAIT: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;

fn instance(uploads: &Path, extra: &[(&str, &str)]) -> Daemon {
    let mut b = DaemonBuilder::new().set(
        "files",
        &format!("dir = {:?}", uploads.display().to_string()),
    );
    for (table, line) in extra {
        b = b.set(table, line);
    }
    b.start()
}

/// The length of the one partial body in `dir`, if there is one.
fn partial_len(dir: &Path) -> Option<u64> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .map(|e| e.metadata().unwrap().len())
        .max()
}

#[test]
fn commits_from_two_instances_never_clobber_each_other() {
    for policy in ["reject", "rename"] {
        let uploads = TempDir::new();
        let line = format!("on_conflict = \"{policy}\"");
        let ds = [
            instance(uploads.path(), &[("files", &line)]),
            instance(uploads.path(), &[("files", &line)]),
        ];
        let answers: Vec<(String, Vec<u8>)> = thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let d = &ds[i % 2];
                    scope.spawn(move || {
                        let body = Rng::new(i as u64).bytes(64 * 1024);
                        let mut s = d.connect();
                        s.write_all(&frame("same.bin", &body)).unwrap();
                        (read_line(&mut s), body)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let stored: Vec<&(String, Vec<u8>)> = answers
            .iter()
            .filter(|(a, _)| a.starts_with("OK "))
            .collect();
        for (answer, _) in &answers {
            assert!(
                answer.starts_with("OK ") || answer.starts_with("ERR exists "),
                "{policy}: {answer}"
            );
        }
        let want = if policy == "reject" { 1 } else { 16 };
        assert_eq!(stored.len(), want, "{policy}: {answers:?}");
        // Each stored file holds the body of the upload told it was stored under that name.
        for (answer, body) in &stored {
            let name = answer
                .strip_prefix("OK ")
                .and_then(|r| r.rsplitn(3, ' ').nth(2))
                .unwrap();
            assert_eq!(answer, &ok_line(name, body), "{policy}");
            assert_eq!(
                &fs::read(uploads.path().join(name)).unwrap(),
                body,
                "{policy}"
            );
        }
        assert_eq!(support::names_in(uploads.path()).len(), want, "{policy}");
    }
}

#[test]
fn a_partial_is_held_across_instances_and_resumes_on_another_once_its_own_is_gone() {
    let uploads = TempDir::new();
    let mut a = instance(uploads.path(), &[]);
    let b = instance(uploads.path(), &[]);
    let body = Rng::new(3).bytes(8 * MIB);
    let head = resumable_head("moved.bin", &body);
    let mut on_a = a.connect();
    on_a.write_all(&head).unwrap();
    assert_eq!(read_line(&mut on_a), "RESUME 0\n");
    on_a.write_all(&body[..4 * MIB]).unwrap();
    assert!(
        wait_until(WAIT, || partial_len(uploads.path())
            .is_some_and(|n| n >= MIB as u64)),
        "no partial grows on A"
    );
    // While A holds the partial, B does not write it: after a short wait it starts afresh.
    let started = Instant::now();
    let mut on_b = b.connect();
    on_b.write_all(&resumable_head("moved.bin", &body)).unwrap();
    assert_eq!(read_line(&mut on_b), "RESUME 0\n");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "B waited for A's lock"
    );
    drop(on_b);
    // A is killed: its lock goes with it, and B continues what A wrote.
    a.signal("KILL");
    a.wait_exit(WAIT).expect("A exits");
    drop(on_a);
    let kept = partial_len(uploads.path()).expect("the partial stays");
    let mut on_b = b.connect();
    on_b.write_all(&head).unwrap();
    assert_eq!(read_line(&mut on_b), format!("RESUME {kept}\n"));
    on_b.write_all(&body[kept as usize..]).unwrap();
    assert_eq!(read_line(&mut on_b), ok_line("moved.bin", &body));
    assert_eq!(fs::read(uploads.path().join("moved.bin")).unwrap(), body);
    assert_eq!(support::names_in(uploads.path()), ["moved.bin"]);
}

#[test]
fn an_instance_starting_over_the_directory_spares_another_ones_uploads_in_progress() {
    let uploads = TempDir::new();
    let a = instance(uploads.path(), &[]);
    let body = Rng::new(4).bytes(2 * MIB);
    let whole = frame("slow.bin", &body);
    let mut s = a.connect();
    s.write_all(&whole[..MIB]).unwrap();
    let parts = || -> Vec<String> {
        support::names_in(uploads.path())
            .into_iter()
            .filter(|n| is_part(n))
            .collect()
    };
    assert!(wait_until(WAIT, || parts().len() == 1), "no temp file on A");
    // A crash's leftover next to it, which the new instance removes.
    fs::write(uploads.path().join(".ferryd-00000000deadbeef.part"), b"old").unwrap();
    let b = instance(uploads.path(), &[]);
    b.wait_log(
        ".ferryd-00000000deadbeef.part (left by an earlier crash or kill)",
        WAIT,
    );
    assert_eq!(parts().len(), 1, "A's temp file stays");
    s.write_all(&whole[MIB..]).unwrap();
    assert_eq!(read_line(&mut s), ok_line("slow.bin", &body));
    assert_eq!(fs::read(uploads.path().join("slow.bin")).unwrap(), body);
}
