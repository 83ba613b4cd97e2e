//! Standard input as a frame's body (`ferryd send --name NAME -`): a regular file redirected to
//! stdin is used in place; anything else (a pipe, a terminal) is spooled to an unlinked temp file
//! under `$TMPDIR`, hashed on the way, because the header names the body's size before its
//! first byte.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::proto::Algo;

/// Read size while spooling.
const CHUNK: usize = 1 << 20;

/// Standard input, ready to be sent: a file of `size` bytes from its start, and its checksum
/// when it was computed on the way.
pub struct Spooled {
    pub file: File,
    pub size: u64,
    pub checksum: Option<[u8; 32]>,
}

/// Why standard input could not be used.
#[derive(Debug)]
pub enum StdinError {
    /// The temp file could not be created or written (`no space` is the usual one).
    Spool {
        dir: PathBuf,
        err: io::Error,
    },
    Read(io::Error),
}

impl std::fmt::Display for StdinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StdinError::Spool { dir, err } => write!(
                f,
                "cannot hold standard input in {} until its size is known: {err} (set TMPDIR to a directory with room)",
                dir.display()
            ),
            StdinError::Read(err) => write!(f, "cannot read standard input: {err}"),
        }
    }
}

impl std::error::Error for StdinError {}

/// Takes standard input. A regular file is used in place (no copy, its checksum computed later
/// like any file's); anything else is copied into a temp file in `$TMPDIR` that is unlinked at
/// once (so it is removed even if ferryd is killed), hashed in `algo` as it is copied.
pub fn take(algo: Algo) -> Result<Spooled, StdinError> {
    let stdin = io::stdin();
    let fd = stdin
        .as_fd()
        .try_clone_to_owned()
        .map_err(StdinError::Read)?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(StdinError::Read)?;
    if meta.is_file() {
        // Sent from its current position would need an offset everywhere; from its start is
        // what `< file` means in practice.
        return Ok(Spooled {
            file,
            size: meta.len(),
            checksum: None,
        });
    }
    spool(&mut stdin.lock(), algo, &std::env::temp_dir())
}

/// Copies `input` into an unlinked temp file in `dir`, hashing it.
pub fn spool(
    input: &mut dyn Read,
    algo: Algo,
    dir: &std::path::Path,
) -> Result<Spooled, StdinError> {
    let spool_err = |err| StdinError::Spool {
        dir: dir.to_path_buf(),
        err,
    };
    let mut file = create_unlinked(dir).map_err(spool_err)?;
    let mut blake = blake3::Hasher::new();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StdinError::Read(e)),
        };
        match algo {
            Algo::Blake3 => {
                blake.update(&buf[..n]);
            }
            Algo::Sha256 => sha.update(&buf[..n]),
        }
        file.write_all(&buf[..n]).map_err(spool_err)?;
        size += n as u64;
    }
    // A full disk may only show at the flush of the last pages.
    file.sync_data().map_err(spool_err)?;
    let checksum = match algo {
        Algo::Blake3 => *blake.finalize().as_bytes(),
        Algo::Sha256 => sha.finalize().into(),
    };
    Ok(Spooled {
        file,
        size,
        checksum: Some(checksum),
    })
}

/// A new file in `dir` that has no name: created with O_EXCL under a random name and unlinked
/// at once.
fn create_unlinked(dir: &std::path::Path) -> io::Result<File> {
    for _ in 0..16 {
        let mut random = [0u8; 8];
        crate::auth::new_nonce().map(|n| random.copy_from_slice(&n[..8]))?;
        let path = dir.join(format!(
            ".ferryd-stdin-{}",
            crate::proto::wire::hex(&random)
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free temp file name"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn spools_and_hashes_and_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("ferryd-stdin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..(3u32 << 20) + 11)
            .map(|i| ((i * 7) >> 3) as u8)
            .collect();
        for (algo, want) in [
            (Algo::Blake3, *blake3::hash(&data).as_bytes()),
            (Algo::Sha256, Sha256::digest(&data).into()),
        ] {
            let s = spool(&mut &data[..], algo, &dir).unwrap();
            assert_eq!(s.size, data.len() as u64);
            assert_eq!(s.checksum, Some(want), "{algo}");
            let mut back = vec![0u8; data.len()];
            s.file.read_exact_at(&mut back, 0).unwrap();
            assert!(back == data);
            assert_eq!(
                std::fs::read_dir(&dir).unwrap().count(),
                0,
                "temp file left"
            );
        }
        let err = spool(&mut &data[..], Algo::Blake3, &dir.join("missing")).err();
        assert!(matches!(err, Some(StdinError::Spool { .. })), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
