//! Every configuration key, declared once: its table, name, one-line doc, type, default, range,
//! whether a reload may change it, and where it lives in `Config`.
//!
//! Validation (`check`), the built-in defaults, `check-config`'s output (`Display for Config`) and
//! the reload plan (`reload`) all read this table, as ripgrep derives its help and parsing from
//! `crates/core/flags/defs.rs`. A new key is one entry here, its field in `Config`, one line in
//! `Config::build` and its documentation in config/config.toml; the unit tests hold the four
//! together.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::proto::decimal::Secs;
use crate::rules::Cidr;

use super::{Config, LogFormat, Mode, OnConflict};

/// One configuration key.
pub(super) struct Key {
    /// The `[table]` it sits in.
    pub table: &'static str,
    /// Its name within the table.
    pub name: &'static str,
    /// One line saying what it does (printed by `check-config`).
    pub doc: &'static str,
    /// Its type, default and range.
    pub kind: Kind,
    /// When the file leaves it out: the value of this other key (`table.name`) instead of the
    /// kind's default.
    pub same_as: Option<&'static str>,
    /// Whether a reload (SIGHUP) may change it.
    pub reload: Reload,
    /// Where it lives in a validated `Config`.
    pub get: fn(&Config) -> &dyn Setting,
}

/// A key's type with its default and, for integers, its inclusive range.
pub(super) enum Kind {
    /// A whole number. `Duration` fields hold it as seconds; `octal` keys (file modes) are
    /// written and described in octal.
    Int {
        min: u64,
        max: u64,
        default: u64,
        octal: bool,
    },
    /// One of a fixed set of words.
    Word {
        words: &'static [&'static str],
        default: &'static str,
    },
    Bool {
        default: bool,
    },
    /// An IPv4 or IPv6 address literal.
    Ip {
        default: IpAddr,
    },
    /// A non-empty path; `None`: unset unless given.
    Path {
        default: Option<&'static str>,
        allowed: &'static str,
    },
    /// A non-empty word such as a group name; unset unless given.
    Text {
        allowed: &'static str,
    },
    /// A list of addresses and CIDR ranges, empty by default.
    Rules,
    /// A command as a list of strings (program, then arguments, with `hookargs` placeholders),
    /// empty (no command) by default.
    Argv,
}

/// What a reload does with a changed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reload {
    /// Read at each use: the new value applies to new connections and files at once.
    Live,
    /// Fixed at start-up (sockets, threads, queues, the mode): the running value stays.
    Restart,
}

/// A key's value in a type-neutral form: what validation produces, what `Display` renders and
/// what the reload plan compares.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Val {
    Int(u64),
    Word(&'static str),
    Bool(bool),
    Ip(IpAddr),
    Path(PathBuf),
    Text(String),
    Rules(Vec<Cidr>),
    Argv(Vec<String>),
    /// An optional key that is not set.
    Unset,
}

/// A field of `Config` that a key fills: it converts to and from `Val` (without `as` casts) and
/// shows itself in the reload log as `Debug` does.
pub(super) trait Setting {
    fn to_val(&self) -> Val;
    /// The value as `{:?}` shows it (not `Debug` itself, so that the vtables do not pull in
    /// `Duration`'s decimal `Debug` code for durations that are whole seconds).
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
    /// `{:?}` itself, which the reload tests hold `show` to.
    #[cfg(test)]
    fn debug(&self) -> String;
}

/// A setting shown as its `show` says, for `{}`.
pub(super) struct Shown<'a>(pub &'a dyn Setting);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.show(f)
    }
}

/// The way back from `Val` to a field's type (by reference, so that only the types that own
/// memory clone it); `None` when the value does not fit the type, which the key's range rules
/// out (the unit tests check every key's extremes).
pub(super) trait FromVal: Sized {
    fn from_val(v: &Val) -> Option<Self>;
}

const fn int(min: u64, max: u64, default: u64) -> Kind {
    Kind::Int {
        min,
        max,
        default,
        octal: false,
    }
}

/// The largest value an `i64` TOML integer holds, for byte counts.
const I64_MAX: u64 = 9_223_372_036_854_775_807;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub(super) const BIND_ALLOWED: &str =
    "an IPv4 or IPv6 address literal such as \"127.0.0.1\", \"0.0.0.0\" or \"::\"";
pub(super) const RULES_ALLOWED: &str =
    "a list of IPv4/IPv6 addresses and CIDR ranges, e.g. [\"10.0.0.0/8\", \"::1\"]";
const DIR_ALLOWED: &str =
    "a non-empty directory path (relative paths start at ferryd's working directory)";
const CONTROL_SOCKET_ALLOWED: &str = "the path of a Unix socket to create, in a directory the daemon may write (e.g. /run/ferryd/control.sock)";
const TOKEN_FILE_ALLOWED: &str = "the path of a file holding the shared key (16 bytes or more)";
pub(super) const ARGV_ALLOWED: &str = "a list of strings: the program, then its arguments, which may hold \
     {path}, {name}, {size}, {checksum}, {peer} ([] for no hook)";

/// The tables, in the order `check-config` prints them.
pub(super) const TABLES: &[&str] = &[
    "server", "udp", "files", "access", "log", "compat", "control",
];

/// Every key, table by table in the order of config/config.toml.
pub(super) const KEYS: &[Key] = &[
    // [server]
    Key {
        table: "server",
        name: "bind",
        doc: "address to listen on: an IPv4 or IPv6 literal (\"::\" is dual-stack)",
        kind: Kind::Ip { default: LOCALHOST },
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.server.bind,
    },
    Key {
        table: "server",
        name: "port",
        doc: "TCP port; 0 (any free port) is refused: clients need to know where to connect",
        kind: int(1, 65535, 7878),
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.server.port,
    },
    Key {
        table: "server",
        name: "max_connections",
        doc: "connections served at once: the most worker threads, started on demand",
        kind: int(1, 65535, 64),
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.server.max_connections,
    },
    Key {
        table: "server",
        name: "queue_depth",
        doc: "accepted connections waiting for a free worker; beyond it \"ERR busy\"",
        kind: int(1, 1_000_000, 16),
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.server.queue_depth,
    },
    Key {
        table: "server",
        name: "backlog",
        doc: "kernel listen backlog (capped by net.core.somaxconn)",
        kind: int(1, 65535, 128),
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.server.backlog,
    },
    Key {
        table: "server",
        name: "idle_timeout_secs",
        doc: "seconds a connection may stay silent before \"ERR idle timeout\"",
        kind: int(1, 86_400, 300),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.idle_timeout,
    },
    Key {
        table: "server",
        name: "max_line_bytes",
        doc: "longest text line held, in bytes",
        kind: int(1, 16 << 20, 65536),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.max_line_bytes,
    },
    Key {
        table: "server",
        name: "thread_stack_kib",
        doc: "stack size of each worker thread, in KiB",
        kind: int(32, 65536, 128),
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.server.thread_stack_kib,
    },
    Key {
        table: "server",
        name: "shutdown_grace_secs",
        doc: "seconds the workers get to finish on SIGINT/SIGTERM",
        kind: int(0, 3600, 5),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.shutdown_grace,
    },
    Key {
        table: "server",
        name: "mode",
        doc: "what text does: \"echo\" it back, or \"chat\" relay lines to the other clients",
        kind: Kind::Word {
            words: Mode::WORDS,
            default: "echo",
        },
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.server.mode,
    },
    Key {
        table: "server",
        name: "chat_queue_bytes",
        doc: "chat mode: bytes the room holds for its slowest member before senders wait",
        kind: int(4096, 1 << 30, 1 << 20),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.chat_queue_bytes,
    },
    Key {
        table: "server",
        name: "chat_drain_timeout_secs",
        doc: "chat mode: seconds a member may take nothing of what waits for it before it is dropped",
        kind: int(1, 3600, 5),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.chat_drain_timeout,
    },
    Key {
        table: "server",
        name: "line_timeout_secs",
        doc: "seconds from a text line's first byte to its newline (minimum progress for text)",
        kind: int(1, 3600, 10),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.line_timeout,
    },
    Key {
        table: "server",
        name: "write_timeout_secs",
        doc: "seconds a peer may leave what ferryd writes untaken before it is closed",
        kind: int(1, 3600, 10),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.write_timeout,
    },
    Key {
        table: "server",
        name: "queue_timeout_secs",
        doc: "seconds a queued connection waits for a worker before \"ERR busy\"",
        kind: int(1, 3600, 5),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.queue_timeout,
    },
    Key {
        table: "server",
        name: "chat_flush_ms",
        doc: "chat mode: text without a newline is delivered as a line after this many \
              milliseconds of silence; 0: only at a newline",
        kind: int(0, 60_000, 200),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.server.chat_flush_ms,
    },
    // [udp]
    Key {
        table: "udp",
        name: "enabled",
        doc: "a UDP echo beside the TCP server",
        kind: Kind::Bool { default: true },
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.udp.enabled,
    },
    Key {
        table: "udp",
        name: "bind",
        doc: "UDP address, by default server.bind",
        kind: Kind::Ip { default: LOCALHOST },
        same_as: Some("server.bind"),
        reload: Reload::Restart,
        get: |c| &c.udp.bind,
    },
    Key {
        table: "udp",
        name: "port",
        doc: "UDP port, by default server.port",
        kind: int(1, 65535, 7878),
        same_as: Some("server.port"),
        reload: Reload::Restart,
        get: |c| &c.udp.port,
    },
    Key {
        table: "udp",
        name: "max_datagram_bytes",
        doc: "largest datagram echoed; larger ones are dropped and logged",
        kind: int(1, 65507, 65507),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.udp.max_datagram_bytes,
    },
    Key {
        table: "udp",
        name: "rate_per_sec",
        doc: "datagrams echoed per second per address (token bucket)",
        kind: int(1, 10_000_000, 1000),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.udp.rate_per_sec,
    },
    Key {
        table: "udp",
        name: "burst",
        doc: "datagrams one address may send above its rate at once",
        kind: int(1, 10_000_000, 1000),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.udp.burst,
    },
    Key {
        table: "udp",
        name: "max_peers",
        doc: "addresses whose buckets are remembered at once",
        kind: int(1, 1_000_000, 4096),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.udp.max_peers,
    },
    // [files]
    Key {
        table: "files",
        name: "dir",
        doc: "directory uploads are stored in, created (mode 0750) if missing",
        kind: Kind::Path {
            default: Some("uploads"),
            allowed: DIR_ALLOWED,
        },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.dir,
    },
    Key {
        table: "files",
        name: "max_file_size",
        doc: "largest file accepted, in bytes; larger ones get \"ERR too-large\"",
        kind: int(0, I64_MAX, 1 << 30),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.max_file_size,
    },
    Key {
        table: "files",
        name: "on_conflict",
        doc: "when the name is taken: \"rename\", \"reject\" or \"overwrite\"",
        kind: Kind::Word {
            words: OnConflict::WORDS,
            default: "rename",
        },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.on_conflict,
    },
    Key {
        table: "files",
        name: "file_mode",
        doc: "permission bits of stored files",
        kind: Kind::Int {
            min: 0,
            max: 0o777,
            default: 0o640,
            octal: true,
        },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.file_mode,
    },
    Key {
        table: "files",
        name: "min_free_bytes",
        doc: "space, in bytes, uploads must leave free on the file system",
        kind: int(0, I64_MAX, 64 << 20),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.min_free_bytes,
    },
    Key {
        table: "files",
        name: "token_file",
        doc: "file holding the shared upload key; unset: uploads need no key",
        kind: Kind::Path {
            default: None,
            allowed: TOKEN_FILE_ALLOWED,
        },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.token_file,
    },
    Key {
        table: "files",
        name: "resume_keep_secs",
        doc: "seconds the partial body of a cut-off resumable upload is kept; 0 turns resuming off",
        kind: int(0, 31_536_000, 86_400),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.resume_keep,
    },
    Key {
        table: "files",
        name: "resume_max_bytes",
        doc: "total size, in bytes, of the files whose partial bodies are kept; 0 turns resuming off",
        kind: int(0, I64_MAX, 4 << 30),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.resume_max_bytes,
    },
    Key {
        table: "files",
        name: "resume_max_count",
        doc: "how many partial bodies are kept at most; a new resumable upload removes the oldest \
              free one to fit; 0 turns resuming off",
        kind: int(0, 1_000_000, 1000),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.resume_max_count,
    },
    Key {
        table: "files",
        name: "allow_subdirs",
        doc: "accept names with subdirectories (photos/2024/a.jpg, from ferryd send -r), \
              creating the directories beneath files.dir",
        kind: Kind::Bool { default: false },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.allow_subdirs,
    },
    Key {
        table: "files",
        name: "on_stored",
        doc: "command run for each stored file, as [program, arg, …] with {path}, {name}, {size}, \
              {checksum}, {peer}; no shell; [] runs nothing",
        kind: Kind::Argv,
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.on_stored,
    },
    Key {
        table: "files",
        name: "hook_workers",
        doc: "files.on_stored commands running at once (threads, started at the first hook)",
        kind: int(1, 64, 2),
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.files.hook_workers,
    },
    Key {
        table: "files",
        name: "hook_queue_depth",
        doc: "stored files waiting for a hook worker; beyond it the hook is skipped and logged",
        kind: int(1, 100_000, 256),
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.files.hook_queue_depth,
    },
    Key {
        table: "files",
        name: "hook_timeout_secs",
        doc: "seconds a files.on_stored command may run before its process group is killed",
        kind: int(1, 86400, 60),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.files.hook_timeout,
    },
    // [access]
    Key {
        table: "access",
        name: "allow",
        doc: "if not empty, only peers in these ranges may connect (TCP and UDP)",
        kind: Kind::Rules,
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.rules.allow,
    },
    Key {
        table: "access",
        name: "deny",
        doc: "peers in these ranges are refused (deny wins over allow)",
        kind: Kind::Rules,
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.rules.deny,
    },
    Key {
        table: "access",
        name: "proxy_protocol_from",
        doc: "balancers in these ranges must start each TCP connection with a PROXY protocol \
              header (v1 or v2) within access.header_timeout_secs; the client address it carries \
              is the one the rules, counts, logs, chat and hooks see. Empty: off",
        kind: Kind::Rules,
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.proxy_from,
    },
    Key {
        table: "access",
        name: "max_per_ip",
        doc: "connections open at once from one address",
        kind: int(1, 65535, 8),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.max_per_ip,
    },
    Key {
        table: "access",
        name: "ipv6_prefix_len",
        doc: "IPv6 peers sharing their first this many bits count as one address (max_per_ip, fair shares, UDP rate limits)",
        kind: int(32, 128, 64),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.ipv6_prefix_len,
    },
    Key {
        table: "access",
        name: "exempt_loopback",
        doc: "loopback peers (127.0.0.0/8, ::1) are not capped by access.max_per_ip",
        kind: Kind::Bool { default: true },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.exempt_loopback,
    },
    Key {
        table: "access",
        name: "max_files_per_connection",
        doc: "file frames one connection may carry",
        kind: int(1, 1_000_000, 1000),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.max_files_per_connection,
    },
    Key {
        table: "access",
        name: "require_token",
        doc: "with files.token_file: text needs the AUTH line too, not only uploads",
        kind: Kind::Bool { default: false },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.require_token,
    },
    Key {
        table: "access",
        name: "auth_timeout_secs",
        doc: "with access.require_token: seconds from connecting to a good AUTH line",
        kind: int(1, 3600, 10),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.auth_timeout,
    },
    Key {
        table: "access",
        name: "header_timeout_secs",
        doc: "seconds from a file frame's first byte to the end of its header, name and tag; \
              and for a connection from access.proxy_protocol_from, to the end of its PROXY header",
        kind: int(1, 3600, 10),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.header_timeout,
    },
    Key {
        table: "access",
        name: "min_upload_bytes_per_sec",
        doc: "slowest upload body accepted, in bytes per second; 0 disables the check",
        kind: int(0, 1 << 40, 1024),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.min_upload_bytes_per_sec,
    },
    Key {
        table: "access",
        name: "upload_rate_window_secs",
        doc: "the window over which access.min_upload_bytes_per_sec is measured; a body read \
              waits at most this long before the check runs",
        kind: int(1, 300, 10),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.access.upload_rate_window,
    },
    // [log]
    Key {
        table: "log",
        name: "level",
        doc: "least severe message logged",
        kind: Kind::Word {
            words: LEVEL_WORDS,
            default: "info",
        },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.log.level,
    },
    Key {
        table: "log",
        name: "format",
        doc: "how lines are written: \"auto\" picks journal under systemd, else human",
        kind: Kind::Word {
            words: LogFormat::WORDS,
            default: "auto",
        },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.log.format,
    },
    Key {
        table: "log",
        name: "refusal_summary_secs",
        doc: "refusals over the per-reason line budget are summed up once per this many seconds",
        kind: int(1, 3600, 10),
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.log.refusal_summary,
    },
    // [compat]
    Key {
        table: "compat",
        name: "starstar_uploads",
        doc: "store NAME**SIZE uploads (the Qt tutorials' file client), unverified; else \
              \"ERR legacy-header\"; not with files.token_file",
        kind: Kind::Bool { default: false },
        same_as: None,
        reload: Reload::Live,
        get: |c| &c.compat.starstar_uploads,
    },
    // [control]
    Key {
        table: "control",
        name: "socket",
        doc: "path of the operator's control socket (ferryd ctl); unset: no control socket",
        kind: Kind::Path {
            default: None,
            allowed: CONTROL_SOCKET_ALLOWED,
        },
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.control.socket,
    },
    Key {
        table: "control",
        name: "group",
        doc: "group whose members may use the control socket (mode 0660); unset: mode 0600",
        kind: Kind::Text {
            allowed: "a group name or number",
        },
        same_as: None,
        reload: Reload::Restart,
        get: |c| &c.control.group,
    },
];

/// The words `log.level` takes (the `log` crate's filter is not ours to give `WORDS`).
const LEVEL_WORDS: &[&str] = &["error", "warn", "info", "debug"];

impl Key {
    /// `table.name`, as errors and logs write it.
    pub fn path(&self) -> String {
        format!("{}.{}", self.table, self.name)
    }

    pub fn is(&self, path: &str) -> bool {
        path.split_once('.') == Some((self.table, self.name))
    }

    /// The value used when the file leaves the key out (and no `same_as` applies).
    pub fn default(&self) -> Val {
        match self.kind {
            Kind::Int { default, .. } => Val::Int(default),
            Kind::Word { default, .. } => Val::Word(default),
            Kind::Bool { default } => Val::Bool(default),
            Kind::Ip { default } => Val::Ip(default),
            Kind::Path {
                default: Some(p), ..
            } => Val::Path(PathBuf::from(p)),
            Kind::Path { default: None, .. } | Kind::Text { .. } => Val::Unset,
            Kind::Rules => Val::Rules(Vec::new()),
            Kind::Argv => Val::Argv(Vec::new()),
        }
    }

    /// What the key allows, as error messages say it after "allowed: ".
    pub fn allowed(&self) -> String {
        match self.kind {
            Kind::Int {
                min,
                max,
                default,
                octal: true,
            } => format!("an octal mode in {min:#o}–{max:#o}, e.g. {default:#o}"),
            Kind::Int { min, max, .. } => format!("an integer in {min}–{max}"),
            Kind::Word { words, .. } => {
                let quoted: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
            Kind::Bool { .. } => "true or false".to_string(),
            Kind::Ip { .. } => BIND_ALLOWED.to_string(),
            Kind::Path { allowed, .. } | Kind::Text { allowed } => allowed.to_string(),
            Kind::Rules => RULES_ALLOWED.to_string(),
            Kind::Argv => ARGV_ALLOWED.to_string(),
        }
    }
}

/// The key named `path` (`table.name`).
pub(super) fn find(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.is(path))
}

// ---------------------------------------------------------------------------------------------
// The field types and their `Val`s.

macro_rules! int_setting {
    ($($t:ty),*) => {$(
        impl Setting for $t {
            fn to_val(&self) -> Val {
                Val::Int(u64::try_from(*self).unwrap_or(u64::MAX))
            }
            #[cfg(test)]
            fn debug(&self) -> String {
                format!("{self:?}")
            }
            fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
        impl FromVal for $t {
            fn from_val(v: &Val) -> Option<$t> {
                match v {
                    Val::Int(n) => <$t>::try_from(*n).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
int_setting!(u16, u32, u64, usize);

/// Durations are whole seconds in the file.
impl Setting for Duration {
    fn to_val(&self) -> Val {
        Val::Int(self.as_secs())
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // As `Debug` shows the whole seconds a duration setting holds: `300s`, zero as
        // `0ns`.
        if self.is_zero() {
            return f.write_str("0ns");
        }
        write!(f, "{}s", Secs(*self))
    }
}

impl FromVal for Duration {
    fn from_val(v: &Val) -> Option<Duration> {
        match v {
            Val::Int(n) => Some(Duration::from_secs(*n)),
            _ => None,
        }
    }
}

impl Setting for bool {
    fn to_val(&self) -> Val {
        Val::Bool(*self)
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromVal for bool {
    fn from_val(v: &Val) -> Option<bool> {
        match v {
            Val::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl Setting for IpAddr {
    fn to_val(&self) -> Val {
        Val::Ip(*self)
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromVal for IpAddr {
    fn from_val(v: &Val) -> Option<IpAddr> {
        match v {
            Val::Ip(ip) => Some(*ip),
            _ => None,
        }
    }
}

impl Setting for PathBuf {
    fn to_val(&self) -> Val {
        Val::Path(self.clone())
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromVal for PathBuf {
    fn from_val(v: &Val) -> Option<PathBuf> {
        match v {
            Val::Path(p) => Some(p.clone()),
            _ => None,
        }
    }
}

impl Setting for Option<PathBuf> {
    fn to_val(&self) -> Val {
        match self {
            Some(p) => Val::Path(p.clone()),
            None => Val::Unset,
        }
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromVal for Option<PathBuf> {
    fn from_val(v: &Val) -> Option<Option<PathBuf>> {
        match v {
            Val::Path(p) => Some(Some(p.clone())),
            Val::Unset => Some(None),
            _ => None,
        }
    }
}

impl Setting for Option<String> {
    fn to_val(&self) -> Val {
        match self {
            Some(t) => Val::Text(t.clone()),
            None => Val::Unset,
        }
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromVal for Option<String> {
    fn from_val(v: &Val) -> Option<Option<String>> {
        match v {
            Val::Text(t) => Some(Some(t.clone())),
            Val::Unset => Some(None),
            _ => None,
        }
    }
}

impl Setting for Vec<Cidr> {
    fn to_val(&self) -> Val {
        Val::Rules(self.clone())
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromVal for Vec<Cidr> {
    fn from_val(v: &Val) -> Option<Vec<Cidr>> {
        match v {
            Val::Rules(r) => Some(r.clone()),
            _ => None,
        }
    }
}

impl Setting for Vec<String> {
    fn to_val(&self) -> Val {
        Val::Argv(self.clone())
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromVal for Vec<String> {
    fn from_val(v: &Val) -> Option<Vec<String>> {
        match v {
            Val::Argv(a) => Some(a.clone()),
            _ => None,
        }
    }
}

macro_rules! word_setting {
    ($($t:ty),*) => {$(
        impl Setting for $t {
            fn to_val(&self) -> Val {
                Val::Word(self.as_str())
            }
            #[cfg(test)]
            fn debug(&self) -> String {
                format!("{self:?}")
            }
            fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
        impl FromVal for $t {
            fn from_val(v: &Val) -> Option<$t> {
                match v {
                    Val::Word(w) => <$t>::from_word(w),
                    _ => None,
                }
            }
        }
    )*};
}
word_setting!(Mode, OnConflict, LogFormat);

impl Setting for log::LevelFilter {
    fn to_val(&self) -> Val {
        Val::Word(match self {
            log::LevelFilter::Off => "off",
            log::LevelFilter::Error => "error",
            log::LevelFilter::Warn => "warn",
            log::LevelFilter::Info => "info",
            log::LevelFilter::Debug => "debug",
            log::LevelFilter::Trace => "trace",
        })
    }
    #[cfg(test)]
    fn debug(&self) -> String {
        format!("{self:?}")
    }
    fn show(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromVal for log::LevelFilter {
    fn from_val(v: &Val) -> Option<log::LevelFilter> {
        match v {
            Val::Word("error") => Some(log::LevelFilter::Error),
            Val::Word("warn") => Some(log::LevelFilter::Warn),
            Val::Word("info") => Some(log::LevelFilter::Info),
            Val::Word("debug") => Some(log::LevelFilter::Debug),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::Values;
    use super::super::render::toml_text;
    use super::super::{SHIPPED, parse};
    use super::*;

    fn parse_err(src: &str) -> String {
        match parse(src, "test.toml") {
            Ok(c) => panic!("expected an error for {src:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// The value `key` has in the configuration `src` gives.
    fn value_in(src: &str, key: &Key) -> Val {
        match parse(src, "test.toml") {
            Ok(c) => (key.get)(&c).to_val(),
            Err(e) => panic!("{src:?} should be valid: {e}"),
        }
    }

    #[test]
    fn the_table_is_consistent() {
        for (i, key) in KEYS.iter().enumerate() {
            let path = key.path();
            assert!(TABLES.contains(&key.table), "{path}: unknown table");
            assert!(
                KEYS.iter().skip(i + 1).all(|k| !k.is(&path)),
                "{path} is declared twice"
            );
            assert!(
                !key.doc.is_empty() && !key.doc.ends_with('.'),
                "{path}: doc"
            );
            if let Some(other) = key.same_as {
                assert!(find(other).is_some(), "{path}: same_as {other} is no key");
            }
            match key.kind {
                Kind::Int {
                    min, max, default, ..
                } => assert!(min <= default && default <= max, "{path}: default in range"),
                Kind::Word { words, default } => {
                    assert!(words.contains(&default), "{path}: default is a word")
                }
                _ => {}
            }
        }
        // Tables appear in `TABLES` order, so `check-config` prints each once.
        let order: Vec<usize> = KEYS
            .iter()
            .filter_map(|k| TABLES.iter().position(|t| *t == k.table))
            .collect();
        assert!(order.is_sorted(), "{order:?}");
    }

    #[test]
    fn defaults_fit_their_fields() {
        let defaults = Values::defaults();
        assert!(super::super::Config::build(&defaults).is_ok());
        assert_eq!(defaults.0.len(), KEYS.len());
    }

    /// Each key's default is the value config/config.toml gives it (a key the file leaves
    /// commented out, such as `files.token_file`, has its default by being absent), and the
    /// paragraph documenting it names its range or its words.
    #[test]
    fn every_default_is_the_shipped_value_and_documented() {
        let shipped = match parse(SHIPPED, "config.toml") {
            Ok(c) => c,
            Err(e) => panic!("config/config.toml: {e}"),
        };
        let defaults = Values::defaults();
        for (key, default) in KEYS.iter().zip(&defaults.0) {
            let path = key.path();
            assert_eq!(&(key.get)(&shipped).to_val(), default, "{path}");
            let paragraph = paragraph_of(key).unwrap_or_else(|| {
                panic!("{path}: no \"{} = \" line in [{}]", key.name, key.table)
            });
            let must_name: Vec<String> = match key.kind {
                Kind::Int {
                    min,
                    max,
                    octal: true,
                    ..
                } => vec![format!("{min:#05o}–{max:#o}")],
                Kind::Int { min, max, .. } => vec![format!("{min}–{max}")],
                Kind::Word { words, .. } => words.iter().map(|w| format!("\"{w}\"")).collect(),
                _ => Vec::new(),
            };
            for text in must_name {
                assert!(
                    paragraph.contains(&text),
                    "{path}: its paragraph should name {text}:\n{paragraph}"
                );
            }
        }
    }

    /// The paragraph (lines between blank lines) of config/config.toml holding `key`'s line,
    /// commented out or not.
    fn paragraph_of(key: &Key) -> Option<String> {
        let head = format!("[{}]", key.table);
        let body = SHIPPED.split(&head).nth(1)?.split("\n[").next()?;
        body.split("\n\n")
            .find(|p| {
                p.lines().any(|l| {
                    let l = l.trim_start_matches("# ");
                    l.strip_prefix(key.name)
                        .is_some_and(|rest| rest.starts_with(" = "))
                })
            })
            .map(str::to_string)
    }

    #[test]
    fn integer_bounds_are_accepted_and_one_beyond_refused() {
        for key in KEYS {
            let Kind::Int { min, max, .. } = key.kind else {
                continue;
            };
            let (path, allowed) = (key.path(), key.allowed());
            let src = |v: &str| format!("[{}]\n{} = {v}\n", key.table, key.name);
            for n in [min, max] {
                assert_eq!(value_in(&src(&n.to_string()), key), Val::Int(n), "{path}");
            }
            let below = i128::from(min) - 1;
            let above = i128::from(max) + 1;
            for bad in [below, above] {
                let msg = parse_err(&src(&bad.to_string()));
                let want = format!("test.toml:2: {path} = {bad}: ");
                assert!(msg.starts_with(&want), "{msg:?} should start with {want:?}");
                assert!(msg.ends_with(&format!("allowed: {allowed}")), "{msg}");
            }
        }
    }

    #[test]
    fn every_word_is_accepted_and_any_other_refused() {
        for key in KEYS {
            let Kind::Word { words, .. } = key.kind else {
                continue;
            };
            let path = key.path();
            let src = |v: &str| format!("[{}]\n{} = \"{v}\"\n", key.table, key.name);
            for word in words {
                assert_eq!(value_in(&src(word), key), Val::Word(word), "{path}");
            }
            let mut others = vec!["nope".to_string(), String::new()];
            others.extend(words.iter().map(|w| w.to_ascii_uppercase()));
            for other in others {
                let msg = parse_err(&src(&other));
                let want = format!(
                    "test.toml:2: {path} = \"{other}\": not a known value; allowed: {}",
                    key.allowed()
                );
                assert_eq!(msg, want);
            }
            let msg = parse_err(&format!("[{}]\n{} = 1\n", key.table, key.name));
            assert!(msg.contains("expected a string, found an integer"), "{msg}");
        }
    }

    #[test]
    fn every_value_renders_as_toml_that_reads_back() {
        let defaults = Values::defaults();
        for (key, v) in KEYS.iter().zip(&defaults.0) {
            if *v == Val::Unset {
                continue;
            }
            let src = format!("[{}]\n{} = {}\n", key.table, key.name, toml_text(key, v));
            assert_eq!(&value_in(&src, key), v, "{src}");
        }
    }
}
