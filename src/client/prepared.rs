//! A file ready to go as a frame (`Prepared`): opened, measured, named, hashed first unless the
//! checksum trails the body (then a resume id stands in for it), and written out as head and
//! body, with `sendfile(2)` where the output allows it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread;

use sha2::{Digest, Sha256};

use crate::client::options::{ClientError, Form, RESUME_MIN};
use crate::client::progress::Progress;
use crate::client::{filehash, stdin};
use crate::cpus;
use crate::proto::{Algo, HEADER_LEN, Header, name};
use crate::threads;

/// Buffer size for the read/write fallback when sendfile(2) cannot be used.
const CHUNK: usize = 1 << 20;

/// Bytes per sendfile(2) call (progress is updated after each).
const SEND_CHUNK: u64 = 8 << 20;

/// A body of at most this many bytes, sent in `send`'s window, is read into memory and sent with
/// its head in one write.
const INLINE_MAX: u64 = 64 << 10;

/// A file ready to go: opened, measured, and hashed unless the checksum trails the body.
pub(super) struct Prepared {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) name: String,
    pub(super) header: Header,
    /// The checksum, when known before sending (always for a header checksum).
    pub(super) known: Option<[u8; 32]>,
    /// Sent with the resume flag (`Form::resume`, files of `RESUME_MIN` bytes or more).
    pub(super) resume: bool,
    /// A small body read into memory to be sent with its head in one write
    /// (`load_for_window`).
    pub(super) inline: Option<Vec<u8>>,
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
pub(super) type TrailerTag<'a> = &'a dyn Fn(&[u8; 32]) -> [u8; 32];

impl Prepared {
    /// Opens `path` to be sent as `form` says, or under `as_name` (a name with subdirectories,
    /// from `send -r`; then a symlink is never followed).
    pub(super) fn open(
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
            inline: None,
        })
    }

    /// Makes a file ready for `send`'s window: a body of at most `INLINE_MAX` bytes is read into
    /// memory (and its trailing checksum computed from those bytes), to go out with its head in
    /// one write; a larger one gets its trailing checksum computed now, on this thread, where a
    /// hashing thread beside `sendfile` would cost more than it saves.
    pub(super) fn load_for_window(&mut self) -> io::Result<()> {
        let (algo, size) = (self.header.algo, self.header.size);
        if size > INLINE_MAX {
            if self.known.is_none() {
                self.known = Some(filehash::checksum_file(algo, &self.file, size, 0, &|_| {})?);
            }
            return Ok(());
        }
        if self.inline.is_some() {
            return Ok(());
        }
        let mut body = vec![0u8; size as usize];
        self.file.read_exact_at(&mut body, 0).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::other(format!("{} shrank while being read", self.path.display()))
            } else {
                e
            }
        })?;
        if self.known.is_none() {
            self.known = Some(match algo {
                Algo::Blake3 => *blake3::hash(&body).as_bytes(),
                Algo::Sha256 => Sha256::digest(&body).into(),
            });
        }
        self.inline = Some(body);
        Ok(())
    }

    /// A frame whose body was read into memory (`load_for_window`): head, tag, body and, when it
    /// trails, the checksum and its tag, in one buffer; `None` for a frame that was not.
    pub(super) fn inline_frame(
        &self,
        tag: Option<&[u8]>,
        trailer_tag: Option<TrailerTag<'_>>,
    ) -> Option<Vec<u8>> {
        let body = self.inline.as_ref()?;
        let mut out = Vec::with_capacity(HEADER_LEN + self.name.len() + body.len() + 128);
        out.extend_from_slice(&self.raw_header());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(tag.unwrap_or_default());
        out.extend_from_slice(body);
        if self.header.trailing {
            let sum = self.known?;
            out.extend_from_slice(&sum);
            if let Some(trailer_tag) = trailer_tag {
                out.extend_from_slice(&trailer_tag(&sum));
            }
        }
        Some(out)
    }

    /// The header as sent: with the resume flag when `resume`.
    pub(super) fn raw_header(&self) -> [u8; HEADER_LEN] {
        let raw = self.header.encode();
        if self.resume {
            Header::with_resume_flag(raw)
        } else {
            raw
        }
    }

    /// Writes header, name and tag.
    pub(super) fn write_head<W: Write>(&self, out: &mut W, tag: Option<&[u8]>) -> io::Result<()> {
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
    pub(super) fn write_to<W: Write + AsFd>(
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
    pub(super) fn write_rest<W: Write + AsFd>(
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
        let file = &self.file;
        let mut hashed = None;
        let (sent, joined) = thread::scope(|s| {
            let hasher = match known {
                Some(_) => None,
                None => Some(threads::spawn_scoped(
                    s,
                    None,
                    None,
                    Box::new(|| {
                        hashed = Some(filehash::checksum_file(
                            algo,
                            file,
                            size,
                            hash_depth(),
                            &|_| {},
                        ));
                    }),
                )),
            };
            let sent = self.write_body(out, from, tick);
            (sent, hasher.map(|h| h.map(|h| h.join())))
        });
        let sum = match joined {
            Some(Ok(Ok(()))) => hashed.unwrap_or_else(|| Err(io::Error::other("no checksum"))),
            Some(Ok(Err(_))) => Err(io::Error::other("hashing thread panicked")),
            Some(Err(e)) => Err(e),
            None => known.ok_or_else(|| io::Error::other("no checksum")),
        };
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
    pub(super) fn write_body<W: Write + AsFd>(
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

/// How many times to halve the file's hash tree for parallel hashing: enough subtrees for every
/// core, twice over, so that uneven halves still keep all cores busy.
pub(super) fn hash_depth() -> u32 {
    let cores = cpus::count() as u32;
    if cores <= 1 {
        0
    } else {
        (cores.next_power_of_two().trailing_zeros() + 1).min(4)
    }
}

pub(super) fn progress_bar(shown: bool, len: u64, what: &str) -> Progress {
    Progress::new(shown, len, what)
}
