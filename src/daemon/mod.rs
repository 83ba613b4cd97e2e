//! The daemon: `server` binds and runs it, from start to shutdown and reload. Its folders group
//! what works together: `net` (listener, activation, accept thread, work queue, workers, UDP),
//! `conn` (one connection, one file per role), `files` (uploads, the store, hashes, resume,
//! hooks), `chat` (the room), `access` (per-address counts, rate limits, refusal log, eviction)
//! and `system` (preflight, notify, signals). The files at this level are the state they share.
//! Nothing in `proto`, `client` or the shared leaves imports from here.

pub mod access;
pub mod chat;
pub mod conn;
pub mod control;
pub mod files;
pub mod net;
pub mod registry;
pub mod server;
pub mod shared;
pub mod stats;
pub mod system;

use std::fmt;

use crate::config::{Config, Origin};
use net::activation;
use server::{Server, ServerError};
use system::notify::Notifier;
use system::preflight::{self, PreflightError};
use system::signals;

/// Why the daemon could not start, or stopped with an error.
#[derive(Debug)]
pub enum DaemonError {
    /// SIGHUP could not be blocked before the threads start.
    Signals(String),
    /// The sockets systemd passed cannot be used.
    Activation(activation::ActivationError),
    /// The configuration names a key, a directory or an address that cannot be used.
    Config(PreflightError),
    /// Binding, the upload directory, the key or a thread.
    Server(ServerError),
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::Signals(e) => f.write_str(e),
            DaemonError::Activation(e) => write!(f, "socket activation: {e}"),
            DaemonError::Config(e) => write!(f, "config error: {e}"),
            DaemonError::Server(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DaemonError {}

impl DaemonError {
    /// Whether the configuration is at fault (exit code 78), not the running system.
    pub fn is_config(&self) -> bool {
        matches!(self, DaemonError::Config(_))
    }
}

/// The checks the daemon makes on a configuration before it serves (`check-config` runs them):
/// the key file, the upload directory, the listening addresses.
pub fn preflight(config: &Config) -> Result<(), PreflightError> {
    preflight::check(config, true)
}

/// Blocks SIGHUP in the calling thread. Call before any other thread exists (the config is read
/// after it), so that every thread inherits the mask and only the reload thread takes SIGHUP.
pub fn block_reload_signal() -> Result<(), DaemonError> {
    signals::block_sighup().map_err(|e| DaemonError::Signals(format!("cannot block SIGHUP: {e}")))
}

/// Runs the daemon on `config` until SIGINT/SIGTERM: takes the sockets systemd passed (or binds
/// its own), opens the store, installs the signal handlers and serves.
pub fn serve(config: Config, origin: Origin) -> Result<(), DaemonError> {
    let activated = activation::from_env().map_err(DaemonError::Activation)?;
    preflight::check(&config, activated.is_none()).map_err(DaemonError::Config)?;
    let server = Server::bind(config, origin, activated, Notifier::from_env())
        .map_err(DaemonError::Server)?;
    let (stop, reload) = (server.handle(), server.handle());
    signals::install(move || stop.stop(), move || reload.reload()).map_err(DaemonError::Signals)?;
    server.run().map_err(DaemonError::Server)
}
