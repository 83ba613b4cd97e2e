//! ferryd as a library: everything but the `main` glue, so that integration tests, benchmarks
//! and the fuzz target can use the protocol code directly.

// One `unsafe` line exists, in `activation` (claiming a descriptor systemd passed), allowed there.
#![deny(unsafe_code)]

pub mod access;
pub mod activation;
pub mod auth;
pub mod chat;
pub mod cli;
pub mod client;
pub mod config;
pub mod conn;
pub mod escape;
pub mod filehash;
pub mod listener;
pub mod logger;
pub mod notify;
pub mod peer;
pub mod proto;
pub mod ratelimit;
pub mod registry;
pub mod reload;
pub mod server;
pub mod signals;
pub mod stats;
pub mod store;
pub mod streamhash;
pub mod udp;
pub mod upload;
