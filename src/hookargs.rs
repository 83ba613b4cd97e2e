//! The hook's command template (`files.on_stored`): the placeholders it may use, checking a
//! template when the configuration is read, and filling one in for a stored file. Pure: no I/O.
//!
//! A template is an argv, never a shell line: its first item is the program, each later item
//! one argument. `{path}`, `{name}`, `{size}`, `{checksum}` and `{peer}` inside an item are
//! replaced by the stored file's values (the item stays one argument whatever the value holds);
//! `{{` and `}}` stand for literal braces. The same values reach the program in the environment
//! as `FERRYD_PATH`, `FERRYD_NAME`, `FERRYD_SIZE`, `FERRYD_CHECKSUM` and `FERRYD_PEER`.

use std::fmt;

/// The placeholders, in the order the documentation lists them.
pub const PLACEHOLDERS: &[&str] = &["path", "name", "size", "checksum", "peer"];
/// Most items in a template (the program and its arguments).
pub const MAX_ITEMS: usize = 64;
/// Longest item, in bytes, before filling in.
pub const MAX_ITEM_BYTES: usize = 4096;

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    TooMany(usize),
    TooLong { item: usize, len: usize },
    EmptyProgram,
    PlaceholderInProgram,
    Nul { item: usize },
    Unknown { item: usize, word: String },
    Unmatched { item: usize },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::TooMany(n) => write!(f, "{n} items, over {MAX_ITEMS}"),
            TemplateError::TooLong { item, len } => {
                write!(f, "item {item} is {len} bytes, over {MAX_ITEM_BYTES}")
            }
            TemplateError::EmptyProgram => f.write_str("item 1, the program, is empty"),
            TemplateError::PlaceholderInProgram => {
                f.write_str("item 1, the program, may not hold a placeholder or brace")
            }
            TemplateError::Nul { item } => write!(f, "item {item} contains a NUL character"),
            TemplateError::Unknown { item, word } => write!(
                f,
                "item {item}: unknown placeholder {{{word}}}, known: {}",
                known()
            ),
            TemplateError::Unmatched { item } => write!(
                f,
                "item {item}: unmatched brace (write {{{{ or }}}} for a literal one)"
            ),
        }
    }
}

impl std::error::Error for TemplateError {}

/// The placeholders as the documentation writes them: `{path}, {name}, …`.
pub fn known() -> String {
    let all: Vec<String> = PLACEHOLDERS.iter().map(|p| format!("{{{p}}}")).collect();
    all.join(", ")
}

/// What one stored file gives the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The stored file's path (the upload directory joined with its name).
    pub path: String,
    /// The name it was stored under.
    pub name: String,
    pub size: u64,
    /// BLAKE3, 64 lowercase hex digits.
    pub checksum: String,
    /// The sender's address and port: `127.0.0.1:5000`, `[::1]:5000`.
    pub peer: String,
}

impl Stored {
    fn value(&self, placeholder: &str) -> Option<String> {
        Some(match placeholder {
            "path" => self.path.clone(),
            "name" => self.name.clone(),
            "size" => self.size.to_string(),
            "checksum" => self.checksum.clone(),
            "peer" => self.peer.clone(),
            _ => return None,
        })
    }

    /// The `FERRYD_*` environment variables, one per placeholder.
    pub fn env(&self) -> Vec<(String, String)> {
        PLACEHOLDERS
            .iter()
            .filter_map(|p| {
                let v = self.value(p)?;
                Some((format!("FERRYD_{}", p.to_ascii_uppercase()), v))
            })
            .collect()
    }
}

/// Checks a template; the empty list (no hook) is valid.
pub fn check(items: &[String]) -> Result<(), TemplateError> {
    if items.len() > MAX_ITEMS {
        return Err(TemplateError::TooMany(items.len()));
    }
    for (item, n) in items.iter().zip(1..) {
        if item.len() > MAX_ITEM_BYTES {
            return Err(TemplateError::TooLong {
                item: n,
                len: item.len(),
            });
        }
        if item.contains('\0') {
            return Err(TemplateError::Nul { item: n });
        }
        if n == 1 {
            if item.is_empty() {
                return Err(TemplateError::EmptyProgram);
            }
            if item.contains(['{', '}']) {
                return Err(TemplateError::PlaceholderInProgram);
            }
        }
        expand(item, n, &|_| Some(String::new()))?;
    }
    Ok(())
}

/// The program and arguments for `stored`, from a checked template (an item that somehow does
/// not expand is passed as written).
pub fn fill(items: &[String], stored: &Stored) -> Vec<String> {
    items
        .iter()
        .zip(1..)
        .map(|(item, n)| expand(item, n, &|p| stored.value(p)).unwrap_or_else(|_| item.clone()))
        .collect()
}

/// Replaces each `{word}` in `item` by `value(word)`, and `{{`/`}}` by one brace.
fn expand(
    item: &str,
    n: usize,
    value: &dyn Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(item.len());
    let mut rest = item;
    while let Some(at) = rest.find(['{', '}']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if let Some(open) = tail.strip_prefix('{') {
            let Some(close) = open.find('}') else {
                return Err(TemplateError::Unmatched { item: n });
            };
            let word = &open[..close];
            if !PLACEHOLDERS.contains(&word) {
                return Err(TemplateError::Unknown {
                    item: n,
                    word: word.to_string(),
                });
            }
            out.push_str(&value(word).unwrap_or_default());
            rest = &open[close + 1..];
        } else {
            return Err(TemplateError::Unmatched { item: n });
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn stored() -> Stored {
        Stored {
            path: "/up/a b.txt".into(),
            name: "a b.txt".into(),
            size: 42,
            checksum: "ab".repeat(32),
            peer: "127.0.0.1:5000".into(),
        }
    }

    #[test]
    fn templates_fill_each_item_as_one_argument() {
        let cases: [(&[&str], &[&str]); 5] = [
            (&[], &[]),
            (&["/bin/true"], &["/bin/true"]),
            (
                &["mosquitto_pub", "-m", "{name} {size} from {peer}"],
                &["mosquitto_pub", "-m", "a b.txt 42 from 127.0.0.1:5000"],
            ),
            (
                &["cp", "--", "{path}", "/dest/"],
                &["cp", "--", "/up/a b.txt", "/dest/"],
            ),
            (&["echo", "{{name}} {{{size}}}"], &["echo", "{name} {42}"]),
        ];
        for (template, want) in cases {
            let t = items(template);
            assert_eq!(check(&t), Ok(()), "{template:?}");
            assert_eq!(fill(&t, &stored()), items(want), "{template:?}");
        }
    }

    #[test]
    fn bad_templates_are_refused_with_the_item() {
        let long = "x".repeat(MAX_ITEM_BYTES + 1);
        let many: Vec<&str> = vec!["a"; MAX_ITEMS + 1];
        let cases: [(&[&str], TemplateError); 7] = [
            (&[""], TemplateError::EmptyProgram),
            (&["{path}"], TemplateError::PlaceholderInProgram),
            (
                &["p", "{file}"],
                TemplateError::Unknown {
                    item: 2,
                    word: "file".into(),
                },
            ),
            (&["p", "{name"], TemplateError::Unmatched { item: 2 }),
            (&["p", "x}y"], TemplateError::Unmatched { item: 2 }),
            (&["p", "a\0"], TemplateError::Nul { item: 2 }),
            (
                &["p", &long],
                TemplateError::TooLong {
                    item: 2,
                    len: MAX_ITEM_BYTES + 1,
                },
            ),
        ];
        for (template, want) in cases {
            assert_eq!(check(&items(template)), Err(want), "{template:?}");
        }
        assert_eq!(
            check(&items(&many)),
            Err(TemplateError::TooMany(MAX_ITEMS + 1))
        );
    }

    #[test]
    fn env_names_every_placeholder() {
        let env = stored().env();
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "FERRYD_PATH",
                "FERRYD_NAME",
                "FERRYD_SIZE",
                "FERRYD_CHECKSUM",
                "FERRYD_PEER"
            ]
        );
        assert_eq!(env[2].1, "42");
    }
}
