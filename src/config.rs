//! The configuration: the TOML schema, its validation into a typed `Config`, and errors that name
//! the file, line, key, bad value and what is allowed.
//!
//! Two layers, as ripgrep does with its flags: serde reads the file into `Raw*` structs whose fields
//! are `Spanned<Value>` (so every error can point at a line), then `validate` turns them into a
//! `Config` whose fields already hold `Duration`s, addresses and checked limits. `parse` is pure
//! (a `&str` in, a `Result` out); `load` only adds the file read.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Spanned, Value};

use crate::escape::quoted;
use crate::rules::{Cidr, Rules};

/// The configuration file shipped in `config/config.toml`; its values are the built-in defaults
/// (this unit test holds the two together).
#[cfg(test)]
const SHIPPED: &str = include_str!("../config/config.toml");

/// A validated configuration. Every field is within its documented range.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub udp: UdpConfig,
    pub files: FilesConfig,
    pub access: AccessConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessConfig {
    pub rules: Rules,
    /// Connections open at once from one address.
    pub max_per_ip: u32,
    /// File frames one connection may carry.
    pub max_files_per_connection: u32,
    /// Text needs the `AUTH` line too, not only file frames.
    pub require_token: bool,
    /// Time from a frame's first byte to the end of its header, name and tag.
    pub header_timeout: Duration,
    /// Slowest body accepted, measured over `RATE_WINDOW`; 0 disables the check.
    pub min_upload_bytes_per_sec: u64,
    /// With `require_token`: time from the connection's start to a good `AUTH` line.
    pub auth_timeout: Duration,
    /// Loopback peers (127.0.0.0/8, ::1) are not counted against `max_per_ip`.
    pub exempt_loopback: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub bind: IpAddr,
    pub port: u16,
    pub max_connections: usize,
    pub queue_depth: usize,
    pub backlog: u32,
    pub idle_timeout: Duration,
    pub max_line_bytes: usize,
    pub thread_stack_kib: usize,
    pub shutdown_grace: Duration,
    pub mode: Mode,
    /// Chat mode: messages waiting for one slow client before it is dropped.
    pub chat_queue_depth: usize,
    /// A text line must be complete within this time of its first byte.
    pub line_timeout: Duration,
    /// A write to a peer that does not take it fails after this time.
    pub write_timeout: Duration,
    /// Longest wait in the queue for a worker before `ERR busy`.
    pub queue_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UdpConfig {
    pub enabled: bool,
    /// Defaults to `server.bind`.
    pub bind: IpAddr,
    /// Defaults to `server.port`.
    pub port: u16,
    pub max_datagram_bytes: usize,
    /// Token bucket per peer address: datagrams echoed per second, and the bucket size.
    pub rate_per_sec: u32,
    pub burst: u32,
    /// Peer addresses whose buckets are remembered at once.
    pub max_peers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every byte goes back to its sender as it arrives.
    Echo,
    /// Every complete line goes to every other client, prefixed with its sender.
    Chat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FilesConfig {
    /// Where uploads are stored (created with mode 0750 if missing).
    pub dir: PathBuf,
    pub max_file_size: u64,
    pub on_conflict: OnConflict,
    /// Permission bits of stored files.
    pub file_mode: u32,
    pub min_free_bytes: u64,
    /// The shared upload key; `None`: uploads need no key.
    pub token_file: Option<PathBuf>,
}

/// What happens when an upload's name is already taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Store as `name (1).ext`, `name (2).ext`, …
    Rename,
    /// Refuse with `ERR exists`.
    Reject,
    /// Replace the old file atomically.
    Overwrite,
}

impl OnConflict {
    pub fn as_str(self) -> &'static str {
        match self {
            OnConflict::Rename => "rename",
            OnConflict::Reject => "reject",
            OnConflict::Overwrite => "overwrite",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: log::LevelFilter,
    pub format: LogFormat,
    /// Refusals beyond the per-reason line budget are summed up once per this interval.
    pub refusal_summary: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `Journal` when stderr is connected to the journal (`$JOURNAL_STREAM`), else `Human`.
    Auto,
    /// RFC 3339 timestamp, level, message.
    Human,
    /// `<N>message`: the sd-daemon priority prefix, no timestamp.
    Journal,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Human => "human",
            LogFormat::Journal => "journal",
            LogFormat::Json => "json",
        }
    }
}

/// Where a configuration came from; the first log line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--config PATH`.
    Flag(PathBuf),
    /// `$FERRYD_CONFIG`.
    Env(PathBuf),
    /// `/etc/ferryd/config.toml`, found on disk.
    System(PathBuf),
    /// No file: the built-in defaults.
    Builtin,
}

/// A configuration that cannot be used. `Display` names the file, line, key, value and what is
/// allowed, as far as each is known.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read { path: PathBuf, err: std::io::Error },
    /// The file is not valid TOML, has an unknown key or a value of the wrong shape.
    Invalid {
        file: String,
        line: Option<usize>,
        key: Option<String>,
        value: Option<String>,
        problem: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, err } => {
                write!(f, "cannot read config file {}: {err}", path.display())
            }
            ConfigError::Invalid {
                file,
                line,
                key,
                value,
                problem,
            } => {
                write!(f, "{file}")?;
                if let Some(line) = line {
                    write!(f, ":{line}")?;
                }
                match (key, value) {
                    (Some(k), Some(v)) => write!(f, ": {k} = {v}")?,
                    (Some(k), None) => write!(f, ": {k}")?,
                    _ => {}
                }
                write!(f, ": {problem}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// The system-wide configuration path tried when neither `--config` nor `$FERRYD_CONFIG` is given.
pub const SYSTEM_PATH: &str = "/etc/ferryd/config.toml";

impl Origin {
    /// Picks the configuration source: `flag`, else `env` (the value of `$FERRYD_CONFIG`), else
    /// `/etc/ferryd/config.toml` if it exists, else the built-in defaults.
    pub fn choose(flag: Option<PathBuf>, env: Option<PathBuf>) -> Origin {
        if let Some(p) = flag {
            return Origin::Flag(p);
        }
        if let Some(p) = env.filter(|p| !p.as_os_str().is_empty()) {
            return Origin::Env(p);
        }
        let system = Path::new(SYSTEM_PATH);
        if system.exists() {
            return Origin::System(system.to_path_buf());
        }
        Origin::Builtin
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            Origin::Flag(p) | Origin::Env(p) | Origin::System(p) => Some(p),
            Origin::Builtin => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(p) => write!(f, "{} (from --config)", p.display()),
            Origin::Env(p) => write!(f, "{} (from $FERRYD_CONFIG)", p.display()),
            Origin::System(p) => write!(f, "{}", p.display()),
            Origin::Builtin => write!(
                f,
                "built-in defaults (same as the shipped config/config.toml)"
            ),
        }
    }
}

/// Reads and validates the configuration named by `origin`.
pub fn load(origin: &Origin) -> Result<Config, ConfigError> {
    let Some(path) = origin.path() else {
        return Ok(Config::default());
    };
    let src = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
        path: path.to_path_buf(),
        err,
    })?;
    parse(&src, &path.display().to_string())
}

/// Parses and validates configuration text. `file` is only used in error messages.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { src, file };
    let raw: RawConfig = toml::from_str(src).map_err(|e| ctx.toml_error(&e))?;
    ctx.validate(&raw)
}

impl Default for Config {
    fn default() -> Config {
        Config {
            server: ServerConfig {
                bind: IpAddr::from([127, 0, 0, 1]),
                port: PORT.default as u16,
                max_connections: MAX_CONNECTIONS.default as usize,
                queue_depth: QUEUE_DEPTH.default as usize,
                backlog: BACKLOG.default as u32,
                idle_timeout: Duration::from_secs(IDLE_TIMEOUT_SECS.default as u64),
                max_line_bytes: MAX_LINE_BYTES.default as usize,
                thread_stack_kib: THREAD_STACK_KIB.default as usize,
                shutdown_grace: Duration::from_secs(SHUTDOWN_GRACE_SECS.default as u64),
                mode: Mode::Echo,
                chat_queue_depth: CHAT_QUEUE_DEPTH.default as usize,
                line_timeout: Duration::from_secs(LINE_TIMEOUT_SECS.default as u64),
                write_timeout: Duration::from_secs(WRITE_TIMEOUT_SECS.default as u64),
                queue_timeout: Duration::from_secs(QUEUE_TIMEOUT_SECS.default as u64),
            },
            udp: UdpConfig {
                enabled: true,
                bind: IpAddr::from([127, 0, 0, 1]),
                port: PORT.default as u16,
                max_datagram_bytes: MAX_DATAGRAM_BYTES.default as usize,
                rate_per_sec: RATE_PER_SEC.default as u32,
                burst: BURST.default as u32,
                max_peers: MAX_PEERS.default as usize,
            },
            files: FilesConfig {
                dir: PathBuf::from(FILES_DIR_DEFAULT),
                max_file_size: MAX_FILE_SIZE.default as u64,
                on_conflict: OnConflict::Rename,
                file_mode: FILE_MODE.default as u32,
                min_free_bytes: MIN_FREE_BYTES.default as u64,
                token_file: None,
            },
            access: AccessConfig {
                rules: Rules::default(),
                max_per_ip: MAX_PER_IP.default as u32,
                max_files_per_connection: MAX_FILES_PER_CONNECTION.default as u32,
                require_token: false,
                header_timeout: Duration::from_secs(HEADER_TIMEOUT_SECS.default as u64),
                min_upload_bytes_per_sec: MIN_UPLOAD_BYTES_PER_SEC.default as u64,
                auth_timeout: Duration::from_secs(AUTH_TIMEOUT_SECS.default as u64),
                exempt_loopback: true,
            },
            log: LogConfig {
                level: log::LevelFilter::Info,
                format: LogFormat::Auto,
                refusal_summary: Duration::from_secs(REFUSAL_SUMMARY_SECS.default as u64),
            },
        }
    }
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Chat => "chat",
        }
    }
}

/// Renders the effective configuration as TOML that `parse` reads back to the same `Config`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.server;
        writeln!(f, "[server]")?;
        writeln!(f, "bind = \"{}\"", s.bind)?;
        writeln!(f, "port = {}", s.port)?;
        writeln!(f, "max_connections = {}", s.max_connections)?;
        writeln!(f, "queue_depth = {}", s.queue_depth)?;
        writeln!(f, "backlog = {}", s.backlog)?;
        writeln!(f, "idle_timeout_secs = {}", s.idle_timeout.as_secs())?;
        writeln!(f, "max_line_bytes = {}", s.max_line_bytes)?;
        writeln!(f, "thread_stack_kib = {}", s.thread_stack_kib)?;
        writeln!(f, "shutdown_grace_secs = {}", s.shutdown_grace.as_secs())?;
        writeln!(f, "mode = \"{}\"", s.mode.as_str())?;
        writeln!(f, "chat_queue_depth = {}", s.chat_queue_depth)?;
        writeln!(f, "line_timeout_secs = {}", s.line_timeout.as_secs())?;
        writeln!(f, "write_timeout_secs = {}", s.write_timeout.as_secs())?;
        writeln!(f, "queue_timeout_secs = {}", s.queue_timeout.as_secs())?;
        writeln!(f)?;
        let u = &self.udp;
        writeln!(f, "[udp]")?;
        writeln!(f, "enabled = {}", u.enabled)?;
        writeln!(f, "bind = \"{}\"", u.bind)?;
        writeln!(f, "port = {}", u.port)?;
        writeln!(f, "max_datagram_bytes = {}", u.max_datagram_bytes)?;
        writeln!(f, "rate_per_sec = {}", u.rate_per_sec)?;
        writeln!(f, "burst = {}", u.burst)?;
        writeln!(f, "max_peers = {}", u.max_peers)?;
        writeln!(f)?;
        let files = &self.files;
        writeln!(f, "[files]")?;
        writeln!(f, "dir = {}", quoted(&files.dir.to_string_lossy()))?;
        writeln!(f, "max_file_size = {}", files.max_file_size)?;
        writeln!(f, "on_conflict = \"{}\"", files.on_conflict.as_str())?;
        writeln!(f, "file_mode = {:#o}", files.file_mode)?;
        writeln!(f, "min_free_bytes = {}", files.min_free_bytes)?;
        if let Some(t) = &files.token_file {
            writeln!(f, "token_file = {}", quoted(&t.to_string_lossy()))?;
        }
        writeln!(f)?;
        let a = &self.access;
        let list = |rules: &[Cidr]| {
            let items: Vec<String> = rules.iter().map(|r| format!("\"{r}\"")).collect();
            format!("[{}]", items.join(", "))
        };
        writeln!(f, "[access]")?;
        writeln!(f, "allow = {}", list(&a.rules.allow))?;
        writeln!(f, "deny = {}", list(&a.rules.deny))?;
        writeln!(f, "max_per_ip = {}", a.max_per_ip)?;
        writeln!(
            f,
            "max_files_per_connection = {}",
            a.max_files_per_connection
        )?;
        writeln!(f, "require_token = {}", a.require_token)?;
        writeln!(f, "header_timeout_secs = {}", a.header_timeout.as_secs())?;
        writeln!(
            f,
            "min_upload_bytes_per_sec = {}",
            a.min_upload_bytes_per_sec
        )?;
        writeln!(f, "auth_timeout_secs = {}", a.auth_timeout.as_secs())?;
        writeln!(f, "exempt_loopback = {}", a.exempt_loopback)?;
        writeln!(f)?;
        writeln!(f, "[log]")?;
        writeln!(
            f,
            "level = \"{}\"",
            self.log.level.as_str().to_ascii_lowercase()
        )?;
        writeln!(f, "format = \"{}\"", self.log.format.as_str())?;
        writeln!(
            f,
            "refusal_summary_secs = {}",
            self.log.refusal_summary.as_secs()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The schema: each key once, with its default and range. Error messages and the syntax-error hint
// both read these, so the range a user is told is the range that is checked.

/// An integer key and its inclusive range.
struct IntKey {
    name: &'static str,
    min: i64,
    max: i64,
    default: i64,
    /// Shown and described in octal (file modes).
    octal: bool,
}

/// A string key that takes one of a fixed set of words.
struct WordKey {
    name: &'static str,
    words: &'static [&'static str],
}

const PORT: IntKey = IntKey {
    name: "server.port",
    min: 1,
    max: 65535,
    default: 7878,
    octal: false,
};
const MAX_CONNECTIONS: IntKey = IntKey {
    name: "server.max_connections",
    min: 1,
    max: 65535,
    default: 64,
    octal: false,
};
const QUEUE_DEPTH: IntKey = IntKey {
    name: "server.queue_depth",
    min: 1,
    max: 1_000_000,
    default: 16,
    octal: false,
};
const BACKLOG: IntKey = IntKey {
    name: "server.backlog",
    min: 1,
    max: 65535,
    default: 128,
    octal: false,
};
const IDLE_TIMEOUT_SECS: IntKey = IntKey {
    name: "server.idle_timeout_secs",
    min: 1,
    max: 86_400,
    default: 300,
    octal: false,
};
const MAX_LINE_BYTES: IntKey = IntKey {
    name: "server.max_line_bytes",
    min: 1,
    max: 16 << 20,
    default: 65536,
    octal: false,
};
const THREAD_STACK_KIB: IntKey = IntKey {
    name: "server.thread_stack_kib",
    min: 32,
    max: 65536,
    default: 128,
    octal: false,
};
const SHUTDOWN_GRACE_SECS: IntKey = IntKey {
    name: "server.shutdown_grace_secs",
    min: 0,
    max: 3600,
    default: 5,
    octal: false,
};
const MAX_FILE_SIZE: IntKey = IntKey {
    name: "files.max_file_size",
    min: 0,
    max: i64::MAX,
    default: 1 << 30,
    octal: false,
};
const FILE_MODE: IntKey = IntKey {
    name: "files.file_mode",
    min: 0,
    max: 0o777,
    default: 0o640,
    octal: true,
};
const MIN_FREE_BYTES: IntKey = IntKey {
    name: "files.min_free_bytes",
    min: 0,
    max: i64::MAX,
    default: 64 << 20,
    octal: false,
};
const CHAT_QUEUE_DEPTH: IntKey = IntKey {
    name: "server.chat_queue_depth",
    min: 1,
    max: 1_000_000,
    default: 128,
    octal: false,
};
const UDP_PORT: IntKey = IntKey {
    name: "udp.port",
    min: 1,
    max: 65535,
    default: 7878,
    octal: false,
};
const MAX_DATAGRAM_BYTES: IntKey = IntKey {
    name: "udp.max_datagram_bytes",
    min: 1,
    max: 65507,
    default: 65507,
    octal: false,
};
const RATE_PER_SEC: IntKey = IntKey {
    name: "udp.rate_per_sec",
    min: 1,
    max: 10_000_000,
    default: 1000,
    octal: false,
};
const BURST: IntKey = IntKey {
    name: "udp.burst",
    min: 1,
    max: 10_000_000,
    default: 1000,
    octal: false,
};
const MAX_PEERS: IntKey = IntKey {
    name: "udp.max_peers",
    min: 1,
    max: 1_000_000,
    default: 4096,
    octal: false,
};
const MAX_PER_IP: IntKey = IntKey {
    name: "access.max_per_ip",
    min: 1,
    max: 65535,
    default: 8,
    octal: false,
};
const MAX_FILES_PER_CONNECTION: IntKey = IntKey {
    name: "access.max_files_per_connection",
    min: 1,
    max: 1_000_000,
    default: 1000,
    octal: false,
};
const HEADER_TIMEOUT_SECS: IntKey = IntKey {
    name: "access.header_timeout_secs",
    min: 1,
    max: 3600,
    default: 10,
    octal: false,
};
const MIN_UPLOAD_BYTES_PER_SEC: IntKey = IntKey {
    name: "access.min_upload_bytes_per_sec",
    min: 0,
    max: 1 << 40,
    default: 1024,
    octal: false,
};
const LINE_TIMEOUT_SECS: IntKey = IntKey {
    name: "server.line_timeout_secs",
    min: 1,
    max: 3600,
    default: 10,
    octal: false,
};
const WRITE_TIMEOUT_SECS: IntKey = IntKey {
    name: "server.write_timeout_secs",
    min: 1,
    max: 3600,
    default: 10,
    octal: false,
};
const QUEUE_TIMEOUT_SECS: IntKey = IntKey {
    name: "server.queue_timeout_secs",
    min: 1,
    max: 3600,
    default: 5,
    octal: false,
};
const AUTH_TIMEOUT_SECS: IntKey = IntKey {
    name: "access.auth_timeout_secs",
    min: 1,
    max: 3600,
    default: 10,
    octal: false,
};
const REFUSAL_SUMMARY_SECS: IntKey = IntKey {
    name: "log.refusal_summary_secs",
    min: 1,
    max: 3600,
    default: 10,
    octal: false,
};
const INT_KEYS: &[&IntKey] = &[
    &PORT,
    &MAX_CONNECTIONS,
    &QUEUE_DEPTH,
    &BACKLOG,
    &IDLE_TIMEOUT_SECS,
    &MAX_LINE_BYTES,
    &THREAD_STACK_KIB,
    &SHUTDOWN_GRACE_SECS,
    &MAX_FILE_SIZE,
    &FILE_MODE,
    &MIN_FREE_BYTES,
    &CHAT_QUEUE_DEPTH,
    &UDP_PORT,
    &MAX_DATAGRAM_BYTES,
    &RATE_PER_SEC,
    &BURST,
    &MAX_PEERS,
    &MAX_PER_IP,
    &MAX_FILES_PER_CONNECTION,
    &HEADER_TIMEOUT_SECS,
    &MIN_UPLOAD_BYTES_PER_SEC,
    &LINE_TIMEOUT_SECS,
    &WRITE_TIMEOUT_SECS,
    &QUEUE_TIMEOUT_SECS,
    &AUTH_TIMEOUT_SECS,
    &REFUSAL_SUMMARY_SECS,
];

const MODE: WordKey = WordKey {
    name: "server.mode",
    words: &["echo", "chat"],
};
const LEVEL: WordKey = WordKey {
    name: "log.level",
    words: &["error", "warn", "info", "debug"],
};
const ON_CONFLICT: WordKey = WordKey {
    name: "files.on_conflict",
    words: &["rename", "reject", "overwrite"],
};
const FORMAT: WordKey = WordKey {
    name: "log.format",
    words: &["auto", "human", "journal", "json"],
};
const WORD_KEYS: &[&WordKey] = &[&MODE, &LEVEL, &ON_CONFLICT, &FORMAT];

const BIND: &str = "server.bind";
const UDP_BIND: &str = "udp.bind";
const UDP_ENABLED: &str = "udp.enabled";
const ALLOW: &str = "access.allow";
const DENY: &str = "access.deny";
const RULES_ALLOWED: &str =
    "a list of IPv4/IPv6 addresses and CIDR ranges, e.g. [\"10.0.0.0/8\", \"::1\"]";
const REQUIRE_TOKEN: &str = "access.require_token";
const EXEMPT_LOOPBACK: &str = "access.exempt_loopback";
const TOKEN_FILE: &str = "files.token_file";
const TOKEN_FILE_ALLOWED: &str = "the path of a file holding the shared key (16 bytes or more)";
const BIND_ALLOWED: &str =
    "an IPv4 or IPv6 address literal such as \"127.0.0.1\", \"0.0.0.0\" or \"::\"";
const FILES_DIR: &str = "files.dir";
const FILES_DIR_DEFAULT: &str = "uploads";
const FILES_DIR_ALLOWED: &str =
    "a non-empty directory path (relative paths start at ferryd's working directory)";

impl IntKey {
    fn allowed(&self) -> String {
        if self.octal {
            format!(
                "an octal mode in {:#o}–{:#o}, e.g. {:#o}",
                self.min, self.max, self.default
            )
        } else {
            format!("an integer in {}–{}", self.min, self.max)
        }
    }
}

impl WordKey {
    fn allowed(&self) -> String {
        let quoted: Vec<String> = self.words.iter().map(|w| format!("\"{w}\"")).collect();
        format!("one of {}", quoted.join(", "))
    }
}

/// What is allowed for `key`, for hints on syntax errors.
fn allowed_for(key: &str) -> Option<String> {
    if let Some(k) = INT_KEYS.iter().find(|k| k.name == key) {
        return Some(k.allowed());
    }
    if let Some(k) = WORD_KEYS.iter().find(|k| k.name == key) {
        return Some(k.allowed());
    }
    match key {
        BIND | UDP_BIND => Some(BIND_ALLOWED.to_string()),
        UDP_ENABLED | REQUIRE_TOKEN | EXEMPT_LOOPBACK => Some("true or false".to_string()),
        ALLOW | DENY => Some(RULES_ALLOWED.to_string()),
        TOKEN_FILE => Some(TOKEN_FILE_ALLOWED.to_string()),
        FILES_DIR => Some(FILES_DIR_ALLOWED.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The raw layer: what serde reads.

type Field = Option<Spanned<Value>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    udp: RawUdp,
    #[serde(default)]
    files: RawFiles,
    #[serde(default)]
    access: RawAccess,
    #[serde(default)]
    log: RawLog,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUdp {
    enabled: Field,
    bind: Field,
    port: Field,
    max_datagram_bytes: Field,
    rate_per_sec: Field,
    burst: Field,
    max_peers: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    dir: Field,
    max_file_size: Field,
    on_conflict: Field,
    file_mode: Field,
    min_free_bytes: Field,
    token_file: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    allow: Field,
    deny: Field,
    max_per_ip: Field,
    max_files_per_connection: Field,
    require_token: Field,
    header_timeout_secs: Field,
    min_upload_bytes_per_sec: Field,
    auth_timeout_secs: Field,
    exempt_loopback: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    bind: Field,
    port: Field,
    max_connections: Field,
    queue_depth: Field,
    backlog: Field,
    idle_timeout_secs: Field,
    max_line_bytes: Field,
    thread_stack_kib: Field,
    shutdown_grace_secs: Field,
    mode: Field,
    chat_queue_depth: Field,
    line_timeout_secs: Field,
    write_timeout_secs: Field,
    queue_timeout_secs: Field,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Field,
    format: Field,
    refusal_summary_secs: Field,
}

/// The text being validated, for turning spans into lines and values.
struct Ctx<'a> {
    src: &'a str,
    file: &'a str,
}

impl Ctx<'_> {
    fn validate(&self, raw: &RawConfig) -> Result<Config, ConfigError> {
        let s = &raw.server;
        let mode = match self.word(&s.mode, &MODE)? {
            Some("chat") => Mode::Chat,
            _ => Mode::Echo,
        };
        let level = match self.word(&raw.log.level, &LEVEL)? {
            Some("error") => log::LevelFilter::Error,
            Some("warn") => log::LevelFilter::Warn,
            Some("debug") => log::LevelFilter::Debug,
            _ => log::LevelFilter::Info,
        };
        Ok(Config {
            server: ServerConfig {
                bind: self
                    .ip(&s.bind, BIND)?
                    .unwrap_or(IpAddr::from([127, 0, 0, 1])),
                port: self.int(&s.port, &PORT)? as u16,
                max_connections: self.int(&s.max_connections, &MAX_CONNECTIONS)? as usize,
                queue_depth: self.int(&s.queue_depth, &QUEUE_DEPTH)? as usize,
                backlog: self.int(&s.backlog, &BACKLOG)? as u32,
                idle_timeout: self.secs(&s.idle_timeout_secs, &IDLE_TIMEOUT_SECS)?,
                max_line_bytes: self.int(&s.max_line_bytes, &MAX_LINE_BYTES)? as usize,
                thread_stack_kib: self.int(&s.thread_stack_kib, &THREAD_STACK_KIB)? as usize,
                shutdown_grace: self.secs(&s.shutdown_grace_secs, &SHUTDOWN_GRACE_SECS)?,
                mode,
                chat_queue_depth: self.int(&s.chat_queue_depth, &CHAT_QUEUE_DEPTH)? as usize,
                line_timeout: self.secs(&s.line_timeout_secs, &LINE_TIMEOUT_SECS)?,
                write_timeout: self.secs(&s.write_timeout_secs, &WRITE_TIMEOUT_SECS)?,
                queue_timeout: self.secs(&s.queue_timeout_secs, &QUEUE_TIMEOUT_SECS)?,
            },
            udp: UdpConfig {
                enabled: self.boolean(&raw.udp.enabled, UDP_ENABLED)?.unwrap_or(true),
                bind: match self.ip(&raw.udp.bind, UDP_BIND)? {
                    Some(ip) => ip,
                    None => self
                        .ip(&s.bind, BIND)?
                        .unwrap_or(IpAddr::from([127, 0, 0, 1])),
                },
                port: match raw.udp.port {
                    Some(_) => self.int(&raw.udp.port, &UDP_PORT)? as u16,
                    None => self.int(&s.port, &PORT)? as u16,
                },
                max_datagram_bytes: self.int(&raw.udp.max_datagram_bytes, &MAX_DATAGRAM_BYTES)?
                    as usize,
                rate_per_sec: self.int(&raw.udp.rate_per_sec, &RATE_PER_SEC)? as u32,
                burst: self.int(&raw.udp.burst, &BURST)? as u32,
                max_peers: self.int(&raw.udp.max_peers, &MAX_PEERS)? as usize,
            },
            files: self.files(&raw.files)?,
            access: self.access(&raw.access, &raw.files)?,
            log: LogConfig {
                level,
                format: match self.word(&raw.log.format, &FORMAT)? {
                    Some("human") => LogFormat::Human,
                    Some("journal") => LogFormat::Journal,
                    Some("json") => LogFormat::Json,
                    _ => LogFormat::Auto,
                },
                refusal_summary: self.secs(&raw.log.refusal_summary_secs, &REFUSAL_SUMMARY_SECS)?,
            },
        })
    }

    fn files(&self, f: &RawFiles) -> Result<FilesConfig, ConfigError> {
        let on_conflict = match self.word(&f.on_conflict, &ON_CONFLICT)? {
            Some("reject") => OnConflict::Reject,
            Some("overwrite") => OnConflict::Overwrite,
            _ => OnConflict::Rename,
        };
        Ok(FilesConfig {
            dir: self
                .path(&f.dir, FILES_DIR)?
                .unwrap_or_else(|| PathBuf::from(FILES_DIR_DEFAULT)),
            max_file_size: self.int(&f.max_file_size, &MAX_FILE_SIZE)? as u64,
            on_conflict,
            file_mode: self.int(&f.file_mode, &FILE_MODE)? as u32,
            min_free_bytes: self.int(&f.min_free_bytes, &MIN_FREE_BYTES)? as u64,
            token_file: self.path(&f.token_file, TOKEN_FILE)?,
        })
    }

    fn access(&self, a: &RawAccess, files: &RawFiles) -> Result<AccessConfig, ConfigError> {
        let require_token = self
            .boolean(&a.require_token, REQUIRE_TOKEN)?
            .unwrap_or(false);
        if let (true, Some(v), None) = (require_token, &a.require_token, &files.token_file) {
            return Err(self.bad(
                v,
                REQUIRE_TOKEN,
                "needs files.token_file, the key to check",
                "false, or set files.token_file",
            ));
        }
        Ok(AccessConfig {
            rules: Rules {
                allow: self.cidrs(&a.allow, ALLOW)?,
                deny: self.cidrs(&a.deny, DENY)?,
            },
            max_per_ip: self.int(&a.max_per_ip, &MAX_PER_IP)? as u32,
            max_files_per_connection: self
                .int(&a.max_files_per_connection, &MAX_FILES_PER_CONNECTION)?
                as u32,
            require_token,
            header_timeout: self.secs(&a.header_timeout_secs, &HEADER_TIMEOUT_SECS)?,
            min_upload_bytes_per_sec: self
                .int(&a.min_upload_bytes_per_sec, &MIN_UPLOAD_BYTES_PER_SEC)?
                as u64,
            auth_timeout: self.secs(&a.auth_timeout_secs, &AUTH_TIMEOUT_SECS)?,
            exempt_loopback: self
                .boolean(&a.exempt_loopback, EXEMPT_LOOPBACK)?
                .unwrap_or(true),
        })
    }

    fn cidrs(&self, field: &Field, key: &str) -> Result<Vec<Cidr>, ConfigError> {
        let Some(v) = field else {
            return Ok(Vec::new());
        };
        let Value::Array(items) = v.get_ref() else {
            let problem = format!("expected a list, found {}", type_name(v.get_ref()));
            return Err(self.bad(v, key, &problem, RULES_ALLOWED));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Cidr::parse(s)
                    .map_err(|e| self.bad(v, key, &format!("item {}: {e}", i + 1), RULES_ALLOWED)),
                other => Err(self.bad(
                    v,
                    key,
                    &format!("item {} is {}, not a string", i + 1, type_name(other)),
                    RULES_ALLOWED,
                )),
            })
            .collect()
    }

    fn path(&self, field: &Field, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(v) = field else {
            return Ok(None);
        };
        match v.get_ref() {
            Value::String(s) if !s.is_empty() => Ok(Some(PathBuf::from(s))),
            Value::String(_) => Err(self.bad(v, key, "empty path", FILES_DIR_ALLOWED)),
            other => {
                let problem = format!("expected a string, found {}", type_name(other));
                Err(self.bad(v, key, &problem, FILES_DIR_ALLOWED))
            }
        }
    }

    /// An integer within the key's range, or the key's default when absent. The range check
    /// happens here, so the `as` casts by the callers cannot truncate.
    fn int(&self, field: &Field, key: &IntKey) -> Result<i64, ConfigError> {
        let Some(v) = field else {
            return Ok(key.default);
        };
        match v.get_ref() {
            Value::Integer(i) if (key.min..=key.max).contains(i) => Ok(*i),
            Value::Integer(_) => Err(self.bad(v, key.name, "out of range", &key.allowed())),
            other => Err(self.bad(
                v,
                key.name,
                &format!("expected an integer, found {}", type_name(other)),
                &key.allowed(),
            )),
        }
    }

    fn secs(&self, field: &Field, key: &IntKey) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.int(field, key)? as u64))
    }

    fn word(&self, field: &Field, key: &WordKey) -> Result<Option<&'static str>, ConfigError> {
        let Some(v) = field else {
            return Ok(None);
        };
        let Value::String(s) = v.get_ref() else {
            let problem = format!("expected a string, found {}", type_name(v.get_ref()));
            return Err(self.bad(v, key.name, &problem, &key.allowed()));
        };
        match key.words.iter().find(|w| **w == s.as_str()) {
            Some(w) => Ok(Some(w)),
            None => Err(self.bad(v, key.name, "not a known value", &key.allowed())),
        }
    }

    fn boolean(&self, field: &Field, key: &str) -> Result<Option<bool>, ConfigError> {
        let Some(v) = field else {
            return Ok(None);
        };
        match v.get_ref() {
            Value::Boolean(b) => Ok(Some(*b)),
            other => {
                let problem = format!("expected a boolean, found {}", type_name(other));
                Err(self.bad(v, key, &problem, "true or false"))
            }
        }
    }

    fn ip(&self, field: &Field, key: &str) -> Result<Option<IpAddr>, ConfigError> {
        let Some(v) = field else {
            return Ok(None);
        };
        let Value::String(s) = v.get_ref() else {
            let problem = format!("expected a string, found {}", type_name(v.get_ref()));
            return Err(self.bad(v, key, &problem, BIND_ALLOWED));
        };
        s.parse()
            .map(Some)
            .map_err(|_| self.bad(v, key, "not an IP address", BIND_ALLOWED))
    }

    fn bad(&self, v: &Spanned<Value>, key: &str, problem: &str, allowed: &str) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: Some(line_of(self.src, v.span().start)),
            key: Some(key.to_string()),
            value: Some(self.raw_text(v.span())),
            problem: format!("{problem}; allowed: {allowed}"),
        }
    }

    fn raw_text(&self, span: Range<usize>) -> String {
        self.src.get(span).unwrap_or("").trim().to_string()
    }

    /// Turns a TOML or serde error into one that names the line, the qualified key on that line
    /// and its value text, plus what the key allows when the key is known.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return ConfigError::Invalid {
                file: self.file.to_string(),
                line: None,
                key: None,
                value: None,
                problem: message,
            };
        };
        let line_no = line_of(self.src, span.start);
        let text = self.src.lines().nth(line_no - 1).unwrap_or("");
        let (key, value) = match split_key_value(text) {
            Some((k, v)) => {
                let table = table_before(self.src, span.start);
                let key = if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                };
                (Some(key), (!v.is_empty()).then(|| v.to_string()))
            }
            None => (None, None),
        };
        let problem = match key.as_deref().and_then(allowed_for) {
            Some(allowed) => format!("{message}; allowed: {allowed}"),
            None => message,
        };
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: Some(line_no),
            key,
            value,
            problem,
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// The 1-based line number of byte offset `pos`.
fn line_of(src: &str, pos: usize) -> usize {
    let pos = pos.min(src.len());
    src.as_bytes()[..pos]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Splits `key = value  # comment` into the bare key and the value text.
fn split_key_value(line: &str) -> Option<(&str, &str)> {
    let (k, v) = line.split_once('=')?;
    let k = k.trim().trim_matches('"');
    if k.is_empty() || k.starts_with('[') || k.starts_with('#') {
        return None;
    }
    let v = match v.find(" #") {
        Some(i) => &v[..i],
        None => v,
    };
    Some((k, v.trim()))
}

/// The name of the `[table]` whose body contains byte offset `pos` ("" at the top level).
fn table_before(src: &str, pos: usize) -> &str {
    let head = src.get(..pos).unwrap_or(src);
    head.lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .map(str::trim)
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> String {
        match parse(src, "test.toml") {
            Ok(c) => panic!("expected an error for {src:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn shipped_file_equals_builtin_defaults() {
        assert_eq!(parse(SHIPPED, "config.toml").unwrap(), Config::default());
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("", "x").unwrap(), Config::default());
    }

    #[test]
    fn display_round_trips() {
        let src = "[server]\nbind = \"::\"\nport = 9000\nidle_timeout_secs = 7\n[log]\nlevel = \"debug\"\n";
        let c = parse(src, "x").unwrap();
        assert_eq!(parse(&c.to_string(), "y").unwrap(), c);
        assert_eq!(
            parse(&Config::default().to_string(), "y").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn bad_ports_name_file_line_key_value_and_range() {
        let cases = [
            ("0", "out of range"),
            ("00", "leading zero"),
            ("\"0000\"", "expected an integer, found a string"),
            ("70000", "out of range"),
            ("-1", "out of range"),
            ("\"abc\"", "expected an integer, found a string"),
            ("7878.5", "expected an integer, found a float"),
        ];
        for (value, problem) in cases {
            let msg = err(&format!("# comment\n[server]\nport = {value}\n"));
            let want = format!("test.toml:3: server.port = {value}: ");
            assert!(msg.starts_with(&want), "{msg:?} should start with {want:?}");
            assert!(msg.contains(problem), "{msg:?} should contain {problem:?}");
            assert!(msg.contains("1–65535"), "{msg:?} should name the range");
        }
    }

    #[test]
    fn absurd_limits_are_rejected() {
        let cases = [
            ("max_connections = 0", "server.max_connections = 0"),
            ("queue_depth = 0", "server.queue_depth = 0"),
            ("queue_depth = 1000001", "server.queue_depth = 1000001"),
            ("thread_stack_kib = 15", "server.thread_stack_kib = 15"),
            ("max_line_bytes = 0", "server.max_line_bytes = 0"),
            ("idle_timeout_secs = 0", "server.idle_timeout_secs = 0"),
            ("backlog = -5", "server.backlog = -5"),
        ];
        for (line, want) in cases {
            let msg = err(&format!("[server]\n{line}\n"));
            assert!(msg.starts_with(&format!("test.toml:2: {want}: ")), "{msg}");
            assert!(msg.contains("allowed: an integer in"), "{msg}");
        }
        assert_eq!(
            parse("[server]\nqueue_depth = 1000000\n", "x")
                .unwrap()
                .server
                .queue_depth,
            1_000_000
        );
    }

    #[test]
    fn unknown_keys_and_tables_name_line_and_key() {
        let msg = err("[server]\nport = 1\nprot = 2\n");
        assert!(
            msg.starts_with("test.toml:3: server.prot = 2: unknown field `prot`"),
            "{msg}"
        );
        let msg = err("[sever]\nport = 1\n");
        assert!(
            msg.starts_with("test.toml:1: unknown field `sever`"),
            "{msg}"
        );
        let msg = err("[log]\nlevel = \"info\"\ncolour = true\n");
        assert!(
            msg.starts_with("test.toml:3: log.colour = true: unknown field"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_words_and_types() {
        let msg = err("[server]\nmode = \"relay\"\n");
        assert!(
            msg.contains("server.mode = \"relay\": not a known value; allowed: one of \"echo\""),
            "{msg}"
        );
        let msg = err("[log]\nlevel = 3\n");
        assert!(
            msg.contains("test.toml:2: log.level = 3: expected a string"),
            "{msg}"
        );
        let msg = err("[server]\nbind = \"localhost\"\n");
        assert!(
            msg.contains("server.bind = \"localhost\": not an IP address"),
            "{msg}"
        );
        let msg = err("server = 5\n");
        assert!(msg.starts_with("test.toml:1: server = 5: "), "{msg}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let msg = err("[server]\nport = 7878\nbind = \"127.0.0.1\n");
        assert!(
            msg.starts_with("test.toml:3: server.bind = \"127.0.0.1: "),
            "{msg}"
        );
        let msg = err("[server\n");
        assert!(msg.starts_with("test.toml:1: "), "{msg}");
    }

    #[test]
    fn valid_values_are_typed() {
        let c = parse(
            "[server]\nbind = \"::\"\nport = 65535\nidle_timeout_secs = 2\n[log]\nlevel = \"warn\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.server.bind, "::".parse::<IpAddr>().unwrap());
        assert_eq!(c.server.port, 65535);
        assert_eq!(c.server.idle_timeout, Duration::from_secs(2));
        assert_eq!(c.log.level, log::LevelFilter::Warn);
    }

    #[test]
    fn files_section() {
        let c = parse(
            "[files]\ndir = \"/var/lib/ferryd/up \\\"q\\\"\"\nmax_file_size = 10\non_conflict = \"reject\"\nfile_mode = 0o600\nmin_free_bytes = 0\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.files.dir, PathBuf::from("/var/lib/ferryd/up \"q\""));
        assert_eq!(c.files.max_file_size, 10);
        assert_eq!(c.files.on_conflict, OnConflict::Reject);
        assert_eq!(c.files.file_mode, 0o600);
        assert_eq!(parse(&c.to_string(), "y").unwrap(), c);
        let msg = err("[files]\nfile_mode = 640\n");
        assert!(msg.contains("files.file_mode = 640: out of range; allowed: an octal mode in 0o0–0o777, e.g. 0o640"), "{msg}");
        let msg = err("[files]\ndir = \"\"\n");
        assert!(msg.contains("files.dir = \"\": empty path"), "{msg}");
        let msg = err("[files]\non_conflict = \"replace\"\n");
        assert!(
            msg.contains("one of \"rename\", \"reject\", \"overwrite\""),
            "{msg}"
        );
        let msg = err("[files]\nmax_file_size = -1\n");
        assert!(
            msg.contains("files.max_file_size = -1: out of range"),
            "{msg}"
        );
    }

    #[test]
    fn access_section() {
        let c = parse(
            "[files]\ntoken_file = \"/etc/ferryd/upload.key\"\n[access]\nallow = [\"10.0.0.0/8\", \"::1\"]\ndeny = [\"10.9.0.0/16\"]\nmax_per_ip = 2\nrequire_token = true\nheader_timeout_secs = 3\nmin_upload_bytes_per_sec = 0\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.access.rules.allow.len(), 2);
        assert_eq!(c.access.max_per_ip, 2);
        assert!(c.access.require_token);
        assert_eq!(c.access.header_timeout, Duration::from_secs(3));
        assert_eq!(parse(&c.to_string(), "y").unwrap(), c);
        let cases = [
            (
                "[access]\nallow = [\"10.0.0/8\"]\n",
                "test.toml:2: access.allow = [\"10.0.0/8\"]: item 1: \"10.0.0/8\" is not an IP address or CIDR range",
            ),
            (
                "[access]\ndeny = \"10.0.0.0/8\"\n",
                "test.toml:2: access.deny = \"10.0.0.0/8\": expected a list, found a string",
            ),
            (
                "[access]\ndeny = [\"::1\", 5]\n",
                "item 2 is an integer, not a string",
            ),
            (
                "[access]\nrequire_token = true\n",
                "access.require_token = true: needs files.token_file",
            ),
            (
                "[access]\nmax_per_ip = 0\n",
                "access.max_per_ip = 0: out of range",
            ),
        ];
        for (src, want) in cases {
            let msg = err(src);
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn origin_prefers_flag_then_env() {
        let flag = Origin::choose(Some("a.toml".into()), Some("b.toml".into()));
        assert_eq!(flag, Origin::Flag("a.toml".into()));
        let env = Origin::choose(None, Some("b.toml".into()));
        assert_eq!(env, Origin::Env("b.toml".into()));
    }
}
