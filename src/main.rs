//! ferryd's entry point: glue between the command line, the configuration, the logger, signals
//! and the server. Each command returns an exit code; nothing here does protocol work.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use ferryd::{Command, Config, ConfigError, Origin, PackOptions, SendOptions};

/// Exit codes (sysexits.h where one fits).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let command = match ferryd::parse_args(std::env::args_os().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferryd: {e}\nTry 'ferryd --help'.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match command {
        Command::Help => {
            print!("{}", ferryd::HELP);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("ferryd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => check_config(config),
        Command::Send(opts) => send(&opts),
        Command::Pack(opts) => pack(&opts),
        Command::Run { config } => run(config),
    }
}

fn load(flag: Option<PathBuf>) -> Result<(Origin, Config), ConfigError> {
    let env = std::env::var_os("FERRYD_CONFIG").map(PathBuf::from);
    let origin = Origin::choose(flag, env);
    let config = ferryd::load_config(&origin)?;
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

fn send(opts: &SendOptions) -> ExitCode {
    match ferryd::send(opts, &mut std::io::stdout()) {
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

fn pack(opts: &PackOptions) -> ExitCode {
    match ferryd::pack(opts, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryd: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(flag: Option<PathBuf>) -> ExitCode {
    if let Err(e) = ferryd::block_reload_signal() {
        eprintln!("ferryd: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let (origin, config) = match load(flag) {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("ferryd: config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
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
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
