//! The `log` backend: one line per record on stderr, written with a single `write` so that lines
//! from different threads never interleave. Three formats: human (RFC 3339 timestamp and level),
//! journal (the sd-daemon `<N>` priority prefix and no timestamp, since journald adds its own)
//! and JSON (one object per line, for log shippers).

use std::fmt;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::LogFormat;
use crate::escape::quoted;

/// Logs a record at `level`, if the level is enabled; what `logger::log!` does, but through one
/// out-of-line function and without the record's target, module path and source location,
/// which no format shows: `log`'s macros keep a static of those three (and its relocations) at
/// each of the daemon's ~120 call sites, 10 to 18 KiB of the binary (issue 24).
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {{
        let level: ::log::Level = $level;
        if level <= ::log::max_level() {
            $crate::logger::emit(level, format_args!($($arg)+));
        }
    }};
}

/// `logger::error!` through `log!` above.
macro_rules! error {
    ($($arg:tt)+) => { $crate::logger::log!(::log::Level::Error, $($arg)+) };
}

/// `logger::warn!` through `log!` above (named `warn` where it is exported: a bare `warn` would be
/// ambiguous with the built-in attribute here).
macro_rules! warning {
    ($($arg:tt)+) => { $crate::logger::log!(::log::Level::Warn, $($arg)+) };
}

/// `logger::info!` through `log!` above.
macro_rules! info {
    ($($arg:tt)+) => { $crate::logger::log!(::log::Level::Info, $($arg)+) };
}

/// `logger::debug!` through `log!` above.
macro_rules! debug {
    ($($arg:tt)+) => { $crate::logger::log!(::log::Level::Debug, $($arg)+) };
}

pub(crate) use {debug, error, info, log, warning as warn};

/// Hands one record to the installed logger (the `log!` macro's out-of-line half).
#[inline(never)]
pub fn emit(level: Level, args: fmt::Arguments<'_>) {
    log::logger().log(&Record::builder().level(level).args(args).build());
}

/// The format actually used (`Auto` resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Human = 0,
    Journal = 1,
    Json = 2,
}

/// Installs the logger, or, if it is installed already, changes its level and format (a reload).
pub fn init(level: LevelFilter, format: LogFormat) -> Resolved {
    // A second `set_logger` fails harmlessly; the settings below still apply.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
    let resolved = resolve(format, std::env::var("JOURNAL_STREAM").ok().as_deref());
    FORMAT.store(resolved as u8, Ordering::Relaxed);
    resolved
}

/// `Auto` is `Journal` when stderr is the stream `$JOURNAL_STREAM` names (systemd sets it to
/// the `device:inode` of the journal stream it connects stderr to), else `Human`.
fn resolve(format: LogFormat, journal_stream: Option<&str>) -> Resolved {
    match format {
        LogFormat::Human => Resolved::Human,
        LogFormat::Journal => Resolved::Journal,
        LogFormat::Json => Resolved::Json,
        LogFormat::Auto => match (journal_stream, stderr_id()) {
            (Some(want), Some((dev, ino))) if want == format!("{dev}:{ino}") => Resolved::Journal,
            _ => Resolved::Human,
        },
    }
}

fn stderr_id() -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(std::io::stderr().as_fd()).ok()?;
    Some((st.st_dev as u64, st.st_ino as u64))
}

static LOGGER: StderrLogger = StderrLogger;
static FORMAT: AtomicU8 = AtomicU8::new(Resolved::Human as u8);

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let format = match FORMAT.load(Ordering::Relaxed) {
            1 => Resolved::Journal,
            2 => Resolved::Json,
            _ => Resolved::Human,
        };
        let line = format_line(
            format,
            record.level(),
            &record.args().to_string(),
            SystemTime::now(),
        );
        // Logging must never take the daemon down: a closed stderr loses the line, nothing else.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// One log line, with its newline.
pub fn format_line(format: Resolved, level: Level, msg: &str, now: SystemTime) -> String {
    match format {
        Resolved::Human => format!("{} {level:<5} {msg}\n", rfc3339(now)),
        Resolved::Journal => {
            // sd-daemon(3) priorities: 3 error, 4 warning, 6 info, 7 debug.
            let prio = match level {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{msg}\n")
        }
        Resolved::Json => format!(
            "{{\"ts\":\"{}\",\"level\":\"{}\",\"msg\":{}}}\n",
            rfc3339(now),
            level.as_str().to_ascii_lowercase(),
            quoted(msg)
        ),
    }
}

/// Formats `t` as an RFC 3339 UTC timestamp with milliseconds, e.g. `2026-11-22T13:38:48.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Converts days since 1970-01-01 to a (year, month, day) date in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn formats() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_354_728_123);
        let cases = [
            (
                Resolved::Human,
                Level::Info,
                "hi",
                "2026-11-22T13:38:48.123Z INFO  hi\n",
            ),
            (Resolved::Journal, Level::Error, "bad", "<3>bad\n"),
            (Resolved::Journal, Level::Warn, "w", "<4>w\n"),
            (Resolved::Journal, Level::Info, "i", "<6>i\n"),
            (Resolved::Journal, Level::Debug, "d", "<7>d\n"),
            (
                Resolved::Json,
                Level::Warn,
                "a \"q\" \\ \u{1}\n",
                "{\"ts\":\"2026-11-22T13:38:48.123Z\",\"level\":\"warn\",\"msg\":\"a \\\"q\\\" \\\\ \\u0001\\n\"}\n",
            ),
        ];
        for (format, level, msg, want) in cases {
            assert_eq!(format_line(format, level, msg, t), want);
        }
    }

    #[test]
    fn auto_follows_journal_stream() {
        let (dev, ino) = stderr_id().unwrap();
        assert_eq!(
            resolve(LogFormat::Auto, Some(&format!("{dev}:{ino}"))),
            Resolved::Journal
        );
        assert_eq!(resolve(LogFormat::Auto, Some("1:2")), Resolved::Human);
        assert_eq!(resolve(LogFormat::Auto, None), Resolved::Human);
        assert_eq!(
            resolve(LogFormat::Json, Some(&format!("{dev}:{ino}"))),
            Resolved::Json
        );
    }

    #[test]
    fn rfc3339_known_instants() {
        let cases = [
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.005Z"),
            (1_795_354_728, 123, "2026-11-22T13:38:48.123Z"),
            (4_107_542_399, 999, "2100-02-28T23:59:59.999Z"),
        ];
        for (secs, ms, want) in cases {
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms);
            assert_eq!(rfc3339(t), want);
        }
    }
}
