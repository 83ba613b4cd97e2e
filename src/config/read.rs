//! The raw layer: the TOML text read by `toml`'s own parser (no serde) into tables of spanned
//! values, and the spans turned into problems that name the file, line, key and value text. A
//! syntax error ends the reading, so it is reported alone.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, Problem};
use super::keys;

/// The text being read, for turning spans into lines and values.
pub(super) struct Ctx<'a> {
    pub src: &'a str,
    pub file: &'a str,
}

impl<'a> Ctx<'a> {
    /// Reads the text into `[table]` → `key` → value, each with its place in the text.
    pub fn read(&self) -> Result<DeTable<'a>, ConfigError> {
        match DeTable::parse(self.src) {
            Ok(top) => Ok(top.into_inner()),
            Err(e) => Err(ConfigError::Invalid {
                file: self.file.to_string(),
                problems: vec![self.syntax_error(&e)],
                syntax: true,
            }),
        }
    }

    /// The value at `span` is wrong for `key`.
    pub fn bad(&self, span: Range<usize>, key: &str, problem: &str, allowed: &str) -> Problem {
        Problem {
            file: self.file.to_string(),
            line: Some(line_of(self.src, span.start)),
            key: Some(key.to_string()),
            value: Some(self.raw_text(span)),
            problem: format!("{problem}; allowed: {allowed}"),
        }
    }

    /// An unknown table (`value` `None`), top-level key (`table` "") or key, named at `name`,
    /// in the wording serde uses for unknown fields.
    pub fn unknown<'k>(
        &self,
        name: (&str, Range<usize>),
        table_and_value: Option<(&str, Range<usize>)>,
        known: impl Iterator<Item = &'k str>,
    ) -> Problem {
        let known: Vec<String> = known.map(|k| format!("`{k}`")).collect();
        let problem = format!(
            "unknown field `{}`, expected one of {}",
            name.0,
            known.join(", ")
        );
        let (key, value) = match table_and_value {
            Some(("", span)) => (Some(name.0.to_string()), Some(self.raw_text(span))),
            Some((table, span)) => (
                Some(format!("{table}.{}", name.0)),
                Some(self.raw_text(span)),
            ),
            None => (None, None),
        };
        Problem {
            file: self.file.to_string(),
            line: Some(line_of(self.src, name.1.start)),
            key,
            value,
            problem,
        }
    }

    /// A problem outside any one place of the text.
    pub fn general(&self, key: Option<String>, problem: String) -> Problem {
        Problem {
            file: self.file.to_string(),
            line: None,
            key,
            value: None,
            problem,
        }
    }

    fn raw_text(&self, span: Range<usize>) -> String {
        self.src.get(span).unwrap_or("").trim().to_string()
    }

    /// Turns a TOML syntax error into a problem that names the line, the qualified key on that
    /// line and its value text, plus what the key allows when the key is known.
    fn syntax_error(&self, e: &toml::de::Error) -> Problem {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return self.general(None, message);
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
        Problem {
            file: self.file.to_string(),
            line: Some(line_no),
            key,
            value,
            problem,
        }
    }
}

/// "a string", "an integer", … as error messages name a value's type.
pub(super) fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
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
