//! The `AUTH` gate: the connection's nonce, and, with `access.require_token`, the `AUTH` line (or
//! a frame with a good tag) that must come before any text reaches anything.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::{self, Key, NONCE_LEN};
use crate::daemon::access::refusals;
use crate::deadline::{Deadline, Why};
use crate::escape::escaped;
use crate::logger;
use crate::proto::wire::{self, OK_AUTH};
use crate::proto::{self, Code};

use super::{Conn, Input, LOG_WIDTH, Reason};

/// Longest `AUTH` line accepted.
const MAX_AUTH_LINE: usize = 256;

pub(super) struct Auth {
    pub(super) key: Arc<Key>,
    pub(super) nonce: [u8; NONCE_LEN],
    pub(super) seq: u64,
}

impl Conn<'_> {
    /// Draws this connection's nonce and sends it, before anything else, so that a client can
    /// read it as the first line.
    #[inline(never)]
    pub(super) fn send_nonce(&mut self) -> Result<(), Reason> {
        let Some(auth) = self.auth.as_mut() else {
            return Ok(());
        };
        match auth::new_nonce() {
            Ok(nonce) => auth.nonce = nonce,
            Err(e) => {
                logger::error!("{} no random nonce: {e}; closing", self.peer);
                return Err(Reason::Error(e));
            }
        }
        let line = wire::nonce_line(&auth.nonce);
        self.say(line.as_bytes());
        Ok(())
    }

    /// `access.require_token`: before the client's text goes anywhere (echoed, or into the chat
    /// room, where it would see the members, the notices and the messages), the client must
    /// prove the key within `access.auth_timeout_secs`: a good `AUTH` line, or a file frame with
    /// a good tag (`ferryd send --key-file`). Frames may come before the `AUTH` line; text other
    /// than it ends the connection with `ERR unauthorized`. Returns once text is unlocked.
    #[inline(never)]
    pub(super) fn unlock(&mut self, input: &mut Input) -> Result<(), Reason> {
        let auth_deadline = Deadline::after(self.cfg.access.auth_timeout, Why::Auth);
        let mut proven = false;
        let mut since = Instant::now();
        while self.text_locked {
            if input.is_empty() {
                let idle = self.idle_deadline();
                let deadline = if proven {
                    idle
                } else {
                    idle.earliest(auth_deadline)
                };
                self.place.reading_since(since);
                input.start = 0;
                input.end = 0;
                self.fill_more(input, deadline)?;
                if self.place.is_evicted() {
                    return Err(self.evicted());
                }
            }
            let data = input.data();
            let n = proto::text_len(data, self.auth_line.is_empty());
            if n == 0 {
                self.frame(input)?;
                proven = true;
                since = Instant::now();
                continue;
            }
            // The AUTH line is taken on its own: what follows it is text for the mode.
            let n = data[..n]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(n, |i| i + 1);
            let text = &data[..n];
            logger::debug!("{} req {}", self.peer, escaped(text, LOG_WIDTH));
            self.auth_text(text)?;
            input.consume(n);
        }
        Ok(())
    }

    /// `access.require_token`: text must begin with `AUTH <hex tag>`; anything else ends the
    /// connection with `ERR unauthorized`.
    pub(super) fn auth_text(&mut self, text: &[u8]) -> Result<(), Reason> {
        if self.auth_line.len() + text.len() > MAX_AUTH_LINE {
            return Err(self.unauthorized("expected the line AUTH <hex tag> first"));
        }
        self.auth_line.extend_from_slice(text);
        if self.auth_line.last() != Some(&b'\n') {
            return Ok(());
        }
        let line = std::mem::take(&mut self.auth_line);
        let Some(hex_tag) = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.trim_end().strip_prefix("AUTH "))
        else {
            return Err(self.unauthorized(
                "text is locked (access.require_token): send the line AUTH <hex tag> first",
            ));
        };
        let good = match (&self.auth, auth::from_hex(hex_tag.trim())) {
            (Some(a), Some(tag)) => a.key.verify_auth(&a.nonce, &tag),
            _ => false,
        };
        if !good {
            return Err(self
                .unauthorized("the AUTH tag does not match this connection's nonce and the key"));
        }
        self.text_locked = false;
        logger::info!("{} authenticated", self.peer);
        self.say(OK_AUTH);
        Ok(())
    }

    pub(super) fn unauthorized(&mut self, why: &str) -> Reason {
        let peer = self.peer;
        self.shared
            .refused(refusals::Why::Unauthorized, Some(peer.ip()), || {
                format!("{peer} refused: unauthorized: {why}")
            });
        self.refuse(&wire::err_line(Code::Unauthorized, &why))
    }
}
