//! `check-config`'s rendering of the effective configuration: every key of every table under
//! its doc line, as TOML that `parse` reads back to the same `Config`.

use std::fmt;

use crate::escape::quoted;

use super::Config;
use super::keys::{KEYS, Key, Kind, TABLES, Val};

/// Renders the effective configuration as TOML that `parse` reads back to the same `Config`:
/// every key of every table, each under its doc line.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, table) in TABLES.iter().enumerate() {
            if n > 0 {
                writeln!(f)?;
            }
            writeln!(f, "[{table}]")?;
            for key in KEYS.iter().filter(|k| k.table == *table) {
                writeln!(f, "# {}", key.doc)?;
                match (key.get)(self).to_val() {
                    Val::Unset => writeln!(f, "# {} is not set", key.name)?,
                    v => writeln!(f, "{} = {}", key.name, toml_text(key, &v))?,
                }
            }
        }
        Ok(())
    }
}

/// A value as TOML text.
pub(super) fn toml_text(key: &Key, v: &Val) -> String {
    match v {
        Val::Int(n) if matches!(key.kind, Kind::Int { octal: true, .. }) => format!("{n:#o}"),
        Val::Int(n) => n.to_string(),
        Val::Word(w) => format!("\"{w}\""),
        Val::Bool(b) => b.to_string(),
        Val::Ip(ip) => format!("\"{ip}\""),
        Val::Path(p) => quoted(&p.to_string_lossy()),
        Val::Text(t) => quoted(t),
        Val::Rules(rules) => {
            let items: Vec<String> = rules.iter().map(|r| format!("\"{r}\"")).collect();
            format!("[{}]", items.join(", "))
        }
        Val::Argv(argv) => {
            let items: Vec<String> = argv.iter().map(|a| quoted(a)).collect();
            format!("[{}]", items.join(", "))
        }
        Val::Unset => String::new(),
    }
}
