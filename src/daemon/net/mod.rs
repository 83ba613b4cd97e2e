//! The server's machinery on the network side: the listening socket (`listener`) or the one
//! systemd passed (`activation`), the accept thread (`accept`), the work queue (`queue`, its
//! policy in `lanes`), the worker threads (`pool`), refusals without blocking (`refuse`), the descriptor limit (`fdlimit`) and the UDP
//! echo (`udp`). Only `daemon::server` imports from here.

pub mod accept;
pub mod activation;
pub mod fdlimit;
pub mod lanes;
pub mod listener;
pub mod pool;
pub mod queue;
pub mod recent;
pub mod refuse;
pub mod udp;
