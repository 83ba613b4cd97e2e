//! The client half of the file protocol: `ferryd send` (upload files to a server, one connection,
//! one answer per file) and `ferryd pack` (write the same frames to stdout for `nc`). `send`
//! puts the checksum after the body by default, hashing beside `sendfile` instead of before it;
//! `pack` puts it in the header.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::auth::{self, Key, KeyError, NONCE_LEN};
use crate::client::progress::Progress;
use crate::client::walk::{self, Item};
use crate::client::{filehash, stdin};
use crate::deadline::is_timeout;
use crate::escape::push_chat_text;
use crate::proto::wire::{Answer, Code, parse_answer, parse_resume};
use crate::proto::{Algo, HEADER_LEN, Header, name};

/// Buffer size for the read/write fallback when sendfile(2) cannot be used.
const CHUNK: usize = 1 << 20;
/// Bytes per sendfile(2) call (progress is updated after each).
const SEND_CHUNK: u64 = 8 << 20;
/// Longest answer line read from a server.
const MAX_ANSWER: u64 = 4096;
/// Files at least this large are sent resumable (header flag bit 3) by default: the server keeps
/// what arrived if the connection is cut, and the next `send` of the same file continues from
/// there, at the cost of one round trip (the `RESUME <offset>` line) before the body. With the
/// trailing checksum (the default) the file is still read once, the header carrying a resume id
/// for this version of the file (`resume_id`) in place of the checksum; with `--checksum header`
/// it is hashed first. Smaller files and standard input are sent one-pass, not resumable.
pub const RESUME_MIN: u64 = 1 << 20;

/// What `ferryd send` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOptions {
    pub to: String,
    pub timeout: Duration,
    pub files: Vec<PathBuf>,
    /// The shared upload key, for servers with `files.token_file`.
    pub key_file: Option<PathBuf>,
    /// How the frames are made.
    pub form: Form,
    /// `-r`: directories among `files` are sent whole, each file named by its path relative to
    /// the directory's parent (`client::walk`).
    pub recursive: bool,
}

/// What `ferryd pack` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    pub files: Vec<PathBuf>,
    pub form: Form,
}

/// How frames are made: the checksum's algorithm and place, and the name to send under.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Form {
    pub algo: Algo,
    /// The checksum follows the body (hashed while it is sent) instead of standing in the
    /// header (hashed before it is sent).
    pub trailing: bool,
    /// The name to send under instead of the file's own (required for `-`, standard input).
    pub name: Option<String>,
    /// Files of `RESUME_MIN` bytes or more (not standard input) are sent resumable (`send`).
    pub resume: bool,
}

/// A client failure, with the reason a user can act on.
#[derive(Debug)]
pub enum ClientError {
    Resolve {
        to: String,
        err: io::Error,
    },
    Refused {
        to: String,
    },
    ConnectTimeout {
        to: String,
        timeout: Duration,
    },
    Connect {
        to: String,
        err: io::Error,
    },
    File {
        path: PathBuf,
        err: io::Error,
    },
    BadName {
        path: PathBuf,
        err: name::NameError,
    },
    Key(KeyError),
    Stdin(stdin::StdinError),
    /// With `--key-file`, the server did not open with a `NONCE` line.
    NoNonce {
        to: String,
    },
    Io(io::Error),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Resolve { to, err } => write!(f, "cannot resolve {to}: {err}"),
            ClientError::Refused { to } => {
                write!(
                    f,
                    "connection refused by {to} (is ferryd running and listening there?)"
                )
            }
            ClientError::ConnectTimeout { to, timeout } => {
                write!(
                    f,
                    "timed out after {} s connecting to {to}",
                    timeout.as_secs_f64()
                )
            }
            ClientError::Connect { to, err } => write!(f, "cannot connect to {to}: {err}"),
            ClientError::File { path, err } => write!(f, "{}: {err}", path.display()),
            ClientError::BadName { path, err } => {
                write!(
                    f,
                    "{}: cannot be sent under this name: {err}",
                    path.display()
                )
            }
            ClientError::Key(e) => write!(f, "--key-file: {e}"),
            ClientError::Stdin(e) => write!(f, "{e}"),
            ClientError::NoNonce { to } => write!(
                f,
                "{to} sent no NONCE line: it does not take upload keys (try without --key-file)"
            ),
            ClientError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// The error without the file's path, for lines that already start with it.
    fn detail(&self) -> String {
        match self {
            ClientError::File { err, .. } => err.to_string(),
            ClientError::BadName { err, .. } => format!("cannot be sent under this name: {err}"),
            other => other.to_string(),
        }
    }
}

/// A file ready to go: opened, measured, and hashed unless the checksum trails the body.
struct Prepared {
    path: PathBuf,
    file: File,
    name: String,
    header: Header,
    /// The checksum, when known before sending (always for a header checksum).
    known: Option<[u8; 32]>,
    /// Sent with the resume flag (`Form::resume`, files of `RESUME_MIN` bytes or more).
    resume: bool,
}

/// The resume id of a trailing resumable frame: what names this version of the file to the
/// server, which finds its partial body by it and the size. A hash (BLAKE3 in its key
/// derivation mode, apart from any checksum) of the name sent, the size, the modification time
/// and the file's device and inode: the same file unchanged gets the same id on the next
/// `send`, an edited or replaced one a new id and so a fresh upload. It only picks a candidate
/// prefix; the trailing checksum covers the whole file, so a wrong guess costs a retry, never a
/// wrong file.
fn resume_id(name: &str, meta: &std::fs::Metadata) -> [u8; 32] {
    use std::os::unix::fs::MetadataExt;
    let mut h = blake3::Hasher::new_derive_key("ferryd 2026-11 trailing resume id");
    h.update(&(name.len() as u64).to_be_bytes());
    h.update(name.as_bytes());
    for n in [
        meta.len(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.dev(),
        meta.ino(),
    ] {
        h.update(&n.to_be_bytes());
    }
    *h.finalize().as_bytes()
}

/// What a trailing checksum is followed by on an authenticated connection: the tag binding it
/// to the frame's first tag.
type TrailerTag<'a> = &'a dyn Fn(&[u8; 32]) -> [u8; 32];

impl Prepared {
    /// Opens `path` to be sent as `form` says, or under `as_name` (a name with subdirectories,
    /// from `send -r`; then a symlink is never followed).
    fn open(
        path: &Path,
        as_name: Option<&str>,
        form: &Form,
        progress: bool,
    ) -> Result<Prepared, ClientError> {
        let file_err = |err| ClientError::File {
            path: path.to_path_buf(),
            err,
        };
        let bad_name = |err| ClientError::BadName {
            path: path.to_path_buf(),
            err,
        };
        let name = match (as_name, &form.name) {
            (Some(n), _) => name::validate_path(n.as_bytes()).map_err(bad_name)?,
            (None, Some(n)) => name::validate(n.as_bytes()).map_err(bad_name)?,
            (None, None) => name::validate(
                path.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            )
            .map_err(bad_name)?,
        }
        .to_string();
        let nofollow = if as_name.is_some() {
            i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0)
        } else {
            0
        };
        let (file, size, mut known, id) = if path == Path::new("-") {
            let s = stdin::take(form.algo).map_err(ClientError::Stdin)?;
            (s.file, s.size, s.checksum, None)
        } else {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(nofollow)
                .open(path)
                .map_err(file_err)?;
            let meta = file.metadata().map_err(file_err)?;
            if !meta.is_file() {
                return Err(file_err(io::Error::other("not a regular file")));
            }
            let id = resume_id(&name, &meta);
            (file, meta.len(), None, Some(id))
        };
        let resume = form.resume && id.is_some() && size >= RESUME_MIN;
        let trailing = form.trailing;
        if !trailing && known.is_none() {
            let bar = progress_bar(progress, size, &format!("hashing {name}"));
            known = Some(
                filehash::checksum_file(form.algo, &file, size, hash_depth(), &|n| bar.inc(n))
                    .map_err(file_err)?,
            );
            bar.finish_and_clear();
        }
        Ok(Prepared {
            path: path.to_path_buf(),
            file,
            header: Header {
                algo: form.algo,
                trailing,
                name_len: name.len() as u16,
                size,
                // A trailing frame's field is zero, or its resume id when resumable.
                checksum: match (known, id) {
                    (Some(sum), _) if !trailing => sum,
                    (_, Some(id)) if trailing && resume => id,
                    _ => [0; 32],
                },
                ..Header::default()
            },
            name,
            known,
            resume,
        })
    }

    /// The header as sent: with the resume flag when `resume`.
    fn raw_header(&self) -> [u8; HEADER_LEN] {
        let raw = self.header.encode();
        if self.resume {
            Header::with_resume_flag(raw)
        } else {
            raw
        }
    }

    /// Writes header, name and tag.
    fn write_head<W: Write>(&self, out: &mut W, tag: Option<&[u8]>) -> io::Result<()> {
        out.write_all(&self.raw_header())?;
        out.write_all(self.name.as_bytes())?;
        if let Some(tag) = tag {
            out.write_all(tag)?;
        }
        out.flush()
    }

    /// Writes header, name (and tag), body and, for a trailing frame, the checksum (and
    /// `trailer_tag` of it) to `out`, calling `tick` with the body bytes sent so far after each
    /// chunk; `tick` returning false stops the body early.
    fn write_to<W: Write + AsFd>(
        &mut self,
        out: &mut W,
        tag: Option<&[u8]>,
        trailer_tag: Option<TrailerTag<'_>>,
        tick: &mut dyn FnMut(u64) -> bool,
    ) -> io::Result<bool> {
        self.write_head(out, tag)?;
        self.write_rest(out, 0, trailer_tag, tick)
    }

    /// Writes what follows the head: the body from byte `from` on (a resumed upload skips what
    /// the server holds) and, for a trailing frame, the checksum (and `trailer_tag` of it). A
    /// trailing checksum not known yet is computed over the whole file on other threads while
    /// the body is sent, reading the file's pages beside `sendfile`: the file is read once.
    fn write_rest<W: Write + AsFd>(
        &self,
        out: &mut W,
        from: u64,
        trailer_tag: Option<TrailerTag<'_>>,
        tick: &mut dyn FnMut(u64) -> bool,
    ) -> io::Result<bool> {
        if !self.header.trailing {
            return self.write_body(out, from, tick);
        }
        let (algo, size, known) = (self.header.algo, self.header.size, self.known);
        let (sent, sum) = thread::scope(|s| {
            let file = &self.file;
            let hasher = match known {
                Some(_) => None,
                None => Some(s.spawn(move || {
                    filehash::checksum_file(algo, file, size, hash_depth(), &|_| {})
                })),
            };
            let sent = self.write_body(out, from, tick);
            let sum = match hasher {
                Some(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("hashing thread panicked"))),
                None => known.ok_or_else(|| io::Error::other("no checksum")),
            };
            (sent, sum)
        });
        if !sent? {
            return Ok(false);
        }
        let sum = sum?;
        out.write_all(&sum)?;
        if let Some(trailer_tag) = trailer_tag {
            out.write_all(&trailer_tag(&sum))?;
        }
        out.flush()?;
        Ok(true)
    }

    /// Sends the body from byte `from` on (a resumed upload skips what the server holds) with
    /// `sendfile(2)` (or read and write where it cannot be used).
    fn write_body<W: Write + AsFd>(
        &self,
        out: &mut W,
        from: u64,
        tick: &mut dyn FnMut(u64) -> bool,
    ) -> io::Result<bool> {
        let size = self.header.size;
        let mut sent = from.min(size);
        let mut fallback: Option<Vec<u8>> = None;
        while sent < size {
            let want = (size - sent).min(SEND_CHUNK);
            let n = match &mut fallback {
                None => {
                    // sendfile(2): the kernel sends the page-cache pages itself, without copying
                    // them through user space (std's io::copy does not, to a socket).
                    let mut offset = sent;
                    match rustix::fs::sendfile(&*out, &self.file, Some(&mut offset), want as usize)
                    {
                        Ok(n) => n as u64,
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                            fallback = Some(vec![0; CHUNK]);
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(buf) => {
                    let len = want.min(buf.len() as u64) as usize;
                    let n = self.file.read_at(&mut buf[..len], sent)?;
                    out.write_all(&buf[..n])?;
                    n as u64
                }
            };
            if n == 0 {
                return Err(io::Error::other(format!(
                    "{} shrank while being sent",
                    self.path.display()
                )));
            }
            sent += n;
            if !tick(sent) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

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
    let progress = io::stderr().is_terminal();
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
    let mut conn: Option<Connection> = None;
    let mut results = Vec::new();
    for Item { path, name } in &items {
        let mut prepared = match Prepared::open(path, name.as_deref(), &opts.form, progress) {
            Ok(p) => p,
            Err(e) => {
                results.push(report(out, path, false, e.detail()));
                continue;
            }
        };
        if conn.is_none() {
            conn = Some(Connection::open(&opts.to, opts.timeout, key.as_ref())?);
        }
        let Some(c) = conn.as_mut() else { continue };
        let (mut ok, mut message, mut keep, resumed) =
            c.upload(&mut prepared, opts.timeout, progress);
        if resumed > 0 && keep && message.contains("; ERR checksum ") {
            // The server's partial did not belong to this file after all (it dropped it): one
            // more try, from the start.
            let _ = writeln!(
                out,
                "{}: resumed at {resumed} bytes, but the whole file failed its checksum on the server (a damaged partial, dropped there); sending it again from the start",
                path.display()
            );
            (ok, message, keep, _) = c.upload(&mut prepared, opts.timeout, progress);
        }
        if !ok && prepared.resume && prepared.header.trailing && message.contains("ERR bad-header")
        {
            // A server from before trailing resumable frames (flag bits 2 and 3 together)
            // refuses them: the same file as a one-pass frame that is not resumable.
            let _ = writeln!(
                out,
                "{}: the server does not take resumable frames with a trailing checksum (an older ferryd); sending it without resuming",
                path.display()
            );
            prepared.resume = false;
            prepared.header.checksum = [0; 32];
            if !keep {
                conn = Some(Connection::open(&opts.to, opts.timeout, key.as_ref())?);
            }
            if let Some(c) = conn.as_mut() {
                (ok, message, keep, _) = c.upload(&mut prepared, opts.timeout, progress);
            }
        }
        results.push(report(out, path, ok, message));
        if !keep {
            // The server closes after refusing a frame; the next file gets a new connection.
            conn = None;
        }
    }
    Ok(results)
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

/// A connection to a server and the lines it has sent.
struct Connection {
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
    fn open(to: &str, timeout: Duration, key: Option<&Key>) -> Result<Connection, ClientError> {
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

    fn connect(to: &str, timeout: Duration) -> Result<Connection, ClientError> {
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
    fn start(stream: TcpStream, timeout: Duration) -> io::Result<Connection> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = stream.try_clone()?;
        let (tx, rx) = crossbeam_channel::bounded(16);
        thread::spawn(move || {
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
        });
        Ok(Connection {
            stream,
            answers: rx,
            auth: None,
            wants_key: false,
            pushed_back: None,
        })
    }

    /// Sends one file and waits for its answer. Returns (ok, message, keep the connection, the
    /// offset a resumed upload continued from).
    fn upload(
        &mut self,
        p: &mut Prepared,
        timeout: Duration,
        progress: bool,
    ) -> (bool, String, bool, u64) {
        let bar = progress_bar(progress, p.header.size, &format!("sending {}", p.name));
        let tag = self.auth.as_mut().map(|(key, nonce, seq)| {
            p.header.authenticated = true;
            let tag = key.upload_tag(nonce, *seq, &p.raw_header(), p.name.as_bytes());
            *seq += 1;
            tag
        });
        let key = self.auth.as_ref().map(|(key, ..)| key.clone());
        let trailer = |sum: &[u8; 32]| match (&key, &tag) {
            (Some(key), Some(tag)) => key.trailer_tag(tag, sum),
            _ => [0; 32],
        };
        if let Some(line) = self.pushed_back.take() {
            // The server already said something (e.g. `ERR busy`): do not send.
            bar.finish_and_clear();
            return with_offset(self.conclude(line, false), 0);
        }
        let from = if p.resume {
            // A resumable frame: the server answers the head with `RESUME <offset>` (or refuses
            // it with `ERR`), and the body goes from that offset on.
            if let Err(e) = p.write_head(&mut self.stream, tag.as_ref().map(|t| &t[..])) {
                bar.finish_and_clear();
                let line = next_answer(&self.answers, Duration::from_secs(2), &mut self.wants_key)
                    .unwrap_or(Err(e));
                return with_offset(self.conclude(line, false), 0);
            }
            match self.resume_offset(answer_wait(timeout)) {
                Ok(n) if n <= p.header.size => n,
                Ok(n) => {
                    bar.finish_and_clear();
                    let size = p.header.size;
                    let why = format!(
                        "the server offered to resume at {n} bytes, past the file's {size}"
                    );
                    return (false, why, false, 0);
                }
                Err(Some(line)) => {
                    bar.finish_and_clear();
                    return with_offset(self.conclude(line, false), 0);
                }
                Err(None) => {
                    bar.finish_and_clear();
                    let secs = answer_wait(timeout).as_secs();
                    let why = format!("no answer from the server within {secs} s");
                    return (false, why, false, 0);
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
                        return (
                            false,
                            format!("no answer from the server within {secs} s"),
                            false,
                            from,
                        );
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
        let (ok, message, keep) = self.conclude(line, body_sent);
        let message = if from > 0 {
            format!("resumed at {from} bytes; {message}")
        } else {
            message
        };
        (ok, message, keep, from)
    }

    /// Waits for the server's `RESUME <offset>` line: the offset, or the answer line it sent
    /// instead (`Err(Some)`: a refusal or a connection error), or nothing in time (`Err(None)`).
    fn resume_offset(&mut self, wait: Duration) -> Result<u64, Option<io::Result<String>>> {
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

    fn conclude(&self, line: io::Result<String>, body_sent: bool) -> (bool, String, bool) {
        match line {
            Ok(line)
                if self.wants_key
                    && self.auth.is_none()
                    && line.starts_with("ERR unauthorized") =>
            {
                (
                    false,
                    format!(
                        "{} (the server needs an upload key: --key-file)",
                        line.trim_end()
                    ),
                    false,
                )
            }
            Ok(line) => interpret(&line, body_sent),
            Err(e) if is_timeout(&e) => (false, format!("timed out sending: {e}"), false),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => (
                false,
                "the server closed the connection without answering".into(),
                false,
            ),
            Err(e) => (false, format!("connection failed: {e}"), false),
        }
    }
}

fn with_offset((ok, message, keep): (bool, String, bool), from: u64) -> (bool, String, bool, u64) {
    (ok, message, keep, from)
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

/// Turns the server's answer into (ok, message, keep the connection). `body_sent`: the whole
/// body had gone out before the answer came.
fn interpret(line: &str, body_sent: bool) -> (bool, String, bool) {
    let text = line.trim_end().to_string();
    match parse_answer(line) {
        Some(Answer::Ok { .. }) => (true, text, true),
        Some(Answer::Err { code, .. }) => {
            let hint = match code.as_str() {
                "busy" => " (all workers busy and the queue full: try again later)",
                "checksum" => {
                    " (the file changed while being sent, or bytes were damaged on the way)"
                }
                _ => "",
            };
            // The server and the client go by the same rule (`Code::keeps_connection`).
            let keep = Code::parse(&code).is_some_and(|c| c.keeps_connection(body_sent));
            (false, format!("{text}{hint}"), keep)
        }
        None => (false, format!("unexpected answer: {text}"), false),
    }
}

/// How many times to halve the file's hash tree for parallel hashing: enough subtrees for every
/// core, twice over, so that uneven halves still keep all cores busy.
fn hash_depth() -> u32 {
    let cores = thread::available_parallelism().map_or(1, usize::from) as u32;
    if cores <= 1 {
        0
    } else {
        (cores.next_power_of_two().trailing_zeros() + 1).min(4)
    }
}

/// How long to wait for the answer after the last body byte: the server fsyncs the file first.
fn answer_wait(timeout: Duration) -> Duration {
    (timeout * 12).max(Duration::from_secs(60))
}

fn progress_bar(shown: bool, len: u64, what: &str) -> Progress {
    Progress::new(shown, len, what)
}
