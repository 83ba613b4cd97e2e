//! A chat member: joining the room with its writer thread, assembling lines into messages for the
//! room, delivering an unfinished line after `chat_flush_ms`, and counting what the room sent it.

use std::net::{Shutdown, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use socket2::SockRef;

use crate::daemon::chat::{ChatLimits, Seat};
use crate::daemon::shared::worker_stack_bytes;
use crate::daemon::stats::Stats;
use crate::escape::push_chat_text;
use crate::logger;
use crate::proto::wire;
use crate::threads;

use super::{Conn, Input, Reason};

/// The kernel send buffer of a chat client (Linux doubles it). A fixed size bounds what a client
/// that stops reading can hold in the kernel, so that its writer blocks and the drop rule sees it
/// instead of the kernel buffering megabytes for it.
const CHAT_SNDBUF: usize = 64 * 1024;

/// The largest message one read's lines make before they go to the room (plus one line).
const CHAT_MSG_BYTES: usize = 16 * 1024;

/// A chat member's read buffer, on the heap: larger than `READ_BUF`, so that a member sending
/// fast gets its lines to the room in few reads and few appends (each read's lines are one
/// message), while an idle echo connection keeps its small stack.
const CHAT_READ_BUF: usize = 4096;

/// A chat client's seat and the line being assembled.
pub(super) struct ChatLine<'a> {
    pub(super) seat: Seat<'a>,
    pub(super) limits: ChatLimits,
    /// `[ip:port] `, which begins each of its lines as the others see them.
    pub(super) prefix: String,
    pub(super) line: Vec<u8>,
    /// The current line was too long and is being thrown away up to its newline.
    pub(super) skipping: bool,
    /// Bytes its writer has sent, and their count when the idle deadline last passed: a member
    /// the room talks to is not idle, even if it only reads.
    pub(super) written: Arc<AtomicU64>,
    pub(super) seen_written: u64,
    /// The current line was delivered without its newline after `server.chat_flush_ms` of
    /// silence: a newline that comes next ends it and is not an empty line of its own.
    pub(super) flushed: bool,
}

impl Conn<'_> {
    /// Chat mode: joins the room, starts this client's writer thread (the only one that writes
    /// to its socket from now on), serves, leaves. The seat is the membership: dropping it leaves
    /// the room, on every path, a panic included.
    #[inline(never)]
    pub(super) fn run_chat(&mut self, stream: &Arc<TcpStream>, small: &mut Input) -> Reason {
        let shared = self.shared;
        let mut buf = vec![0; CHAT_READ_BUF.max(small.data().len())];
        let end = small.take_into(&mut buf);
        let input = &mut Input {
            buf: &mut buf,
            start: 0,
            end,
        };
        // Best effort: without it the kernel buffers more for a client that does not read.
        let _ = SockRef::from(&**stream).set_send_buffer_size(CHAT_SNDBUF);
        let limits = ChatLimits {
            queue_bytes: self.cfg.server.chat_queue_bytes,
            drain_timeout: self.cfg.server.chat_drain_timeout,
        };
        let (mut seat, writer) = shared.room.join(self.peer, Arc::clone(stream), limits);
        let written = Arc::new(AtomicU64::new(0));
        self.live.count_chat_out(Arc::clone(&written));
        let stack = worker_stack_bytes(&self.cfg);
        let reason = thread::scope(|s| {
            let counter = Arc::clone(&written);
            let spawned = threads::spawn_scoped(
                s,
                Some("chat-writer".into()),
                Some(stack),
                Box::new(move || writer.run(&counter)),
            );
            if let Err(e) = spawned {
                seat.leave("server error");
                return Reason::Error(e);
            }
            self.chat = Some(ChatLine {
                seat,
                limits,
                prefix: format!("{} ", self.peer),
                line: Vec::new(),
                skipping: false,
                written: Arc::clone(&written),
                seen_written: 0,
                flushed: false,
            });
            let served = panic::catch_unwind(AssertUnwindSafe(|| self.run(input)));
            // Leave before the scope joins the writer: leaving is what ends the writer, once it
            // has sent what is still queued for this client alone.
            let chat = self.chat.take();
            let reason = match served {
                Ok(reason) => reason,
                Err(panic) => {
                    // Wake the writer too (it may be blocked on a full socket), then leave.
                    let _ = stream.shutdown(Shutdown::Both);
                    if let Some(mut chat) = chat {
                        chat.seat.leave("server error");
                    }
                    panic::resume_unwind(panic);
                }
            };
            let Some(mut chat) = chat else {
                return reason;
            };
            let reason = match chat.seat.dropped() {
                Some(why) => Reason::TooSlow(why),
                None => reason,
            };
            chat.seat.leave(&reason.to_string());
            reason
        });
        let written = written.load(Ordering::Relaxed);
        self.bytes_out += written;
        Stats::add(&self.shared.stats.bytes_out, written);
        reason
    }

    /// Chat: adds text to the current line; each completed line goes to everyone else as
    /// `[ip:port] line`. The lines completed by one read travel as few messages as
    /// `CHAT_MSG_BYTES` allows, so a sender's burst costs the room few entries. A line over
    /// `max_line_bytes` is refused to its sender and thrown away. Waits while the room's log is
    /// full or this sender holds its share of it.
    pub(super) fn chat_text(&mut self, text: &[u8]) {
        let max = self.cfg.server.max_line_bytes;
        let shared = self.shared;
        let Some(chat) = self.chat.as_mut() else {
            return;
        };
        let give_up = || shared.is_stopping();
        let mut out = String::with_capacity(CHAT_MSG_BYTES.min(2 * text.len() + 64));
        let mut too_long = false;
        for segment in text.split_inclusive(|&b| b == b'\n') {
            let ends_line = segment.last() == Some(&b'\n');
            let content = segment.strip_suffix(b"\n").unwrap_or(segment);
            // The newline of a line already delivered by the flush.
            if std::mem::take(&mut chat.flushed)
                && ends_line
                && chat.line.is_empty()
                && matches!(content, b"" | b"\r")
            {
                continue;
            }
            if chat.skipping {
                chat.skipping = !ends_line;
                continue;
            }
            // A CR that ends a CRLF line is not part of the line.
            let cr = ends_line
                && (content.last() == Some(&b'\r')
                    || (content.is_empty() && chat.line.last() == Some(&b'\r')));
            if chat.line.len() + content.len() > max + usize::from(cr) {
                chat.line = Vec::new();
                chat.skipping = !ends_line;
                too_long = true;
                continue;
            }
            chat.line.extend_from_slice(content);
            if ends_line {
                let line = std::mem::take(&mut chat.line);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if self.panic_line.as_deref() == Some(line) {
                    panic!("FERRYD_DEBUG_PANIC_LINE received");
                }
                out.push_str(&chat.prefix);
                push_chat_text(&mut out, line);
                out.push('\n');
                if out.len() >= CHAT_MSG_BYTES {
                    chat.seat.broadcast(out.as_bytes(), chat.limits, &give_up);
                    out.clear();
                }
            }
        }
        if !out.is_empty() {
            chat.seat.broadcast(out.as_bytes(), chat.limits, &give_up);
        }
        if too_long {
            logger::warn!(
                "{} chat line over server.max_line_bytes = {max}; refused",
                self.peer
            );
            self.say(wire::err_line_too_long(max).as_bytes());
        }
    }

    /// Chat: whether this member's writer sent it anything since the last time this was asked.
    pub(super) fn room_talked(&mut self) -> bool {
        let Some(chat) = self.chat.as_mut() else {
            return false;
        };
        let written = chat.written.load(Ordering::Relaxed);
        let talked = written != chat.seen_written;
        chat.seen_written = written;
        talked
    }

    /// Chat: how long to wait before delivering the unfinished line, if there is one.
    pub(super) fn chat_flush_after(&self) -> Option<Duration> {
        let chat = self.chat.as_ref()?;
        if chat.line.is_empty() || chat.skipping {
            return None;
        }
        match self.cfg.server.chat_flush_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Chat: delivers the unfinished line as a line (a client that writes without newlines, or
    /// the last line before the end of the stream).
    pub(super) fn flush_chat_line(&mut self) {
        let Some(chat) = self.chat.as_mut() else {
            return;
        };
        if chat.skipping || chat.line.is_empty() {
            return;
        }
        let line = std::mem::take(&mut chat.line);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        chat.flushed = true;
        let mut out = chat.prefix.clone();
        push_chat_text(&mut out, line);
        out.push('\n');
        let shared = self.shared;
        chat.seat
            .broadcast(out.as_bytes(), chat.limits, &|| shared.is_stopping());
    }
}
