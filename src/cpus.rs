//! How many threads can run at once: the CPUs this process may run on, capped by its cgroup v2
//! `cpu.max` quota, as `std::thread::available_parallelism` counts them on Linux without its
//! 8 KiB of code (cgroup v1 and mountinfo scanning).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

/// Where cgroup v2 is mounted (file-hierarchy(7)), as std also assumes.
const CGROUP_MOUNT: &[u8] = b"/sys/fs/cgroup";

/// Most bytes read from one of the kernel's small files.
const READ_LIMIT: u64 = 4096;

/// The CPUs this process may run on (1 if the kernel does not say), at most its cgroup's quota
/// in whole CPUs (at least 1). Counted once per process: `send` asks for every file it hashes,
/// and the count is a handful of syscalls and file reads.
pub fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cpus = rustix::thread::sched_getaffinity(None).map_or(0, |set| set.count() as usize);
        cpus.max(1).min(quota().max(1))
    })
}

/// The cgroup v2 quota in whole CPUs: the smallest `cpu.max` from this process's cgroup up to
/// the root; `usize::MAX` when there is none.
fn quota() -> usize {
    let mut quota = usize::MAX;
    let Some(cgroups) = read(b"/proc/self/cgroup") else {
        return quota;
    };
    let Some(group) = v2_group(&cgroups) else {
        return quota;
    };
    let mut dir = [CGROUP_MOUNT, b"/", group].concat();
    while dir.last() == Some(&b'/') {
        dir.pop();
    }
    // Not cgroup v2 there (or not mounted where expected).
    let controllers = [&dir[..], b"/cgroup.controllers"].concat();
    if !Path::new(OsStr::from_bytes(&controllers))
        .try_exists()
        .unwrap_or(false)
    {
        return quota;
    }
    loop {
        if let Some(cpus) = read(&[&dir[..], b"/cpu.max"].concat()).and_then(|m| cpu_max(&m)) {
            quota = quota.min(cpus);
        }
        match parent(&dir) {
            Some(up) => dir.truncate(up),
            None => return quota,
        }
    }
}

/// The first `READ_LIMIT` bytes of a file, or None if it cannot be read.
fn read(path: &[u8]) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(OsStr::from_bytes(path))
        .and_then(|f| f.take(READ_LIMIT).read_to_end(&mut bytes))
        .ok()?;
    Some(bytes)
}

/// The cgroup v2 path (without its leading `/`) in `/proc/self/cgroup`'s text: the line whose
/// controller list is empty (`0::/path`). None if a cgroup v1 line names the `cpu` controller,
/// whose quota this does not read, or if there is no v2 line.
fn v2_group(text: &[u8]) -> Option<&[u8]> {
    let mut found = None;
    for line in text.split(|&b| b == b'\n') {
        let mut fields = line.splitn(3, |&b| b == b':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            found = found.or(Some(path.strip_prefix(b"/").unwrap_or(path)));
        } else if controllers.split(|&b| b == b',').any(|c| c == b"cpu") {
            return None;
        }
    }
    found
}

/// The quota in a `cpu.max` file (`<limit> <period>`, in microseconds) as whole CPUs, rounded
/// down; None for `max` (no limit) or text that is not two numbers.
fn cpu_max(text: &[u8]) -> Option<usize> {
    let line = text.split(|&b| b == b'\n').next()?;
    let mut numbers = std::str::from_utf8(line).ok()?.split(' ');
    let limit: usize = numbers.next()?.parse().ok()?;
    let period: usize = numbers.next()?.parse().ok()?;
    limit.checked_div(period)
}

/// The length of `dir`'s parent, while it stays within the cgroup mount; None at the mount.
fn parent(dir: &[u8]) -> Option<usize> {
    if dir.len() <= CGROUP_MOUNT.len() {
        return None;
    }
    dir.iter()
        .rposition(|&b| b == b'/')
        .map(|i| i.max(CGROUP_MOUNT.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_group_is_the_line_without_controllers() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (
                b"0::/system.slice/ferryd.service\n",
                Some(b"system.slice/ferryd.service"),
            ),
            (b"0::/\n", Some(b"")),
            (b"12:pids:/a\n0::/user.slice\n", Some(b"user.slice")),
            (b"0::/first\n0::/second\n", Some(b"first")),
            // A v1 hierarchy with the cpu controller: its quota is not read here.
            (b"4:cpu,cpuacct:/a\n0::/b\n", None),
            (b"0::/b\n4:cpuacct,cpu:/a\n", None),
            (b"4:cpuset:/a\n", None),
            (b"", None),
            (b"garbage\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(v2_group(text), *want, "{:?}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn cpu_max_gives_whole_cpus() {
        let cases: &[(&[u8], Option<usize>)] = &[
            (b"max 100000\n", None),
            (b"200000 100000\n", Some(2)),
            (b"250000 100000\n", Some(2)),
            (b"50000 100000\n", Some(0)),
            (b"100000 0\n", None),
            (b"100000\n", None),
            (b"", None),
            (b"-1 100000\n", None),
            (b"300000 100000", Some(3)),
        ];
        for (text, want) in cases {
            assert_eq!(cpu_max(text), *want, "{:?}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn parents_stop_at_the_mount() {
        let mut dir = b"/sys/fs/cgroup/a/b".to_vec();
        let mut seen = vec![String::from_utf8_lossy(&dir).into_owned()];
        while let Some(up) = parent(&dir) {
            dir.truncate(up);
            seen.push(String::from_utf8_lossy(&dir).into_owned());
        }
        assert_eq!(
            seen,
            ["/sys/fs/cgroup/a/b", "/sys/fs/cgroup/a", "/sys/fs/cgroup"]
        );
        assert_eq!(parent(b"/sys/fs/cgroup"), None);
    }

    #[test]
    fn at_least_one_cpu() {
        assert!(count() >= 1);
        assert_eq!(
            count(),
            std::thread::available_parallelism().map_or(1, usize::from)
        );
    }
}
