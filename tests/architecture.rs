//! The dependency rules of ARCHITECTURE.md, checked on the source: every `crate::` path in
//! `src/` is read (in `use` lines and in code), mapped to the file it names, and the rules below
//! are asserted, plus: no import circle anywhere.
//!
//! - `src/proto/` imports nothing from the crate outside `proto`;
//! - the shared leaves (files directly under `src/`, but `main`, `lib` and `cli`, which glue the
//!   command line to both sides) import neither `daemon` nor `client`;
//! - `client` does not import `daemon`, and `daemon` does not import `client`;
//! - nothing under `src/daemon/` imports `daemon::server` (the server imports them);
//! - nothing imports `daemon/net/` but the server; `files/` imports neither `chat/` nor `conn/`,
//!   `chat/` neither `files/` nor `conn/`; `access/` and `system/` import nothing else from the
//!   daemon; a folder imports from the files directly under `daemon/` only the shared state
//!   (`shared`, `stats`, `registry`).
//!
//! And: no source file holds more than 500 lines of code before its tests, but the declarative
//! tables ARCHITECTURE.md names.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Module path (`daemon::conn`) → the module paths it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let me = module_of(&src, file);
        let text = fs::read_to_string(file).expect("read a source file");
        // Unit tests may reach anywhere; the rules are about the code.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        // Comments are not imports.
        let code: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut deps = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let path: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            // The longest prefix of the path that is a module.
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            let target = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|m| modules.contains(m));
            if let Some(t) = target.filter(|t| *t != me) {
                deps.insert(t);
            }
        }
        graph.insert(me, deps);
    }
    graph
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/daemon/conn/read.rs` → `daemon::conn::read`; `src/proto/mod.rs` → `proto`; `src/lib.rs` → `lib`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or(m)
}

#[test]
fn the_dependency_rules_hold() {
    let graph = graph();
    assert!(graph.contains_key("daemon::conn") && graph.contains_key("proto::wire"));
    let mut broken = Vec::new();
    for (m, deps) in &graph {
        for d in deps {
            let (mt, dt) = (top(m), top(d));
            // `cli`, like `main`, is the command line that dispatches to both sides.
            let leaf = !m.contains("::")
                && !["daemon", "client", "proto", "lib", "main", "cli"].contains(&m.as_str());
            let rule = if mt == "proto" && dt != "proto" {
                Some("proto imports nothing from the crate")
            } else if leaf && (dt == "daemon" || dt == "client") {
                Some("a shared leaf imports neither daemon nor client")
            } else if (mt == "client" && dt == "daemon") || (mt == "daemon" && dt == "client") {
                Some("client and daemon do not import each other")
            } else if mt == "daemon" && m != "daemon" && d == "daemon::server" {
                Some("nothing below the server imports the server")
            } else {
                folder_rule(m, d)
            };
            if let Some(rule) = rule {
                broken.push(format!("{m} -> {d}: {rule}"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The folder under `daemon` a module lives in (`daemon::files::store` → `files`), if any.
fn daemon_folder(m: &str) -> Option<&str> {
    let mut parts = m.split("::");
    (parts.next() == Some("daemon")).then_some(())?;
    let folder = parts.next()?;
    // A file directly under `src/daemon/` is no folder, and neither is the module itself.
    parts.next().map(|_| folder).or_else(|| {
        ["net", "conn", "files", "chat", "access", "system"]
            .contains(&folder)
            .then_some(folder)
    })
}

/// The rules between the folders of `src/daemon/`, for `m` importing `d`.
fn folder_rule(m: &str, d: &str) -> Option<&'static str> {
    let (mf, df) = (daemon_folder(m), daemon_folder(d));
    if mf == df {
        return None;
    }
    match (mf, df) {
        (_, Some("net")) if m != "daemon::server" && m != "daemon" => {
            Some("nothing imports net/ but the server")
        }
        (Some("files"), Some("chat" | "conn")) => Some("files/ imports neither chat/ nor conn/"),
        (Some("chat"), Some("files" | "conn")) => Some("chat/ imports neither files/ nor conn/"),
        (Some("access" | "system"), _) if d.starts_with("daemon::") => {
            Some("access/ and system/ import nothing else from the daemon")
        }
        (Some(_), None)
            if d.starts_with("daemon::")
                && !["daemon::shared", "daemon::stats", "daemon::registry"].contains(&d) =>
        {
            Some("a folder imports from the files directly under daemon/ only what they all share")
        }
        _ => None,
    }
}

#[test]
fn the_folder_rules_are_checked() {
    let cases = [
        ("daemon::files::upload", "daemon::chat", true),
        ("daemon::files::upload", "daemon::conn::frame", true),
        ("daemon::files::upload", "daemon::files::store", false),
        ("daemon::chat", "daemon::files::store", true),
        ("daemon::conn", "daemon::net::listener", true),
        ("daemon::shared", "daemon::net::queue", true),
        ("daemon::server", "daemon::net::accept", false),
        ("daemon::net::pool", "daemon::net::queue", false),
        ("daemon::net::pool", "daemon::conn", false),
        ("daemon::access::evict", "daemon::stats", true),
        ("daemon::system::notify", "daemon::shared", true),
        ("daemon::system::notify", "proto::wire", false),
        ("daemon::conn", "daemon::shared", false),
        ("daemon::conn::frame", "daemon::files::upload", false),
    ];
    for (m, d, broken) in cases {
        assert_eq!(folder_rule(m, d).is_some(), broken, "{m} -> {d}");
    }
}

#[test]
fn there_is_no_import_circle() {
    let graph = graph();
    // Depth-first search with colours; a grey node met again closes a circle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(m, 1);
        stack.push(m);
        for d in graph.get(m).into_iter().flatten() {
            // A module naming its own child (`daemon` → `daemon::server`) is the module tree,
            // not an import; `lib` declares everything.
            if m == "lib" || d.starts_with(&format!("{m}::")) {
                continue;
            }
            match state.get(d.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|s| s == d).unwrap_or(0);
                    let mut circle: Vec<String> =
                        stack[at..].iter().map(|s| s.to_string()).collect();
                    circle.push(d.clone());
                    return Some(circle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(d, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(m, 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if !state.contains_key(m.as_str()) {
            let mut stack = Vec::new();
            if let Some(circle) = visit(m, &graph, &mut state, &mut stack) {
                panic!("import circle: {}", circle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_codemap_matches_the_tree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let map = fs::read_to_string(root.join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let src = root.join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    let mut missing = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(root)
            .expect("under the root")
            .to_string_lossy()
            .to_string();
        if !map.contains(&format!("`{rel}`")) {
            missing.push(rel);
        }
    }
    // And every `src/….rs` the codemap names exists.
    let mut stale = Vec::new();
    for (i, _) in map.match_indices("`src/") {
        let name: String = map[i + 1..].chars().take_while(|&c| c != '`').collect();
        if name.ends_with(".rs") && !root.join(&name).is_file() {
            stale.push(name);
        }
    }
    assert!(
        missing.is_empty() && stale.is_empty(),
        "ARCHITECTURE.md's codemap is out of date: no line for {missing:?}; names missing files {stale:?}"
    );
}

/// Lines of code a file may hold before its unit tests, unless ARCHITECTURE.md names it as a
/// declarative table.
const MAX_CODE_LINES: usize = 500;

/// The non-blank lines that are not comments, before a file's unit tests: the first
/// `#[cfg(test)]` that opens a module (one on a single test-only item does not end the count).
fn code_lines(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let tests_at = (0..lines.len())
        .find(|&i| {
            lines[i] == "#[cfg(test)]"
                && lines[i + 1..]
                    .iter()
                    .find(|l| !l.is_empty() && !l.starts_with("//"))
                    .is_some_and(|l| l.starts_with("mod ") || l.starts_with("pub mod "))
        })
        .unwrap_or(lines.len());
    lines[..tests_at]
        .iter()
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .count()
}

/// The files ARCHITECTURE.md names under "Declarative tables": one `` `src/….rs` `` per line of
/// that section's list.
fn declared_tables(map: &str) -> Vec<String> {
    let Some(at) = map.find("\n## Declarative tables") else {
        return Vec::new();
    };
    let section = &map[at + 1..];
    let section = section[2..].split("\n## ").next().unwrap_or("");
    section
        .lines()
        .filter(|l| l.starts_with("- `src/"))
        .filter_map(|l| l.split('`').nth(1).map(str::to_string))
        .collect()
}

#[test]
fn no_source_file_holds_more_than_500_lines_of_code_but_the_named_tables() {
    assert_eq!(
        code_lines("a\n\n  // c\n/// d\nb\n#[cfg(test)]\nmod tests {}\n"),
        2
    );
    // A test-only item is code like any other; the count ends at the test module.
    assert_eq!(
        code_lines("a\n#[cfg(test)]\nconst X: u8 = 1;\nb\n#[cfg(test)]\n// m\nmod tests {\nc\n}\n"),
        4
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let map = fs::read_to_string(root.join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let tables = declared_tables(&map);
    for t in &tables {
        assert!(
            root.join(t).is_file(),
            "ARCHITECTURE.md names a table {t} that does not exist"
        );
    }
    let mut files = Vec::new();
    collect(&root.join("src"), &mut files);
    let mut over = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(root)
            .expect("under the root")
            .to_string_lossy()
            .to_string();
        let n = code_lines(&fs::read_to_string(f).expect("read a source file"));
        if n > MAX_CODE_LINES && !tables.contains(&rel) {
            over.push(format!("{rel}: {n}"));
        }
    }
    over.sort();
    assert!(
        over.is_empty(),
        "over {MAX_CODE_LINES} lines of code before the tests, and not a table ARCHITECTURE.md names: {over:?}"
    );
}
