//! Everything a hook starts, kept within its limits: the daemon is a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), so a process a hook leaves behind comes back to the daemon as its
//! child when its parent exits, instead of going to PID 1.
//!
//! Why a subreaper and the process group together, and not a cgroup: a cgroup needs a delegated
//! subtree (systemd's `Delegate=`) and a writable cgroupfs, which the hardened unit does not
//! grant and a plain `ferryd run` does not have. The process group reaches what the hook starts
//! while its parents live (one `killpg`, also after the hook itself has exited); the subreaper
//! catches what leaves the group with `setsid` once its parent dies. Such an adopted process is
//! traced to its hook by `FERRYD_HOOK_RUN=<run id>` in its environment (inherited from the hook);
//! one whose environment no longer says (cleared, or unreadable) cannot be held to any hook's
//! limit and is killed on sight. A process that escapes the group and keeps a living parent
//! outside it cannot exist: its parents are the hook's own processes, all in the group or
//! adopted.
//!
//! Hook leaders are reaped by their own thread (`std::process::Child`); every other child of the
//! daemon is a hook's leftover, and `remains` reaps those that have ended. The daemon starts no
//! other processes.

use std::fs;
use std::io;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{
    Pid, Signal, WaitOptions, getpid, kill_process, kill_process_group, set_child_subreaper,
    test_kill_process_group, waitpgid, waitpid,
};

use crate::logger;

/// The environment variable that ties a hook's processes to its run.
pub const RUN_ENV: &str = "FERRYD_HOOK_RUN";
/// How long `kill_all` keeps killing what reappears (adopted children of killed parents).
const KILL_FOR: Duration = Duration::from_secs(2);
const KILL_STEP: Duration = Duration::from_millis(20);

/// The hook leaders being waited for by their threads (never reaped here): one per hook thread
/// at most, so a short list.
#[derive(Debug, Default)]
pub struct Reaper {
    leaders: Mutex<Vec<i32>>,
}

impl Reaper {
    /// Makes the daemon a child subreaper (once, when the first hook thread starts).
    pub fn adopt_orphans() {
        if let Err(e) = set_child_subreaper(Some(getpid())) {
            logger::warn!(
                "cannot become a child subreaper: {e}; a hook's process that leaves its process group with setsid may outlive files.hook_timeout_secs"
            );
        }
    }

    /// Starts `cmd` (its own process group, `RUN_ENV` set) and registers its leader, under the
    /// lock that `remains` scans with, so the leader is never taken for a leftover.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let mut leaders = self.lock();
        let child = cmd.spawn()?;
        leaders.push(child.id() as i32);
        Ok(child)
    }

    /// The leader `pid` has been reaped by its thread.
    pub fn leader_done(&self, pid: u32) {
        self.lock().retain(|&leader| leader != pid as i32);
    }

    /// After the leader of group `pgid` has been reaped: reaps what of the hook has ended, and
    /// says whether anything of run `run` still lives (in the group, or adopted with its tag).
    /// An adopted process without a tag is killed.
    pub fn remains(&self, pgid: u32, run: u64) -> bool {
        let mut alive = false;
        if let Some(group) = pid_of(pgid) {
            while let Ok(Some(_)) = waitpgid(group, WaitOptions::NOHANG) {}
            alive = test_kill_process_group(group).is_ok();
        }
        let leaders = self.lock();
        for child in children() {
            let Some(pid) = pid_of(child.pid as u32) else {
                continue;
            };
            if leaders.contains(&child.pid) {
                continue;
            }
            if child.zombie {
                let _ = waitpid(Some(pid), WaitOptions::NOHANG);
                continue;
            }
            match child.run {
                Some(r) if r == run => alive = true,
                Some(_) => {}
                None => {
                    logger::warn!(
                        "killing process {} left by a hook: it cleared {RUN_ENV} from its environment, so no hook's limit can hold it",
                        child.pid
                    );
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
        }
        alive
    }

    /// After the leader of group `pgid` has been reaped: kills the group and every adopted
    /// process of run `run`, again while new ones are adopted (the children of those just
    /// killed), for at most `KILL_FOR`. Returns whether anything is still alive then.
    pub fn kill_all(&self, pgid: u32, run: u64) -> bool {
        let until = Instant::now() + KILL_FOR;
        loop {
            kill_group(pgid);
            for child in children() {
                if child.run == Some(run) && !child.zombie {
                    if let Some(pid) = pid_of(child.pid as u32) {
                        let _ = kill_process(pid, Signal::KILL);
                    }
                }
            }
            let alive = self.remains(pgid, run);
            if !alive || Instant::now() >= until {
                return alive;
            }
            thread::sleep(KILL_STEP);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<i32>> {
        self.leaders.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A child of the daemon, as `/proc` shows it.
struct ChildProc {
    pid: i32,
    zombie: bool,
    /// The hook run named in its environment.
    run: Option<u64>,
}

/// The daemon's children (hook leaders and adopted leftovers), from `/proc/<pid>/stat`.
fn children() -> Vec<ChildProc> {
    let me = getpid().as_raw_nonzero().get();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((state, ppid)) = state_and_parent(&stat) else {
            continue;
        };
        if ppid != me {
            continue;
        }
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        out.push(ChildProc {
            pid,
            zombie: state == 'Z',
            run: run_of(&environ),
        });
    }
    out
}

/// The state and parent pid in a `/proc/<pid>/stat` line (after the command name, which may
/// hold spaces and parentheses).
fn state_and_parent(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The run id in a process environment (`/proc/<pid>/environ`: `KEY=value` NUL-separated).
fn run_of(environ: &[u8]) -> Option<u64> {
    let prefix = format!("{RUN_ENV}=");
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// Kills process group `pgid` (the hook leader's pid), if it has any process left.
pub fn kill_group(pgid: u32) {
    if let Some(group) = pid_of(pgid) {
        let _ = kill_process_group(group, Signal::KILL);
    }
}

/// A child's pid as rustix takes it; `None` for 0, 1 and what does not fit, which are never a
/// hook's (signalling them would reach the caller's group or init).
fn pid_of(raw: u32) -> Option<Pid> {
    i32::try_from(raw)
        .ok()
        .filter(|&p| p > 1)
        .and_then(Pid::from_raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_and_environments() {
        let cases: [(&str, Option<(char, i32)>); 4] = [
            ("123 (sleep) S 77 123 1 0", Some(('S', 77))),
            ("124 (a) b) (c) Z 9 9", Some(('Z', 9))),
            ("125 (x", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(state_and_parent(line), want, "{line}");
        }
        assert_eq!(run_of(b"A=1\0FERRYD_HOOK_RUN=42\0B=2\0"), Some(42));
        assert_eq!(run_of(b"FERRYD_HOOK_RUN=x\0"), None);
        assert_eq!(run_of(b"XFERRYD_HOOK_RUN=4\0"), None);
        assert_eq!(run_of(b""), None);
    }
}
