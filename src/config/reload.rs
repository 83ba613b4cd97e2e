//! What a reload (SIGHUP) may change: comparing the running configuration with a newly read one,
//! keeping the settings that only a restart can change, and listing both kinds of change for the
//! log. Pure: no I/O.

use super::check::Values;
use super::keys::{KEYS, Reload, Shown};
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

/// Compares `old` (running) with `new` (just read), key by key as the key table declares: a
/// `Reload::Live` key takes its new value, a `Reload::Restart` key (the listening sockets, the
/// thread pool, the queue, the mode) keeps its running one.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut applied = Vec::new();
    let mut needs_restart = Vec::new();
    let mut kept = Vec::with_capacity(KEYS.len());
    for key in KEYS {
        let (was, now) = ((key.get)(old), (key.get)(new));
        let (was_val, now_val) = (was.to_val(), now.to_val());
        if was_val == now_val {
            kept.push(now_val);
            continue;
        }
        let change = format!("{}: {} -> {}", key.path(), Shown(was), Shown(now));
        match key.reload {
            Reload::Live => {
                applied.push(change);
                kept.push(now_val);
            }
            Reload::Restart => {
                needs_restart.push(change);
                kept.push(was_val);
            }
        }
    }
    let effective = if needs_restart.is_empty() {
        new.clone()
    } else {
        // Values read out of two valid configurations always fit; should one not, nothing
        // changes.
        Config::build(&Values(kept)).unwrap_or_else(|_| old.clone())
    };
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
    use crate::config::keys::{Key, Kind};
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

    /// A valid setting of `key` that differs from its default, as TOML lines.
    fn changed(key: &Key) -> String {
        let value = match key.kind {
            Kind::Int { max, default, .. } if default != max => max.to_string(),
            Kind::Int { min, .. } => min.to_string(),
            Kind::Word { words, default } => {
                let other = words.iter().find(|w| **w != default);
                format!("\"{}\"", other.unwrap_or(&default))
            }
            Kind::Bool { default } => (!default).to_string(),
            Kind::Ip { .. } => "\"::1\"".to_string(),
            Kind::Path { .. } => "\"elsewhere\"".to_string(),
            Kind::Text { .. } => "\"adm\"".to_string(),
            Kind::Rules => "[\"10.0.0.0/8\"]".to_string(),
            Kind::Argv => "[\"/bin/true\", \"{path}\"]".to_string(),
        };
        let mut src = format!("[{}]\n{} = {value}\n", key.table, key.name);
        if key.is("access.require_token") {
            src.push_str("[files]\ntoken_file = \"upload.key\"\n");
        }
        src
    }

    /// For each key in turn: a file changing it (and, through `same_as`, the keys that follow
    /// it) gives a plan that applies exactly the changed `Reload::Live` keys, keeps exactly the
    /// changed `Reload::Restart` keys at their running value, and says so in the log wording.
    #[test]
    fn each_key_applies_live_or_waits_for_a_restart_as_declared() {
        let old = Config::default();
        let mut live = 0;
        let mut restart = 0;
        for key in KEYS {
            let src = changed(key);
            let new = match parse(&src, "x") {
                Ok(c) => c,
                Err(e) => panic!("{src:?}: {e}"),
            };
            let p = plan(&old, &new);
            let mut want_applied = Vec::new();
            let mut want_restart = Vec::new();
            for k in KEYS {
                let (was, now) = ((k.get)(&old), (k.get)(&new));
                let effective = (k.get)(&p.effective).to_val();
                if was.to_val() == now.to_val() {
                    assert_eq!(effective, now.to_val(), "{src:?}: {}", k.path());
                    continue;
                }
                let line = format!("{}: {} -> {}", k.path(), was.debug(), now.debug());
                match k.reload {
                    Reload::Live => {
                        assert_eq!(effective, now.to_val(), "{src:?}: {} applies", k.path());
                        want_applied.push(line);
                    }
                    Reload::Restart => {
                        assert_eq!(effective, was.to_val(), "{src:?}: {} stays", k.path());
                        want_restart.push(line);
                    }
                }
            }
            assert!(
                want_applied.len() + want_restart.len() >= 1,
                "{src:?} should change {}",
                key.path()
            );
            assert_eq!(p.applied, want_applied, "{src:?}");
            assert_eq!(p.needs_restart, want_restart, "{src:?}");
            let own = format!("{}: ", key.path());
            match key.reload {
                Reload::Live => {
                    live += 1;
                    assert!(p.applied.iter().any(|l| l.starts_with(&own)), "{src:?}");
                }
                Reload::Restart => {
                    restart += 1;
                    assert!(
                        p.needs_restart.iter().any(|l| l.starts_with(&own)),
                        "{src:?}"
                    );
                }
            }
        }
        // The listening sockets, the pool, the queue, the stacks, the mode and the control socket
        // wait for a restart.
        let restart_only: Vec<String> = KEYS
            .iter()
            .filter(|k| k.reload == Reload::Restart)
            .map(|k| k.path())
            .collect();
        assert_eq!(
            restart_only,
            [
                "server.bind",
                "server.port",
                "server.max_connections",
                "server.queue_depth",
                "server.backlog",
                "server.thread_stack_kib",
                "server.mode",
                "udp.enabled",
                "udp.bind",
                "udp.port",
                "files.hook_workers",
                "files.hook_queue_depth",
                "control.socket",
                "control.group",
            ]
        );
        assert_eq!((live + restart, restart), (KEYS.len(), restart_only.len()));
    }
}
