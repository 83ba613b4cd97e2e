//! Frames and their answers: the `NAME**SIZE` head that may open a connection, a frame's head
//! (limits, key and tag), handing the body to `files::upload`, answering its outcome, and
//! refusing a frame (answer, then drain before closing).

use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::files::upload::{self, Check, Lost, Outcome};
use crate::daemon::stats::Stats;
use crate::deadline::{Deadline, Why};
use crate::escape::{escaped, push_chat_text};
use crate::logger;
use crate::proto::header::MAX_NAME_LEN;
use crate::proto::wire;
use crate::proto::{Code, FrameError, FrameHead, Parsed};

use super::body::ConnSource;
use super::{Conn, Input, Reason};

/// The buffer that drains a refused peer's bytes (on the stack only while refusing).
const DRAIN_BUF: usize = 4096;

/// After refusing a frame, how long and how much of the unread body is read and dropped before
/// closing, so that the peer gets the `ERR` line instead of a connection reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 8 << 20;

impl Conn<'_> {
    /// Handles the frame that starts at the beginning of `input`: header, name, body, answer.
    /// `Ok` means the connection goes on.
    // Not inlined, so that its buffers and the upload's frames take stack only while it runs,
    // never under a worker that waits for an idle peer's next line.
    #[inline(never)]
    pub(super) fn frame(&mut self, input: &mut Input) -> Result<(), Reason> {
        // From here to the answer, the connection must not be chosen to make room.
        if !self.place.busy() {
            return Err(self.evicted());
        }
        self.frames += 1;
        let max_files = self.cfg.access.max_files_per_connection;
        if self.frames > max_files {
            logger::warn!(
                "{} refused: more than access.max_files_per_connection = {max_files} files",
                self.peer
            );
            let why =
                format!("this connection has carried {max_files} files, the limit; reconnect");
            return Err(self.refuse(&wire::err_line(Code::TooManyFiles, &why)));
        }
        // The header, name and tag must all arrive within header_timeout_secs of the first byte.
        let header_deadline = Deadline::after(self.cfg.access.header_timeout, Why::Header);
        let mut name_buf = [0u8; MAX_NAME_LEN as usize];
        let (header, raw_header, name_len, tag, resumable) = loop {
            match FrameHead::parse(input.data()) {
                Ok(Parsed::Complete(head)) => {
                    let name = &mut name_buf[..head.name.len()];
                    name.copy_from_slice(head.name);
                    let parts = (
                        head.header,
                        head.raw_header,
                        head.name.len(),
                        head.tag,
                        head.resumable(),
                    );
                    input.consume(head.len);
                    break parts;
                }
                Ok(Parsed::Partial) => {
                    let deadline = self.idle_deadline().earliest(header_deadline);
                    self.fill_more(input, deadline)?;
                }
                Err(e) => {
                    logger::warn!("{} bad frame header: {e}", self.peer);
                    return Err(self.refuse(&wire::err_line(code_for(e), &e)));
                }
            }
        };
        let name = &name_buf[..name_len];
        if let Some(auth) = self.auth.as_mut() {
            let Some(tag) = tag else {
                return Err(
                    self.unauthorized("this server needs an upload key (ferryd send --key-file)")
                );
            };
            if !auth
                .key
                .verify_upload(&auth.nonce, auth.seq, &raw_header, name, &tag)
            {
                return Err(
                    self.unauthorized("the tag does not match this frame, connection and key")
                );
            }
            auth.seq += 1;
        }
        // A trailing checksum comes with a second tag when the frame needed a key.
        let trailer_key = match (&self.auth, tag) {
            (Some(a), Some(tag)) if header.trailing => Some((Arc::clone(&a.key), tag)),
            _ => None,
        };
        let shared = self.shared;
        let peer = self.peer;
        self.live
            .begin_upload(escaped(name, 255).to_string(), header.size);
        let store = self.store;
        let mut source = ConnSource::new(self, input);
        let received = upload::receive_verified(
            store,
            Check::Frame {
                header: &header,
                trailer_auth: trailer_key.as_ref().map(|(key, tag)| upload::TrailerAuth {
                    key,
                    first_tag: *tag,
                }),
                resumable,
            },
            name,
            &mut source,
            shared.hash_pool(),
            &peer,
        );
        match received {
            Ok(file) => {
                // Answered once it is durable, with the files that come right after it.
                self.live.end_upload();
                self.batch.push(file);
                if self.batch.is_full() {
                    self.commit_batch();
                }
                Ok(())
            }
            Err(outcome) => self.answer_upload(outcome),
        }
    }

    /// Commits the files waiting in the batch together and answers each, in order (`OK`, or
    /// the `ERR` of a file that could not be stored, which keeps the connection).
    pub(super) fn commit_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        for committed in self.batch.commit(&self.peer) {
            self.answer_kept(committed.into());
        }
    }

    /// Counts an upload's outcome, announces a stored file to the chat room, and answers it
    /// (after the answers of the files waiting in the batch); `Ok` means the connection goes on.
    pub(super) fn answer_upload(&mut self, outcome: Outcome) -> Result<(), Reason> {
        self.live.end_upload();
        if matches!(outcome, Outcome::Lost(_)) && self.live.kicked_by().is_some() {
            Stats::add(&self.shared.stats.files_failed, 1);
            return Err(self.kicked());
        }
        self.commit_batch();
        if outcome.keeps_connection() {
            self.answer_kept(outcome);
            return Ok(());
        }
        Stats::add(&self.shared.stats.files_failed, 1);
        let line = outcome.answer();
        Err(match outcome {
            Outcome::Lost(Lost::Shutdown) => {
                self.say(line.as_bytes());
                Reason::Shutdown
            }
            Outcome::Lost(Lost::Timeout) => {
                self.say(line.as_bytes());
                Reason::Idle
            }
            Outcome::Lost(Lost::TooSlow { min }) => {
                self.say(line.as_bytes());
                Reason::Protocol(format!("body slower than {min} B/s"))
            }
            Outcome::Lost(Lost::Error(e)) => Reason::Error(e),
            Outcome::Lost(Lost::Eof) => {
                // The peer may have only half-closed (e.g. `nc -N`): tell it.
                self.say(line.as_bytes());
                Reason::Protocol("end of stream in the middle of a file".into())
            }
            _ => self.refuse(&line),
        })
    }

    /// Answers an outcome after which the connection goes on: counts it, announces a stored
    /// file to the chat room, sends the line, then queues the file's hook.
    fn answer_kept(&mut self, outcome: Outcome) {
        let shared = self.shared;
        let peer = self.peer;
        let Outcome::Stored {
            stored_name,
            size,
            checksum,
        } = &outcome
        else {
            Stats::add(&shared.stats.files_failed, 1);
            self.say_now(outcome.answer().as_bytes());
            return;
        };
        Stats::add(&shared.stats.files_stored, 1);
        if let Some(chat) = &self.chat {
            let mut shown = String::new();
            push_chat_text(&mut shown, stored_name.as_bytes());
            let notice = wire::chat_uploaded(&peer, &shown, *size);
            chat.seat
                .broadcast(notice.as_bytes(), chat.limits, &|| shared.is_stopping());
        }
        self.say_now(outcome.answer().as_bytes());
        // After the answer, so a hook never delays the client.
        let snapshot = &self.snapshot;
        shared.hooks.stored(
            &snapshot.config,
            snapshot.store.dir(),
            stored_name,
            *size,
            checksum,
            peer.addr(),
        );
    }

    /// Answers a refused frame and prepares to close: the rest of its bytes cannot be told apart
    /// from text, so the connection ends. The unread bytes are drained for a moment first, since
    /// closing a socket with unread input sends a reset that could destroy the answer.
    // Not inlined, so that its drain buffer takes stack only while it runs, never under a
    // worker that waits for an idle peer's next line.
    #[inline(never)]
    pub(super) fn refuse(&mut self, line: &str) -> Reason {
        self.say(line.as_bytes());
        let reason = Reason::Refused(line.trim_end().to_string());
        match self.chat.as_mut() {
            // Chat: the writer sends the answer (and what is queued for this client alone), then
            // shuts the sending side.
            Some(chat) => chat.seat.leave(&reason.to_string()),
            None => {
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        let deadline = Deadline::after(LINGER_TIME, Why::Linger);
        let mut scratch = [0u8; DRAIN_BUF];
        let mut drained = 0u64;
        while drained < LINGER_BYTES {
            match self.read_by(&mut scratch, deadline) {
                Ok(n) => drained += n as u64,
                Err(_) => break,
            }
        }
        reason
    }
}

pub(super) fn code_for(e: FrameError) -> Code {
    match e {
        FrameError::Magic => Code::BadMagic,
        FrameError::Version(_) => Code::BadVersion,
        FrameError::Flags(_) | FrameError::TrailingChecksum => Code::BadHeader,
        FrameError::NameLength(_) => Code::BadName,
    }
}
