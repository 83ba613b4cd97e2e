//! ferryd's entry point: glue between the command line, the configuration, the logger, signals
//! and the server. Each command returns an exit code; nothing here does protocol work.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use ferryd::cli::{self, Command};
use ferryd::config::{self, ConfigError, Origin};
use ferryd::notify::Notifier;
use ferryd::server::Server;
use ferryd::{activation, client, logger, signals};

/// Exit codes (sysexits.h where one fits).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferryd: {e}\nTry 'ferryd --help'.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match command {
        Command::Help => {
            print!("{}", cli::HELP);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("ferryd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => check_config(config),
        Command::Send(opts) => send(&opts),
        Command::Pack { files } => pack(&files),
        Command::Run { config } => run(config),
    }
}

fn load(flag: Option<PathBuf>) -> Result<(Origin, config::Config), ConfigError> {
    let env = std::env::var_os("FERRYD_CONFIG").map(PathBuf::from);
    let origin = Origin::choose(flag, env);
    let config = config::load(&origin)?;
    Ok((origin, config))
}

fn check_config(flag: Option<PathBuf>) -> ExitCode {
    match load(flag) {
        Ok((origin, config)) => {
            println!(
                "# ferryd {}: effective configuration from {origin}",
                env!("CARGO_PKG_VERSION")
            );
            print!("{config}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferryd: config error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn send(opts: &client::SendOptions) -> ExitCode {
    match client::send(opts, &mut std::io::stdout()) {
        Ok(stored) if stored.iter().all(|&ok| ok) => ExitCode::SUCCESS,
        Ok(stored) => {
            let failed = stored.iter().filter(|&&ok| !ok).count();
            eprintln!("ferryd: {failed} of {} file(s) not stored", stored.len());
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            eprintln!("ferryd: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn pack(files: &[PathBuf]) -> ExitCode {
    match client::pack(files, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryd: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(flag: Option<PathBuf>) -> ExitCode {
    // Before any thread exists, so that every thread inherits it: SIGHUP is then only ever taken
    // by the reload thread.
    if let Err(e) = signals::block_sighup() {
        eprintln!("ferryd: cannot block SIGHUP: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let (origin, config) = match load(flag) {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("ferryd: config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logger::init(config.log.level, config.log.format);
    log::info!(
        "ferryd {} using config: {origin}",
        env!("CARGO_PKG_VERSION")
    );
    let activated = match activation::from_env() {
        Ok(a) => a,
        Err(e) => {
            log::error!("socket activation: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let server = match Server::bind(config, origin, activated, Notifier::from_env()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let (stop, reload) = (server.handle(), server.handle());
    if let Err(e) = signals::install(move || stop.stop(), move || reload.reload()) {
        log::error!("{e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
