//! Validation against the key table: each value the file gives is checked against its key's
//! declaration in `keys`, giving one `Val` per key, and keys that depend on each other are
//! checked together. Every problem is collected (unknown tables and keys too, in the wording
//! serde's `deny_unknown_fields` used), in the order of the file.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use crate::hookargs;
use crate::rules::Cidr;

use super::error::Problem;
use super::keys::{self, KEYS, Key, Kind, TABLES, Val};
use super::read::{Ctx, type_name};

/// One value per key, in the order of `KEYS`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Values(pub Vec<Val>);

/// A value whose type does not fit the `Config` field the key names (a mistake in the key
/// table, which the unit tests rule out): the key.
#[derive(Debug)]
pub(super) struct Unfit(pub &'static str);

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

    /// The value of the key `path`, in the type of the field it fills. Only the conversion is
    /// generic: the look-up is one function for every key (fewer bytes in the binary).
    pub fn get<T: keys::FromVal>(&self, path: &'static str) -> Result<T, Unfit> {
        self.find(path).and_then(T::from_val).ok_or(Unfit(path))
    }

    #[inline(never)]
    fn find(&self, path: &str) -> Option<&Val> {
        KEYS.iter()
            .zip(&self.0)
            .find(|(k, _)| k.is(path))
            .map(|(_, v)| v)
    }
}

/// What the file gives for one key.
#[derive(Debug, Clone)]
enum Given {
    /// Nothing: the key keeps its default.
    Absent,
    /// A value that passed its checks, and where it is.
    Good(Val, Range<usize>),
    /// A value that was refused (and reported).
    Bad,
}

/// A problem and the byte offset it is reported at, for putting problems in the order of the
/// file.
type Found = (usize, Problem);

/// Problems kept in the order of the file as they are found (a handful: an insertion costs
/// less code than a sort).
struct InFileOrder(Vec<Found>);

impl InFileOrder {
    fn add(&mut self, found: Found) {
        let at = self.0.partition_point(|(before, _)| *before <= found.0);
        self.0.insert(at, found);
    }

    fn extend(&mut self, found: Option<Found>) {
        if let Some(found) = found {
            self.add(found);
        }
    }
}

impl Ctx<'_> {
    /// Checks every table and value the file gives against the key table, and the keys that
    /// depend on each other; fills in the rest. Every problem is reported, in the order of the
    /// file.
    pub fn validate(&self, raw: &DeTable<'_>) -> Result<Values, Vec<Problem>> {
        let mut found = InFileOrder(Vec::new());
        let mut given = vec![Given::Absent; KEYS.len()];
        for (name, value) in raw {
            let (table, at) = (name.get_ref().as_ref(), name.span());
            let is_table = matches!(value.get_ref(), DeValue::Table(_));
            if !TABLES.contains(&table) {
                let value_at = (!is_table).then(|| ("", value.span()));
                let known = TABLES.iter().copied();
                found.add((at.start, self.unknown((table, at), value_at, known)));
                continue;
            }
            let DeValue::Table(body) = value.get_ref() else {
                let problem = format!("expected a table, found {}", type_name(value.get_ref()));
                let allowed = format!("a [{table}] table");
                let problem = self.bad(value.span(), table, &problem, &allowed);
                found.add((value.span().start, problem));
                continue;
            };
            for (name, value) in body {
                if let Err(problem) = self.entry(table, name, value, &mut given) {
                    found.add(problem);
                }
            }
        }
        let checked = given.iter().map(|g| match g {
            Given::Good(v, _) => Some(v.clone()),
            Given::Absent | Given::Bad => None,
        });
        let values = Values::resolve(checked.collect());
        found.extend(self.require_token_has_key(&given));
        found.extend(self.starstar_without_key(&given));
        let found = found.0;
        if found.is_empty() {
            return Ok(values);
        }
        Err(found.into_iter().map(|(_, problem)| problem).collect())
    }

    /// Checks `table.name = value` and records it in `given`.
    fn entry(
        &self,
        table: &str,
        name: &Spanned<DeString<'_>>,
        value: &Spanned<DeValue<'_>>,
        given: &mut [Given],
    ) -> Result<(), Found> {
        let name_str: &str = name.get_ref().as_ref();
        let slot = KEYS
            .iter()
            .position(|k| k.table == table && k.name == name_str);
        let Some((key, slot)) = slot.and_then(|i| Some((KEYS.get(i)?, given.get_mut(i)?))) else {
            let names = KEYS.iter().filter(|k| k.table == table).map(|k| k.name);
            let at = name.span();
            let problem = self.unknown((name_str, at.clone()), Some((table, value.span())), names);
            return Err((at.start, problem));
        };
        match self.value(value, key) {
            Ok(v) => {
                *slot = Given::Good(v, value.span());
                Ok(())
            }
            Err(problem) => {
                *slot = Given::Bad;
                Err((value.span().start, problem))
            }
        }
    }

    /// `access.require_token = true` needs `files.token_file` (unless the key file's own line
    /// was refused already).
    fn require_token_has_key(&self, given: &[Given]) -> Option<Found> {
        let span = match (
            given_of(given, "access.require_token")?,
            given_of(given, "files.token_file")?,
        ) {
            (Given::Good(Val::Bool(true), span), Given::Absent) => span.clone(),
            _ => return None,
        };
        let problem = self.bad(
            span.clone(),
            "access.require_token",
            "needs files.token_file, the key to check",
            "false, or set files.token_file",
        );
        Some((span.start, problem))
    }

    /// `compat.starstar_uploads = true` cannot go with `files.token_file`: such an upload
    /// carries no key.
    fn starstar_without_key(&self, given: &[Given]) -> Option<Found> {
        let span = match (
            given_of(given, "compat.starstar_uploads")?,
            given_of(given, "files.token_file")?,
        ) {
            (Given::Good(Val::Bool(true), span), Given::Good(Val::Path(_), _)) => span.clone(),
            _ => return None,
        };
        let problem = self.bad(
            span.clone(),
            "compat.starstar_uploads",
            "cannot be combined with files.token_file: a NAME**SIZE upload carries no key",
            "false while files.token_file is set",
        );
        Some((span.start, problem))
    }

    /// Checks one value against its key's declaration.
    fn value(&self, v: &Spanned<DeValue<'_>>, key: &Key) -> Result<Val, Problem> {
        let path = key.path();
        let wrong_type = |want: &str| {
            let problem = format!("expected {want}, found {}", type_name(v.get_ref()));
            self.bad(v.span(), &path, &problem, &key.allowed())
        };
        let problem = |problem: &str| self.bad(v.span(), &path, problem, &key.allowed());
        match (&key.kind, v.get_ref()) {
            (Kind::Int { min, max, .. }, DeValue::Integer(i)) => {
                i128::from_str_radix(i.as_str(), i.radix())
                    .ok()
                    .and_then(|n| u64::try_from(n).ok())
                    .filter(|n| (*min..=*max).contains(n))
                    .map(Val::Int)
                    .ok_or_else(|| problem("out of range"))
            }
            (Kind::Int { .. }, _) => Err(wrong_type("an integer")),
            (Kind::Word { words, .. }, DeValue::String(s)) => words
                .iter()
                .find(|w| **w == s.as_ref())
                .map(|w| Val::Word(w))
                .ok_or_else(|| problem("not a known value")),
            (Kind::Bool { .. }, DeValue::Boolean(b)) => Ok(Val::Bool(*b)),
            (Kind::Bool { .. }, _) => Err(wrong_type("a boolean")),
            (Kind::Ip { .. }, DeValue::String(s)) => s
                .parse()
                .map(Val::Ip)
                .map_err(|_| problem("not an IP address")),
            (Kind::Path { .. }, DeValue::String(s)) if s.is_empty() => Err(problem("empty path")),
            (Kind::Path { .. }, DeValue::String(s)) => Ok(Val::Path(s.as_ref().into())),
            (Kind::Text { .. }, DeValue::String(s)) if s.is_empty() => Err(problem("empty")),
            (Kind::Text { .. }, DeValue::String(s)) => Ok(Val::Text(s.to_string())),
            (Kind::Word { .. } | Kind::Ip { .. } | Kind::Path { .. } | Kind::Text { .. }, _) => {
                Err(wrong_type("a string"))
            }
            (Kind::Argv, DeValue::Array(items)) => {
                let argv = strings(items, &problem)?;
                hookargs::check(&argv).map_err(|e| problem(&e.to_string()))?;
                Ok(Val::Argv(argv))
            }
            (Kind::Rules, DeValue::Array(items)) => items
                .iter()
                .zip(1..)
                .map(|(item, n)| match item.get_ref() {
                    DeValue::String(s) => {
                        Cidr::parse(s).map_err(|e| problem(&format!("item {n}: {e}")))
                    }
                    other => Err(not_a_string(n, other, &problem)),
                })
                .collect::<Result<Vec<Cidr>, Problem>>()
                .map(Val::Rules),
            (Kind::Rules | Kind::Argv, _) => Err(wrong_type("a list")),
        }
    }
}

/// What the file gives for the key `path`.
fn given_of<'g>(given: &'g [Given], path: &str) -> Option<&'g Given> {
    KEYS.iter()
        .position(|k| k.is(path))
        .and_then(|i| given.get(i))
}

/// The items of a list that must hold only strings; the first other item is the problem.
fn strings(
    items: &[Spanned<DeValue<'_>>],
    problem: &dyn Fn(&str) -> Problem,
) -> Result<Vec<String>, Problem> {
    items
        .iter()
        .zip(1..)
        .map(|(item, n)| match item.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            other => Err(not_a_string(n, other, problem)),
        })
        .collect()
}

/// Item `n` of a list of strings is something else.
fn not_a_string(n: usize, item: &DeValue<'_>, problem: &dyn Fn(&str) -> Problem) -> Problem {
    problem(&format!("item {n} is {}, not a string", type_name(item)))
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, parse};

    /// Each case: a file with several mistakes, and the start of each problem reported, in
    /// order.
    const CASES: &[(&str, &[&str])] = &[
        (
            "[server]\nport = 70000\nmode = \"relay\"\n[udp]\nmax_peers = 0\n",
            &[
                "t.toml:2: server.port = 70000: out of range; allowed: an integer in 1–65535",
                "t.toml:3: server.mode = \"relay\": not a known value; allowed: one of \"echo\", \"chat\"",
                "t.toml:5: udp.max_peers = 0: out of range; allowed: an integer in ",
            ],
        ),
        (
            "[sever]\nport = 1\n[server]\nprot = 2\nbacklog = -5\n",
            &[
                "t.toml:1: unknown field `sever`, expected one of `server`, `udp`,",
                "t.toml:4: server.prot = 2: unknown field `prot`, expected one of `bind`, `port`,",
                "t.toml:5: server.backlog = -5: out of range; allowed: an integer in 1–65535",
            ],
        ),
        (
            "[access]\nrequire_token = true\nmax_per_ip = 0\n[compat]\nstarstar_uploads = \"yes\"\n",
            &[
                "t.toml:2: access.require_token = true: needs files.token_file",
                "t.toml:3: access.max_per_ip = 0: out of range",
                "t.toml:5: compat.starstar_uploads = \"yes\": expected a boolean, found a string",
            ],
        ),
        (
            "[files]\ntoken_file = \"/k\"\nmax_file_size = -1\n[compat]\nstarstar_uploads = true\n",
            &[
                "t.toml:3: files.max_file_size = -1: out of range",
                "t.toml:5: compat.starstar_uploads = true: cannot be combined with files.token_file",
            ],
        ),
        // A refused key file is reported once, not again as missing for require_token.
        (
            "[files]\ntoken_file = \"\"\n[access]\nrequire_token = true\nallow = [\"10.0.0/8\"]\n",
            &[
                "t.toml:2: files.token_file = \"\": empty path",
                "t.toml:5: access.allow = [\"10.0.0/8\"]: item 1: \"10.0.0/8\" is not an IP address",
            ],
        ),
        // File order, not table or name order: a later [server] after [udp], and an inline
        // table whose keys are out of alphabetical order.
        (
            "[udp]\nport = 0\n[server]\nport = 0\n[log]\nlevel = \"loud\"\nformat = 1\n",
            &[
                "t.toml:2: udp.port = 0: out of range",
                "t.toml:4: server.port = 0: out of range",
                "t.toml:6: log.level = \"loud\": not a known value",
                "t.toml:7: log.format = 1: expected a string, found an integer",
            ],
        ),
        (
            "server = { port = 0, backlog = 0 }\n",
            &[
                "t.toml:1: server.port = 0: out of range",
                "t.toml:1: server.backlog = 0: out of range",
            ],
        ),
        (
            "log = 5\nport = 5\n[server]\nport = 0\n",
            &[
                "t.toml:1: log = 5: expected a table, found an integer; allowed: a [log] table",
                "t.toml:2: port = 5: unknown field `port`, expected one of `server`",
                "t.toml:4: server.port = 0: out of range",
            ],
        ),
    ];

    fn problems(src: &str) -> (Vec<String>, Option<String>) {
        match parse(src, "t.toml") {
            Ok(c) => panic!("{src:?} should be refused, got {c:?}"),
            Err(e) => (
                e.problems().iter().map(ToString::to_string).collect(),
                e.summary(),
            ),
        }
    }

    #[test]
    fn every_problem_is_reported_in_the_order_of_the_file() {
        for (src, want) in CASES {
            let (got, summary) = problems(src);
            assert_eq!(got.len(), want.len(), "{src:?}: {got:#?}");
            for (got, want) in got.iter().zip(want.iter()) {
                assert!(
                    got.starts_with(want),
                    "{src:?}:\n{got}\nshould start with\n{want}"
                );
            }
            let n = want.len();
            assert_eq!(summary, Some(format!("{n} errors in t.toml")), "{src:?}");
        }
    }

    #[test]
    fn a_syntax_error_is_reported_alone_and_says_so() {
        let src = "[server]\nport = 0\nbind = = \"::\"\nbacklog = 0\n";
        let e = match parse(src, "t.toml") {
            Ok(c) => panic!("should be refused, got {c:?}"),
            Err(e) => e,
        };
        assert!(
            matches!(e, ConfigError::Invalid { syntax: true, .. }),
            "{e:?}"
        );
        let got: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("t.toml:3: server.bind = = \"::\": "),
            "{got:?}"
        );
        let summary = e.summary().unwrap_or_default();
        assert!(
            summary.starts_with(
                "1 error in t.toml (a TOML syntax error stops the check: no other line was checked)"
            ),
            "{summary}"
        );
    }
}
