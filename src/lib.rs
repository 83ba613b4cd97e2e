//! ferryd as a library: everything but the `main` glue, so that integration tests, benchmarks
//! and the fuzz target can use the protocol code directly.
//!
//! The folders show the architecture: `proto` is the pure wire format, `daemon` the server,
//! `client` the sending side; the files at this level are leaves both sides share.

// One `unsafe` line exists, in `daemon::activation` (claiming a descriptor systemd passed),
// allowed there.
#![deny(unsafe_code)]
// No function over 100 lines (clippy.toml sets the threshold).
#![warn(clippy::too_many_lines)]

// The protocol library: public, for clients in Rust, the tests and the fuzz target.
pub mod auth;
pub mod proto;

mod cli;
mod client;
mod config;
mod cpus;
mod daemon;
mod deadline;
mod escape;
mod hookargs;
mod logger;
mod peer;
mod rules;
mod threads;

// The reload plan lives with the key declarations it is derived from.
use config::reload;

// What `main` needs; everything else is private, so the compiler reports what nothing uses.
pub use cli::{Command, HELP, parse as parse_args};
pub use client::{CtlError, Form, PackOptions, SendOptions, control_socket, ctl, pack, send};
pub use config::{Config, ConfigError, Origin, load as load_config};
pub use daemon::system::preflight::PreflightError;
pub use daemon::{DaemonError, block_reload_signal, preflight, serve};
pub use logger::init as init_logger;
