//! What is wrong with a configuration: the file that cannot be read, or every problem found in
//! it (`Problem`: file, line, key, value, what is allowed), in the order of the file.

use std::fmt;
use std::path::PathBuf;

/// A configuration that cannot be used. `Display` names the file, line, key, value and what is
/// allowed, as far as each is known; `problems` and `summary` give the same one line at a time.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read { path: PathBuf, err: std::io::Error },
    /// The file is not valid TOML, or has unknown keys or values outside what their keys allow:
    /// every problem found, in the order of the file (at least one).
    Invalid {
        file: String,
        problems: Vec<Problem>,
        /// A TOML syntax error, which ends the reading before any value is checked: it is the
        /// only problem reported.
        syntax: bool,
    },
}

/// One thing wrong in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; `None` when no place in the text is to blame.
    pub line: Option<usize>,
    /// `table.key` (or a bare top-level name).
    pub key: Option<String>,
    /// The value as written in the file.
    pub value: Option<String>,
    /// What is wrong, then `; allowed: …` when a key is known.
    pub problem: String,
}

impl ConfigError {
    /// Every problem found, in the order of the file; none for a file that cannot be read.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }

    /// `N errors in FILE`, saying when a syntax error stopped the check; `None` for a file that
    /// cannot be read.
    pub fn summary(&self) -> Option<String> {
        let ConfigError::Invalid {
            file,
            problems,
            syntax,
        } = self
        else {
            return None;
        };
        let n = problems.len();
        let mut text = format!("{n} error{} in {file}", if n == 1 { "" } else { "s" });
        if *syntax {
            text.push_str(" (a TOML syntax error stops the check: no other line was checked)");
        }
        Some(text)
    }
}

impl fmt::Display for ConfigError {
    /// One line, for a log: the problem itself when there is one, else the summary and each
    /// problem numbered.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, err } => {
                write!(f, "cannot read config file {}: {err}", path.display())
            }
            ConfigError::Invalid { problems, .. } => match problems.as_slice() {
                [one] => write!(f, "{one}"),
                many => {
                    write!(f, "{}:", self.summary().unwrap_or_default())?;
                    for (n, p) in (1..).zip(many) {
                        write!(f, " ({n}) {p}")?;
                    }
                    Ok(())
                }
            },
        }
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for Problem {
    /// `file:line: key = value: problem; allowed: …`, leaving out what is not known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        match (&self.key, &self.value) {
            (Some(k), Some(v)) => write!(f, ": {k} = {v}")?,
            (Some(k), None) => write!(f, ": {k}")?,
            _ => {}
        }
        write!(f, ": {}", self.problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(line: usize, key: &str, value: &str) -> Problem {
        Problem {
            file: "c.toml".to_string(),
            line: Some(line),
            key: Some(key.to_string()),
            value: Some(value.to_string()),
            problem: "out of range; allowed: an integer in 1–65535".to_string(),
        }
    }

    #[test]
    fn one_problem_is_its_own_line_and_many_are_counted() {
        let cases: [(Vec<Problem>, bool, &str, &str); 3] = [
            (
                vec![problem(3, "server.port", "0")],
                false,
                "c.toml:3: server.port = 0: out of range; allowed: an integer in 1–65535",
                "1 error in c.toml",
            ),
            (
                vec![
                    problem(3, "server.port", "0"),
                    problem(5, "udp.port", "70000"),
                ],
                false,
                "2 errors in c.toml: (1) c.toml:3: server.port = 0: out of range; allowed: an integer in 1–65535 (2) c.toml:5: udp.port = 70000: out of range; allowed: an integer in 1–65535",
                "2 errors in c.toml",
            ),
            (
                vec![problem(1, "server.port", "00")],
                true,
                "c.toml:1: server.port = 00: out of range; allowed: an integer in 1–65535",
                "1 error in c.toml (a TOML syntax error stops the check: no other line was checked)",
            ),
        ];
        for (problems, syntax, display, summary) in cases {
            let e = ConfigError::Invalid {
                file: "c.toml".to_string(),
                problems,
                syntax,
            };
            assert_eq!(e.to_string(), display);
            assert_eq!(e.summary().as_deref(), Some(summary));
        }
    }

    #[test]
    fn an_unreadable_file_has_no_problems_and_no_summary() {
        let e = ConfigError::Read {
            path: "/nope".into(),
            err: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(e.problems().is_empty() && e.summary().is_none());
        assert!(e.to_string().starts_with("cannot read config file /nope: "));
    }
}
