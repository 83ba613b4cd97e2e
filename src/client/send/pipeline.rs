//! `send`'s window of frames in flight: files not sent resumable (under `RESUME_MIN`, and
//! standard input) go out one after another without waiting for each answer, up to
//! `WINDOW_FRAMES` frames and `WINDOW_BYTES` body bytes unanswered. The server answers frames in
//! the order they came, so each answer belongs to the oldest frame in flight. When the connection
//! ends (an `ERR` that closes it, a cut, no answer in time), every frame it has not answered
//! counts as not stored and is sent again on the next connection, behind the one the retry
//! policy (`settle`) decides about.

use std::collections::VecDeque;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use super::{Run, Settled, Tries, report};
use crate::client::connection::{Sent, answer_wait};
use crate::client::options::ClientError;
use crate::client::prepared::Prepared;
use crate::proto::wire::{Answer, Code, parse_answer};

/// The most frames sent and not yet answered: enough for the server to commit them in batches
/// (its `files::batch::MAX_FILES` is 64) while the next ones arrive.
pub(super) const WINDOW_FRAMES: usize = 128;
/// The most body bytes sent and not yet answered (one larger frame may go alone).
pub(super) const WINDOW_BYTES: u64 = 8 << 20;
/// After a write failed: how long to wait for each answer still due (the server's reason).
const BROKEN_WAIT: Duration = Duration::from_secs(2);

/// A file on its way, with the tries it took.
pub(super) struct Job {
    idx: usize,
    prepared: Prepared,
    tries: Tries,
}

/// The files `send` pipelines: those to send and those in flight.
#[derive(Default)]
pub(super) struct Window {
    /// Files to send, in order: new ones, and those a lost connection did not answer.
    queued: VecDeque<Job>,
    /// Frames sent and not yet answered, oldest first.
    flying: VecDeque<Job>,
    /// Their body bytes.
    bytes: u64,
    /// A write on this connection failed: only the answers still due are taken.
    broken: bool,
    /// The last answer was an `ERR` that closes the connection when it comes before the body
    /// and keeps it after (`exists`, `io`): if the connection ends next, it ended with that
    /// answer, and the frames behind it were never read.
    maybe_closed: bool,
}

impl Window {
    /// Whether the next queued frame may go now.
    fn has_room(&self) -> bool {
        let next = self.queued.front().map_or(0, |j| j.prepared.header.size);
        self.flying.len() < WINDOW_FRAMES
            && (self.flying.is_empty() || self.bytes + next <= WINDOW_BYTES)
    }
}

impl Run<'_> {
    /// Queues a file for the window, sends what fits and takes the answers already here (or
    /// waits for one when the window is full).
    pub(super) fn pipelined(&mut self, idx: usize, prepared: Prepared) -> Result<(), ClientError> {
        self.window.queued.push_back(Job {
            idx,
            prepared,
            tries: Tries::default(),
        });
        self.pump(false)
    }

    /// Sends and takes answers until every file given to the window is settled.
    pub(super) fn drain(&mut self) -> Result<(), ClientError> {
        self.pump(true)
    }

    /// Sends what fits, then takes answers: those already here, and one more with waiting when
    /// the window is full, a write failed, or `all` files are to be settled.
    fn pump(&mut self, all: bool) -> Result<(), ClientError> {
        loop {
            while !self.window.broken && self.window.has_room() {
                let Some(job) = self.window.queued.pop_front() else {
                    break;
                };
                self.launch(job)?;
            }
            if self.window.flying.is_empty() {
                if self.window.broken {
                    self.lose_connection();
                }
                if self.window.queued.is_empty() {
                    return Ok(());
                }
                continue;
            }
            let wait = all || self.window.broken || !self.window.has_room();
            if !self.take_answer(wait) && !wait {
                return Ok(());
            }
        }
    }

    /// Sends one file's frame on the connection (opened if need be) and puts it in flight.
    fn launch(&mut self, mut job: Job) -> Result<(), ClientError> {
        if let Err(e) = job.prepared.load_for_window() {
            let why = format!("cannot read the file: {e}");
            self.results[job.idx] = report(self.out, &job.prepared.path, false, why);
            return Ok(());
        }
        let connected = self.connected;
        let conn = match self.connection() {
            Ok(c) => c,
            // A server reached before and unreachable now: a cut like any other.
            Err(e) if connected && e.is_connect() => {
                self.settle_job(job, Sent::cut(e.to_string()));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if conn.spoke_first() {
            // The server answered before the first frame (`ERR busy`): this file was not sent.
            let line = conn
                .next_line(Duration::ZERO)
                .unwrap_or_else(|_| Err(std::io::ErrorKind::UnexpectedEof.into()));
            let sent = conn.conclude(line, false);
            if !sent.keep {
                self.conn = None;
            }
            self.settle_job(job, sent);
            return Ok(());
        }
        let written = conn.send_frame(&mut job.prepared);
        self.window.bytes += job.prepared.header.size;
        self.window.flying.push_back(job);
        if written.is_err() {
            // The answers still due say why (e.g. a refusal that closed the connection).
            self.window.broken = true;
        }
        Ok(())
    }

    /// Takes the answer to the oldest frame in flight (waiting for it if `wait`) and settles
    /// that file; whether one was taken.
    fn take_answer(&mut self, wait: bool) -> bool {
        let limit = if self.window.broken {
            BROKEN_WAIT
        } else {
            answer_wait(self.opts.timeout)
        };
        let Some(conn) = self.conn.as_mut() else {
            self.lose_connection();
            return true;
        };
        let line = match conn.next_line(if wait { limit } else { Duration::ZERO }) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) if !wait => return false,
            Err(RecvTimeoutError::Timeout) => {
                let why = format!("no answer from the server within {} s", limit.as_secs());
                self.answered(Sent::cut(why));
                return true;
            }
            Err(RecvTimeoutError::Disconnected) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        };
        if line.is_err() && self.window.maybe_closed {
            // Closed after that answer: nothing behind it was read, nothing is lost.
            self.lose_connection();
            return true;
        }
        self.window.maybe_closed = match &line {
            Ok(l) => parse_answer(l).is_some_and(|a| match a {
                Answer::Err { code, .. } => Code::parse(&code)
                    .is_some_and(|c| c.keeps_connection(true) && !c.keeps_connection(false)),
                Answer::Ok { .. } => false,
            }),
            Err(_) => false,
        };
        // Whether an `exists` or `io` came after the whole body cannot be told here: the
        // connection is taken to go on, and if it did not, the next frames find it closed.
        let sent = conn.conclude(line, true);
        self.answered(sent);
        true
    }

    /// The oldest frame in flight got `sent`: settles it, and when the connection is over,
    /// queues every other frame in flight to be sent again.
    fn answered(&mut self, sent: Sent) {
        let Some(mut job) = self.window.flying.pop_front() else {
            return;
        };
        self.window.bytes = self.window.bytes.saturating_sub(job.prepared.header.size);
        if !sent.keep {
            self.lose_connection();
        }
        let path = job.prepared.path.clone();
        match self.settle(&path, sent, &mut job.tries) {
            Settled::Done(ok) => self.results[job.idx] = ok,
            Settled::Again => self.window.queued.push_front(job),
        }
    }

    /// Settles a file that was not put in flight.
    fn settle_job(&mut self, mut job: Job, sent: Sent) {
        let path = job.prepared.path.clone();
        match self.settle(&path, sent, &mut job.tries) {
            Settled::Done(ok) => self.results[job.idx] = ok,
            Settled::Again => self.window.queued.push_front(job),
        }
    }

    /// The connection is over: the frames it did not answer were not stored, and go first on
    /// the next one, in their order.
    fn lose_connection(&mut self) {
        self.conn = None;
        self.window.broken = false;
        self.window.maybe_closed = false;
        self.window.bytes = 0;
        while let Some(job) = self.window.flying.pop_back() {
            self.window.queued.push_front(job);
        }
    }
}
