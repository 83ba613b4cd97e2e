//! The client half of the file protocol: `ferryd send` (upload files to a server, one connection,
//! one answer per file, in order) and `ferryd pack` (write the same frames to stdout for `nc`).
//! `send` puts the checksum after the body by default, hashing beside `sendfile` instead of
//! before it; `pack` puts it in the header. A file made ready as a frame is a
//! `prepared::Prepared`; one connection to a server is a `connection::Connection`; small files
//! go through a window of frames in flight (`pipeline`), a resumable one alone; whether a file
//! is sent again, and when, is `retry`'s policy.

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::thread;

use crate::auth::Key;
use crate::client::connection::{Connection, Fate, Sent};
use crate::client::options::{ClientError, PackOptions, SendOptions};
use crate::client::prepared::Prepared;
use crate::client::retry::{self, Next};
use crate::client::walk::{self, Item};

mod pipeline;

use crate::escape::push_chat_text;
use crate::proto::decimal::Secs;
use pipeline::Window;

/// `ferryd pack FILE...`: writes one frame per file to `out`.
pub fn pack<W: Write + AsFd>(opts: &PackOptions, out: &mut W) -> Result<(), ClientError> {
    for path in &opts.files {
        let mut prepared = Prepared::open(path, None, &opts.form, false)?;
        prepared
            .write_to(out, None, None, &mut |_| true)
            .map_err(ClientError::Io)?;
    }
    out.flush().map_err(ClientError::Io)
}

/// `ferryd send`: uploads each file, printing one result line per file to `out`. Returns whether
/// each file was stored; failing to connect is an error.
pub fn send(opts: &SendOptions, out: &mut dyn Write) -> Result<Vec<bool>, ClientError> {
    let key = match &opts.key_file {
        Some(path) => Some(Key::load(path).map_err(ClientError::Key)?.0),
        None => None,
    };
    let items = if opts.recursive {
        let (items, notes) = walk::expand(&opts.files);
        for note in notes {
            eprintln!("{note}");
        }
        items
    } else {
        opts.files
            .iter()
            .map(|p| Item {
                path: p.clone(),
                name: None,
            })
            .collect()
    };
    let mut run = Run {
        opts,
        key,
        progress: io::stderr().is_terminal(),
        conn: None,
        connected: false,
        out,
        window: Window::default(),
        results: vec![false; items.len()],
    };
    for (idx, item) in items.iter().enumerate() {
        let opened = Prepared::open(&item.path, item.name.as_deref(), &opts.form, run.progress);
        match opened {
            // A resumable file waits for its `RESUME` line: it goes alone, after the window.
            Ok(mut prepared) if prepared.resume => {
                run.drain()?;
                run.results[idx] = run.item(&mut prepared)?;
            }
            Ok(prepared) => run.pipelined(idx, prepared)?,
            Err(e) => {
                // Reported in its place among the others.
                run.drain()?;
                run.results[idx] = report(run.out, &item.path, false, e.detail());
            }
        }
    }
    run.drain()?;
    Ok(run.results)
}

/// How often one file was sent again, and how far its furthest try got.
#[derive(Debug, Default, Clone, Copy)]
struct Tries {
    reconnects: u32,
    retries: u32,
    furthest: u64,
}

/// What became of a file after one try.
enum Settled {
    /// Reported: stored (`true`) or not.
    Done(bool),
    /// To be sent again.
    Again,
}

/// One `send`: its options and the connection files go over, opened when a file needs it.
struct Run<'a> {
    opts: &'a SendOptions,
    key: Option<Key>,
    progress: bool,
    conn: Option<Connection>,
    /// A connection was made once: a later failure to connect is a cut, retried like one.
    connected: bool,
    out: &'a mut dyn Write,
    /// The files in flight without waiting for each answer, and those queued for it.
    window: Window,
    /// Each file's result, in the order given.
    results: Vec<bool>,
}

impl Run<'_> {
    /// Sends one file on its own, on a new connection again when the server asks for one, and
    /// after a cut, pauses and tries again (`--retry`), resuming where the server's partial
    /// ends, until `settle` says it is done; whether it was stored.
    fn item(&mut self, prepared: &mut Prepared) -> Result<bool, ClientError> {
        let mut tries = Tries::default();
        loop {
            let sent = match self.attempt(prepared) {
                Ok(sent) => sent,
                // A server reached before and unreachable now: a cut like any other.
                Err(e) if self.connected && e.is_connect() => Sent::cut(e.to_string()),
                Err(e) => return Err(e),
            };
            if !sent.keep {
                // The server closes after refusing a frame; the next try gets a new connection.
                self.conn = None;
            }
            if let Settled::Done(ok) = self.settle(&prepared.path, sent, &mut tries) {
                return Ok(ok);
            }
        }
    }

    /// After one try at a file: reports it when it is done (stored, refused for good, out of
    /// tries), or notes why it goes again and, for a retry, pauses first.
    fn settle(&mut self, path: &Path, sent: Sent, tries: &mut Tries) -> Settled {
        if sent.from > tries.furthest {
            // This try got further than the last: the count starts again.
            tries.furthest = sent.from;
            tries.retries = 0;
        }
        match retry::next(sent.fate) {
            Next::Reconnect if tries.reconnects < retry::MAX_RECONNECTS => {
                tries.reconnects += 1;
                self.note(
                    path,
                    &format!("{}; sending it again on a new connection", sent.message),
                );
                Settled::Again
            }
            Next::Retry if tries.retries < self.opts.retries => {
                tries.retries += 1;
                let pause = retry::backoff(tries.retries);
                let of = self.opts.retries;
                self.note(
                    path,
                    &format!(
                        "{}; retry {} of {of} in {} s",
                        sent.message,
                        tries.retries,
                        Secs(pause)
                    ),
                );
                thread::sleep(pause);
                Settled::Again
            }
            Next::Retry if self.opts.retries > 0 => {
                let why = format!("{} (gave up after {} retries)", sent.message, tries.retries);
                Settled::Done(report(self.out, path, false, why))
            }
            _ => Settled::Done(report(self.out, path, sent.ok, sent.message)),
        }
    }

    /// One try at sending `p`: the upload, and the one more try a resumed upload whose partial
    /// failed the checksum, or an older server's refusal of a trailing resumable frame, calls for.
    fn attempt(&mut self, p: &mut Prepared) -> Result<Sent, ClientError> {
        let (timeout, progress) = (self.opts.timeout, self.progress);
        let mut sent = self.connection()?.upload(p, timeout, progress);
        if sent.from > 0 && sent.keep && sent.message.contains("; ERR checksum ") {
            // The server's partial did not belong to this file after all (it dropped it): one
            // more try, from the start.
            let resumed = sent.from;
            self.note(
                &p.path,
                &format!(
                    "resumed at {resumed} bytes, but the whole file failed its checksum on the server (a damaged partial, dropped there); sending it again from the start"
                ),
            );
            sent = self.connection()?.upload(p, timeout, progress);
        }
        if !sent.ok
            && p.resume
            && p.header.trailing
            && sent.fate == Fate::Refused(Some(crate::proto::wire::Code::BadHeader))
        {
            // A server from before trailing resumable frames (flag bits 2 and 3 together)
            // refuses them: the same file as a one-pass frame that is not resumable.
            self.note(
                &p.path,
                "the server does not take resumable frames with a trailing checksum (an older ferryd); sending it without resuming",
            );
            p.resume = false;
            p.header.checksum = [0; 32];
            if !sent.keep {
                self.conn = None;
            }
            sent = self.connection()?.upload(p, timeout, progress);
        }
        Ok(sent)
    }

    /// The open connection, or a new one.
    fn connection(&mut self) -> Result<&mut Connection, ClientError> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let c = Connection::open(&self.opts.to, self.opts.timeout, self.key.as_ref())?;
                self.connected = true;
                c
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// A line about a file that is not its result.
    fn note(&mut self, path: &Path, text: &str) {
        report(self.out, path, false, text.to_string());
    }
}

/// Prints one result line. The message may quote the server, so its control characters are
/// escaped: a hostile server (or a man in the middle) cannot drive the user's terminal.
fn report(out: &mut dyn Write, path: &Path, ok: bool, message: String) -> bool {
    let mut shown = String::with_capacity(message.len());
    push_chat_text(&mut shown, message.as_bytes());
    let mut name = String::new();
    push_chat_text(&mut name, path.as_os_str().as_encoded_bytes());
    let _ = writeln!(out, "{name}: {shown}");
    ok
}
