//! ferryd's entry point: glue between the command line, the configuration, the logger, signals
//! and the server. Each command returns an exit code; nothing here does protocol work.

#![forbid(unsafe_code)]
// No function over 100 lines (clippy.toml sets the threshold).
#![warn(clippy::too_many_lines)]

use std::fmt::Display;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use ferryd::{Command, Config, ConfigError, Origin, PackOptions, PreflightError, SendOptions};

/// Exit codes (sysexits.h where one fits).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let command = match ferryd::parse_args(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            say(format_args!("{e}\nTry 'ferryd --help'."));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match command {
        Command::Help => print_out(ferryd::HELP),
        Command::Version => print_out(&format!("ferryd {}\n", env!("CARGO_PKG_VERSION"))),
        Command::CheckConfig { config, quiet } => check_config(config, quiet),
        Command::Send(opts) => send(&opts),
        Command::Pack(opts) => pack(&opts),
        Command::Ctl { socket, request } => ctl(socket, &request),
        Command::Run { config } => run(config),
    }
}

fn load(flag: Option<PathBuf>) -> Result<(Origin, Config), ConfigError> {
    let env = std::env::var_os("FERRYD_CONFIG").map(PathBuf::from);
    let origin = Origin::choose(flag, env);
    let config = ferryd::load_config(&origin)?;
    Ok((origin, config))
}

/// Writes `text` to stderr as `ferryd: text`. A closed or broken stderr loses the line, nothing
/// else (`eprintln!` would panic).
fn say(text: impl Display) {
    let _ = writeln!(io::stderr().lock(), "ferryd: {text}");
}

/// Reports a configuration that cannot be used, one line per problem and then how many there
/// are (as rustc does), and gives exit code 78.
fn config_error(e: &ConfigError) -> ExitCode {
    if e.problems().is_empty() {
        say(format_args!("config error: {e}"));
    }
    for problem in e.problems() {
        say(format_args!("config error: {problem}"));
    }
    if let Some(summary) = e.summary() {
        say(summary);
    }
    ExitCode::from(EXIT_CONFIG)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Writes `text` to stdout. A reader that stopped reading (`ferryd check-config | head -1`) is
/// not a failure: what it wanted it got. Any other write error is (exit 1).
fn print_out(text: &str) -> ExitCode {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            say(format_args!("cannot write to stdout: {e}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Parses the file and runs the daemon's own start-up checks on what it names (key file, upload
/// directory, addresses): what passes here passes at start, and what fails exits 78 in both.
fn check_config(flag: Option<PathBuf>, quiet: bool) -> ExitCode {
    let (origin, config) = match load(flag) {
        Ok(pair) => pair,
        Err(e) => return config_error(&e),
    };
    if let Err(e) = ferryd::preflight(&config) {
        let all = match &e {
            PreflightError::Several(all) => all.iter().collect(),
            one => vec![one],
        };
        for e in &all {
            say(format_args!("config error: {origin}: {e}"));
        }
        let n = all.len();
        say(format_args!("{n} error{} in {origin}", plural(n)));
        return ExitCode::from(EXIT_CONFIG);
    }
    if quiet {
        return ExitCode::SUCCESS;
    }
    print_out(&format!(
        "# ferryd {}: effective configuration from {origin}\n{config}",
        env!("CARGO_PKG_VERSION")
    ))
}

fn send(opts: &SendOptions) -> ExitCode {
    match ferryd::send(opts, &mut std::io::stdout()) {
        Ok(stored) if stored.iter().all(|&ok| ok) => ExitCode::SUCCESS,
        Ok(stored) => {
            let failed = stored.iter().filter(|&&ok| !ok).count();
            say(format_args!(
                "{failed} of {} file(s) not stored",
                stored.len()
            ));
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            say(e);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn pack(opts: &PackOptions) -> ExitCode {
    match ferryd::pack(opts, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(e);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn ctl(socket: Option<PathBuf>, request: &str) -> ExitCode {
    let path = ferryd::control_socket(socket);
    match ferryd::ctl(&path, request, &mut io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format_args!("ctl: {e}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(flag: Option<PathBuf>) -> ExitCode {
    if let Err(e) = ferryd::block_reload_signal() {
        say(e);
        return ExitCode::from(EXIT_FAILURE);
    }
    let (origin, config) = match load(flag) {
        Ok(pair) => pair,
        Err(e) => return config_error(&e),
    };
    ferryd::init_logger(config.log.level, config.log.format);
    log::info!(
        "ferryd {} using config: {origin}",
        env!("CARGO_PKG_VERSION")
    );
    match ferryd::serve(config, origin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(if e.is_config() {
                EXIT_CONFIG
            } else {
                EXIT_FAILURE
            })
        }
    }
}
