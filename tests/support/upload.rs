//! Upload frames and answers as the tests build and expect them, and the daemon's temporary
//! files in an upload directory.

use std::path::Path;

use ferryd::proto::{HEADER_LEN, Header};

use super::names_in;

/// The header announcing `body` under `name`, built with the crate's own encoder.
pub fn header_for(name: impl AsRef<[u8]>, body: &[u8], authenticated: bool) -> [u8; HEADER_LEN] {
    Header {
        authenticated,
        name_len: u16::try_from(name.as_ref().len()).expect("test names fit in a u16"),
        size: body.len() as u64,
        checksum: *blake3::hash(body).as_bytes(),
        ..Header::default()
    }
    .encode()
}

/// The header and name of `body` sent as `name`, resumable (flag bit 3); the body follows.
pub fn resumable_head(name: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Header::with_resume_flag(header_for(name, body, false)).to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// Header, name and body of an unauthenticated BLAKE3 frame, in one buffer.
pub fn frame(name: impl AsRef<[u8]>, body: &[u8]) -> Vec<u8> {
    let name = name.as_ref();
    let mut out = header_for(name, body, false).to_vec();
    out.extend_from_slice(name);
    out.extend_from_slice(body);
    out
}

/// The answer the daemon must give for `body` stored as `stored`.
pub fn ok_line(stored: &str, body: &[u8]) -> String {
    format!(
        "OK {stored} {} {}\n",
        body.len(),
        blake3::hash(body).to_hex()
    )
}

/// Whether `name` is one of the daemon's temporary files.
pub fn is_part(name: &str) -> bool {
    name.starts_with(".ferryd-") && name.ends_with(".part")
}

/// The daemon's temporary files in `dir`, sorted.
pub fn parts_in(dir: &Path) -> Vec<String> {
    names_in(dir).into_iter().filter(|n| is_part(n)).collect()
}
