//! The rules a file name must pass before anything is stored: one plain path component of UTF-8
//! text, nothing a file system or a terminal could read as more than a name. With
//! `files.allow_subdirs`, a relative path (`photos/2024/a.jpg`) whose every component passes
//! the same rules, at most `MAX_DEPTH` components deep.

use std::fmt;

use super::header::MAX_NAME_LEN;

/// Prefix of the server's temporary files; no upload may take a name that starts with it.
pub const RESERVED_PREFIX: &str = ".ferryd-";
/// Most components in a name with subdirectories (`a/b/c.txt` has 3). The whole name is at most
/// `MAX_NAME_LEN` bytes, like any name.
pub const MAX_DEPTH: usize = 16;

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
    /// A name with subdirectories: component `n` (from 1) breaks the rule.
    InComponent(usize, ComponentError),
    TooDeep(usize),
}

/// What is wrong with one component of a name with subdirectories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentError {
    /// Empty: the name starts with `/` (absolute), ends with it or has `//`.
    Empty,
    NotUtf8,
    Backslash,
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
            NameError::InComponent(n, e) => write!(f, "path component {n} {e}"),
            NameError::TooDeep(n) => write!(f, "path has {n} components, over {MAX_DEPTH}"),
        }
    }
}

impl std::error::Error for NameError {}

impl fmt::Display for ComponentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ComponentError::Empty => "is empty (absolute path, or / at the end or twice)",
            ComponentError::NotUtf8 => "is not UTF-8",
            ComponentError::Backslash => "contains a backslash",
            ComponentError::Control => "contains a control character",
            ComponentError::DotOrDotDot => "is . or ..",
            ComponentError::Reserved => "starts with the reserved .ferryd-",
        })
    }
}

/// Checks a name that may hold subdirectories (`files.allow_subdirs = true`): `/`-separated
/// components, each following the rules of `validate`, at most `MAX_DEPTH` of them. A name
/// without `/` gets exactly `validate`'s answer.
pub fn validate_path(bytes: &[u8]) -> Result<&str, NameError> {
    if !bytes.contains(&b'/') {
        return validate(bytes);
    }
    if bytes.len() > usize::from(MAX_NAME_LEN) {
        return Err(NameError::TooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(NameError::Nul);
    }
    let depth = bytes.split(|&b| b == b'/').count();
    if depth > MAX_DEPTH {
        return Err(NameError::TooDeep(depth));
    }
    for (component, n) in bytes.split(|&b| b == b'/').zip(1..) {
        let err = match validate(component) {
            Ok(_) => continue,
            Err(NameError::Empty) => ComponentError::Empty,
            Err(NameError::NotUtf8) => ComponentError::NotUtf8,
            Err(NameError::Separator) => ComponentError::Backslash,
            Err(NameError::Control) => ComponentError::Control,
            Err(NameError::DotOrDotDot) => ComponentError::DotOrDotDot,
            Err(NameError::Reserved) => ComponentError::Reserved,
            // Each component is shorter than the whole name and has no NUL (checked above).
            Err(other) => return Err(other),
        };
        return Err(NameError::InComponent(n, err));
    }
    std::str::from_utf8(bytes).map_err(|_| NameError::NotUtf8)
}

/// A checked name split into its directories and its last component (`("", name)` without
/// subdirectories).
pub fn split_path(name: &str) -> (&str, &str) {
    name.rsplit_once('/').unwrap_or(("", name))
}

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

    #[test]
    fn paths_with_subdirectories() {
        let deepest = vec!["d"; MAX_DEPTH].join("/");
        for name in [
            "photos/2024/a.jpg",
            "a/b",
            ".config/x",
            "plain.txt",
            deepest.as_str(),
        ] {
            assert_eq!(validate_path(name.as_bytes()), Ok(name), "{name}");
        }
        let too_deep = vec!["d"; MAX_DEPTH + 1].join("/");
        let long = format!("{}/b", "a".repeat(255));
        use ComponentError as C;
        let cases: [(&[u8], NameError); 14] = [
            (b"/etc/passwd", NameError::InComponent(1, C::Empty)),
            (b"a//b", NameError::InComponent(2, C::Empty)),
            (b"a/", NameError::InComponent(2, C::Empty)),
            (b"../up", NameError::InComponent(1, C::DotOrDotDot)),
            (b"a/../../b", NameError::InComponent(2, C::DotOrDotDot)),
            (b"a/./b", NameError::InComponent(2, C::DotOrDotDot)),
            (b"a/..", NameError::InComponent(2, C::DotOrDotDot)),
            (b"a\\b/c", NameError::InComponent(1, C::Backslash)),
            (b"a/\x1b[2J", NameError::InComponent(2, C::Control)),
            (b"a/\xff", NameError::InComponent(2, C::NotUtf8)),
            (b"a/.ferryd-1.part", NameError::InComponent(2, C::Reserved)),
            (b"a/b\0", NameError::Nul),
            (too_deep.as_bytes(), NameError::TooDeep(MAX_DEPTH + 1)),
            (long.as_bytes(), NameError::TooLong(257)),
        ];
        for (bytes, want) in cases {
            assert_eq!(validate_path(bytes), Err(want), "{bytes:?}");
        }
        // Without subdirectories the rules are validate's.
        assert_eq!(validate_path(b".."), Err(NameError::DotOrDotDot));
        assert_eq!(split_path("a/b/c.txt"), ("a/b", "c.txt"));
        assert_eq!(split_path("c.txt"), ("", "c.txt"));
    }
}
