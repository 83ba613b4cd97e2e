//! The client side: `ferryd send` (hash, frame, send, read the answers) and `ferryd pack`, and
//! the multi-threaded file hashing they use.

pub mod filehash;
mod send;
mod stdin;
mod walk;

pub use send::*;
