//! A connection's opening when it may be the Qt tutorial file client's `NAME**SIZE` upload
//! (`proto::starstar`): waiting a moment for a head split in transit, reading ahead until SIZE
//! is known, and receiving the body only if the stream ends right after its SIZE bytes. Once a
//! head is recognised the connection never goes back to text: a stream that does not fit is
//! refused with `ERR`, so a file is never echoed, relayed or stored wrong.

use std::time::{Duration, Instant};

use crate::daemon::files::upload::{self, BodySource, Check, Lost, Outcome};
use crate::deadline::{Deadline, Why};
use crate::escape::escaped;
use crate::logger;
use crate::proto::header::MAX_NAME_LEN;
use crate::proto::starstar::{self, After, Detect, LOOKAHEAD, Size};
use crate::proto::wire::{self, Code};

use super::body::ConnSource;
use super::read::ReadEnd;
use super::{Conn, Input, Reason};

/// How long a connection's first bytes that could still become a `NAME**SIZE` head wait for the
/// next ones before they are taken as text (and, after a run of digits, the pause that ends
/// SIZE). The client writes its head in one write, so this only covers a split in transit.
const STARSTAR_WAIT: Duration = Duration::from_millis(200);

impl Conn<'_> {
    /// At the start of a connection: recognises a `NAME**SIZE` head and, with
    /// `compat.starstar_uploads`, stores its body like a frame's (unverified); without it,
    /// refuses with `ERR legacy-header` and closes. `Ok` means the connection goes on with text,
    /// carrying the deadline of the line its first byte began (`line_timeout_secs` holds from
    /// that byte, however slowly the head trickled), or after the upload (`None`).
    // Not inlined, so that its buffers take stack only while it runs.
    #[inline(never)]
    pub(super) fn starstar(&mut self, input: &mut Input) -> Result<Option<Deadline>, Reason> {
        self.fill(input, None)?;
        let line = Deadline::after(self.cfg.server.line_timeout, Why::Line);
        let compat = self.cfg.compat.starstar_uploads;
        let head = loop {
            match starstar::detect(input.data(), compat) {
                Detect::NotStarstar => return Ok(Some(line)),
                Detect::Complete(head) => break head,
                Detect::Partial => {
                    input.compact();
                    let end = input.end;
                    let wait = line.earliest(Deadline::after(STARSTAR_WAIT, Why::Header));
                    match self.read_by(&mut input.buf[end..], wait) {
                        Ok(n) => input.end += n,
                        Err(ReadEnd::Timeout(Why::Line)) => {
                            return Err(self.ended(ReadEnd::Timeout(Why::Line)));
                        }
                        // Not a head after all: the bytes are text, and the main loop sees the
                        // end of the stream again after them.
                        Err(ReadEnd::Timeout(_) | ReadEnd::Eof) => return Ok(Some(line)),
                        Err(end) => return Err(self.ended(end)),
                    }
                }
            }
        };
        // The name is where the head starts: the first `name_len` bytes of `input`'s data.
        let name_len = head.name.len();
        self.starstar_upload(input, name_len, head.len, head.digits, line)
    }

    /// A recognised `NAME**SIZE` head (its name the first `name_len` bytes of `input`'s data,
    /// `head_len` bytes up to SIZE's first digit), refused or received. Out of line, like every rare or large path here, so
    /// that its buffers never sit under a worker waiting on an idle peer (see `READ_BUF`).
    #[inline(never)]
    fn starstar_upload(
        &mut self,
        input: &mut Input,
        name_len: usize,
        head_len: usize,
        first_digits: usize,
        line: Deadline,
    ) -> Result<Option<Deadline>, Reason> {
        let mut name_buf = [0u8; MAX_NAME_LEN as usize];
        name_buf[..name_len].copy_from_slice(&input.data()[..name_len]);
        let name = &name_buf[..name_len];
        let shown = escaped(name, 255);
        if !self.cfg.compat.starstar_uploads {
            let digits = &input.data()[head_len..head_len + first_digits];
            logger::warn!(
                "{} refused: legacy-header: the connection opened with a NAME**SIZE upload (\"{shown}\", {} B) and compat.starstar_uploads is off",
                self.peer,
                escaped(digits, 20)
            );
            return Err(self.refuse(&wire::err_legacy_header()));
        }
        let mut ahead = input.data()[head_len..].to_vec();
        input.consume(input.data().len());
        let (digits, size, ended) = self.size_ahead(&mut ahead, first_digits, line, name)?;
        self.frames += 1;
        logger::info!(
            "{} NAME**SIZE upload \"{shown}\" ({size} B): no checksum, storing unverified",
            self.peer
        );
        let end = ahead.len();
        let mut body = Input {
            buf: &mut ahead,
            start: digits,
            end,
        };
        let shared = self.shared;
        let peer = self.peer;
        self.live.begin_upload(shown.to_string(), size);
        let end_wait = self.cfg.access.header_timeout;
        let mut source = EndSource {
            inner: ConnSource::new(self, &mut body),
            left: size,
            ended,
            end_wait,
        };
        if size == 0 && !source.ended {
            // No body byte to read: the end of the stream is checked here.
            if let Err(lost) = source.expect_end() {
                logger::warn!(
                    "{peer} NAME**SIZE upload \"{shown}\" (0 B) refused: {lost}; nothing stored"
                );
                return self.answer_upload(Outcome::Lost(lost)).map(|()| None);
            }
        }
        let store = source.inner.conn.store;
        let outcome = upload::receive_checked(
            store,
            Check::Unverified { size },
            name,
            &mut source,
            shared.hash_pool(),
            &peer,
        );
        self.answer_upload(outcome).map(|()| None)
    }

    /// Reads ahead after the separator (into `ahead`, at most `LOOKAHEAD` bytes) until
    /// `starstar::size` knows where SIZE ends: (digits, size, whether the stream has ended).
    /// The head's bytes are held to `line`, and a stream that fits no size is refused.
    fn size_ahead(
        &mut self,
        ahead: &mut Vec<u8>,
        first_digits: usize,
        line: Deadline,
        name: &[u8],
    ) -> Result<(usize, u64, bool), Reason> {
        let (mut ended, mut paused) = (false, false);
        loop {
            let verdict = starstar::size(After {
                bytes: ahead,
                ended,
                paused,
                first_digits,
            });
            match verdict {
                Size::Known {
                    digits,
                    size,
                    exact,
                } => return Ok((digits, size, exact)),
                Size::Wrong(e) => {
                    logger::warn!(
                        "{} refused: bad-header: NAME**SIZE upload \"{}\": {e}",
                        self.peer,
                        escaped(name, 255)
                    );
                    return Err(self.refuse(&wire::err_line(Code::BadHeader, &e)));
                }
                Size::More => {}
            }
            // While only digits have come, a pause ends them; after that, only the line limit.
            let only_digits = ahead.iter().all(u8::is_ascii_digit);
            let wait = match only_digits {
                true => line.earliest(Deadline::after(STARSTAR_WAIT, Why::Header)),
                false => line,
            };
            let start = ahead.len();
            ahead.resize(LOOKAHEAD.max(start + 1), 0);
            let got = self.read_by(&mut ahead[start..], wait);
            ahead.truncate(start + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(_) => paused = false,
                Err(ReadEnd::Eof) => ended = true,
                Err(ReadEnd::Timeout(Why::Header)) => paused = true,
                Err(end) => return Err(self.ended(end)),
            }
        }
    }
}

/// A `NAME**SIZE` body: `left` bytes from the connection, then the end of the stream, which must
/// come within `end_wait` (the client closes right after the body). Extra bytes, or no end,
/// fail the upload before it is committed.
struct EndSource<'c, 'a, 'i> {
    inner: ConnSource<'c, 'a, 'i>,
    left: u64,
    /// The end of the stream has been seen already.
    ended: bool,
    end_wait: Duration,
}

impl BodySource for EndSource<'_, '_, '_> {
    fn read_into(&mut self, buf: &mut [u8]) -> Result<usize, Lost> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read_into(&mut buf[..want.max(1)])?;
        self.left = self.left.saturating_sub(n as u64);
        if self.left == 0 && !self.ended {
            self.expect_end()?;
        }
        Ok(n)
    }

    fn tell(&mut self, line: &str) -> Result<(), Lost> {
        self.inner.tell(line)
    }
}

impl EndSource<'_, '_, '_> {
    /// After the last body byte: the stream must end, with nothing more.
    fn expect_end(&mut self) -> Result<(), Lost> {
        if !self.inner.input.is_empty() {
            return Err(Lost::Trailing);
        }
        let deadline = Deadline {
            at: Instant::now() + self.end_wait,
            why: Why::Header,
        };
        let mut probe = [0u8; 1];
        match self.inner.conn.read_by(&mut probe, deadline) {
            Ok(_) => Err(Lost::Trailing),
            Err(ReadEnd::Eof) => {
                self.ended = true;
                Ok(())
            }
            Err(ReadEnd::Timeout(_)) => Err(Lost::Unended),
            Err(ReadEnd::Error(e)) => Err(Lost::Error(e)),
        }
    }
}
