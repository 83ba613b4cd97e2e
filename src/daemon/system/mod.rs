//! The daemon's dealings with the system around it: the checks before serving (`preflight`),
//! systemd notifications (`notify`) and signals (`signals`). Imports nothing else from the daemon.

pub mod notify;
pub mod preflight;
pub mod signals;
