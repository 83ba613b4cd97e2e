//! Directories beneath the upload directory, for names with subdirectories
//! (`files.allow_subdirs`): walked, and created when asked, one component at a time from a
//! directory handle, never following a symbolic link and never leaving the upload directory.
//!
//! Every component has passed `proto::name::validate_path` (no `/`, no `.` or `..`, not empty),
//! and each is opened with `openat(parent, component, O_DIRECTORY | O_NOFOLLOW)`: a component
//! that is a symlink fails (ELOOP) instead of being followed, so a link planted inside the
//! upload directory can never lead a write outside it, and `..` never reaches the kernel.
//! (`openat2` with `RESOLVE_BENEATH` would give the same guarantee in one call on Linux 5.6+;
//! the walk works on every kernel and also creates what is missing.)

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::escape::{Escaped, escaped};

/// Mode of the directories ferryd creates (the upload directory's own).
const DIR_MODE: u32 = 0o750;

/// Why a directory beneath the upload directory could not be reached.
#[derive(Debug)]
pub enum WalkError {
    /// `path` (the leading components so far) is a symlink, which is never followed.
    Symlink(String),
    /// `path` exists and is a file (or anything but a directory).
    NotADirectory(String),
    Io {
        path: String,
        err: io::Error,
    },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Paths come from the peer: shown escaped wherever this is printed.
            WalkError::Symlink(p) => {
                write!(
                    f,
                    "{} is a symbolic link in the upload directory, never followed",
                    shown(p)
                )
            }
            WalkError::NotADirectory(p) => {
                write!(f, "{} exists and is not a directory", shown(p))
            }
            WalkError::Io { path, err } => {
                write!(f, "cannot open or create directory {}: {err}", shown(path))
            }
        }
    }
}

impl std::error::Error for WalkError {}

/// A peer-chosen name or path as an error shows it (log line and answer): escaped, so that a
/// control, bidi or zero-width character cannot forge or disguise the line.
pub(crate) fn shown(name: &str) -> Escaped<'_> {
    escaped(name.as_bytes(), 4096)
}

/// Opens the directory `parents` (`a/b`, components checked by `validate_path`; empty: `root`
/// itself is wanted and `Ok(None)` is returned) beneath `root`. With `create`, a missing
/// component is made (mode 0750) and its parent fsynced, so the new entry is durable before a
/// file is renamed into it; without, a missing component gives `Ok(None)`.
pub fn open_beneath(
    root: BorrowedFd<'_>,
    parents: &str,
    create: bool,
) -> Result<Option<OwnedFd>, WalkError> {
    let mut current: Option<OwnedFd> = None;
    let mut end = 0;
    for component in parents.split('/').filter(|c| !c.is_empty()) {
        end += component.len() + usize::from(end > 0);
        let so_far = parents.get(..end).unwrap_or(parents);
        let dir = current.as_ref().map_or(root, |fd| fd.as_fd());
        let next = match open_dir(dir, component) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if !create => return Ok(None),
            Err(Errno::NOENT) => make_dir(dir, component, so_far)?,
            Err(e) => return Err(classify(dir, component, so_far, e)),
        };
        current = Some(next);
    }
    Ok(current)
}

/// What kind of entry `name` in `dir` is, without following a symlink; `None` if absent.
pub fn entry_type(dir: BorrowedFd<'_>, name: &str) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn open_dir(dir: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Creates `name` in `dir` (someone else creating it first is fine), fsyncs `dir` and opens it.
fn make_dir(dir: BorrowedFd<'_>, name: &str, so_far: &str) -> Result<OwnedFd, WalkError> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(DIR_MODE)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => {
            return Err(WalkError::Io {
                path: so_far.to_string(),
                err: e.into(),
            });
        }
    }
    let io_err = |e: Errno| WalkError::Io {
        path: so_far.to_string(),
        err: e.into(),
    };
    let opened = open_dir(dir, name).map_err(|e| classify(dir, name, so_far, e))?;
    // The umask may have narrowed the mode; a directory ferryd creates gets exactly 0750.
    rustix::fs::fchmod(&opened, Mode::from_raw_mode(DIR_MODE)).map_err(io_err)?;
    rustix::fs::fsync(dir).map_err(io_err)?;
    Ok(opened)
}

/// Turns a failed `open_dir` into the reason a person needs.
fn classify(dir: BorrowedFd<'_>, name: &str, so_far: &str, e: Errno) -> WalkError {
    if e == Errno::LOOP || e == Errno::NOTDIR {
        match entry_type(dir, name) {
            Ok(Some(FileType::Symlink)) => return WalkError::Symlink(so_far.to_string()),
            Ok(Some(FileType::Directory)) | Ok(None) | Err(_) => {}
            Ok(Some(_)) => return WalkError::NotADirectory(so_far.to_string()),
        }
    }
    WalkError::Io {
        path: so_far.to_string(),
        err: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ferryd-subdir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn walks_creates_and_refuses_links_and_files() {
        let root_path = temp_dir("walk");
        let outside = temp_dir("outside");
        let root = File::open(&root_path).unwrap();
        let fd = root.as_fd();
        // Missing without create: nothing made.
        assert!(matches!(open_beneath(fd, "a/b", false), Ok(None)));
        assert!(!root_path.join("a").exists());
        // Created with create, then found without.
        assert!(matches!(open_beneath(fd, "a/b", true), Ok(Some(_))));
        assert!(root_path.join("a/b").is_dir());
        assert!(matches!(open_beneath(fd, "a/b", false), Ok(Some(_))));
        assert!(matches!(open_beneath(fd, "", true), Ok(None)));
        // A symlink at any depth is refused, nothing is created through it.
        symlink(&outside, root_path.join("a/link")).unwrap();
        symlink(&outside, root_path.join("top")).unwrap();
        fs::write(root_path.join("a/file"), b"x").unwrap();
        let cases = [
            ("top", "Symlink(\"top\")"),
            ("top/x", "Symlink(\"top\")"),
            ("a/link/x", "Symlink(\"a/link\")"),
            ("a/file", "NotADirectory(\"a/file\")"),
            ("a/file/x", "NotADirectory(\"a/file\")"),
        ];
        for (path, want) in cases {
            for create in [false, true] {
                let got = open_beneath(fd, path, create);
                assert_eq!(
                    format!("{:?}", got.err()),
                    format!("Some({want})"),
                    "{path}"
                );
            }
        }
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing outside"
        );
        let _ = fs::remove_dir_all(&root_path);
        let _ = fs::remove_dir_all(&outside);
    }
}
