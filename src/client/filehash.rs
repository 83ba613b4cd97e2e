//! The checksum of a whole file as the client computes it: BLAKE3 on several threads (the tree
//! hash is split at its top nodes with `blake3::hazmat`, each subtree is read with `pread` and
//! hashed on its own thread, and the chaining values are merged), or SHA-256 in one sequential
//! pass. Used before the header is sent (header checksum) or beside `sendfile` (trailing).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::thread;

use sha2::{Digest, Sha256};

use crate::proto::Algo;
use crate::threads;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

/// Files smaller than this are hashed on one thread; splitting would cost more than it saves.
const PARALLEL_MIN: u64 = 8 << 20;
/// Read size per `pread`.
const READ_CHUNK: usize = 1 << 20;

/// The `algo` checksum of the first `len` bytes of `file` (BLAKE3 on up to `2^depth` threads).
pub fn checksum_file(
    algo: Algo,
    file: &File,
    len: u64,
    depth: u32,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<[u8; 32]> {
    match algo {
        Algo::Blake3 => hash_file(file, len, depth, progress),
        Algo::Sha256 => {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; READ_CHUNK.min(len as usize)];
            let mut done = 0u64;
            while done < len {
                let want = (len - done).min(buf.len() as u64) as usize;
                let n = match file.read_at(&mut buf[..want], done) {
                    Ok(0) => return Err(io::Error::other("file shrank while being hashed")),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                hasher.update(&buf[..n]);
                done += n as u64;
                progress(n as u64);
            }
            Ok(hasher.finalize().into())
        }
    }
}

/// Hashes the first `len` bytes of `file`, splitting the work into up to `2^depth` subtrees
/// hashed at once. `progress` is called with byte counts as they are hashed (from any thread).
pub fn hash_file(
    file: &File,
    len: u64,
    depth: u32,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<[u8; 32]> {
    if len < PARALLEL_MIN || depth == 0 || len <= blake3::CHUNK_LEN as u64 {
        let mut hasher = blake3::Hasher::new();
        feed(file, 0, len, &mut hasher, progress)?;
        return Ok(*hasher.finalize().as_bytes());
    }
    let left_len = left_subtree_len(len);
    let (left, right) = halves(file, 0, len, left_len, depth, progress);
    Ok(*merge_subtrees_root(&left?, &right?, Mode::Hash).as_bytes())
}

/// The chaining value of the subtree covering `file[offset..offset + len]`, which must be a
/// complete subtree of the file's BLAKE3 tree (as the halves `left_subtree_len` gives are).
fn subtree(
    file: &File,
    offset: u64,
    len: u64,
    depth: u32,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<ChainingValue> {
    if depth == 0 || len <= blake3::CHUNK_LEN as u64 {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(offset);
        feed(file, offset, len, &mut hasher, progress)?;
        return Ok(hasher.finalize_non_root());
    }
    let left_len = left_subtree_len(len);
    let (left, right) = halves(file, offset, len, left_len, depth, progress);
    Ok(merge_subtrees_non_root(&left?, &right?, Mode::Hash))
}

/// The chaining values of the two halves of `file[offset..offset + len]`, split after
/// `left_len` bytes: the right one on a thread of its own, the left one on this thread.
fn halves(
    file: &File,
    offset: u64,
    len: u64,
    left_len: u64,
    depth: u32,
    progress: &(dyn Fn(u64) + Sync),
) -> (io::Result<ChainingValue>, io::Result<ChainingValue>) {
    let mut right = None;
    let (left, joined) = thread::scope(|s| {
        let spawned = threads::spawn_scoped(
            s,
            None,
            None,
            Box::new(|| {
                right = Some(subtree(
                    file,
                    offset + left_len,
                    len - left_len,
                    depth - 1,
                    progress,
                ));
            }),
        );
        let left = subtree(file, offset, left_len, depth - 1, progress);
        (left, spawned.map(|h| h.join()))
    });
    let right = match (joined, right) {
        (Ok(Ok(())), Some(right)) => right,
        (Err(e), _) => Err(e),
        _ => Err(io::Error::other("hashing thread panicked")),
    };
    (left, right)
}

fn feed(
    file: &File,
    offset: u64,
    len: u64,
    hasher: &mut blake3::Hasher,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<()> {
    let mut buf = vec![0u8; READ_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = match file.read_at(&mut buf[..want], offset + done) {
            Ok(0) => return Err(io::Error::other("file shrank while being hashed")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(n as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn matches_blake3_hash_at_every_split() {
        let dir = std::env::temp_dir().join(format!("ferryd-filehash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        let data: Vec<u8> = (0..(20u32 << 20) + 777)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        let file = File::open(&path).unwrap();
        let sizes = [
            0u64,
            1,
            1024,
            1025,
            3 << 20,
            (8 << 20) - 1,
            8 << 20,
            (8 << 20) + 1,
            (12 << 20) + 5,
            16 << 20,
            data.len() as u64,
        ];
        for len in sizes {
            let want = *blake3::hash(&data[..len as usize]).as_bytes();
            for depth in 0..4 {
                let seen = std::sync::atomic::AtomicU64::new(0);
                let got = hash_file(&file, len, depth, &|n| {
                    seen.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                })
                .unwrap();
                assert_eq!(got, want, "len {len} depth {depth}");
                assert_eq!(
                    seen.into_inner(),
                    len,
                    "progress for len {len} depth {depth}"
                );
            }
        }
        for len in [0, 1, (1 << 20) + 3, data.len() as u64] {
            let want: [u8; 32] = Sha256::digest(&data[..len as usize]).into();
            let got = checksum_file(Algo::Sha256, &file, len, 2, &|_| {}).unwrap();
            assert_eq!(got, want, "sha256 len {len}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
