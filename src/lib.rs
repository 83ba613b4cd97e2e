//! ferryd as a library: everything but the `main` glue, so that integration tests, benchmarks
//! and the fuzz target can use the protocol code directly.

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod config;
pub mod conn;
pub mod escape;
pub mod filehash;
pub mod listener;
pub mod logger;
pub mod peer;
pub mod proto;
pub mod registry;
pub mod server;
pub mod stats;
pub mod store;
pub mod upload;
