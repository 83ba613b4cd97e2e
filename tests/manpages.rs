//! The manual pages: ferryd(8) names every flag of `ferryd --help` and of the parser in
//! src/cli.rs; both pages render with man without a warning; the Debian package carries them
//! where `man ferryd` and `man ferryd.toml` find them. (That ferryd.toml(5) is what the key table
//! generates is a unit test in src/config/manpage.rs.)

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{TempDir, bin, describe, need, run_ferryd, run_for, stdout_of};

const PAGES: [&str; 2] = ["docs/man/ferryd.8", "docs/man/ferryd.toml.5"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The page's text with roff's `\-` read as the `-` it prints.
fn page_text(rel: &str) -> String {
    fs::read_to_string(root().join(rel))
        .unwrap_or_else(|e| panic!("read {rel}: {e}"))
        .replace("\\-", "-")
}

/// Every `--long` and `-s` option word in `text`.
fn option_words(text: &str) -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        let long = word.len() > 2
            && word.starts_with("--")
            && word.as_bytes()[2].is_ascii_lowercase()
            && word[2..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-');
        let short =
            word.len() == 2 && word.starts_with('-') && word.as_bytes()[1].is_ascii_alphabetic();
        if long || short {
            words.insert(word.to_string());
        }
    }
    words
}

/// The flags src/cli.rs parses: `Long("x")` and `Short('x')`.
fn parsed_flags() -> BTreeSet<String> {
    let src = fs::read_to_string(root().join("src/cli.rs")).expect("read src/cli.rs");
    let mut flags = BTreeSet::new();
    for (pattern, dashes, close) in [("Long(\"", "--", '"'), ("Short('", "-", '\'')] {
        for (i, _) in src.match_indices(pattern) {
            let rest = &src[i + pattern.len()..];
            let name = &rest[..rest.find(close).expect("a closing quote")];
            flags.insert(format!("{dashes}{name}"));
        }
    }
    flags
}

#[test]
fn ferryd_8_names_every_flag_and_command() {
    let out = run_ferryd(&["--help"], &[]);
    assert!(out.status.success(), "ferryd --help: {}", describe(&out));
    let help = option_words(&stdout_of(&out));
    let parsed = parsed_flags();
    assert!(
        help.len() >= 12 && parsed.len() >= 12,
        "too few flags found: --help {help:?}, src/cli.rs {parsed:?}"
    );
    let page = page_text(PAGES[0]);
    let documented = option_words(&page);
    let missing: Vec<&String> = help
        .union(&parsed)
        .filter(|f| !documented.contains(*f))
        .collect();
    assert!(missing.is_empty(), "ferryd.8 does not name {missing:?}");
    for command in ["run", "check-config", "send", "pack", "ctl"] {
        assert!(
            page.contains(&format!(".B {command}\n")),
            "ferryd.8 has no entry for the command {command}"
        );
    }
    for section in ["SIGNALS", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"] {
        assert!(
            page.contains(&format!(".SH {section}\n")),
            "ferryd.8 has no {section}"
        );
    }
    for code in ["0", "1", "64", "78", "130"] {
        assert!(
            page.contains(&format!(".TP\n.B {code}\n")),
            "ferryd.8: exit status {code}"
        );
    }
    assert!(page.contains("FERRYD_CONFIG"));
}

#[test]
fn option_words_are_found() {
    let words = option_words("  -c, --config PATH  (send) --key-file, -r; a-b --x2 ---");
    let want: BTreeSet<String> = ["-c", "--config", "--key-file", "-r"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(words, want);
}

/// `man --warnings` on `page` (a file): its stderr must be empty.
fn man_warnings(page: &Path) -> String {
    let mut cmd = Command::new("man");
    cmd.args(["--warnings", "-l"])
        .arg(page)
        .env("MANWIDTH", "80");
    let out = run_for(cmd, "man --warnings -l", Duration::from_secs(30));
    assert!(
        out.status.success(),
        "man -l {}: {}",
        page.display(),
        describe(&out)
    );
    assert!(
        stdout_of(&out).lines().count() > 20,
        "man -l {} printed almost nothing",
        page.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: man (man-db); run bash tests/real-peers.sh"
)]
fn both_pages_render_without_warnings() {
    need("man", "man-db");
    for rel in PAGES {
        let warnings = man_warnings(&root().join(rel));
        assert!(warnings.is_empty(), "man --warnings -l {rel}:\n{warnings}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: dpkg-deb (dpkg), strip (binutils), man (man-db); run bash tests/real-peers.sh"
)]
fn the_package_installs_both_pages_where_man_finds_them() {
    need("dpkg-deb", "dpkg");
    need("strip", "binutils");
    need("man", "man-db");
    let dir = TempDir::new();
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("systemd/deb/build-deb.sh"))
        .arg(bin())
        .arg(dir.path().join("debian"));
    let out = run_for(cmd, "build-deb.sh", Duration::from_secs(120));
    assert!(out.status.success(), "build-deb.sh: {}", describe(&out));
    let deb = PathBuf::from(stdout_of(&out).trim());

    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-c").arg(&deb);
    let listing = stdout_of(&run_for(cmd, "dpkg-deb -c", Duration::from_secs(30)));
    for entry in [
        "./usr/share/man/man8/ferryd.8.gz",
        "./usr/share/man/man5/ferryd.toml.5.gz",
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("-rw-r--r-- ") && l.ends_with(entry)),
            "dpkg-deb -c lists no {entry} (mode 0644):\n{listing}"
        );
    }

    // Unpacked, `man ferryd` and `man ferryd.toml` find the pages in the package's man tree, and
    // they are the pages of docs/man.
    let tree = dir.path().join("tree");
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-x").arg(&deb).arg(&tree);
    let out = run_for(cmd, "dpkg-deb -x", Duration::from_secs(30));
    assert!(out.status.success(), "dpkg-deb -x: {}", describe(&out));
    let manpath = tree.join("usr/share/man");
    for (name, rel) in [("ferryd", PAGES[0]), ("ferryd.toml", PAGES[1])] {
        let mut cmd = Command::new("man");
        cmd.arg("--manpath")
            .arg(&manpath)
            .arg(name)
            .env("MANWIDTH", "80");
        let out = run_for(cmd, &format!("man {name}"), Duration::from_secs(30));
        assert!(out.status.success(), "man {name}: {}", describe(&out));
        let mut cmd = Command::new("man");
        cmd.arg("--manpath")
            .arg(&manpath)
            .arg("-l")
            .arg(root().join(rel));
        let want = run_for(cmd, "man -l", Duration::from_secs(30));
        assert_eq!(
            stdout_of(&out),
            stdout_of(&want),
            "man {name} from the package is not {rel}"
        );
    }
}
