//! The client side: `ferryd send` (hash, frame, send, read the answers) and `ferryd pack`, and
//! the multi-threaded file hashing and the progress line they use.

mod connection;
mod ctl;
pub mod filehash;
mod options;
mod prepared;
mod progress;
mod retry;
mod send;
mod stdin;
mod walk;

pub use ctl::{CtlError, control_socket, ctl};
pub use options::*;
pub use send::*;
