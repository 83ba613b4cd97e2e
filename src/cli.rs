//! The command line: which command to run and with what, parsed with `lexopt`.

use std::ffi::OsString;
use std::path::PathBuf;

/// The usage text shown by `--help`.
pub const HELP: &str = "\
ferryd — a small TCP daemon that echoes text and stores uploaded files

Usage:
  ferryd [--config PATH]                 run the daemon
  ferryd check-config [--config PATH]    validate a config and print the effective settings
  ferryd --help | --version

Options:
  -c, --config PATH   config file; without it: $FERRYD_CONFIG, else /etc/ferryd/config.toml
                      if it exists, else the built-in defaults (127.0.0.1:7878, echo)
  -h, --help          print this help
  -V, --version       print the version

Exit codes: 0 success, 1 runtime failure (e.g. the port is taken), 64 bad command line,
78 bad configuration, 130 a second SIGINT/SIGTERM during shutdown.
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon.
    Run {
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print it.
    CheckConfig {
        config: Option<PathBuf>,
    },
    Help,
    Version,
}

/// Parses the arguments after the program name.
pub fn parse<I>(args: I) -> Result<Command, lexopt::Error>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let mut parser = lexopt::Parser::from_args(args);
    let mut subcommand: Option<String> = None;
    let mut config = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') | Long("config") => config = Some(PathBuf::from(parser.value()?)),
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Value(v) if subcommand.is_none() => {
                let name = v.string()?;
                match name.as_str() {
                    "check-config" | "run" => subcommand = Some(name),
                    _ => {
                        return Err(format!(
                            "unknown command '{name}' (commands: run, check-config; see --help)"
                        )
                        .into());
                    }
                }
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(match subcommand.as_deref() {
        Some("check-config") => Command::CheckConfig { config },
        _ => Command::Run { config },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(args: &[&str]) -> Command {
        parse(args.iter().copied()).unwrap()
    }

    #[test]
    fn commands() {
        assert_eq!(ok(&[]), Command::Run { config: None });
        assert_eq!(
            ok(&["--config", "a.toml"]),
            Command::Run {
                config: Some("a.toml".into())
            }
        );
        assert_eq!(
            ok(&["check-config", "-c", "b.toml"]),
            Command::CheckConfig {
                config: Some("b.toml".into())
            }
        );
        assert_eq!(
            ok(&["--config=c.toml", "run"]),
            Command::Run {
                config: Some("c.toml".into())
            }
        );
        assert_eq!(ok(&["--help"]), Command::Help);
        assert_eq!(ok(&["-V"]), Command::Version);
    }

    #[test]
    fn errors() {
        for args in [
            &["--nope"][..],
            &["frobnicate"],
            &["--config"],
            &["run", "extra"],
        ] {
            assert!(parse(args.iter().copied()).is_err(), "{args:?}");
        }
    }
}
