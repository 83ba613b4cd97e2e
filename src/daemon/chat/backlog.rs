//! The room's log, under the room's lock: the fair-share check before a sender appends, appending
//! (and waking the members' writers), trimming what every member has taken, the drop rule for a
//! member that stopped draining, and the notices it posts.

use std::net::{IpAddr, Shutdown};
use std::time::{Duration, Instant};

use crate::daemon::access::addrgroup;
use crate::logger;
use crate::proto::wire;

use super::notices::Notice;
use super::{Entry, Msg, State, msg};

impl State {
    pub(super) fn next_seq(&self) -> u64 {
        self.first_seq + self.log.len() as u64
    }

    /// Whether a message of `len` bytes from a sender whose address group has `in_log` bytes in
    /// the log may be appended now: the log has space for it (an empty log takes any message),
    /// and the group stays within its fair share, the log's bytes divided by the groups with
    /// bytes in it (its own included); a group with nothing in the log may always add one.
    pub(super) fn fits(&self, len: usize, in_log: usize, queue_bytes: usize) -> bool {
        if self.log_bytes == 0 {
            return true;
        }
        if self.log_bytes + len > queue_bytes {
            return false;
        }
        let senders = self.n_senders + usize::from(in_log == 0);
        in_log == 0 || in_log + len <= queue_bytes / senders.max(1)
    }

    pub(super) fn append(&mut self, from: Option<u64>, message: Msg, now: Instant) {
        let len = message.len();
        let next = self.next_seq();
        let mut sender_was_oldest = false;
        if let Some(m) = from.and_then(|id| self.members.get_mut(&id)) {
            let group = self
                .group_bytes
                .entry(addrgroup::of(m.peer.ip()))
                .or_insert(0);
            if *group == 0 {
                self.n_senders += 1;
            }
            *group += len as u64;
            m.in_log += len;
            // A sender that has taken everything skips its own line at once: otherwise its
            // writer, which is not woken for it, would hold the log back until it looks again.
            if m.cursor == next {
                m.cursor = next + 1;
                sender_was_oldest = self.first_seq == next;
            }
        }
        self.log_bytes += len;
        self.log.push_back(Entry {
            from,
            msg: message,
            at: now,
        });
        if sender_was_oldest {
            self.trim();
        }
        for (&id, m) in self.members.iter_mut() {
            if m.waiting && m.listening && Some(id) != from {
                m.waiting = false;
                m.wake.notify_one();
            }
        }
    }

    /// Removes the entries every listening member has taken; true if there were any.
    pub(super) fn trim(&mut self) -> bool {
        let before = self.first_seq;
        let min = self
            .members
            .values()
            .filter(|m| m.listening)
            .map(|m| m.cursor)
            .min()
            .unwrap_or_else(|| self.next_seq());
        while self.first_seq < min {
            let Some(e) = self.log.pop_front() else {
                break;
            };
            self.first_seq += 1;
            self.log_bytes -= e.msg.len();
            if let Some(m) = e.from.and_then(|id| self.members.get_mut(&id)) {
                m.in_log -= e.msg.len();
                let ip = m.peer.ip();
                self.group_sent(ip, e.msg.len());
            }
        }
        self.first_seq != before
    }

    /// The drop rule, applied while a sender waits: a listening member that holds the oldest
    /// entry and has taken nothing since that entry arrived or for `drain_timeout`, whichever is
    /// later, is dropped. True if one was.
    pub(super) fn drop_stalled(&mut self, now: Instant, drain_timeout: Duration) -> bool {
        let Some(oldest) = self.log.front() else {
            return false;
        };
        let (first, oldest_at, waiting_bytes) = (self.first_seq, oldest.at, self.log_bytes);
        let stalled: Vec<u64> = self
            .members
            .iter()
            .filter(|(_, m)| {
                m.listening
                    && m.cursor == first
                    && now.saturating_duration_since(m.last_take.max(oldest_at)) >= drain_timeout
            })
            .map(|(&id, _)| id)
            .collect();
        let secs = drain_timeout.as_secs();
        let mut any = false;
        for id in stalled {
            any |= self.drop_member(
                id,
                format!(
                    "not reading: took nothing for {secs} s while {waiting_bytes} B waited for it (server.chat_drain_timeout_secs)"
                ),
            );
        }
        any
    }

    /// Takes a listening member out of the room for `why`; true if it was in.
    pub(super) fn drop_member(&mut self, id: u64, why: String) -> bool {
        let Some(m) = self.members.get_mut(&id) else {
            return false;
        };
        if !m.listening {
            return false;
        }
        m.listening = false;
        m.wake.notify_one();
        // Wakes both of its threads: the writer blocked on a full socket, the reader.
        let _ = m.stream.shutdown(Shutdown::Both);
        let peer = m.peer;
        logger::warn!("{peer} dropped from the chat: {why}");
        m.dropped = Some(why);
        m.announced = true;
        self.notice(
            Instant::now(),
            Notice::Left,
            wire::chat_left(&peer, &"too slow: not reading"),
        );
        self.trim();
        true
    }

    /// Removes a member whose seat and writer are both gone.
    pub(super) fn forget(&mut self, id: u64) {
        if let Some(m) = self.members.remove(&id) {
            // Its lines still in the log no longer count against its group.
            self.group_sent(m.peer.ip(), m.in_log);
        }
    }

    /// `len` bytes a member from `ip` had in the log left it (or stopped counting).
    fn group_sent(&mut self, ip: IpAddr, len: usize) {
        let group = addrgroup::of(ip);
        let Some(bytes) = self.group_bytes.get_mut(&group) else {
            return;
        };
        *bytes = bytes.saturating_sub(len as u64);
        if *bytes == 0 {
            self.group_bytes.remove(&group);
            self.n_senders -= 1;
        }
    }

    /// Posts a join or leave notice, or counts it when this window has shown its share.
    pub(super) fn notice(&mut self, now: Instant, kind: Notice, text: String) {
        self.flush_notices(now);
        if self.notices.admit(now, kind) {
            self.append(None, msg(text.as_bytes()), now);
        }
    }

    /// Posts the summary of the notices counted in a finished window.
    pub(super) fn flush_notices(&mut self, now: Instant) {
        if let Some(summary) = self.notices.summary(now) {
            self.append(None, msg(summary.as_bytes()), now);
        }
    }
}
