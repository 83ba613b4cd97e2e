//! Integration tests of whole folders: `ferryd send -r DIR` against a daemon with
//! `files.allow_subdirs = true` stores a nested tree byte for byte (symlinks and special files on
//! the client skipped with a note); without the key such names are refused; `..`, absolute paths,
//! empty components and too deep paths are refused; a symlink planted inside the upload directory
//! is never followed; a name that is a file on one side and a directory on the other is refused
//! or renamed as documented; and nothing is ever written outside the upload directory.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use support::{
    Daemon, DaemonBuilder, Rng, TempDir, expect_err_then_eof, frame, log_tail, read_line,
    run_ferryd,
};

/// Sends one file on a new connection and returns the stream and the answer line.
fn upload(d: &Daemon, name: &str, body: &[u8]) -> (TcpStream, String) {
    let mut s = d.connect();
    s.write_all(&frame(name, body)).expect("write frame");
    let line = read_line(&mut s);
    (s, line)
}

/// Expects `name` to be refused with `ERR <code>` before its body, the connection closed.
fn refused(d: &Daemon, name: &str, code: &str) -> String {
    let mut s = d.connect();
    s.write_all(&frame(name, b"must not be stored"))
        .expect("write frame");
    expect_err_then_eof(d, &mut s, code, name)
}

fn with_subdirs() -> DaemonBuilder {
    DaemonBuilder::new().set("files", "allow_subdirs = true")
}

/// Every regular file under `root` (not following symlinks), by relative path, with its bytes.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    support::files_under(root)
        .into_iter()
        .map(|rel| {
            let bytes = fs::read(root.join(&rel)).unwrap();
            (rel, bytes)
        })
        .collect()
}

/// Asserts that nothing but `allowed` exists in `dir`.
fn assert_untouched(dir: &Path, allowed: &[&str]) {
    let names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !allowed.contains(&n.as_str()))
        .collect();
    assert!(
        names.is_empty(),
        "written outside the upload dir: {names:?}"
    );
}

#[test]
fn a_nested_tree_round_trips_byte_for_byte() {
    let d = with_subdirs().start();
    let src = TempDir::new();
    let top = src.path().join("photos");
    let mut rng = Rng::new(14);
    let files: [(&str, usize); 6] = [
        ("photos/2024/a.jpg", 300_000),
        ("photos/2024/deep/x/y/z.bin", 70_000),
        ("photos/b.txt", 12),
        ("photos/empty", 0),
        ("photos/my notes/n 1.txt", 5),
        ("photos/.hidden/h", 3),
    ];
    for (rel, len) in files {
        let p = src.path().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, rng.bytes(len)).unwrap();
    }
    // On the client: a link to a file outside the tree, a link to a directory, and a FIFO.
    fs::write(src.path().join("secret.txt"), b"outside the tree").unwrap();
    symlink(src.path().join("secret.txt"), top.join("link.txt")).unwrap();
    symlink(src.path(), top.join("2024/up")).unwrap();
    let fifo = top.join("pipe");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");

    let out = run_ferryd(
        &[
            "send",
            "-r",
            "--to",
            &d.addr().to_string(),
            top.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "send -r failed:\n{stdout}{stderr}{}",
        log_tail(&d)
    );
    assert_eq!(stdout.matches(": OK photos/").count(), 6, "{stdout}");
    for skipped in [
        "link.txt: skipped: a symbolic link",
        "up: skipped: a symbolic link",
        "pipe: skipped: a named pipe",
    ] {
        assert!(stderr.contains(skipped), "want {skipped:?} in:\n{stderr}");
    }
    let mut want = tree(src.path());
    want.remove("secret.txt");
    assert_eq!(tree(&d.uploads()), want, "the stored tree differs");
    // The directories ferryd made have the upload directory's mode.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(d.uploads().join("photos/2024/deep"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
    // Sending the tree again renames the files, each in its own directory.
    let again = run_ferryd(
        &[
            "send",
            "-r",
            "--to",
            &d.addr().to_string(),
            top.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{stdout}");
    assert!(
        stdout.contains(": OK photos/2024/a (1).jpg 300000 "),
        "{stdout}"
    );
}

#[test]
fn names_with_subdirectories_are_refused_unless_allowed() {
    let d = DaemonBuilder::new().start();
    let src = TempDir::new();
    fs::create_dir_all(src.path().join("logs/rig7")).unwrap();
    fs::write(src.path().join("logs/rig7/run.log"), b"x").unwrap();
    let out = run_ferryd(
        &[
            "send",
            "-r",
            "--to",
            &d.addr().to_string(),
            src.path().join("logs").to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains(
            "run.log: ERR bad-name name contains a path separator (/ or \\); this server takes no subdirectories (files.allow_subdirs)"
        ),
        "{stdout}"
    );
    assert!(fs::read_dir(d.uploads()).unwrap().next().is_none());
}

#[test]
fn dot_dot_absolute_empty_and_too_deep_names_are_refused() {
    let d = with_subdirs().start();
    let outside = TempDir::new();
    let abs = outside.path().join("abs.txt");
    let too_deep = vec!["d"; 17].join("/");
    let cases: [(&str, &str); 8] = [
        ("../escape.txt", "path component 1 is . or .."),
        ("a/../../escape.txt", "path component 2 is . or .."),
        ("a/./b", "path component 2 is . or .."),
        (abs.to_str().unwrap(), "path component 1 is empty"),
        ("a//b", "path component 2 is empty"),
        ("a/", "path component 2 is empty"),
        ("a/.ferryd-1.part", "reserved"),
        (&too_deep, "path has 17 components, over 16"),
    ];
    for (name, reason) in cases {
        let line = refused(&d, name, "bad-name");
        assert!(line.contains(reason), "{name}: {line}");
    }
    assert_untouched(outside.path(), &[]);
    assert_untouched(&d.uploads(), &[]);
    assert_untouched(d.dir(), &["uploads", "config.toml"]);
    // Sixteen components are fine.
    let sixteen = vec!["d"; 16].join("/");
    let (_s, line) = upload(&d, &sixteen, b"deep");
    assert!(line.starts_with(&format!("OK {sixteen} 4 ")), "{line}");
}

#[test]
fn a_symlink_planted_in_the_upload_dir_is_never_followed() {
    let outside = TempDir::new();
    fs::write(outside.path().join("target.txt"), b"original").unwrap();
    for policy in ["rename", "overwrite", "reject"] {
        let d = with_subdirs()
            .set("files", &format!("on_conflict = {policy:?}"))
            .start();
        let up = d.uploads();
        symlink(outside.path(), up.join("evil")).unwrap();
        fs::create_dir(up.join("real")).unwrap();
        symlink(outside.path(), up.join("real/link")).unwrap();
        symlink(outside.path().join("target.txt"), up.join("real/leaf.txt")).unwrap();
        for name in ["evil/x.txt", "evil/new/x.txt", "real/link/y.txt"] {
            let line = refused(&d, name, "bad-name");
            assert!(
                line.contains("is a symbolic link"),
                "{policy} {name}: {line}"
            );
        }
        // A symlink as the last component is a name like any other: never written through.
        let (_s, line) = upload(&d, "real/leaf.txt", b"new bytes");
        match policy {
            "rename" => assert!(line.starts_with("OK real/leaf (1).txt 9 "), "{line}"),
            "overwrite" => {
                assert!(line.starts_with("OK real/leaf.txt 9 "), "{line}");
                let meta = fs::symlink_metadata(up.join("real/leaf.txt")).unwrap();
                assert!(meta.is_file(), "the link itself was replaced");
            }
            _ => assert!(line.starts_with("ERR exists "), "{line}"),
        }
        assert_eq!(
            fs::read(outside.path().join("target.txt")).unwrap(),
            b"original"
        );
        assert_untouched(outside.path(), &["target.txt"]);
        let log = d.log();
        assert!(
            log.contains("symbolic link in the upload directory, never followed"),
            "{log}"
        );
    }
}

#[test]
fn a_file_on_one_side_and_a_directory_on_the_other() {
    for policy in ["rename", "reject", "overwrite"] {
        let d = with_subdirs()
            .set("files", &format!("on_conflict = {policy:?}"))
            .start();
        // "a" is a file; "a/b.txt" needs it to be a directory.
        let (_s, line) = upload(&d, "a", b"file a");
        assert!(line.starts_with("OK a 6 "), "{line}");
        let line = refused(&d, "a/b.txt", "exists");
        assert!(
            line.contains("a exists and is not a directory"),
            "{policy}: {line}"
        );
        let line = refused(&d, "a/deeper/b.txt", "exists");
        assert!(
            line.contains("a exists and is not a directory"),
            "{policy}: {line}"
        );
        // "d" is a directory; a file named "d" gets "d (1)" or is refused, never replaces it.
        let (_s, line) = upload(&d, "d/x", b"x");
        assert!(line.starts_with("OK d/x 1 "), "{line}");
        match policy {
            "rename" => {
                let (_s, line) = upload(&d, "d", b"file d");
                assert!(line.starts_with("OK d (1) 6 "), "{line}");
            }
            _ => {
                let line = refused(&d, "d", "exists");
                assert!(
                    line.contains("d (a directory) already exists"),
                    "{policy}: {line}"
                );
            }
        }
        assert_eq!(fs::read(d.uploads().join("a")).unwrap(), b"file a");
        assert_eq!(fs::read(d.uploads().join("d/x")).unwrap(), b"x");
    }
}
