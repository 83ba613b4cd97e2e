//! The configuration: the TOML schema, its validation into a typed `Config`, and errors that name
//! the file, line, key, bad value and what is allowed.
//!
//! Every key is declared once, in `keys`: its table, name, doc line, type, default, range and
//! whether a reload may change it. Two layers read the file, as ripgrep does with its flags:
//! `toml`'s own parser reads it into tables of spanned values (`read`, so every error can point
//! at a line; no serde), `check` validates each value against its key, reporting every problem
//! at once (`error`), and `Config::build` moves the checked values into a `Config` whose fields
//! already hold `Duration`s, addresses and checked limits. The built-in defaults,
//! `check-config`'s output (`render`) and the reload plan (`reload`) come from the same table.
//! `parse` is pure (a `&str` in, a `Result` out); `load` only adds the file read.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::rules::{Cidr, Rules};

mod check;
mod error;
mod keys;
// The generator of docs/man/ferryd.toml.5; only its unit test runs it.
#[cfg(test)]
mod manpage;
mod origin;
mod read;
pub(crate) mod reload;
mod render;

pub use error::ConfigError;
pub use origin::Origin;

use check::{Unfit, Values};
use read::Ctx;

/// The configuration file shipped in `config/config.toml`; its values are the built-in defaults
/// (this unit test holds the two together).
#[cfg(test)]
const SHIPPED: &str = include_str!("../../config/config.toml");

/// An enum whose values are the words a key takes: the words are written once, here, and give
/// `WORDS` (what the key allows), `as_str` and `from_word`.
macro_rules! words {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal,)+ }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }

        impl $name {
            /// Every word, in the order the documentation lists them.
            pub const WORDS: &'static [&'static str] = &[$($word),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word,)+ }
            }

            /// The value a word names; `None` for any other word (never a silent default).
            pub fn from_word(word: &str) -> Option<$name> {
                match word { $($word => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

/// A validated configuration. Every field is within its documented range.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub udp: UdpConfig,
    pub files: FilesConfig,
    pub access: AccessConfig,
    pub log: LogConfig,
    pub compat: CompatConfig,
    pub control: ControlConfig,
}

/// The operator's control socket (`ferryd ctl`).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlConfig {
    /// Where the socket is created; `None`: no control socket.
    pub socket: Option<PathBuf>,
    /// The group allowed to connect (mode 0660); `None`: mode 0600.
    pub group: Option<String>,
}

/// Compatibility with clients that do not speak the frame protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct CompatConfig {
    /// Store `NAME**SIZE` uploads (the Qt tutorials' file client), unverified.
    pub starstar_uploads: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessConfig {
    pub rules: Rules,
    /// Balancers whose connections start with a PROXY protocol header; empty: none.
    pub proxy_from: Vec<Cidr>,
    /// Connections open at once from one address.
    pub max_per_ip: u32,
    /// IPv6 peers sharing this many leading bits count as one address.
    pub ipv6_prefix_len: u32,
    /// File frames one connection may carry.
    pub max_files_per_connection: u32,
    /// Text needs the `AUTH` line too, not only file frames.
    pub require_token: bool,
    /// Time from a frame's first byte to the end of its header, name and tag.
    pub header_timeout: Duration,
    /// Slowest body accepted, measured over `upload_rate_window`; 0 disables the check.
    pub min_upload_bytes_per_sec: u64,
    /// The window over which `min_upload_bytes_per_sec` is measured; a body read waits at most
    /// this long before the check runs.
    pub upload_rate_window: Duration,
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
    /// Chat mode: bytes of messages the room holds for its slowest member before senders wait.
    pub chat_queue_bytes: usize,
    /// Chat mode: how long a member may take nothing of what waits for it before it is dropped.
    pub chat_drain_timeout: Duration,
    /// A text line must be complete within this time of its first byte.
    pub line_timeout: Duration,
    /// A write to a peer that does not take it fails after this time.
    pub write_timeout: Duration,
    /// Longest wait in the queue for a worker before `ERR busy`.
    pub queue_timeout: Duration,
    /// Chat mode: text without a newline is delivered as a line after this many milliseconds
    /// of silence; 0: only at a newline (or the end of the stream).
    pub chat_flush_ms: u64,
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

words! {
    /// What text does.
    pub enum Mode {
        /// Every byte goes back to its sender as it arrives.
        Echo = "echo",
        /// Every complete line goes to every other client, prefixed with its sender.
        Chat = "chat",
    }
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
    /// How long the partial body of a cut-off resumable upload is kept; 0: resuming is off.
    pub resume_keep: Duration,
    /// Total announced size of the partial bodies kept; 0: resuming is off.
    pub resume_max_bytes: u64,
    /// How many partial bodies are kept at most; 0: resuming is off.
    pub resume_max_count: usize,
    /// Names may hold subdirectories (`photos/2024/a.jpg`).
    pub allow_subdirs: bool,
    /// The command run for each stored file (checked by `hookargs::check`); empty: none.
    pub on_stored: Vec<String>,
    /// Hook commands running at once.
    pub hook_workers: usize,
    /// Stored files waiting for a hook worker.
    pub hook_queue_depth: usize,
    /// How long a hook may run before its process group is killed.
    pub hook_timeout: Duration,
}

words! {
    /// What happens when an upload's name is already taken.
    pub enum OnConflict {
        /// Store as `name (1).ext`, `name (2).ext`, …
        Rename = "rename",
        /// Refuse with `ERR exists`.
        Reject = "reject",
        /// Replace the old file atomically.
        Overwrite = "overwrite",
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: log::LevelFilter,
    pub format: LogFormat,
    /// Refusals beyond the per-reason line budget are summed up once per this interval.
    pub refusal_summary: Duration,
}

words! {
    /// How log lines are written.
    pub enum LogFormat {
        /// `Journal` when stderr is connected to the journal (`$JOURNAL_STREAM`), else `Human`.
        Auto = "auto",
        /// RFC 3339 timestamp, level, message.
        Human = "human",
        /// `<N>message`: the sd-daemon priority prefix, no timestamp.
        Journal = "journal",
        /// One JSON object per line.
        Json = "json",
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

/// Parses and validates configuration text, reporting every problem found. `file` is only used
/// in error messages.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { src, file };
    let raw = ctx.read()?;
    let values = ctx
        .validate(&raw)
        .map_err(|problems| ConfigError::Invalid {
            file: file.to_string(),
            problems,
            syntax: false,
        })?;
    Config::build(&values).map_err(|Unfit(key)| ConfigError::Invalid {
        file: file.to_string(),
        problems: vec![ctx.general(
            Some(key.to_string()),
            "the value does not fit its setting (a bug in ferryd)".to_string(),
        )],
        syntax: false,
    })
}

impl Config {
    /// Moves one checked value per key into its field: the one place that names both.
    fn build(v: &Values) -> Result<Config, Unfit> {
        Ok(Config {
            server: ServerConfig {
                bind: v.get("server.bind")?,
                port: v.get("server.port")?,
                max_connections: v.get("server.max_connections")?,
                queue_depth: v.get("server.queue_depth")?,
                backlog: v.get("server.backlog")?,
                idle_timeout: v.get("server.idle_timeout_secs")?,
                max_line_bytes: v.get("server.max_line_bytes")?,
                thread_stack_kib: v.get("server.thread_stack_kib")?,
                shutdown_grace: v.get("server.shutdown_grace_secs")?,
                mode: v.get("server.mode")?,
                chat_queue_bytes: v.get("server.chat_queue_bytes")?,
                chat_drain_timeout: v.get("server.chat_drain_timeout_secs")?,
                line_timeout: v.get("server.line_timeout_secs")?,
                write_timeout: v.get("server.write_timeout_secs")?,
                queue_timeout: v.get("server.queue_timeout_secs")?,
                chat_flush_ms: v.get("server.chat_flush_ms")?,
            },
            udp: UdpConfig {
                enabled: v.get("udp.enabled")?,
                bind: v.get("udp.bind")?,
                port: v.get("udp.port")?,
                max_datagram_bytes: v.get("udp.max_datagram_bytes")?,
                rate_per_sec: v.get("udp.rate_per_sec")?,
                burst: v.get("udp.burst")?,
                max_peers: v.get("udp.max_peers")?,
            },
            files: FilesConfig {
                dir: v.get("files.dir")?,
                max_file_size: v.get("files.max_file_size")?,
                on_conflict: v.get("files.on_conflict")?,
                file_mode: v.get("files.file_mode")?,
                min_free_bytes: v.get("files.min_free_bytes")?,
                token_file: v.get("files.token_file")?,
                resume_keep: v.get("files.resume_keep_secs")?,
                resume_max_bytes: v.get("files.resume_max_bytes")?,
                resume_max_count: v.get("files.resume_max_count")?,
                allow_subdirs: v.get("files.allow_subdirs")?,
                on_stored: v.get("files.on_stored")?,
                hook_workers: v.get("files.hook_workers")?,
                hook_queue_depth: v.get("files.hook_queue_depth")?,
                hook_timeout: v.get("files.hook_timeout_secs")?,
            },
            access: AccessConfig {
                rules: Rules {
                    allow: v.get("access.allow")?,
                    deny: v.get("access.deny")?,
                },
                proxy_from: v.get("access.proxy_protocol_from")?,
                max_per_ip: v.get("access.max_per_ip")?,
                ipv6_prefix_len: v.get("access.ipv6_prefix_len")?,
                max_files_per_connection: v.get("access.max_files_per_connection")?,
                require_token: v.get("access.require_token")?,
                header_timeout: v.get("access.header_timeout_secs")?,
                min_upload_bytes_per_sec: v.get("access.min_upload_bytes_per_sec")?,
                upload_rate_window: v.get("access.upload_rate_window_secs")?,
                auth_timeout: v.get("access.auth_timeout_secs")?,
                exempt_loopback: v.get("access.exempt_loopback")?,
            },
            log: LogConfig {
                level: v.get("log.level")?,
                format: v.get("log.format")?,
                refusal_summary: v.get("log.refusal_summary_secs")?,
            },
            compat: CompatConfig {
                starstar_uploads: v.get("compat.starstar_uploads")?,
            },
            control: ControlConfig {
                socket: v.get("control.socket")?,
                group: v.get("control.group")?,
            },
        })
    }
}

/// The built-in defaults: every key's declared default.
impl Default for Config {
    fn default() -> Config {
        // The key table is constant, and `defaults_fit_their_fields` builds it.
        Config::build(&Values::defaults())
            .expect("every key's default fits its field (unit-tested)")
    }
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
        assert!(
            msg.starts_with("test.toml:1: server = 5: expected a table, found an integer"),
            "{msg}"
        );
        let msg = err("port = 5\n");
        assert!(
            msg.starts_with(
                "test.toml:1: port = 5: unknown field `port`, expected one of `server`"
            ),
            "{msg}"
        );
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
    fn on_stored_is_a_checked_command() {
        let c = parse(
            "[files]\non_stored = [\"/usr/bin/mosquitto_pub\", \"-m\", \"{name} \\\"{size}\\\"\"]\nhook_workers = 3\nhook_timeout_secs = 5\n",
            "x",
        )
        .unwrap();
        assert_eq!(
            c.files.on_stored,
            ["/usr/bin/mosquitto_pub", "-m", "{name} \"{size}\""]
        );
        assert_eq!(c.files.hook_workers, 3);
        assert_eq!(c.files.hook_timeout, Duration::from_secs(5));
        assert_eq!(parse(&c.to_string(), "y").unwrap(), c);
        let cases = [
            (
                "[files]\non_stored = [\"/bin/x\", \"{file}\"]\n",
                "test.toml:2: files.on_stored = [\"/bin/x\", \"{file}\"]: item 2: unknown placeholder {file}, known: {path}, {name}, {size}, {checksum}, {peer}; allowed: a list of strings",
            ),
            (
                "[files]\non_stored = \"/bin/x {path}\"\n",
                "files.on_stored = \"/bin/x {path}\": expected a list, found a string",
            ),
            (
                "[files]\non_stored = [\"/bin/x\", 5]\n",
                "item 2 is an integer, not a string",
            ),
            (
                "[files]\non_stored = [\"\"]\n",
                "item 1, the program, is empty",
            ),
            (
                "[files]\nhook_workers = 0\n",
                "files.hook_workers = 0: out of range",
            ),
        ];
        for (src, want) in cases {
            let msg = err(src);
            assert!(msg.contains(want), "{msg}");
        }
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
        assert_eq!(c.access.upload_rate_window, Duration::from_secs(10));
        let c = parse("[access]\nupload_rate_window_secs = 30\n", "x").unwrap();
        assert_eq!(c.access.upload_rate_window, Duration::from_secs(30));
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
            (
                "[files]\ntoken_file = \"/k\"\n[compat]\nstarstar_uploads = true\n",
                "compat.starstar_uploads = true: cannot be combined with files.token_file",
            ),
            (
                "[compat]\nstarstar_uploads = 1\n",
                "compat.starstar_uploads",
            ),
            ("[compat]\nstarstar = true\n", "starstar"),
            (
                "[server]\nchat_flush_ms = 60001\n",
                "server.chat_flush_ms = 60001: out of range",
            ),
        ];
        for (src, want) in cases {
            let msg = err(src);
            assert!(msg.contains(want), "{msg}");
        }
    }
}
