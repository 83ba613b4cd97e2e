//! The raw layer and its validation: serde reads the file into tables of `Spanned` values (so
//! every error can point at a line), and each value is checked against its key's declaration in
//! `keys`, giving one `Val` per key. Errors name the file, line, key, value and what is allowed.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::{Spanned, Value};

use crate::hookargs;
use crate::rules::Cidr;

use super::ConfigError;
use super::keys::{self, KEYS, Key, Kind, TABLES, Val};

/// What serde reads: `[table]` → `key` → value, each with its place in the text. Unknown tables
/// (`Ctx::read`) and keys (`Ctx::validate`) are refused against the key table, in the wording
/// serde's `deny_unknown_fields` uses.
pub(super) type Raw = BTreeMap<Spanned<String>, Spanned<RawTable>>;
type RawTable = BTreeMap<Spanned<String>, Spanned<Value>>;

/// One value per key, in the order of `KEYS`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Values(pub Vec<Val>);

/// A value whose type does not fit the `Config` field the key names (a mistake in the key
/// table, which the unit tests rule out): the key.
#[derive(Debug)]
pub(super) struct Unfit(pub String);

impl Values {
    /// Every key at its built-in default.
    pub fn defaults() -> Values {
        Values::resolve(KEYS.iter().map(|_| None).collect())
    }

    /// Fills the keys the file left out (`None`) with their `same_as` key's value or their
    /// default.
    fn resolve(given: Vec<Option<Val>>) -> Values {
        let mut vals: Vec<Val> = KEYS
            .iter()
            .zip(&given)
            .map(|(key, v)| v.clone().unwrap_or_else(|| key.default()))
            .collect();
        for ((key, v), slot) in KEYS.iter().zip(&given).zip(0..) {
            let (None, Some(other)) = (v, key.same_as) else {
                continue;
            };
            let follow = KEYS
                .iter()
                .position(|k| k.is(other))
                .and_then(|i| vals.get(i).cloned());
            if let (Some(value), Some(dst)) = (follow, vals.get_mut(slot)) {
                *dst = value;
            }
        }
        Values(vals)
    }

    /// The value of the key `path`, in the type of the field it fills.
    pub fn get<T: keys::FromVal>(&self, path: &str) -> Result<T, Unfit> {
        KEYS.iter()
            .zip(&self.0)
            .find(|(k, _)| k.is(path))
            .and_then(|(_, v)| T::from_val(v.clone()))
            .ok_or_else(|| Unfit(path.to_string()))
    }
}

/// The text being validated, for turning spans into lines and values.
pub(super) struct Ctx<'a> {
    pub src: &'a str,
    pub file: &'a str,
}

impl Ctx<'_> {
    /// Reads the text into tables of spanned values: a TOML error, an unknown table or a table
    /// name given a plain value is refused first, in the order of the file.
    pub fn read(&self) -> Result<Raw, ConfigError> {
        let top: BTreeMap<Spanned<String>, Spanned<Value>> =
            toml::from_str(self.src).map_err(|e| self.toml_error(&e))?;
        let mut top: Vec<_> = top.iter().collect();
        top.sort_by_key(|(name, _)| name.span().start);
        for (name, value) in top {
            let is_table = matches!(value.get_ref(), Value::Table(_));
            if !TABLES.contains(&name.get_ref().as_str()) {
                let at = (!is_table).then_some(("", value));
                return Err(self.unknown(name, at, TABLES.iter().copied()));
            }
            if !is_table {
                let problem = format!("expected a table, found {}", type_name(value.get_ref()));
                let allowed = format!("a [{}] table", name.get_ref());
                return Err(self.bad(value, name.get_ref(), &problem, &allowed));
            }
        }
        toml::from_str(self.src).map_err(|e| self.toml_error(&e))
    }

    /// Checks every value the file gives against its key, in the order of the file, and fills
    /// in the rest.
    pub fn validate(&self, raw: &Raw) -> Result<Values, ConfigError> {
        let mut entries = Vec::new();
        for (table, body) in raw {
            for (name, value) in body.get_ref() {
                entries.push((table, name, value));
            }
        }
        entries.sort_by_key(|(_, name, _)| name.span().start);
        let mut given: Vec<Option<Val>> = KEYS.iter().map(|_| None).collect();
        let mut spans: Vec<Option<&Spanned<Value>>> = KEYS.iter().map(|_| None).collect();
        for (table, name, value) in entries {
            let (table, name_str) = (table.get_ref().as_str(), name.get_ref().as_str());
            let Some(slot) = KEYS
                .iter()
                .position(|k| k.table == table && k.name == name_str)
            else {
                let names = KEYS.iter().filter(|k| k.table == table).map(|k| k.name);
                return Err(self.unknown(name, Some((table, value)), names));
            };
            let key = &KEYS[slot];
            given[slot] = Some(self.value(value, key)?);
            spans[slot] = Some(value);
        }
        let values = Values::resolve(given);
        self.require_token_has_key(&values, &spans)?;
        self.starstar_without_key(&values, &spans)?;
        Ok(values)
    }

    /// `access.require_token = true` needs `files.token_file`.
    fn require_token_has_key(
        &self,
        values: &Values,
        spans: &[Option<&Spanned<Value>>],
    ) -> Result<(), ConfigError> {
        let at = |path: &str| KEYS.iter().position(|k| k.is(path));
        let (Some(req), Some(file)) = (at("access.require_token"), at("files.token_file")) else {
            return Ok(());
        };
        let required = values.0.get(req) == Some(&Val::Bool(true));
        let no_key = values.0.get(file) == Some(&Val::Unset);
        match spans.get(req) {
            Some(Some(v)) if required && no_key => Err(self.bad(
                v,
                "access.require_token",
                "needs files.token_file, the key to check",
                "false, or set files.token_file",
            )),
            _ => Ok(()),
        }
    }

    /// `compat.starstar_uploads = true` cannot go with `files.token_file`: such an upload
    /// carries no key.
    fn starstar_without_key(
        &self,
        values: &Values,
        spans: &[Option<&Spanned<Value>>],
    ) -> Result<(), ConfigError> {
        let at = |path: &str| KEYS.iter().position(|k| k.is(path));
        let (Some(star), Some(file)) = (at("compat.starstar_uploads"), at("files.token_file"))
        else {
            return Ok(());
        };
        let on = values.0.get(star) == Some(&Val::Bool(true));
        let keyed = !matches!(values.0.get(file), Some(Val::Unset) | None);
        match spans.get(star) {
            Some(Some(v)) if on && keyed => Err(self.bad(
                v,
                "compat.starstar_uploads",
                "cannot be combined with files.token_file: a NAME**SIZE upload carries no key",
                "false while files.token_file is set",
            )),
            _ => Ok(()),
        }
    }

    /// Checks one value against its key's declaration.
    fn value(&self, v: &Spanned<Value>, key: &Key) -> Result<Val, ConfigError> {
        let path = key.path();
        let wrong_type = |want: &str| {
            let problem = format!("expected {want}, found {}", type_name(v.get_ref()));
            self.bad(v, &path, &problem, &key.allowed())
        };
        let problem = |problem: &str| self.bad(v, &path, problem, &key.allowed());
        match (&key.kind, v.get_ref()) {
            (Kind::Int { min, max, .. }, Value::Integer(i)) => u64::try_from(*i)
                .ok()
                .filter(|n| (*min..=*max).contains(n))
                .map(Val::Int)
                .ok_or_else(|| problem("out of range")),
            (Kind::Int { .. }, _) => Err(wrong_type("an integer")),
            (Kind::Word { words, .. }, Value::String(s)) => words
                .iter()
                .find(|w| **w == s.as_str())
                .map(|w| Val::Word(w))
                .ok_or_else(|| problem("not a known value")),
            (Kind::Bool { .. }, Value::Boolean(b)) => Ok(Val::Bool(*b)),
            (Kind::Bool { .. }, _) => Err(wrong_type("a boolean")),
            (Kind::Ip { .. }, Value::String(s)) => s
                .parse()
                .map(Val::Ip)
                .map_err(|_| problem("not an IP address")),
            (Kind::Path { .. }, Value::String(s)) if s.is_empty() => Err(problem("empty path")),
            (Kind::Path { .. }, Value::String(s)) => Ok(Val::Path(s.into())),
            (Kind::Word { .. } | Kind::Ip { .. } | Kind::Path { .. }, _) => {
                Err(wrong_type("a string"))
            }
            (Kind::Argv, Value::Array(items)) => {
                let argv = items
                    .iter()
                    .zip(1..)
                    .map(|(item, n)| match item {
                        Value::String(s) => Ok(s.clone()),
                        other => Err(problem(&format!(
                            "item {n} is {}, not a string",
                            type_name(other)
                        ))),
                    })
                    .collect::<Result<Vec<String>, ConfigError>>()?;
                hookargs::check(&argv).map_err(|e| problem(&e.to_string()))?;
                Ok(Val::Argv(argv))
            }
            (Kind::Rules, Value::Array(items)) => items
                .iter()
                .zip(1..)
                .map(|(item, n)| match item {
                    Value::String(s) => {
                        Cidr::parse(s).map_err(|e| problem(&format!("item {n}: {e}")))
                    }
                    other => Err(problem(&format!(
                        "item {n} is {}, not a string",
                        type_name(other)
                    ))),
                })
                .collect::<Result<Vec<Cidr>, ConfigError>>()
                .map(Val::Rules),
            (Kind::Rules | Kind::Argv, _) => Err(wrong_type("a list")),
        }
    }

    /// An unknown table (`in_table` `None`), top-level key (table "") or key, in serde's wording
    /// for unknown fields.
    fn unknown<'k>(
        &self,
        name: &Spanned<String>,
        in_table: Option<(&str, &Spanned<Value>)>,
        known: impl Iterator<Item = &'k str>,
    ) -> ConfigError {
        let known: Vec<String> = known.map(|k| format!("`{k}`")).collect();
        let problem = format!(
            "unknown field `{}`, expected one of {}",
            name.get_ref(),
            known.join(", ")
        );
        let (key, value) = match in_table {
            Some(("", v)) => (Some(name.get_ref().clone()), Some(self.raw_text(v.span()))),
            Some((table, v)) => (
                Some(format!("{table}.{}", name.get_ref())),
                Some(self.raw_text(v.span())),
            ),
            None => (None, None),
        };
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: Some(line_of(self.src, name.span().start)),
            key,
            value,
            problem,
        }
    }

    fn bad(&self, v: &Spanned<Value>, key: &str, problem: &str, allowed: &str) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: Some(line_of(self.src, v.span().start)),
            key: Some(key.to_string()),
            value: Some(self.raw_text(v.span())),
            problem: format!("{problem}; allowed: {allowed}"),
        }
    }

    fn raw_text(&self, span: Range<usize>) -> String {
        self.src.get(span).unwrap_or("").trim().to_string()
    }

    /// Turns a TOML or serde error into one that names the line, the qualified key on that line
    /// and its value text, plus what the key allows when the key is known.
    pub fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return ConfigError::Invalid {
                file: self.file.to_string(),
                line: None,
                key: None,
                value: None,
                problem: message,
            };
        };
        let line_no = line_of(self.src, span.start);
        let text = self.src.lines().nth(line_no - 1).unwrap_or("");
        let (key, value) = match split_key_value(text) {
            Some((k, v)) => {
                let table = table_before(self.src, span.start);
                let key = if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                };
                (Some(key), (!v.is_empty()).then(|| v.to_string()))
            }
            None => (None, None),
        };
        let problem = match key.as_deref().and_then(keys::find) {
            Some(k) => format!("{message}; allowed: {}", k.allowed()),
            None => message,
        };
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: Some(line_no),
            key,
            value,
            problem,
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// The 1-based line number of byte offset `pos`.
fn line_of(src: &str, pos: usize) -> usize {
    let head = src.get(..pos).unwrap_or(src);
    head.bytes().filter(|&b| b == b'\n').count() + 1
}

/// Splits `key = value  # comment` into the bare key and the value text.
fn split_key_value(line: &str) -> Option<(&str, &str)> {
    let (k, v) = line.split_once('=')?;
    let k = k.trim().trim_matches('"');
    if k.is_empty() || k.starts_with('[') || k.starts_with('#') {
        return None;
    }
    let v = v.split(" #").next().unwrap_or(v);
    Some((k, v.trim()))
}

/// The name of the `[table]` whose body contains byte offset `pos` ("" at the top level).
fn table_before(src: &str, pos: usize) -> &str {
    let head = src.get(..pos).unwrap_or(src);
    head.lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .map(str::trim)
        .unwrap_or("")
}
