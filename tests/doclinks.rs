//! Every relative link in README.md and docs/*.md resolves: the file it names exists, and its
//! `#anchor` (in the same page or another) is a heading there, spelled as GitHub makes anchors.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The pages whose links are checked.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("read docs/")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ has no .md page");
    pages.extend(docs);
    pages
}

/// The lines of a Markdown page outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push(line);
        }
    }
    out
}

/// The target of every `[text](target)` link on the lines.
fn links(lines: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for line in lines {
        for (i, _) in line.match_indices("](") {
            let rest = &line[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_string());
            }
        }
    }
    out
}

/// The anchor GitHub gives a heading: lowercase, every character but letters, digits, `-`, `_`
/// and spaces dropped, spaces made `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor of a page: its headings' slugs, a repeated one with `-1`, `-2`, … as GitHub does.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading);
        let mut name = base.clone();
        let mut n = 0;
        while seen.contains(&name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        seen.insert(name);
    }
    seen
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = fs::read_to_string(&page).expect("read a page");
        let dir = page.parent().expect("a page has a directory");
        for link in links(&prose(&text)) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                page.clone()
            } else {
                dir.join(path)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}: no file {}", page.display(), path));
                continue;
            }
            if let Some(anchor) = anchor {
                let target_text = fs::read_to_string(&target).unwrap_or_default();
                if !anchors(&target_text).contains(anchor) {
                    broken.push(format!("{}: {link}: no heading #{anchor}", page.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked > 20, "only {checked} relative links found");
}

#[test]
fn anchors_are_spelled_as_github_spells_them() {
    let page = "# Title\n## Sending files with `ferryd send` and `ferryd pack`\n\
                ```sh\n# not a heading\n```\n## Hooks: carrying each file onward\n## Title\n";
    let want: BTreeSet<String> = [
        "title",
        "sending-files-with-ferryd-send-and-ferryd-pack",
        "hooks-carrying-each-file-onward",
        "title-1",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(anchors(page), want);
    assert_eq!(
        links(&["see [a](docs/a.md#b) and [c](#d)."]),
        ["docs/a.md#b", "#d"]
    );
}
