//! One connection to a server as `ferryd send` uses it: connecting (every address the name
//! resolves to), the nonce and the key, a thread that reads the server's lines, one upload with
//! its `RESUME` offset and its answer, and what an answer line means.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::auth::{self, Key, NONCE_LEN};
use crate::client::options::ClientError;
use crate::client::prepared::progress_bar;
use crate::client::prepared::{Prepared, TrailerTag};
use crate::deadline::is_timeout;
use crate::proto::wire::{Answer, Code, parse_answer, parse_resume};
use crate::threads;

/// Longest answer line read from a server.
const MAX_ANSWER: u64 = 4096;

/// What became of one upload: the line to report and what it means for the next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sent {
    pub(super) ok: bool,
    pub(super) message: String,
    /// The connection stays usable for the next file.
    pub(super) keep: bool,
    /// The offset a resumed upload continued from (0 if none).
    pub(super) from: u64,
    pub(super) fate: Fate,
}

impl Sent {
    /// An upload the link cut, with its reason.
    pub(super) fn cut(message: String) -> Sent {
        failed(message, Fate::Cut)
    }
}

/// How an upload ended, for `send`'s choice of what to do next (`client::retry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// The server answered `OK`.
    Stored,
    /// The server answered `ERR <code>` (`None`: a code this client does not know), or the
    /// answer made no sense.
    Refused(Option<Code>),
    /// The connection failed, closed or went silent before an answer: the link, not the file.
    Cut,
}

/// A connection to a server and the lines it has sent.
pub(super) struct Connection {
    stream: TcpStream,
    answers: Receiver<io::Result<String>>,
    /// With a key: the server's nonce and the number of authenticated frames sent so far.
    auth: Option<(Key, [u8; NONCE_LEN], u64)>,
    /// The server opened with a `NONCE` line: it wants a key.
    wants_key: bool,
    /// A line read while looking for the nonce, to be taken as the next answer.
    pushed_back: Option<io::Result<String>>,
}

impl Connection {
    pub(super) fn open(
        to: &str,
        timeout: Duration,
        key: Option<&Key>,
    ) -> Result<Connection, ClientError> {
        let mut conn = Connection::connect(to, timeout)?;
        // A server with upload keys opens with `NONCE <hex>`; one without says nothing.
        let wait = if key.is_some() {
            timeout
        } else {
            Duration::from_millis(0)
        };
        let mut nonce = None;
        loop {
            match conn.answers.recv_timeout(wait) {
                Ok(Ok(line)) if parse_nonce(&line).is_some() => {
                    nonce = parse_nonce(&line);
                    break;
                }
                // An answer already (e.g. `ERR busy`): keep it for the first file.
                Ok(Ok(line)) if line.starts_with("OK ") || line.starts_with("ERR ") => {
                    conn.pushed_back = Some(Ok(line));
                    break;
                }
                // Chat notices and messages are not for us.
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    conn.pushed_back = Some(Err(e));
                    break;
                }
                Err(_) => break,
            }
        }
        conn.wants_key = nonce.is_some();
        match (key, nonce) {
            (Some(key), Some(nonce)) => conn.auth = Some((key.clone(), nonce, 0)),
            (Some(_), None) if conn.pushed_back.is_none() => {
                return Err(ClientError::NoNonce { to: to.to_string() });
            }
            _ => {}
        }
        Ok(conn)
    }

    pub(super) fn connect(to: &str, timeout: Duration) -> Result<Connection, ClientError> {
        let addrs: Vec<SocketAddr> = to
            .to_socket_addrs()
            .map_err(|err| ClientError::Resolve {
                to: to.to_string(),
                err,
            })?
            .collect();
        let mut last = ClientError::Resolve {
            to: to.to_string(),
            err: io::Error::other("no addresses"),
        };
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => return Connection::start(stream, timeout).map_err(ClientError::Io),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = ClientError::Refused { to: to.to_string() }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    last = ClientError::ConnectTimeout {
                        to: to.to_string(),
                        timeout,
                    }
                }
                Err(err) => {
                    last = ClientError::Connect {
                        to: to.to_string(),
                        err,
                    }
                }
            }
        }
        Err(last)
    }

    /// Starts a reader thread that forwards every line the server sends, so that an early
    /// refusal (`ERR busy`, `ERR too-large`) is seen while the body is still being sent.
    pub(super) fn start(stream: TcpStream, timeout: Duration) -> io::Result<Connection> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = stream.try_clone()?;
        let (tx, rx) = crossbeam_channel::bounded(16);
        // The thread could not start: the connection cannot see its answers.
        threads::spawn(
            "answers".into(),
            None,
            Box::new(move || {
                let mut reader = BufReader::new(reader);
                loop {
                    let mut line = Vec::new();
                    match (&mut reader).take(MAX_ANSWER).read_until(b'\n', &mut line) {
                        Ok(0) => {
                            let _ = tx.send(Err(io::ErrorKind::UnexpectedEof.into()));
                            return;
                        }
                        Ok(_) => {
                            // Bytes that are not UTF-8 are shown as U+FFFD; control characters are
                            // escaped where the line is printed.
                            let line = String::from_utf8_lossy(&line).into_owned();
                            if tx.send(Ok(line)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            }),
        )?;
        Ok(Connection {
            stream,
            answers: rx,
            auth: None,
            wants_key: false,
            pushed_back: None,
        })
    }

    /// The tag of the next frame on this connection, with a key (which marks the frame
    /// authenticated); each call counts one frame.
    fn next_tag(&mut self, p: &mut Prepared) -> Option<[u8; 32]> {
        self.auth.as_mut().map(|(key, nonce, seq)| {
            p.header.authenticated = true;
            let tag = key.upload_tag(nonce, *seq, &p.raw_header(), p.name.as_bytes());
            *seq += 1;
            tag
        })
    }

    /// Sends one whole frame (head, body, trailing checksum and its tag) without looking at any
    /// answer: a file in `send`'s window, whose answer is taken later (`next_line`), made ready
    /// by `Prepared::load_for_window` (a small one goes in one write).
    pub(super) fn send_frame(&mut self, p: &mut Prepared) -> io::Result<()> {
        let tag = self.next_tag(p);
        let key = self.auth.as_ref().map(|(key, ..)| key.clone());
        let trailer = |sum: &[u8; 32]| match (&key, &tag) {
            (Some(key), Some(tag)) => key.trailer_tag(tag, sum),
            _ => [0; 32],
        };
        let trailer_tag: Option<TrailerTag<'_>> = tag.is_some().then_some(&trailer);
        let tag = tag.as_ref().map(|t| &t[..]);
        if let Some(frame) = p.inline_frame(tag, trailer_tag) {
            return self.stream.write_all(&frame);
        }
        p.write_to(&mut self.stream, tag, trailer_tag, &mut |_| true)
            .map(drop)
    }

    /// Whether the server said something before the first frame (e.g. `ERR busy`).
    pub(super) fn spoke_first(&self) -> bool {
        self.pushed_back.is_some()
    }

    /// The next `OK` or `ERR` line, within `wait`.
    pub(super) fn next_line(
        &mut self,
        wait: Duration,
    ) -> Result<io::Result<String>, RecvTimeoutError> {
        if let Some(line) = self.pushed_back.take() {
            return Ok(line);
        }
        next_answer(&self.answers, wait, &mut self.wants_key)
    }

    /// Sends one file and waits for its answer.
    pub(super) fn upload(&mut self, p: &mut Prepared, timeout: Duration, progress: bool) -> Sent {
        let bar = progress_bar(progress, p.header.size, &format!("sending {}", p.name));
        let tag = self.next_tag(p);
        let key = self.auth.as_ref().map(|(key, ..)| key.clone());
        let trailer = |sum: &[u8; 32]| match (&key, &tag) {
            (Some(key), Some(tag)) => key.trailer_tag(tag, sum),
            _ => [0; 32],
        };
        if let Some(line) = self.pushed_back.take() {
            // The server already said something (e.g. `ERR busy`): do not send.
            bar.finish_and_clear();
            return self.conclude(line, false);
        }
        let from = if p.resume {
            // A resumable frame: the server answers the head with `RESUME <offset>` (or refuses
            // it with `ERR`), and the body goes from that offset on.
            if let Err(e) = p.write_head(&mut self.stream, tag.as_ref().map(|t| &t[..])) {
                bar.finish_and_clear();
                let line = next_answer(&self.answers, Duration::from_secs(2), &mut self.wants_key)
                    .unwrap_or(Err(e));
                return self.conclude(line, false);
            }
            match self.resume_offset(answer_wait(timeout)) {
                Ok(n) if n <= p.header.size => n,
                Ok(n) => {
                    bar.finish_and_clear();
                    let size = p.header.size;
                    let why = format!(
                        "the server offered to resume at {n} bytes, past the file's {size}"
                    );
                    return failed(why, Fate::Refused(None));
                }
                Err(Some(line)) => {
                    bar.finish_and_clear();
                    return self.conclude(line, false);
                }
                Err(None) => {
                    bar.finish_and_clear();
                    let secs = answer_wait(timeout).as_secs();
                    let why = format!("no answer from the server within {secs} s");
                    return failed(why, Fate::Cut);
                }
            }
        } else {
            0
        };
        let mut early = None;
        let stream = &mut self.stream;
        let (answers, wants_key) = (&self.answers, &mut self.wants_key);
        let trailer_tag: Option<TrailerTag<'_>> = tag.is_some().then_some(&trailer);
        let mut tick = |n| {
            bar.set_position(n);
            match next_answer(answers, Duration::ZERO, wants_key) {
                Ok(line) => {
                    early = Some(line);
                    false
                }
                Err(_) => true,
            }
        };
        let sent = if p.resume {
            p.write_rest(stream, from, trailer_tag, &mut tick)
        } else {
            p.write_to(stream, tag.as_ref().map(|t| &t[..]), trailer_tag, &mut tick)
        };
        bar.finish_and_clear();
        // Only an answer that came after the whole body finds the stream in step.
        let body_sent = early.is_none() && sent.is_ok();
        let line = match (early, sent) {
            (Some(line), _) => line,
            (None, Ok(_)) => {
                match next_answer(&self.answers, answer_wait(timeout), &mut self.wants_key) {
                    Ok(line) => line,
                    Err(RecvTimeoutError::Timeout) => {
                        let secs = answer_wait(timeout).as_secs();
                        let why = format!("no answer from the server within {secs} s");
                        return Sent {
                            from,
                            ..failed(why, Fate::Cut)
                        };
                    }
                    Err(RecvTimeoutError::Disconnected) => Err(io::ErrorKind::UnexpectedEof.into()),
                }
            }
            // The write failed: the server may have refused and closed; its reason, if it got
            // one out, is the better message.
            (None, Err(e)) => {
                next_answer(&self.answers, Duration::from_secs(2), &mut self.wants_key)
                    .unwrap_or(Err(e))
            }
        };
        let mut sent = self.conclude(line, body_sent);
        if from > 0 {
            sent.message = format!("resumed at {from} bytes; {}", sent.message);
            sent.from = from;
        }
        sent
    }

    /// Waits for the server's `RESUME <offset>` line: the offset, or the answer line it sent
    /// instead (`Err(Some)`: a refusal or a connection error), or nothing in time (`Err(None)`).
    pub(super) fn resume_offset(
        &mut self,
        wait: Duration,
    ) -> Result<u64, Option<io::Result<String>>> {
        loop {
            match self.answers.recv_timeout(wait) {
                Ok(Ok(line)) => {
                    if let Some(n) = parse_resume(&line) {
                        return Ok(n);
                    }
                    if parse_nonce(&line).is_some() {
                        self.wants_key = true;
                    } else if line.starts_with("OK ") || line.starts_with("ERR ") {
                        return Err(Some(Ok(line)));
                    }
                }
                Ok(Err(e)) => return Err(Some(Err(e))),
                Err(RecvTimeoutError::Timeout) => return Err(None),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                }
            }
        }
    }

    pub(super) fn conclude(&self, line: io::Result<String>, body_sent: bool) -> Sent {
        match line {
            Ok(line)
                if self.wants_key
                    && self.auth.is_none()
                    && line.starts_with("ERR unauthorized") =>
            {
                let why = format!(
                    "{} (the server needs an upload key: --key-file)",
                    line.trim_end()
                );
                failed(why, Fate::Refused(Some(Code::Unauthorized)))
            }
            Ok(line) => interpret(&line, body_sent),
            Err(e) if is_timeout(&e) => failed(format!("timed out sending: {e}"), Fate::Cut),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => failed(
                "the server closed the connection without answering".into(),
                Fate::Cut,
            ),
            Err(e) => failed(format!("connection failed: {e}"), Fate::Cut),
        }
    }
}

/// An upload that failed and left the connection unusable.
fn failed(message: String, fate: Fate) -> Sent {
    Sent {
        ok: false,
        message,
        keep: false,
        from: 0,
        fate,
    }
}

/// The next answer from the server: an `OK` or `ERR` line. A `NONCE` line sets `wants_key`;
/// anything else (chat messages and notices, in chat mode) is not for us and is skipped.
fn next_answer(
    answers: &Receiver<io::Result<String>>,
    wait: Duration,
    wants_key: &mut bool,
) -> Result<io::Result<String>, RecvTimeoutError> {
    loop {
        match answers.recv_timeout(wait)? {
            Ok(line) if parse_nonce(&line).is_some() => *wants_key = true,
            Ok(line) if !(line.starts_with("OK ") || line.starts_with("ERR ")) => {}
            other => return Ok(other),
        }
    }
}

/// The nonce of a `NONCE <64 hex>` line.
fn parse_nonce(line: &str) -> Option<[u8; NONCE_LEN]> {
    let hex = line.trim_end().strip_prefix("NONCE ")?;
    auth::from_hex(hex)?.try_into().ok()
}

/// Turns the server's answer into what became of the upload. `body_sent`: the whole body had
/// gone out before the answer came.
fn interpret(line: &str, body_sent: bool) -> Sent {
    let text = line.trim_end().to_string();
    match parse_answer(line) {
        Some(Answer::Ok { .. }) => Sent {
            ok: true,
            message: text,
            keep: true,
            from: 0,
            fate: Fate::Stored,
        },
        Some(Answer::Err { code, .. }) => {
            let hint = match code.as_str() {
                "busy" => " (all workers busy and the queue full: try again later)",
                "checksum" => {
                    " (the file changed while being sent, or bytes were damaged on the way)"
                }
                _ => "",
            };
            let code = Code::parse(&code);
            // The server and the client go by the same rule (`Code::keeps_connection`).
            let keep = code.is_some_and(|c| c.keeps_connection(body_sent));
            Sent {
                keep,
                ..failed(format!("{text}{hint}"), Fate::Refused(code))
            }
        }
        None => failed(format!("unexpected answer: {text}"), Fate::Refused(None)),
    }
}

/// How long to wait for the answer after the last body byte: the server fsyncs the file first.
pub(super) fn answer_wait(timeout: Duration) -> Duration {
    (timeout * 12).max(Duration::from_secs(60))
}
