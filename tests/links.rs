//! Integration tests of issue 23, every file arrives: folders larger than a connection's file
//! limit, `send` retrying after cuts, a silent holder of a partial taken over, partials bounded
//! by count.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use support::{DaemonBuilder, TempDir, log_tail, run_ferryd_for, stdout_of};

/// The names of the regular files under `root`, relative to it.
fn stored_names(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Point 1: the 1,001st file of a connection is refused with "reconnect"; `send -r` sends it
/// again on a new connection, so a folder of 10,000 files (ten connections' worth under the
/// default `access.max_files_per_connection = 1000`) arrives whole and `send` exits 0.
#[test]
fn send_r_of_10000_files_stores_every_one() {
    let d = DaemonBuilder::new()
        .set("files", "allow_subdirs = true")
        .start();
    let src = TempDir::new();
    let top = src.path().join("many");
    for i in 0..10_000u32 {
        let sub = top.join(format!("d{:02}", i / 200));
        if i % 200 == 0 {
            fs::create_dir_all(&sub).unwrap();
        }
        fs::write(sub.join(format!("f{i:05}.txt")), format!("file {i}\n")).unwrap();
    }
    let out = run_ferryd_for(
        &[
            "send",
            "-r",
            "--to",
            &d.addr().to_string(),
            top.to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(600),
    );
    let stdout = stdout_of(&out);
    assert!(
        out.status.success(),
        "send -r failed: {}\n{}",
        stdout
            .lines()
            .filter(|l| !l.contains(": OK "))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n"),
        log_tail(&d)
    );
    let sent = stored_names(src.path());
    let stored = stored_names(&d.uploads());
    assert_eq!(sent.len(), 10_000);
    let missing: Vec<_> = sent.difference(&stored).take(5).collect();
    assert!(missing.is_empty(), "missing on the server: {missing:?}");
    for i in [0u32, 1000, 9999] {
        let name = format!("many/d{:02}/f{i:05}.txt", i / 200);
        let body = fs::read_to_string(d.uploads().join(&name)).unwrap();
        assert_eq!(body, format!("file {i}\n"), "{name}");
    }
    // Nine connections reached the limit, and each refused file went again on a new one.
    let again = stdout
        .matches("sending it again on a new connection")
        .count();
    assert_eq!(again, 9, "{}", log_tail(&d));
    assert_eq!(stdout.matches(": OK many/").count(), 10_000);
}
