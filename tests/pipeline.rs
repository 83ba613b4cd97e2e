//! Integration tests of pipelined frames and group commit: a failed file in the middle of a
//! pipelined run costs only itself and every answer keeps its frame's place; an `OK` is only ever
//! sent for a file already under its name (the daemon killed with SIGKILL right after an `OK`);
//! `ferryd send -r` sends again every frame a refusal that closed the connection left unanswered,
//! and each file once.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::process::ExitStatusExt;
use std::thread;
use std::time::Duration;

use support::{
    DaemonBuilder, Rng, TempDir, frame, header_for, log_tail, names_in, ok_line, parts_in,
    path_str, read_until_eof, run_ferryd_for, stdout_of, text_of,
};

const KIB: usize = 1 << 10;

/// Bodies of 4 KiB for `n` files named `f000.bin`, `f001.bin`, ...
fn small_files(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| (format!("f{i:03}.bin"), rng.bytes(4 * KIB)))
        .collect()
}

#[test]
fn a_failed_file_in_a_pipelined_run_costs_only_itself_and_answers_keep_their_order() {
    let d = DaemonBuilder::new().start();
    let files = small_files(30, 23);
    // All 30 frames in one go: #10 carries another body's checksum (ERR checksum, the
    // connection goes on), #25 a name with a slash (ERR bad-name, the connection ends, so
    // #26..#29 are never read).
    let mut stream = Vec::new();
    for (i, (name, body)) in files.iter().enumerate() {
        match i {
            10 => {
                stream.extend_from_slice(&header_for(name, &files[0].1, false));
                stream.extend_from_slice(name.as_bytes());
                stream.extend_from_slice(body);
            }
            25 => stream.extend_from_slice(&frame("sub/f025.bin", body)),
            _ => stream.extend_from_slice(&frame(name, body)),
        }
    }
    let mut s = d.connect();
    let mut writer = s.try_clone().unwrap();
    let (got, _) = thread::scope(|scope| {
        scope.spawn(move || {
            // The daemon stops reading at #25: the rest of the write may fail.
            let _ = writer.write_all(&stream);
            let _ = writer.shutdown(Shutdown::Write);
        });
        read_until_eof(&mut s, Duration::from_secs(60))
    });
    let text = text_of(&got);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        26,
        "want 26 answers, got:\n{text}{}",
        log_tail(&d)
    );
    for (i, line) in lines.iter().enumerate() {
        let (name, body) = &files[i];
        match i {
            10 => assert!(line.starts_with("ERR checksum "), "#{i}: {line}"),
            25 => assert!(line.starts_with("ERR bad-name "), "#{i}: {line}"),
            _ => assert_eq!(format!("{line}\n"), ok_line(name, body), "#{i}"),
        }
    }
    let uploads = d.uploads();
    let mut want: Vec<String> = (0..25)
        .filter(|&i| i != 10)
        .map(|i| files[i].0.clone())
        .collect();
    want.sort();
    assert_eq!(names_in(&uploads), want, "{}", log_tail(&d));
    for name in &want {
        let i: usize = name[1..4].parse().unwrap();
        assert_eq!(fs::read(uploads.join(name)).unwrap(), files[i].1, "{name}");
    }
    assert!(parts_in(&uploads).is_empty());
}

#[test]
fn every_ok_of_a_pipelined_run_names_a_stored_file_after_kill_9() {
    let uploads_dir = TempDir::new();
    let uploads = uploads_dir.path().join("uploads");
    let mut d = DaemonBuilder::new()
        .set("files", &format!("dir = {:?}", path_str(&uploads)))
        .set("access", "max_files_per_connection = 100000")
        .start();
    let files = small_files(2000, 99);
    let stream: Vec<u8> = files
        .iter()
        .flat_map(|(name, body)| frame(name, body))
        .collect();
    let s = d.connect();
    let mut writer = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&stream);
    });
    // Kill the daemon right after the 300th OK, in the middle of the run; then take every
    // line it had sent before it died.
    let mut reader = BufReader::new(s);
    let mut answered = Vec::new();
    let mut line = String::new();
    while answered.len() < 300 {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(
            n > 0,
            "connection ended after {} answers{}",
            answered.len(),
            log_tail(&d)
        );
        answered.push(line.clone());
    }
    d.signal("KILL");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("ferryd did not die of SIGKILL");
    assert_eq!(status.signal(), Some(9), "{status}");
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 && line.ends_with('\n') => answered.push(line.clone()),
            _ => break,
        }
    }
    let _ = sender.join();
    assert!(
        answered.len() < files.len(),
        "the run ended before the kill: nothing was left in flight"
    );
    let by_name: BTreeMap<&str, &[u8]> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    for (i, line) in answered.iter().enumerate() {
        let (name, body) = &files[i];
        assert_eq!(line, &ok_line(name, body), "answer #{i}");
        let stored = fs::read(uploads.join(name))
            .unwrap_or_else(|e| panic!("{name} was answered OK but is not there: {e}"));
        assert_eq!(stored.as_slice(), by_name[name.as_str()], "{name}");
    }
    eprintln!(
        "{} of {} answered OK before the kill",
        answered.len(),
        files.len()
    );
}

#[test]
fn send_r_sends_again_the_frames_a_closing_refusal_left_unanswered() {
    let src = TempDir::new();
    let top = src.path().join("tree");
    fs::create_dir(&top).unwrap();
    let files = small_files(150, 7);
    for (name, body) in &files {
        fs::write(top.join(name), body).unwrap();
    }
    // Under "reject", f050.bin is refused before its body (the connection ends with it), and a
    // file sent twice would be refused too: every other file must be stored exactly once,
    // also across the reconnects every 40 files ask for.
    let d = DaemonBuilder::new()
        .set("files", "allow_subdirs = true")
        .set("files", "on_conflict = \"reject\"")
        .set("access", "max_files_per_connection = 40")
        .start();
    let uploads = d.uploads();
    fs::create_dir_all(uploads.join("tree")).unwrap();
    fs::write(uploads.join("tree/f050.bin"), b"already here").unwrap();
    let out = run_ferryd_for(
        &["send", "-r", "--to", &d.addr().to_string(), path_str(&top)],
        &[],
        Duration::from_secs(120),
    );
    let text = stdout_of(&out);
    // One result line per file, in the order given; the reconnect notes beside them.
    let results: Vec<&str> = text
        .lines()
        .filter(|l| !l.ends_with("sending it again on a new connection"))
        .collect();
    assert_eq!(results.len(), files.len(), "{text}{}", log_tail(&d));
    for (i, line) in results.iter().enumerate() {
        let (name, body) = &files[i];
        let want = if i == 50 {
            format!("{}: ERR exists ", top.join(name).display())
        } else {
            let ok = ok_line(&format!("tree/{name}"), body);
            format!("{}: {}", top.join(name).display(), ok.trim_end())
        };
        assert!(line.starts_with(&want), "#{i}: {line:?}, want {want:?}");
    }
    assert!(
        !out.status.success(),
        "f050 failed: the exit status says so"
    );
    for (i, (name, body)) in files.iter().enumerate() {
        let stored = fs::read(uploads.join("tree").join(name)).unwrap();
        let want: &[u8] = if i == 50 { b"already here" } else { body };
        assert_eq!(stored, want, "{name}");
    }
    assert_eq!(names_in(&uploads.join("tree")).len(), files.len());
}
