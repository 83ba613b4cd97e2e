//! The server's machinery on the network side: the listening socket (`listener`) or the one
//! systemd passed (`activation`), the descriptor limit (`fdlimit`) and the UDP echo (`udp`).
//! Only `daemon::server` imports from here.

pub mod activation;
pub mod fdlimit;
pub mod listener;
pub mod udp;
