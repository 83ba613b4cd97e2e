//! Files: one upload frame after its header (`upload`), its checksum (`bodyhash`, `streamhash`),
//! the upload directory (`store`) with its subdirectories (`subdir`) and resumable partials
//! (`resume`), and the `files.on_stored` hook (`hooks`). Nothing here knows about chat or about
//! how connections are accepted.

pub mod batch;
pub mod bodyhash;
pub mod holders;
pub mod hookreap;
pub mod hooks;
pub mod oneshot;
pub mod partials;
pub mod resume;
pub mod store;
pub mod streamhash;
pub mod subdir;
pub mod upload;
