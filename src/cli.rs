//! The command line: which command to run and with what, parsed with `lexopt`.

use std::ffi::OsString;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use crate::client::{DEFAULT_RETRIES, Form, PackOptions, SendOptions};
use crate::proto::Algo;
use crate::proto::control::{MAX_REQUEST, Request};

/// The usage text shown by `--help`.
pub const HELP: &str = "\
ferryd — a small TCP daemon that echoes text and stores uploaded files

Usage:
  ferryd [--config PATH]                 run the daemon
  ferryd check-config [--quiet] [--config PATH]
                                         validate a config (and the key file, upload directory
                                         and addresses it names) and print the effective settings
  ferryd send --to HOST:PORT [--timeout SECS] [--key-file PATH] [--hash ALGO]
              [--checksum PLACE] [--name NAME] [--retry N] [-r] FILE|DIR...
                                         upload files over one connection, one answer per file;
                                         files of 1 MiB or more are resumable: sending one again
                                         after a cut continues where it stopped, and send
                                         does so itself (--retry)
  ferryd pack [--hash ALGO] [--name NAME] FILE...
                                         write the same frames to stdout, for netcat:
                                           ferryd pack photo.jpg | nc -N 127.0.0.1 7878
  FILE may be - for standard input (with --name): tar c dir | ferryd send --name dir.tar --to … -
  ferryd ctl [--socket PATH] COMMAND    talk to a running daemon's control socket:
    list [--json]                        every connection: peer, state, age, bytes in and out,
                                         the file arriving (bytes so far of its size, rate)
    say [--to PEER] TEXT                 a line \"[server] TEXT\" to every echo client and the
                                         chat room, or to the one connection PEER
    kick PEER                            end PEER's connection (it gets \"ERR kicked …\")
    stats                                the counters behind STATUS= and the summary line
    udp HOST:PORT TEXT                   a datagram from the daemon's UDP socket
  ferryd --help | --version

Options:
  -c, --config PATH   config file; without it: $FERRYD_CONFIG, else /etc/ferryd/config.toml
                      if it exists, else the built-in defaults (127.0.0.1:7878, echo)
  -q, --quiet         (check-config) print nothing when the config is valid
      --to HOST:PORT  (send) the server to upload to
      --timeout SECS  (send) connect timeout, and how long a stalled write may block; default 5
      --key-file PATH (send) the shared upload key, for servers with files.token_file
  -r, --recursive     (send) send each DIR whole: every regular file under it, named by its
                      path from DIR's parent (photos/2024/a.jpg); symlinks and special files
                      are skipped with a note; the server needs files.allow_subdirs = true
      --hash ALGO     (send, pack) the checksum: blake3 (default) or sha256
      --checksum PLACE
                      (send) trailing (default: after the body, hashed while sending) or
                      header (before the body, hashed first); either way files of 1 MiB
                      or more are sent resumable
      --name NAME     (send, pack) send the one FILE under NAME; needed for -
      --retry N       (send) after a cut (or ERR busy, a stall, a server restarting) reconnect
                      and send the file again, resuming it, up to N times per file, pausing
                      0.5 s, 1 s, 2 s, 4 s, then 8 s; the count restarts when a try gets
                      further; 0 turns it off; default 8
      --socket PATH   (ctl) the control socket; without it: $FERRYD_CONTROL, else
                      /run/ferryd/control.sock (control.socket in the systemd units)
      --json          (ctl list) one JSON object instead of columns
  -h, --help          print this help
  -V, --version       print the version

Exit codes: 0 success, 1 runtime failure (the port is taken; a file was not stored),
64 bad command line, 78 bad configuration, 130 a second SIGINT/SIGTERM during shutdown.
";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon.
    Run {
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print it (unless `quiet`).
    CheckConfig {
        config: Option<PathBuf>,
        quiet: bool,
    },
    /// Upload files to a server.
    Send(SendOptions),
    /// Write file frames to stdout.
    Pack(PackOptions),
    /// Send one request line to a daemon's control socket.
    Ctl {
        socket: Option<PathBuf>,
        request: String,
    },
    Help,
    Version,
}

/// Parses the arguments after the program name: reads them, checks that each flag belongs to
/// the command, and builds the command.
pub fn parse<I>(args: I) -> Result<Command, lexopt::Error>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    match Args::read(args)? {
        ControlFlow::Break(command) => Ok(command),
        ControlFlow::Continue(args) => {
            args.check()?;
            args.command()
        }
    }
}

/// The arguments as given, before they make a command.
#[derive(Default)]
struct Args {
    subcommand: Option<String>,
    config: Option<PathBuf>,
    to: Option<String>,
    timeout: Option<Duration>,
    key_file: Option<PathBuf>,
    recursive: bool,
    hash: Option<Algo>,
    checksum: Option<bool>,
    name: Option<String>,
    retries: Option<u32>,
    quiet: bool,
    files: Vec<PathBuf>,
}

impl Args {
    /// Reads every argument; `--help` and `--version` end the reading with their command.
    fn read<I>(args: I) -> Result<ControlFlow<Command, Args>, lexopt::Error>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        use lexopt::prelude::*;

        let mut parser = lexopt::Parser::from_args(args);
        let mut a = Args::default();
        while let Some(arg) = parser.next()? {
            match arg {
                Short('c') | Long("config") => a.config = Some(PathBuf::from(parser.value()?)),
                Long("to") => a.to = Some(parse_to(&parser.value()?.string()?)?),
                Short('q') | Long("quiet") => a.quiet = true,
                Long("timeout") => a.timeout = Some(parse_timeout(&parser.value()?.string()?)?),
                Long("key-file") => a.key_file = Some(PathBuf::from(parser.value()?)),
                Short('r') | Long("recursive") => a.recursive = true,
                Long("hash") => a.hash = Some(parse_hash(&parser.value()?.string()?)?),
                Long("checksum") => a.checksum = Some(parse_place(&parser.value()?.string()?)?),
                Long("name") => a.name = Some(parser.value()?.string()?),
                Long("retry") => a.retries = Some(parse_retries(&parser.value()?.string()?)?),
                Short('h') | Long("help") => return Ok(ControlFlow::Break(Command::Help)),
                Short('V') | Long("version") => return Ok(ControlFlow::Break(Command::Version)),
                Value(v) if a.subcommand.is_none() && v == "ctl" => {
                    if a.has_flags() {
                        return Err("options before 'ctl' do not apply to it".into());
                    }
                    return ctl(&mut parser).map(ControlFlow::Break);
                }
                Value(v) if a.subcommand.is_none() => {
                    let name = v.string()?;
                    match name.as_str() {
                        "run" | "check-config" | "send" | "pack" => a.subcommand = Some(name),
                        _ => {
                            return Err(format!(
                                "unknown command '{name}' (commands: run, check-config, send, pack, ctl; see --help)"
                            )
                            .into());
                        }
                    }
                }
                // `-` alone is a value (standard input), not an option.
                Value(v) if matches!(a.subcommand.as_deref(), Some("send" | "pack")) => {
                    a.files.push(PathBuf::from(v));
                }
                _ => return Err(arg.unexpected()),
            }
        }
        Ok(ControlFlow::Continue(a))
    }

    fn has_flags(&self) -> bool {
        self.config.is_some()
            || self.to.is_some()
            || self.timeout.is_some()
            || self.key_file.is_some()
            || self.recursive
            || self.hash.is_some()
            || self.checksum.is_some()
            || self.name.is_some()
            || self.quiet
    }

    fn sub(&self) -> &str {
        self.subcommand.as_deref().unwrap_or("run")
    }

    /// Every flag given belongs to the command, and `--name` and `-` have what they need.
    fn check(&self) -> Result<(), lexopt::Error> {
        let sub = self.sub();
        let misplaced = [
            (
                "--config",
                self.config.is_some(),
                matches!(sub, "run" | "check-config"),
            ),
            ("--to", self.to.is_some(), sub == "send"),
            ("--timeout", self.timeout.is_some(), sub == "send"),
            ("--key-file", self.key_file.is_some(), sub == "send"),
            ("-r", self.recursive, sub == "send"),
            (
                "--hash",
                self.hash.is_some(),
                matches!(sub, "send" | "pack"),
            ),
            ("--checksum", self.checksum.is_some(), sub == "send"),
            ("--retry", self.retries.is_some(), sub == "send"),
            (
                "--name",
                self.name.is_some(),
                matches!(sub, "send" | "pack"),
            ),
            ("--quiet", self.quiet, sub == "check-config"),
        ];
        if let Some((flag, ..)) = misplaced
            .iter()
            .find(|(_, used, allowed)| *used && !*allowed)
        {
            return Err(format!("{flag} does not apply to '{sub}'").into());
        }
        if matches!(sub, "send" | "pack") {
            if self.name.is_some() && self.files.len() != 1 {
                return Err("--name needs exactly one FILE".into());
            }
            if self.name.is_none() && self.files.iter().any(|f| f.as_os_str() == "-") {
                return Err("- (standard input) needs --name NAME".into());
            }
        }
        Ok(())
    }

    /// The command the checked arguments make.
    fn command(self) -> Result<Command, lexopt::Error> {
        let sub = self.sub().to_string();
        let sub = sub.as_str();
        let Args {
            config,
            to,
            timeout,
            key_file,
            recursive,
            hash,
            checksum,
            name,
            retries,
            quiet,
            files,
            ..
        } = self;
        let form = Form {
            algo: hash.unwrap_or_default(),
            // `send` hashes while sending; `pack` keeps the header checksum, which any receiver
            // of its output can check before reading the body.
            trailing: sub == "send" && checksum.unwrap_or(true),
            name,
            // `send` makes large files resumable, with the checksum in either place.
            resume: sub == "send",
        };
        Ok(match sub {
            "check-config" => Command::CheckConfig { config, quiet },
            "send" => {
                let to = to.ok_or("send needs --to HOST:PORT")?;
                if files.is_empty() {
                    return Err("send needs at least one FILE".into());
                }
                let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
                Command::Send(SendOptions {
                    to,
                    timeout,
                    files,
                    key_file,
                    recursive,
                    form,
                    retries: retries.unwrap_or(DEFAULT_RETRIES),
                })
            }
            "pack" if files.is_empty() => return Err("pack needs at least one FILE".into()),
            "pack" => Command::Pack(PackOptions { files, form }),
            _ => Command::Run { config },
        })
    }
}

/// `ctl`'s arguments: `--socket PATH` (or `--socket=PATH`), then the request's words, joined
/// by spaces into one line and checked here, so that a mistyped request never reaches the daemon.
fn ctl(parser: &mut lexopt::Parser) -> Result<Command, lexopt::Error> {
    let mut words = Vec::new();
    for arg in parser.raw_args()? {
        words.push(
            arg.into_string()
                .map_err(|a| format!("ctl: not UTF-8: {}", a.to_string_lossy()))?,
        );
    }
    let mut socket = None;
    match words.first().map(String::as_str) {
        Some("--socket") if words.len() >= 2 => {
            socket = Some(PathBuf::from(words.remove(1)));
            words.remove(0);
        }
        Some("--socket") => return Err("--socket needs a PATH".into()),
        Some(w) if w.starts_with("--socket=") => {
            socket = Some(PathBuf::from(&w["--socket=".len()..]));
            words.remove(0);
        }
        _ => {}
    }
    let request = words.join(" ");
    if request.contains(['\n', '\r']) {
        return Err("ctl: the request must be one line".into());
    }
    if request.len() >= MAX_REQUEST {
        return Err(format!("ctl: request over {MAX_REQUEST} bytes").into());
    }
    Request::parse(request.as_bytes()).map_err(|e| format!("ctl: {e}"))?;
    Ok(Command::Ctl { socket, request })
}

/// `--retry N`: a count, 0 for none.
fn parse_retries(s: &str) -> Result<u32, lexopt::Error> {
    s.parse()
        .map_err(|_| format!("--retry {s}: expected a number of retries (0 turns them off)").into())
}

fn parse_hash(s: &str) -> Result<Algo, lexopt::Error> {
    match s {
        "blake3" => Ok(Algo::Blake3),
        "sha256" => Ok(Algo::Sha256),
        _ => Err(format!("--hash {s}: expected blake3 or sha256").into()),
    }
}

/// `--checksum`: true for trailing.
fn parse_place(s: &str) -> Result<bool, lexopt::Error> {
    match s {
        "trailing" => Ok(true),
        "header" => Ok(false),
        _ => Err(format!("--checksum {s}: expected trailing or header").into()),
    }
}

/// `HOST:PORT` or `[IPv6]:PORT` with a port in 1–65535; the name is resolved when connecting.
fn parse_to(s: &str) -> Result<String, lexopt::Error> {
    let bad = || -> lexopt::Error {
        format!("--to {s}: expected HOST:PORT, e.g. 127.0.0.1:7878 or [::1]:7878").into()
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let bare_v6 = host.contains(':') && !(host.starts_with('[') && host.ends_with(']'));
    if host.is_empty() || bare_v6 || !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
        return Err(bad());
    }
    Ok(s.to_string())
}

fn parse_timeout(s: &str) -> Result<Duration, lexopt::Error> {
    match decimal_nanos(s) {
        Some(nanos) if nanos > 0 && nanos <= MAX_TIMEOUT_NANOS => Ok(Duration::from_nanos(nanos)),
        _ => Err(format!("--timeout {s}: expected seconds, more than 0 and at most 3600").into()),
    }
}

/// The longest `--timeout`, 3600 s, in nanoseconds.
const MAX_TIMEOUT_NANOS: u64 = 3_600_000_000_000;

/// A non-negative decimal number of seconds as whole nanoseconds (the rest cut off), in the
/// forms a float literal takes (`5`, `0.25`, `.5`, `5.`, `1e3`, `2.5E-1`, an optional `+`); None
/// if it is not one, and `u64::MAX` for anything at or over 10^10 s. By hand rather than
/// `str::parse::<f64>`, whose decimal-to-binary tables cost ~14 KiB of the binary (issue 24).
fn decimal_nanos(s: &str) -> Option<u64> {
    let s = s.strip_prefix('+').unwrap_or(s);
    let (number, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], parse_exponent(&s[i + 1..])?),
        None => (s, 0),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if int.len() + frac.len() == 0 || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    // The significant digits, and how many of them stand before the decimal point.
    let digits = format!("{int}{frac}");
    let lead = digits.len() - digits.trim_start_matches('0').len();
    let digits = &digits[lead..];
    let before_point = int.len() as i64 - lead as i64 + exp;
    if digits.is_empty() {
        return Some(0);
    }
    if before_point > 10 {
        return Some(u64::MAX);
    }
    // Digits down to the nanosecond, padded with zeros.
    let keep = before_point + 9;
    if keep <= 0 {
        return Some(0);
    }
    let keep = keep as usize;
    let mut nanos: u64 = 0;
    for i in 0..keep {
        let d = digits.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
        nanos = nanos * 10 + d;
    }
    // Past the nanosecond, only whether anything is left matters: 3600.0000000001 is over.
    let rest = digits.get(keep..).unwrap_or("");
    Some(
        if nanos == MAX_TIMEOUT_NANOS && rest.bytes().any(|b| b != b'0') {
            nanos + 1
        } else {
            nanos
        },
    )
}

/// An exponent (`-3`, `+2`, `12`), saturating far beyond any useful value.
fn parse_exponent(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = digits
        .bytes()
        .fold(0i64, |n, b| (n * 10 + i64::from(b - b'0')).min(1 << 40));
    Some(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(args: &[&str]) -> Command {
        parse(args.iter().copied()).unwrap()
    }

    #[test]
    fn commands() {
        let cases: [(&[&str], Command); 7] = [
            (&[], Command::Run { config: None }),
            (
                &["--config", "a.toml"],
                Command::Run {
                    config: Some("a.toml".into()),
                },
            ),
            (
                &["check-config", "-c", "b.toml"],
                Command::CheckConfig {
                    config: Some("b.toml".into()),
                    quiet: false,
                },
            ),
            (
                &["check-config", "--quiet"],
                Command::CheckConfig {
                    config: None,
                    quiet: true,
                },
            ),
            (
                &["--config=c.toml", "run"],
                Command::Run {
                    config: Some("c.toml".into()),
                },
            ),
            (&["--help"], Command::Help),
            (&["-V"], Command::Version),
        ];
        for (args, want) in cases {
            assert_eq!(ok(args), want, "{args:?}");
        }
    }

    #[test]
    fn send_and_pack() {
        let default_send = Form {
            trailing: true,
            resume: true,
            ..Form::default()
        };
        let explicit_trailing = default_send.clone();
        let send = |to: &str, ms: u64, files: &[&str], form: &Form, recursive: bool| {
            Command::Send(SendOptions {
                to: to.into(),
                timeout: Duration::from_millis(ms),
                files: files.iter().map(PathBuf::from).collect(),
                key_file: None,
                form: form.clone(),
                recursive,
                retries: DEFAULT_RETRIES,
            })
        };
        let with_retries = |command: Command, retries: u32| match command {
            Command::Send(opts) => Command::Send(SendOptions { retries, ..opts }),
            other => other,
        };
        let sha_header_named = Form {
            algo: Algo::Sha256,
            trailing: false,
            name: Some("d.tar".into()),
            resume: true,
        };
        let cases: [(&[&str], Command); 9] = [
            (
                &["send", "--to", "h:1", "a", "b"],
                send("h:1", 5000, &["a", "b"], &default_send, false),
            ),
            (
                &["send", "--retry", "0", "--to", "h:1", "a"],
                with_retries(send("h:1", 5000, &["a"], &default_send, false), 0),
            ),
            (
                &["send", "--to", "h:1", "--retry=20", "a"],
                with_retries(send("h:1", 5000, &["a"], &default_send, false), 20),
            ),
            (
                &["send", "a", "--timeout", "0.5", "--to=h:2"],
                send("h:2", 500, &["a"], &default_send, false),
            ),
            (
                &["send", "-r", "--to", "h:1", "dir"],
                send("h:1", 5000, &["dir"], &default_send, true),
            ),
            (
                &[
                    "send",
                    "--to",
                    "h:1",
                    "--hash",
                    "sha256",
                    "--checksum",
                    "header",
                    "--name",
                    "d.tar",
                    "-",
                ],
                send("h:1", 5000, &["-"], &sha_header_named, false),
            ),
            (
                &[
                    "send",
                    "--to",
                    "h:1",
                    "--hash=blake3",
                    "--checksum=trailing",
                    "a",
                ],
                send("h:1", 5000, &["a"], &explicit_trailing, false),
            ),
            (
                &["pack", "x"],
                Command::Pack(PackOptions {
                    files: vec!["x".into()],
                    form: Form::default(),
                }),
            ),
            (
                &["pack", "--hash", "sha256", "--name", "d.tar", "-"],
                Command::Pack(PackOptions {
                    files: vec!["-".into()],
                    form: Form {
                        trailing: false,
                        resume: false,
                        ..sha_header_named.clone()
                    },
                }),
            ),
        ];
        for (args, want) in cases {
            assert_eq!(ok(args), want, "{args:?}");
        }
    }

    #[test]
    fn errors() {
        let cases: [&[&str]; 31] = [
            &["pack", "-r", "d"],
            &["pack", "--retry", "2", "a"],
            &["send", "--to", "h:1", "--retry", "-1", "a"],
            &["send", "--to", "h:1", "--retry", "many", "a"],
            &["send", "--to", "h:1", "-"],
            &["pack", "-"],
            &["send", "--to", "h:1", "--name", "x", "a", "b"],
            &["send", "--to", "h:1", "--hash", "md5", "a"],
            &["send", "--to", "h:1", "--checksum", "front", "a"],
            &["pack", "--checksum", "trailing", "a"],
            &["check-config", "--hash", "sha256"],
            &["--nope"],
            &["frobnicate"],
            &["--config"],
            &["run", "extra"],
            &["send", "a"],
            &["send", "--to", "h:1"],
            &["send", "--to", "h:1", "--timeout", "0", "a"],
            &["send", "--to", "h:1", "--timeout", "abc", "a"],
            &["pack"],
            &["pack", "--to", "h:1", "a"],
            &["send", "--config", "c", "--to", "h:1", "a"],
            &["--to", "h:1"],
            &["check-config", "x"],
            &["--quiet"],
            &["send", "--to", "127.0.0.1", "a"],
            &["send", "--to", "127.0.0.1:", "a"],
            &["send", "--to", ":7878", "a"],
            &["send", "--to", "::1", "a"],
            &["send", "--to", "h:0", "a"],
            &["send", "--to", "h:65536", "a"],
        ];
        for args in cases {
            assert!(parse(args.iter().copied()).is_err(), "{args:?}");
        }
    }

    /// The hand-written `--timeout` parser takes and refuses what `f64` parsing did, with the
    /// same duration to the nanosecond (f64 rounding aside).
    #[test]
    fn timeouts_parse_as_f64_did() {
        let cases = [
            "5",
            "0.5",
            ".5",
            "5.",
            "+2",
            "1e3",
            "1E3",
            "2.5e-1",
            "3600",
            "3600.0",
            "3600.000000001",
            "3601",
            "0",
            "0.0",
            "-1",
            "-0",
            "0.000000001",
            "1e-9",
            "1e-10",
            "0.0000000001",
            "1e4",
            "36e2",
            "360000e-2",
            "0036.00",
            "1e99999999999",
            "1e-99999999",
            "abc",
            "",
            ".",
            "e3",
            "1e",
            "1e+",
            "1.2.3",
            "1 ",
            " 1",
            "inf",
            "NaN",
            "infinity",
            "++1",
            "1_0",
            "0x10",
            "12.345678912345",
            "0.1",
            "0.3",
            "7.25",
        ];
        for case in cases {
            let old = match case.parse::<f64>() {
                Ok(secs) if secs > 0.0 && secs <= 3600.0 => Some(Duration::from_secs_f64(secs)),
                _ => None,
            };
            let new = parse_timeout(case).ok();
            match (old, new) {
                (Some(a), Some(b)) => assert!(
                    a.abs_diff(b) <= Duration::from_nanos(1),
                    "{case:?}: {a:?} by f64, {b:?} by hand"
                ),
                // A positive value under a nanosecond was a zero timeout; it is refused now.
                (Some(a), None) => assert!(a.is_zero(), "{case:?}: refused, f64 gave {a:?}"),
                (None, b) => assert_eq!(b, None, "{case:?}"),
            }
        }
        // Past f64's precision the number itself counts: f64 rounded this one down to 3600.
        assert!(parse_timeout("3600.0000000000001").is_err());
        assert_eq!(
            parse_timeout("3600.0000000000000").ok(),
            Some(Duration::from_secs(3600))
        );
    }
}
