//! The daemon: the accept loop and worker pool (`server`), one connection (`conn`), uploads into
//! the store, the chat room, the UDP echo, access counts, and the glue to systemd (activation,
//! notify, signals). Nothing in `proto`, `client` or the shared leaves imports from here.

pub mod access;
pub mod activation;
pub mod addrgroup;
pub mod bodyhash;
pub mod chat;
pub mod conn;
pub mod evict;
pub mod fdlimit;
pub mod hookreap;
pub mod hooks;
pub mod listener;
pub mod notify;
pub mod preflight;
pub mod ratelimit;
pub mod recent;
pub mod refusals;
pub mod registry;
pub mod resume;
pub mod server;
pub mod shared;
pub mod signals;
pub mod stats;
pub mod store;
pub mod streamhash;
pub mod subdir;
pub mod udp;
pub mod upload;
pub mod waiting;

use std::fmt;

use crate::config::{Config, Origin};
use notify::Notifier;
use preflight::PreflightError;
use server::{Server, ServerError};

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
