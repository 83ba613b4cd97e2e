//! The manual page ferryd.toml(5), generated from the key table: every key's doc line, type,
//! default, range and reload rule, rendered as roff (pure: the table in, a `String` out).
//!
//! `docs/man/ferryd.toml.5` is this function's output, checked in; the unit test below fails when
//! the two differ and, with `FERRYD_BLESS=1`, rewrites the file. Only that test calls it, so the
//! module is compiled for tests alone and adds nothing to the binary.

use std::fmt::Write as _;

use super::keys::{KEYS, Key, Kind, Reload, TABLES, Val};

/// The page's source path in the repository.
pub(super) const PAGE: &str = "docs/man/ferryd.toml.5";

/// What the page says above the keys.
const DESCRIPTION: &str = "\
ferryd reads one TOML file. Without --config it reads $FERRYD_CONFIG, else \
/etc/ferryd/config.toml if it exists, else uses built-in defaults, which are the defaults \
listed below (the shipped config.toml holds the same values, each key documented). A key left \
out takes its default. An unknown key, a value of the wrong type or out of its range is refused \
before anything starts: the daemon and ferryd check-config exit 78 with one line naming the \
file, line, key, value and what is allowed.";

/// What the page says about reloading, after the keys.
const RELOAD: &str = "\
SIGHUP (systemctl reload) re-reads the file. A key marked \"applied at once\" takes its new \
value for connections and files that start after the reload; a key marked \"needs a restart\" \
keeps its running value, and the reload logs that it changed. A file that does not validate is \
refused with its error, and the running configuration stays in force.";

/// ferryd.toml(5) as roff, for ferryd `version`.
pub(super) fn render(version: &str) -> String {
    let mut out = String::new();
    out.push_str(
        ".\\\" Generated from src/config/keys.rs by src/config/manpage.rs: do not edit.\n",
    );
    out.push_str(".\\\" Regenerate with: FERRYD_BLESS=1 cargo test --lib manpage\n");
    let _ = writeln!(
        out,
        ".TH FERRYD.TOML 5 \"\" \"ferryd {}\" \"File Formats\"",
        text(version)
    );
    out.push_str(".SH NAME\nferryd.toml \\- configuration file of the ferryd daemon\n");
    out.push_str(".SH SYNOPSIS\n.I /etc/ferryd/config.toml\n");
    let _ = writeln!(out, ".SH DESCRIPTION\n{}", text(DESCRIPTION));
    for table in TABLES {
        let _ = writeln!(out, ".SH \"[{}]\"", text(table));
        for key in KEYS.iter().filter(|k| k.table == *table) {
            entry(&mut out, key);
        }
    }
    let _ = writeln!(out, ".SH RELOADING\n{}", text(RELOAD));
    out.push_str(".SH EXAMPLE\n.EX\n[server]\nbind = \"0.0.0.0\"\nport = 7878\n\n");
    out.push_str("[files]\ndir = \"/var/lib/ferryd/uploads\"\non_conflict = \"reject\"\n.EE\n");
    out.push_str(
        ".SH FILES\n.TP\n.I /etc/ferryd/config.toml\nthe file the daemon reads \
                  when neither --config nor $FERRYD_CONFIG names one\n",
    );
    out.push_str(".SH SEE ALSO\n.BR ferryd (8)\n");
    out
}

/// One key: its name as a tag, its doc line, then type, default, allowed values and reload rule.
fn entry(out: &mut String, key: &Key) {
    let _ = writeln!(out, ".TP\n.B {}\n{}.", code(key.name), text(key.doc));
    let _ = writeln!(out, ".br\nType: {}.", type_name(&key.kind));
    let default = match key.same_as {
        Some(other) => format!("the value of \\fB{}\\fR", code(other)),
        None => default_text(key),
    };
    let _ = writeln!(out, ".br\nDefault: {default}.");
    let _ = writeln!(out, ".br\nAllowed: {}.", text(&key.allowed()));
    let reload = match key.reload {
        Reload::Live => "applied at once",
        Reload::Restart => "needs a restart",
    };
    let _ = writeln!(out, ".br\nOn reload: {reload}.");
}

fn type_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Int { octal: true, .. } => "integer, a file mode written in octal",
        Kind::Int { .. } => "integer",
        Kind::Word { .. } => "string",
        Kind::Bool { .. } => "boolean",
        Kind::Ip { .. } => "string, an IP address",
        Kind::Path { .. } => "string, a path",
        Kind::Text { .. } => "string",
        Kind::Rules | Kind::Argv => "array of strings",
    }
}

/// The key's own default, as TOML writes it, in bold; "not set" for an optional key.
fn default_text(key: &Key) -> String {
    let toml = match key.default() {
        Val::Int(n) if matches!(key.kind, Kind::Int { octal: true, .. }) => format!("{n:#o}"),
        Val::Int(n) => n.to_string(),
        Val::Word(w) => format!("\"{w}\""),
        Val::Bool(b) => b.to_string(),
        Val::Ip(ip) => format!("\"{ip}\""),
        Val::Path(p) => format!("\"{}\"", p.display()),
        Val::Text(t) => format!("\"{t}\""),
        Val::Rules(rules) => {
            let items: Vec<String> = rules.iter().map(|r| format!("\"{r}\"")).collect();
            format!("[{}]", items.join(", "))
        }
        Val::Argv(argv) => {
            let items: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
            format!("[{}]", items.join(", "))
        }
        Val::Unset => return "not set".to_string(),
    };
    format!("\\fB{}\\fR", code(&toml))
}

/// Prose for roff: backslashes and non-ASCII characters escaped, and a line that would start
/// with a control character (`.` or `'`) protected.
fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '\u{2013}' => out.push_str("\\(en"),
            c if c.is_ascii() => out.push(c),
            c => {
                let _ = write!(out, "\\[u{:04X}]", u32::from(c));
            }
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// A literal (key name, value) for roff: as `text`, with `-` a minus sign, as typed.
fn code(s: &str) -> String {
    text(s).replace('-', "\\-")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_checked_in_manpage_is_what_the_key_table_generates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PAGE);
        let want = render(env!("CARGO_PKG_VERSION"));
        if std::env::var_os("FERRYD_BLESS").is_some_and(|v| v == "1") {
            std::fs::write(&path, &want).expect("write the manual page");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{PAGE} is not what src/config/keys.rs generates: run FERRYD_BLESS=1 cargo test --lib manpage"
        );
    }

    #[test]
    fn every_key_is_on_the_page_with_its_default_and_reload_rule() {
        let page = render("9.9.9");
        for key in KEYS {
            let tag = format!(".TP\n.B {}\n", code(key.name));
            let at = page
                .find(&format!(".SH \"[{}]\"", key.table))
                .and_then(|t| page[t..].find(&tag).map(|i| t + i))
                .unwrap_or_else(|| panic!("{} is not on the page", key.path()));
            let body = &page[at + tag.len()..];
            let body = &body[..body
                .find(".TP\n")
                .or(body.find(".SH "))
                .unwrap_or(body.len())];
            assert!(body.contains("Default: "), "{}: {body}", key.path());
            let rule = match key.reload {
                Reload::Live => "On reload: applied at once.",
                Reload::Restart => "On reload: needs a restart.",
            };
            assert!(body.contains(rule), "{}: {body}", key.path());
        }
        assert!(page.contains(".TH FERRYD.TOML 5 \"\" \"ferryd 9.9.9\""));
    }

    #[test]
    fn roff_escapes() {
        assert_eq!(text(".dot"), "\\&.dot");
        assert_eq!(text("a\\b"), "a\\eb");
        assert_eq!(text("1–65535 …"), "1\\(en65535 \\[u2026]");
        assert_eq!(code("0o640 -x"), "0o640 \\-x");
    }
}
