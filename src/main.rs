//! ferryd's entry point: glue between the command line, the configuration, the logger, signals
//! and the server. Each command returns an exit code; nothing here does protocol work.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use ferryd::cli::{self, Command};
use ferryd::config::{self, ConfigError, Origin};
use ferryd::server::Server;
use ferryd::{client, logger};

/// Exit codes (sysexits.h where one fits).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;
const EXIT_SECOND_SIGNAL: i32 = 130;

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
    let (origin, config) = match load(flag) {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("ferryd: config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logger::init(config.log.level);
    log::info!(
        "ferryd {} using config: {origin}",
        env!("CARGO_PKG_VERSION")
    );
    let server = match Server::bind(config) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let handle = server.stop_handle();
    let installed = ctrlc::set_handler(move || {
        if !handle.stop() {
            log::warn!("second signal during shutdown: exiting now");
            std::process::exit(EXIT_SECOND_SIGNAL);
        }
    });
    if let Err(e) = installed {
        log::error!("cannot install the SIGINT/SIGTERM handler: {e}");
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
