//! The rules a file name must pass before anything is stored: one plain path component of UTF-8
//! text, nothing a file system or a terminal could read as more than a name.

use std::fmt;

use super::header::MAX_NAME_LEN;

/// Prefix of the server's temporary files; no upload may take a name that starts with it.
pub const RESERVED_PREFIX: &str = ".ferryd-";

/// Why a name was refused (answered as `ERR bad-name <reason>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong(usize),
    NotUtf8,
    Separator,
    Nul,
    Control,
    DotOrDotDot,
    Reserved,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("empty name"),
            NameError::TooLong(n) => write!(f, "name is {n} bytes, over {MAX_NAME_LEN}"),
            NameError::NotUtf8 => f.write_str("name is not UTF-8"),
            NameError::Separator => f.write_str("name contains a path separator (/ or \\)"),
            NameError::Nul => f.write_str("name contains a NUL byte"),
            NameError::Control => f.write_str("name contains a control character"),
            NameError::DotOrDotDot => f.write_str("name is . or .."),
            NameError::Reserved => write!(f, "names starting with {RESERVED_PREFIX} are reserved"),
        }
    }
}

impl std::error::Error for NameError {}

/// Checks a file name received from a peer and returns it as text.
pub fn validate(bytes: &[u8]) -> Result<&str, NameError> {
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() > usize::from(MAX_NAME_LEN) {
        return Err(NameError::TooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(NameError::Nul);
    }
    let name = std::str::from_utf8(bytes).map_err(|_| NameError::NotUtf8)?;
    if name.contains(['/', '\\']) {
        return Err(NameError::Separator);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    if name == "." || name == ".." {
        return Err(NameError::DotOrDotDot);
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(NameError::Reserved);
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names() {
        for name in [
            "a",
            "photo.jpg",
            "résumé (final).pdf",
            ".bashrc",
            "..hidden",
            "a b",
            "日本語.txt",
            "-rf",
            "x".repeat(255).as_str(),
        ] {
            assert_eq!(validate(name.as_bytes()), Ok(name));
        }
    }

    #[test]
    fn bad_names() {
        let long = vec![b'x'; 256];
        let cases: [(&[u8], NameError); 14] = [
            (b"", NameError::Empty),
            (&long, NameError::TooLong(256)),
            (b"\xff\xfe", NameError::NotUtf8),
            (b"caf\xc3", NameError::NotUtf8),
            (b"a/b", NameError::Separator),
            (b"/etc", NameError::Separator),
            (b"..\\win", NameError::Separator),
            (b"a\0b", NameError::Nul),
            (b"line\nbreak", NameError::Control),
            (b"\x1b[31mred", NameError::Control),
            (b"del\x7f", NameError::Control),
            (b".", NameError::DotOrDotDot),
            (b"..", NameError::DotOrDotDot),
            (b".ferryd-1234.part", NameError::Reserved),
        ];
        for (bytes, want) in cases {
            assert_eq!(validate(bytes), Err(want), "{bytes:?}");
        }
        // C1 controls (U+0080..U+009F) are control characters too.
        assert_eq!(validate("a\u{85}b".as_bytes()), Err(NameError::Control));
    }
}
