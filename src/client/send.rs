//! The client half of the file protocol: `ferryd send` (upload files to a server, one connection,
//! one answer per file) and `ferryd pack` (write the same frames to stdout for `nc`). `send`
//! puts the checksum after the body by default, hashing beside `sendfile` instead of before it;
//! `pack` puts it in the header. A file made ready as a frame is a `prepared::Prepared`; one
//! connection to a server is a `connection::Connection`.

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;

use crate::auth::Key;
use crate::client::connection::Connection;
use crate::client::options::{ClientError, PackOptions, SendOptions};
use crate::client::prepared::Prepared;
use crate::client::walk::{self, Item};
use crate::escape::push_chat_text;

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
