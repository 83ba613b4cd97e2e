//! `ferryd send -r DIR…`: the regular files under each directory, named by their path relative
//! to the directory's parent (`send -r photos` sends `photos/2024/a.jpg`). Symbolic links and
//! special files are skipped with a note, never followed, and the walk stops at the depth a
//! server accepts (`proto::name::MAX_DEPTH`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::proto::name::MAX_DEPTH;

/// One file to send and the name it is sent under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    /// `None`: the file's own name (a FILE argument given as is).
    pub name: Option<String>,
}

/// The files `send -r` sends for `args`, in order (directories walked in name order), and a
/// note for each entry skipped.
pub fn expand(args: &[PathBuf]) -> (Vec<Item>, Vec<String>) {
    let mut items = Vec::new();
    let mut notes = Vec::new();
    for arg in args {
        let is_dir = fs::symlink_metadata(arg).is_ok_and(|m| m.is_dir());
        if !is_dir {
            // A plain FILE (or an error Prepared::open will report).
            items.push(Item {
                path: arg.clone(),
                name: None,
            });
            continue;
        }
        match top_name(arg) {
            Some(top) => walk(arg, &top, 1, &mut items, &mut notes),
            None => notes.push(format!(
                "{}: skipped: a directory without a name (send its contents instead)",
                arg.display()
            )),
        }
    }
    (items, notes)
}

/// The name `dir` is sent under: its last component (of its canonical path for `.`).
fn top_name(dir: &Path) -> Option<String> {
    let name = match dir.file_name() {
        Some(n) => n.to_os_string(),
        None => dir.canonicalize().ok()?.file_name()?.to_os_string(),
    };
    Some(name.to_string_lossy().into_owned())
}

/// Adds the files under `dir`, which is sent as `prefix` (`depth` components).
fn walk(dir: &Path, prefix: &str, depth: usize, items: &mut Vec<Item>, notes: &mut Vec<String>) {
    let mut entries: Vec<fs::DirEntry> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(Result::ok).collect(),
        Err(e) => {
            notes.push(format!("{}: skipped: {e}", dir.display()));
            return;
        }
    };
    // Names in one directory are unique: an unstable sort gives the same order.
    entries.sort_unstable_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = format!("{prefix}/{}", entry.file_name().to_string_lossy());
        // DirEntry::file_type does not follow symlinks.
        let kind = match entry.file_type() {
            Ok(k) => k,
            Err(e) => {
                notes.push(format!("{}: skipped: {e}", path.display()));
                continue;
            }
        };
        if kind.is_symlink() {
            notes.push(format!(
                "{}: skipped: a symbolic link (never followed)",
                path.display()
            ));
        } else if kind.is_dir() {
            if depth + 1 >= MAX_DEPTH {
                notes.push(format!(
                    "{}: skipped: deeper than {MAX_DEPTH} path components",
                    path.display()
                ));
            } else {
                walk(&path, &name, depth + 1, items, notes);
            }
        } else if kind.is_file() {
            items.push(Item {
                path,
                name: Some(name),
            });
        } else {
            notes.push(format!(
                "{}: skipped: {}",
                path.display(),
                special_kind(&entry).unwrap_or_else(|_| "not a regular file".into())
            ));
        }
    }
}

fn special_kind(entry: &fs::DirEntry) -> io::Result<String> {
    use std::os::unix::fs::FileTypeExt;
    let t = entry.file_type()?;
    Ok(if t.is_fifo() {
        "a named pipe (FIFO), not a regular file"
    } else if t.is_socket() {
        "a socket, not a regular file"
    } else if t.is_block_device() || t.is_char_device() {
        "a device, not a regular file"
    } else {
        "not a regular file"
    }
    .to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn walks_files_and_skips_links_with_a_note() {
        let root = std::env::temp_dir().join(format!("ferryd-walk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let top = root.join("photos");
        fs::create_dir_all(top.join("2024/deep")).unwrap();
        fs::write(top.join("b.txt"), b"b").unwrap();
        fs::write(top.join("2024/a.jpg"), b"a").unwrap();
        fs::write(top.join("2024/deep/c"), b"c").unwrap();
        fs::write(root.join("secret"), b"s").unwrap();
        symlink(root.join("secret"), top.join("link")).unwrap();
        symlink(&root, top.join("loop")).unwrap();
        let (items, notes) = expand(&[top.clone(), root.join("secret")]);
        let names: Vec<Option<&str>> = items.iter().map(|i| i.name.as_deref()).collect();
        assert_eq!(
            names,
            [
                Some("photos/2024/a.jpg"),
                Some("photos/2024/deep/c"),
                Some("photos/b.txt"),
                None
            ]
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes.iter().all(|n| n.contains("symbolic link")),
            "{notes:?}"
        );
        let _ = fs::remove_dir_all(&root);
    }
}
