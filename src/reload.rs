//! What a reload (SIGHUP) may change: comparing the running configuration with a newly read one,
//! keeping the settings that only a restart can change, and listing both kinds of change for the
//! log. Pure: no I/O.

use crate::config::Config;

/// The outcome of comparing two configurations.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The configuration to run with: the new one, except for the restart-only settings.
    pub effective: Config,
    /// `key: old -> new` for each setting that changes now.
    pub applied: Vec<String>,
    /// `key: old -> new` for each setting that changed in the file but needs a restart.
    pub needs_restart: Vec<String>,
}

/// Compares `old` (running) with `new` (just read).
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut effective = new.clone();
    let mut applied = Vec::new();
    let mut needs_restart = Vec::new();

    // Settings fixed at start-up: the listening socket, the thread pool, the queue, the mode.
    macro_rules! restart_only {
        ($($name:literal => $($field:ident).+),* $(,)?) => {$(
            if old.$($field).+ != new.$($field).+ {
                needs_restart.push(format!("{}: {:?} -> {:?}", $name, old.$($field).+, new.$($field).+));
                effective.$($field).+ = old.$($field).+.clone();
            }
        )*};
    }
    restart_only! {
        "server.bind" => server.bind,
        "server.port" => server.port,
        "server.max_connections" => server.max_connections,
        "server.queue_depth" => server.queue_depth,
        "server.backlog" => server.backlog,
        "server.thread_stack_kib" => server.thread_stack_kib,
        "server.mode" => server.mode,
        "udp.enabled" => udp.enabled,
        "udp.bind" => udp.bind,
        "udp.port" => udp.port,
    }

    // Settings read at each use: they apply to new connections and files from now on.
    macro_rules! live {
        ($($name:literal => $($field:ident).+),* $(,)?) => {$(
            if old.$($field).+ != new.$($field).+ {
                applied.push(format!("{}: {:?} -> {:?}", $name, old.$($field).+, new.$($field).+));
            }
        )*};
    }
    live! {
        "server.idle_timeout_secs" => server.idle_timeout,
        "server.max_line_bytes" => server.max_line_bytes,
        "server.shutdown_grace_secs" => server.shutdown_grace,
        "server.chat_queue_depth" => server.chat_queue_depth,
        "server.line_timeout_secs" => server.line_timeout,
        "server.write_timeout_secs" => server.write_timeout,
        "server.queue_timeout_secs" => server.queue_timeout,
        "udp.max_datagram_bytes" => udp.max_datagram_bytes,
        "udp.rate_per_sec" => udp.rate_per_sec,
        "udp.burst" => udp.burst,
        "udp.max_peers" => udp.max_peers,
        "files.dir" => files.dir,
        "files.max_file_size" => files.max_file_size,
        "files.on_conflict" => files.on_conflict,
        "files.file_mode" => files.file_mode,
        "files.min_free_bytes" => files.min_free_bytes,
        "files.token_file" => files.token_file,
        "access.allow" => access.rules.allow,
        "access.deny" => access.rules.deny,
        "access.max_per_ip" => access.max_per_ip,
        "access.max_files_per_connection" => access.max_files_per_connection,
        "access.require_token" => access.require_token,
        "access.header_timeout_secs" => access.header_timeout,
        "access.min_upload_bytes_per_sec" => access.min_upload_bytes_per_sec,
        "access.auth_timeout_secs" => access.auth_timeout,
        "access.exempt_loopback" => access.exempt_loopback,
        "log.level" => log.level,
        "log.format" => log.format,
        "log.refusal_summary_secs" => log.refusal_summary,
    }
    Plan {
        effective,
        applied,
        needs_restart,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::parse;

    #[test]
    fn live_settings_apply_and_restart_ones_are_kept() {
        let old = Config::default();
        let new = parse(
            "[server]\nport = 9999\nidle_timeout_secs = 7\nmax_connections = 3\n[log]\nlevel = \"debug\"\n[files]\nmax_file_size = 5\n",
            "x",
        )
        .unwrap();
        let p = plan(&old, &new);
        assert_eq!(p.effective.server.port, old.server.port);
        assert_eq!(
            p.effective.server.max_connections,
            old.server.max_connections
        );
        assert_eq!(p.effective.server.idle_timeout, Duration::from_secs(7));
        assert_eq!(p.effective.log.level, log::LevelFilter::Debug);
        assert_eq!(p.effective.files.max_file_size, 5);
        assert_eq!(
            p.needs_restart,
            [
                "server.port: 7878 -> 9999",
                "server.max_connections: 64 -> 3",
                // udp.port follows server.port when not set.
                "udp.port: 7878 -> 9999"
            ]
        );
        assert_eq!(
            p.applied,
            [
                "server.idle_timeout_secs: 300s -> 7s",
                "files.max_file_size: 1073741824 -> 5",
                "log.level: Info -> Debug"
            ]
        );
    }

    #[test]
    fn no_change_is_an_empty_plan() {
        let p = plan(&Config::default(), &Config::default());
        assert!(p.applied.is_empty() && p.needs_restart.is_empty());
        assert_eq!(p.effective, Config::default());
    }
}
