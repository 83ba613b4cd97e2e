//! The client side: `ferryd send` (hash, frame, send, read the answers) and `ferryd pack`, and
//! the multi-threaded file hashing and the progress line they use.

mod connection;
pub mod filehash;
mod options;
mod prepared;
mod progress;
mod retry;
mod send;
mod stdin;
mod walk;

pub use options::*;
pub use send::*;
