//! The text loop: splits the incoming stream into text and file frames (`proto::text_len`), times
//! unfinished lines (`line_timeout_secs`), and sends text where it goes: the `AUTH` gate while
//! text is locked, the chat room for a member, or straight back (echo).

use std::time::Instant;

use crate::deadline::{Deadline, Why};
use crate::escape::escaped;
use crate::logger;
use crate::proto;

use super::{Conn, Input, LOG_WIDTH, Reason};

impl Conn<'_> {
    /// Text and frames until the connection ends; the files still waiting in the batch are
    /// committed and answered then (a peer that only half-closed still reads the answers).
    pub(super) fn run(&mut self, input: &mut Input) -> Reason {
        let reason = self.run_input(input);
        self.commit_batch();
        reason
    }

    fn run_input(&mut self, input: &mut Input) -> Reason {
        // A NAME**SIZE head can only open a connection: not after an AUTH line whose following
        // bytes wait in `input` (and those must not be dropped). `first_line` is the limit of
        // the line the connection's first byte began, which a slow head counts toward.
        let mut first_line = None;
        if input.is_empty() {
            // Waiting for the first bytes: a silent peer may be chosen to make room.
            self.waiting_on_peer(Instant::now());
            match self.starstar(input) {
                Ok(deadline) => first_line = deadline,
                Err(reason) => return reason,
            }
        }
        // The minimum progress for text lines. In chat mode with chat_flush_ms an unfinished
        // line is delivered after a pause, so there is no unfinished line to time.
        let line_rule = self.chat.is_none() || self.cfg.server.chat_flush_ms == 0;
        // Whether the next byte begins a message (so a frame may start there).
        let mut at_message_start = true;
        // When the last line (or frame) ended: how long the peer has kept us waiting.
        let mut last_line = Instant::now();
        // While a text line is incomplete: when it must be complete (`line_timeout_secs`).
        let mut line_deadline: Option<Deadline> = None;
        loop {
            if input.is_empty() {
                // Answered before the connection may be chosen to make room while it waits.
                self.commit_unless_busy();
                self.waiting_on_peer(last_line);
                if let Err(reason) = self.fill(input, line_deadline) {
                    return reason;
                }
                // Chosen to make room while the peer's bytes were still arriving (shutting the
                // read side lets queued bytes through first): end now.
                if self.place.is_evicted() {
                    return self.evicted();
                }
            }
            let data = input.data();
            let n = proto::text_len(data, at_message_start);
            if n == 0 {
                if let Err(reason) = self.frame(input) {
                    return reason;
                }
                at_message_start = true;
                last_line = Instant::now();
                line_deadline = None;
                continue;
            }
            // While text is locked, the AUTH line is taken on its own: what follows it is text
            // for the mode (or a frame) once it has unlocked.
            let n = match data[..n].iter().position(|&b| b == b'\n') {
                Some(i) if self.text_locked => i + 1,
                _ => n,
            };
            let text = &data[..n];
            let was_start = at_message_start;
            at_message_start = text[n - 1] == b'\n';
            if at_message_start {
                last_line = Instant::now();
                line_deadline = None;
                first_line = None;
            } else if line_rule && (was_start || text.contains(&b'\n')) {
                // A new line began in these bytes and is not complete yet: its limit counts from
                // its first byte, which came before these if the opening head was slow.
                let limit = self.cfg.server.line_timeout;
                let began = first_line.take().filter(|_| !text.contains(&b'\n'));
                line_deadline = Some(began.unwrap_or_else(|| Deadline::after(limit, Why::Line)));
            }
            // Text goes nowhere before the answers to the frames that came before it.
            self.commit_batch();
            logger::debug!("{} req {}", self.peer, escaped(text, LOG_WIDTH));
            if self.text_locked {
                if let Err(reason) = self.auth_text(text) {
                    return reason;
                }
            } else if self.chat.is_some() {
                self.chat_text(text);
            } else {
                // A peer that does not take the echo may be chosen to make room meanwhile.
                if !self.place.writing() {
                    return self.evicted();
                }
                if let Err(e) = self.write_all(text) {
                    if self.place.is_evicted() {
                        return Reason::Evicted;
                    }
                    return Reason::Error(e);
                }
                logger::debug!("{} resp {}", self.peer, escaped(text, LOG_WIDTH));
            }
            input.consume(n);
        }
    }
}
