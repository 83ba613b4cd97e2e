//! The operator's lines to the room (`ferryd ctl say`): one entry in the log from nobody, which
//! every member sees, or a line in one member's private queue.

use std::time::Instant;

use crate::peer::Peer;

use super::{PRIVATE_BYTES, Room, msg};

impl Room {
    /// Posts `line` (whole, from `[server]`) to every member in the room, as the notices are
    /// posted: it never waits for room in the log (the control socket sends one at a time and
    /// bounds its length). Returns how many members it reaches.
    pub fn announce(&self, line: &[u8]) -> usize {
        let mut st = self.lock();
        let listening = st.members.values().filter(|m| m.listening).count();
        if listening > 0 {
            st.append(None, msg(line), Instant::now());
        }
        listening
    }

    /// Queues `line` for the member at `peer` alone, behind the server's other lines to it;
    /// false if no such member is in the room or it is not reading them.
    pub fn tell_peer(&self, peer: Peer, line: &[u8]) -> bool {
        let mut st = self.lock();
        let Some(m) = st
            .members
            .values_mut()
            .find(|m| m.peer == peer && m.listening)
        else {
            return false;
        };
        if m.writer_gone || (!m.private.is_empty() && m.private_bytes + line.len() > PRIVATE_BYTES)
        {
            return false;
        }
        m.private_bytes += line.len();
        m.private.push_back(msg(line));
        m.wake.notify_one();
        true
    }
}
