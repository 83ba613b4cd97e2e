//! A frame's body as `files::upload` reads it: what is left in the input buffer, then reads
//! straight from the socket under the idle deadline and the minimum upload rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::files::holders::{Heard, Holder};
use crate::daemon::files::upload::{BodySource, Lost};
use crate::deadline::{Deadline, Why};

use super::read::ReadEnd;
use super::{Conn, Input};

/// The body of a frame: what is left in the input buffer, then reads from the socket straight
/// into a large buffer.
pub(super) struct ConnSource<'c, 'a, 'i> {
    pub(super) conn: &'c mut Conn<'a>,
    pub(super) input: &'c mut Input<'i>,
    /// `access.min_upload_bytes_per_sec` (0: no check), checked over windows of
    /// `access.upload_rate_window_secs`; a body read waits at most until the end of the window.
    pub(super) min_rate: u64,
    pub(super) window: Duration,
    pub(super) window_start: Instant,
    pub(super) window_bytes: u64,
    /// When body bytes last came, for `holders` (a newer upload of the same file may end this
    /// connection once it has gone quiet).
    pub(super) heard: Arc<Heard>,
}

impl<'c, 'a, 'i> ConnSource<'c, 'a, 'i> {
    /// The body source for a frame (or `NAME**SIZE` upload) starting now, under the snapshot's
    /// `access.min_upload_bytes_per_sec` and `access.upload_rate_window_secs`.
    pub(super) fn new(conn: &'c mut Conn<'a>, input: &'c mut Input<'i>) -> Self {
        let min_rate = conn.cfg.access.min_upload_bytes_per_sec;
        let window = conn.cfg.access.upload_rate_window;
        ConnSource {
            conn,
            input,
            min_rate,
            window,
            window_start: Instant::now(),
            window_bytes: 0,
            heard: Heard::now(),
        }
    }

    /// At the end of a rate window, checks the window's rate and starts the next one.
    pub(super) fn check_rate(&mut self) -> Result<(), Lost> {
        let elapsed = self.window_start.elapsed();
        if self.min_rate == 0 || elapsed < self.window {
            return Ok(());
        }
        if (self.window_bytes as f64) < self.min_rate as f64 * elapsed.as_secs_f64() {
            return Err(Lost::TooSlow { min: self.min_rate });
        }
        self.window_start = Instant::now();
        self.window_bytes = 0;
        Ok(())
    }
}

impl BodySource for ConnSource<'_, '_, '_> {
    fn read_into(&mut self, buf: &mut [u8]) -> Result<usize, Lost> {
        if !self.input.is_empty() {
            let n = self.input.take_into(buf);
            self.conn.live.add_upload(n as u64);
            return Ok(n);
        }
        loop {
            let mut deadline = self.conn.idle_deadline();
            if self.min_rate > 0 {
                // Wake up at the end of the window at the latest, so a stalled body is noticed.
                let window_end = Deadline {
                    at: self.window_start + self.window,
                    why: Why::RateWindow,
                };
                deadline = deadline.earliest(window_end);
            }
            match self.conn.read_by(buf, deadline) {
                Ok(n) => {
                    self.conn.live.add_upload(n as u64);
                    self.heard.touch();
                    self.window_bytes += n as u64;
                    self.check_rate()?;
                    return Ok(n);
                }
                Err(ReadEnd::Timeout(Why::RateWindow)) => self.check_rate()?,
                Err(ReadEnd::Eof) if self.conn.shared.is_stopping() => return Err(Lost::Shutdown),
                Err(ReadEnd::Eof) => return Err(Lost::Eof),
                Err(ReadEnd::Timeout(_)) => return Err(Lost::Timeout),
                Err(ReadEnd::Error(e)) => return Err(Lost::Error(e)),
            }
        }
    }

    fn tell(&mut self, line: &str) -> Result<(), Lost> {
        self.conn.say(line.as_bytes());
        // The body starts after the peer has read this: the rate window starts now.
        self.window_start = Instant::now();
        self.window_bytes = 0;
        self.heard.touch();
        Ok(())
    }

    fn holder(&self) -> Option<Holder> {
        // A second descriptor on the same socket: shutting it down ends this connection.
        let stream = self.conn.stream.try_clone().ok()?;
        Some(Holder {
            stream: Arc::new(stream),
            peer: self.conn.peer.to_string(),
            heard: Arc::clone(&self.heard),
        })
    }
}
