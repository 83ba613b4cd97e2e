//! Where the configuration comes from: `--config`, `$FERRYD_CONFIG`, the system-wide file or
//! the built-in defaults, in that order; the first log line names the one used.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a configuration came from; the first log line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--config PATH`.
    Flag(PathBuf),
    /// `$FERRYD_CONFIG`.
    Env(PathBuf),
    /// `/etc/ferryd/config.toml`, found on disk.
    System(PathBuf),
    /// No file: the built-in defaults.
    Builtin,
}

/// The system-wide configuration path tried when neither `--config` nor `$FERRYD_CONFIG` is given.
pub const SYSTEM_PATH: &str = "/etc/ferryd/config.toml";

impl Origin {
    /// Picks the configuration source: `flag`, else `env` (the value of `$FERRYD_CONFIG`), else
    /// `/etc/ferryd/config.toml` if it exists, else the built-in defaults.
    pub fn choose(flag: Option<PathBuf>, env: Option<PathBuf>) -> Origin {
        if let Some(p) = flag {
            return Origin::Flag(p);
        }
        if let Some(p) = env.filter(|p| !p.as_os_str().is_empty()) {
            return Origin::Env(p);
        }
        let system = Path::new(SYSTEM_PATH);
        if system.exists() {
            return Origin::System(system.to_path_buf());
        }
        Origin::Builtin
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            Origin::Flag(p) | Origin::Env(p) | Origin::System(p) => Some(p),
            Origin::Builtin => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(p) => write!(f, "{} (from --config)", p.display()),
            Origin::Env(p) => write!(f, "{} (from $FERRYD_CONFIG)", p.display()),
            Origin::System(p) => write!(f, "{}", p.display()),
            Origin::Builtin => write!(
                f,
                "built-in defaults (same as the shipped config/config.toml)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_prefers_flag_then_env() {
        let flag = Origin::choose(Some("a.toml".into()), Some("b.toml".into()));
        assert_eq!(flag, Origin::Flag("a.toml".into()));
        let env = Origin::choose(None, Some("b.toml".into()));
        assert_eq!(env, Origin::Env("b.toml".into()));
    }
}
