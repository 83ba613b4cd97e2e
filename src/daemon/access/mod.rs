//! Who may get in and who must make room: the per-address connection count (`per_ip`), per-address
//! token buckets (`ratelimit`), the rate-limited log of refusals (`refusals`) and the choice of a
//! served connection to end when every worker is busy (`evict`). Imports nothing else from the
//! daemon.

pub mod addrgroup;
pub mod evict;
pub mod per_ip;
pub mod ratelimit;
pub mod refusals;
