//! The tests of real outside programs ("real peers") are named, gated and installed from one
//! place, checked on the test sources: every ignored test is a real-peer test behind the
//! `real-peers` feature that says how to run it; every package a test names, in its ignore reason
//! or in a `need` call, is in `tests/real-peers.sh`'s list, and each `need` call matches that
//! list's line for its program; and a missing program fails naming its package.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// What starts an ignore reason, split so that this file's own source does not hold it.
const IGNORE: &str = concat!("ignore", " = \"");
/// What a real-peer test's ignore reason starts and ends with.
const REASON_START: &str = "real peer: ";
const REASON_END: &str = "; run bash tests/real-peers.sh";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/real-peers.sh`'s list: each program and the packages that provide it.
fn script_peers() -> BTreeMap<String, BTreeSet<String>> {
    let path = root().join("tests/real-peers.sh");
    let text = fs::read_to_string(&path).expect("read tests/real-peers.sh");
    let list = text
        .split("\npeers=(\n")
        .nth(1)
        .and_then(|rest| rest.split("\n)\n").next())
        .expect("tests/real-peers.sh has a `peers=(` ... `)` list");
    let mut peers = BTreeMap::new();
    for line in list.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.trim_matches('"').split_whitespace();
        let program = words.next().expect("a program name").to_string();
        let packages: BTreeSet<String> = words.map(String::from).collect();
        assert!(
            !packages.is_empty(),
            "real-peers.sh: no package for {program}"
        );
        peers.insert(program, packages);
    }
    assert!(!peers.is_empty(), "real-peers.sh lists no program");
    peers
}

/// The test sources (`tests/*.rs`, `tests/support/*.rs`) with comment lines left out.
fn sources() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for dir in [root().join("tests"), root().join("tests/support")] {
        for entry in fs::read_dir(&dir).expect("list the test sources") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path).expect("read a test source");
                let code: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect();
                out.push((path, code.join("\n")));
            }
        }
    }
    assert!(out.len() > 5, "found only {} test sources", out.len());
    out
}

/// The string literal that `text` starts with (after `"`), up to its closing quote.
fn literal(text: &str) -> Option<&str> {
    text.strip_prefix('"')?.split('"').next()
}

/// Every `need("program", "packages")` call with two string literals in `code`.
fn need_calls(code: &str) -> Vec<(String, String)> {
    code.match_indices("need(\"")
        .filter_map(|(i, _)| {
            let rest = &code[i + "need(".len()..];
            let program = literal(rest)?;
            let after = rest[program.len() + 2..].trim_start().strip_prefix(',')?;
            let packages = literal(after.trim_start())?;
            Some((program.to_string(), packages.to_string()))
        })
        .collect()
}

/// The reasons of the ignore attributes in `code`.
fn ignore_reasons(code: &str) -> Vec<&str> {
    code.match_indices(IGNORE)
        .map(|(i, _)| {
            let rest = &code[i + IGNORE.len() - 1..];
            literal(rest).expect("an ignore reason is a string literal")
        })
        .collect()
}

/// The packages an ignore reason names: the comma-separated words in its parentheses.
fn reason_packages(reason: &str) -> Vec<String> {
    reason
        .split('(')
        .skip(1)
        .filter_map(|part| part.split(')').next())
        .flat_map(|list| list.split(',').map(|p| p.trim().to_string()))
        .collect()
}

#[test]
fn every_ignored_test_is_a_real_peer_behind_the_feature() {
    // Split, as `IGNORE` is.
    let gate = concat!("#[", "cfg_attr(not(feature=\"real-peers\"),ignore=");
    let mut gated = 0;
    for (path, code) in sources() {
        let bare = concat!("#[", "ignore");
        assert!(
            !code.contains(bare),
            "{}: a bare ignore attribute; only real-peer tests are ignored, behind the feature",
            path.display()
        );
        let squeezed: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        let attrs = squeezed.matches(concat!("#[", "cfg_attr(")).count();
        let gates = squeezed.matches(gate).count();
        assert_eq!(
            attrs,
            gates,
            "{}: a cfg_attr that is not `not(feature = \"real-peers\"), ignore = ...`",
            path.display()
        );
        for reason in ignore_reasons(&code) {
            assert!(
                reason.starts_with(REASON_START) && reason.ends_with(REASON_END),
                "{}: ignore reason {reason:?} should read \"{REASON_START}PROGRAM (PACKAGE)\
                 {REASON_END}\"",
                path.display()
            );
            gated += 1;
        }
    }
    println!("{gated} real-peer tests");
    assert!(gated > 10, "only {gated} real-peer tests found");
}

#[test]
fn every_package_a_test_names_is_in_real_peers_sh() {
    let peers = script_peers();
    let listed: BTreeSet<&String> = peers.values().flatten().collect();
    let mut n_calls = 0;
    for (path, code) in sources() {
        for (program, packages) in need_calls(&code) {
            let named: BTreeSet<String> = packages.split_whitespace().map(String::from).collect();
            assert_eq!(
                peers.get(&program),
                Some(&named),
                "{}: need({program:?}, {packages:?}) does not match real-peers.sh's line for \
                 {program}",
                path.display()
            );
            n_calls += 1;
        }
        for reason in ignore_reasons(&code) {
            let packages = reason_packages(reason);
            // A test that needs only root (no outside program) says so instead.
            assert!(
                !packages.is_empty() || reason.contains(", as root;"),
                "{reason:?} names no package, nor that it needs root"
            );
            for p in packages {
                assert!(
                    listed.contains(&p),
                    "{}: {reason:?} names {p}, which real-peers.sh does not install",
                    path.display()
                );
            }
        }
    }
    assert!(n_calls > 10, "only {n_calls} need calls found");
}

#[test]
fn a_missing_program_fails_naming_its_package() {
    let (program, package) = ("ferryd-no-such-program", "ferryd-no-such-package");
    let panic = std::panic::catch_unwind(|| support::need(program, package))
        .expect_err("need found a program that does not exist");
    let msg = panic
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    for want in [
        format!("`{program}` not found"),
        format!("apt-get install --no-install-recommends {package}"),
        "bash tests/real-peers.sh".to_string(),
    ] {
        assert!(msg.contains(&want), "want {want:?} in {msg:?}");
    }
}
