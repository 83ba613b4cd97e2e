//! Upload benchmark (run with `cargo bench --bench upload`; `-- --size-mib N` for a smaller file,
//! `-- --small-files N` for another count of small files, `-- --small-only` to skip the large
//! file; `FERRYD_BIN=path` runs another ferryd build, daemon and `send`, in place of this one).
//!
//! A random file (1 GiB by default) is stored over loopback, durably, by these contenders,
//! alternated round by round on the same disk with the source in the page cache:
//!   - ferryd: `ferryd send` to a running daemon, its default frame (BLAKE3, trailing checksum:
//!     hashed beside sendfile in one pass); the time runs until the `OK` line, which the daemon
//!     sends only after the checksum matched, the file and its directory were fsynced and the
//!     file got its final name;
//!   - ferryd-sha: the same with `--hash sha256` (trailing SHA-256);
//!   - ferryd-hdr: `--checksum header`, the checksum hashed before the body is sent (the form
//!     `send` used before the trailing one);
//!   - rsync: `rsync -W --inplace --fsync src rsync://127.0.0.1:PORT/up/dst.bin` to an rsync
//!     daemon the bench starts on a loopback port with a temporary rsyncd.conf;
//!   - netcat: `nc -l 127.0.0.1 PORT > dst` fed by `nc -N 127.0.0.1 PORT < src`, then `sync dst`;
//!   - socat: `socat -u TCP-LISTEN:PORT OPEN:dst,creat,trunc` fed by
//!     `socat -u FILE:src TCP:127.0.0.1:PORT`, then `sync dst`;
//!   - dd: `dd if=src of=dst bs=1M conv=fsync` (no network at all: the local copy ceiling).
//!
//! Each destination is deleted (and the deletion synced, then 3 s allowed for the discard the
//! `discard` mount option sends) between runs. Medians and ratios are printed (`--rounds N`,
//! default 3). Needs netcat-openbsd, socat and rsync
//! (`apt-get install -y netcat-openbsd socat rsync`).
//!
//! Then many small files (2,000 of 4 KiB by default) in one folder, stored durably by two
//! contenders alternated round by round (`--small-rounds N`, default 5), each into a fresh
//! destination:
//! (moved aside after each run, deleted after the last):
//!   - ferryd: `ferryd send -r DIR` to the same daemon (a window of frames in flight, group
//!     commit on the daemon), timed until every file's `OK`;
//!   - rsync: `rsync -r -W --fsync DIR rsync://127.0.0.1:PORT/up/` into the same rsync daemon.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::{free_port, median, wait_listening};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let size_mib: u64 = arg("--size-mib").map_or(1024, |s| s.parse().expect("--size-mib N"));
    let rounds: usize = arg("--rounds").map_or(3, |s| s.parse().expect("--rounds N"));
    let small_files: usize =
        arg("--small-files").map_or(2000, |s| s.parse().expect("--small-files N"));
    let small_rounds: usize =
        arg("--small-rounds").map_or(5, |s| s.parse().expect("--small-rounds N"));
    let small_only = args.iter().any(|a| a == "--small-only");
    for tool in ["nc", "socat", "dd", "sync", "rsync"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map_or(true, |o| !o.status.success())
        {
            panic!("`{tool}` not found: apt-get install -y netcat-openbsd socat rsync coreutils");
        }
    }

    // Work next to the build output, i.e. on the project's disk.
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("upload-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("uploads")).unwrap();
    let src = work.join("src.bin");
    write_random(&src, size_mib << 20);
    let bytes = (size_mib << 20) as f64;

    let port = free_port();
    let cfg = work.join("config.toml");
    fs::write(
        &cfg,
        format!(
            "[server]\nport = {port}\n[files]\ndir = {:?}\nmax_file_size = {}\nallow_subdirs = true\n[log]\nlevel = \"warn\"\n",
            work.join("uploads").display().to_string(),
            (size_mib + 1) << 20
        ),
    )
    .unwrap();
    let mut daemon = Command::new(ferryd_bin())
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_listening(port);
    let rsync_port = free_port();
    let mut rsyncd = start_rsyncd(&work, rsync_port);
    let small = (small_files > 0).then(|| {
        let dir = work.join("small").join("tree");
        write_small_files(&dir, small_files);
        dir
    });
    let mut small_med = None;
    if let Some(dir) = &small {
        small_med = Some(bench_small(&work, port, rsync_port, dir, small_rounds));
    }
    if small_only {
        let _ = daemon.kill();
        let _ = daemon.wait();
        let _ = rsyncd.kill();
        let _ = rsyncd.wait();
        if let Some((f, r)) = small_med {
            print_small(small_files, f, r);
        }
        let _ = fs::remove_dir_all(&work);
        return;
    }

    println!(
        "upload benchmark: {size_mib} MiB random file, {rounds} rounds, contenders alternated"
    );
    let names = [
        "ferryd",
        "ferryd-sha",
        "ferryd-hdr",
        "rsync",
        "netcat",
        "socat",
        "dd",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for k in 0..names.len() {
            // Rotate the order every round so that no contender always follows the same one.
            let which = (k + round) % names.len();
            warm(&src);
            let dst = work.join("dst.bin");
            let secs = match which {
                0 => run_ferryd(port, &src, &[]),
                1 => run_ferryd(port, &src, &["--hash", "sha256"]),
                2 => run_ferryd(port, &src, &["--checksum", "header"]),
                3 => run_rsync(rsync_port, &src),
                4 => run_netcat(&src, &dst),
                5 => run_socat(&src, &dst),
                _ => run_dd(&src, &dst),
            };
            check_and_remove(&src, &work, which);
            times[which].push(secs);
            println!(
                "  round {round} {:<7} {secs:.3} s  {:.2} GB/s",
                names[which],
                bytes / secs / 1e9
            );
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = rsyncd.kill();
    let _ = rsyncd.wait();

    let med: Vec<f64> = times.iter().map(|t| median(t)).collect();
    println!();
    for (i, name) in names.iter().enumerate() {
        println!(
            "{name:<7} median {:.3} s  {:.2} GB/s",
            med[i],
            bytes / med[i] / 1e9
        );
    }
    println!("ferryd / rsync: {:.2}×  (goal ≥ 1.5×)", med[3] / med[0]);
    let best_peer = med[4].min(med[5]);
    println!(
        "ferryd / faster of netcat and socat: {:.2}×  (goal ≥ 1.5×)",
        best_peer / med[0]
    );
    println!(
        "ferryd / dd conv=fsync: {:.2}×  (goal ≥ 0.75×)",
        med[6] / med[0]
    );
    println!(
        "ferryd SHA-256 time / BLAKE3 time: {:.2}×  (goal ≤ 1.3×)",
        med[1] / med[0]
    );
    println!(
        "ferryd header-checksum time / trailing time: {:.2}×",
        med[2] / med[0]
    );
    if let Some((f, r)) = small_med {
        print_small(small_files, f, r);
    }
    let _ = fs::remove_dir_all(&work);
}

/// The ferryd binary to run: `$FERRYD_BIN`, else this build's.
fn ferryd_bin() -> PathBuf {
    std::env::var_os("FERRYD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_ferryd")),
        PathBuf::from,
    )
}

/// `n` files of 4 KiB of random bytes in `dir`, synced.
fn write_small_files(dir: &Path, n: usize) {
    fs::create_dir_all(dir).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut body = vec![0u8; 4096];
    for i in 0..n {
        for w in body.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        fs::write(dir.join(format!("f{i:05}.bin")), &body).unwrap();
    }
    sh("sync");
}

/// The small-file rounds: `ferryd send -r` and `rsync -r -W --fsync`, alternated (which goes
/// first swaps each round), each into a fresh destination that is deleted afterwards; returns
/// the medians (ferryd, rsync) in seconds.
fn bench_small(work: &Path, port: u16, rsync_port: u16, dir: &Path, rounds: usize) -> (f64, f64) {
    let n = fs::read_dir(dir).unwrap().count();
    println!("small files: {n} files of 4 KiB, {rounds} rounds, contenders alternated");
    let (mut ferryd, mut rsync) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for k in 0..2 {
            let rsync_turn = (k + round) % 2 == 1;
            let (secs, dst) = if rsync_turn {
                let t = Instant::now();
                let st = Command::new("rsync")
                    .args(["-r", "-W", "--fsync"])
                    .arg(dir)
                    .arg(format!("rsync://127.0.0.1:{rsync_port}/up/"))
                    .status()
                    .unwrap();
                assert!(st.success(), "rsync failed");
                (t.elapsed().as_secs_f64(), work.join("rsync").join("tree"))
            } else {
                (
                    run_ferryd_r(port, dir, n),
                    work.join("uploads").join("tree"),
                )
            };
            assert_eq!(
                fs::read_dir(&dst).unwrap().count(),
                n,
                "{} is incomplete",
                dst.display()
            );
            // Moved aside, not deleted, until the end: ext4 without a journal skips inodes freed
            // in the last 5-10 s when it allocates new ones, one lookup each, so deleting 2,000
            // files makes the next 2,000 creations in that block group slow for seconds.
            let name = if rsync_turn { "rsync" } else { "ferryd" };
            fs::rename(&dst, dst.with_file_name(format!("done-{round}-{name}"))).unwrap();
            sh("sync");
            println!(
                "  round {round} {name:<7} {secs:.3} s  {:.0} files/s",
                n as f64 / secs
            );
            if rsync_turn {
                rsync.push(secs);
            } else {
                ferryd.push(secs);
            }
        }
    }
    for dir in [work.join("uploads"), work.join("rsync")] {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("done-"))
            {
                fs::remove_dir_all(&path).unwrap();
            }
        }
    }
    sh("sync");
    thread::sleep(SETTLE);
    (median(&ferryd), median(&rsync))
}

/// `ferryd send -r dir`: the seconds until it exits, having printed `n` `OK` lines.
fn run_ferryd_r(port: u16, dir: &Path, n: usize) -> f64 {
    let t = Instant::now();
    let out = Command::new(ferryd_bin())
        .args(["send", "-r", "--to", &format!("127.0.0.1:{port}")])
        .arg(dir)
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let oks = stdout.lines().filter(|l| l.contains(": OK ")).count();
    assert!(
        out.status.success() && oks == n,
        "ferryd send -r stored {oks} of {n}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn print_small(n: usize, ferryd: f64, rsync: f64) {
    println!();
    println!(
        "small files ({n} × 4 KiB): ferryd send -r median {ferryd:.3} s ({:.0} files/s), rsync -r -W --fsync median {rsync:.3} s ({:.0} files/s)",
        n as f64 / ferryd,
        n as f64 / rsync
    );
    println!(
        "ferryd send -r / rsync, small files: {:.2}×  (goal ≥ 1.5×)",
        rsync / ferryd
    );
}

fn write_random(path: &Path, len: u64) {
    let mut f = fs::File::create(path).unwrap();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// Reads the source so that it is in the page cache for every contender.
fn warm(src: &Path) {
    let _ = fs::read(src).map(drop);
}

fn run(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn sh(script: &str) {
    let st = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(st.success(), "{script} failed");
}

/// Starts `rsync --daemon` on 127.0.0.1:`port` with a module `up` writing into `work/rsync`.
fn start_rsyncd(work: &Path, port: u16) -> Child {
    let dir = work.join("rsync");
    fs::create_dir_all(&dir).unwrap();
    let conf = work.join("rsyncd.conf");
    let id = |flag: &str| {
        let out = Command::new("id").arg(flag).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = {}\ngid = {}\npid file = {}\n[up]\npath = {}\nread only = no\n",
            id("-u"),
            id("-g"),
            work.join("rsyncd.pid").display(),
            dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("rsync")
        .arg("--daemon")
        .arg("--no-detach")
        .arg(format!("--config={}", conf.display()))
        .arg(format!("--port={port}"))
        .arg("--address=127.0.0.1")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    child
}

fn run_rsync(port: u16, src: &Path) -> f64 {
    let t = Instant::now();
    let st = Command::new("rsync")
        .args(["-W", "--inplace", "--fsync"])
        .arg(src)
        .arg(format!("rsync://127.0.0.1:{port}/up/dst.bin"))
        .status()
        .unwrap();
    assert!(st.success(), "rsync failed");
    t.elapsed().as_secs_f64()
}

fn run_ferryd(port: u16, src: &Path, extra: &[&str]) -> f64 {
    let t = Instant::now();
    let out = Command::new(ferryd_bin())
        .args(["send", "--to", &format!("127.0.0.1:{port}")])
        .args(extra)
        .arg(src)
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(": OK "),
        "ferryd send failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn run_netcat(src: &Path, dst: &Path) -> f64 {
    let port = free_port();
    let mut rx = Command::new("sh")
        .arg("-c")
        .arg(format!("exec nc -l 127.0.0.1 {port} > '{}'", dst.display()))
        .spawn()
        .unwrap();
    wait_listening(port);
    let t = Instant::now();
    sh(&format!("nc -N 127.0.0.1 {port} < '{}'", src.display()));
    assert!(rx.wait().unwrap().success());
    sh(&format!("sync '{}'", dst.display()));
    t.elapsed().as_secs_f64()
}

fn run_socat(src: &Path, dst: &Path) -> f64 {
    let port = free_port();
    let mut rx = run(Command::new("socat").args([
        "-u".to_string(),
        format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
        format!("OPEN:{},creat,trunc", dst.display()),
    ]));
    wait_listening(port);
    let t = Instant::now();
    let st = Command::new("socat")
        .args([
            "-u".to_string(),
            format!("FILE:{}", src.display()),
            format!("TCP:127.0.0.1:{port}"),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(rx.wait().unwrap().success());
    sh(&format!("sync '{}'", dst.display()));
    t.elapsed().as_secs_f64()
}

fn run_dd(src: &Path, dst: &Path) -> f64 {
    let t = Instant::now();
    sh(&format!(
        "dd if='{}' of='{}' bs=1M conv=fsync status=none",
        src.display(),
        dst.display()
    ));
    t.elapsed().as_secs_f64()
}

/// Checks the copy is complete, then deletes it and syncs the deletion outside the timing.
fn check_and_remove(src: &Path, work: &Path, which: usize) {
    let dst = match which {
        0..=2 => work.join("uploads").join(src.file_name().unwrap()),
        3 => work.join("rsync").join("dst.bin"),
        _ => work.join("dst.bin"),
    };
    let (a, b) = (
        fs::metadata(src).unwrap().len(),
        fs::metadata(&dst).unwrap().len(),
    );
    assert_eq!(a, b, "{} is incomplete", dst.display());
    fs::remove_file(&dst).unwrap();
    sh("sync");
    // This VM's root file system is mounted with `discard`: freeing 1 GiB sends a 1 GiB discard
    // to the host at the next journal commit, which slows whatever writes next. Let it finish.
    thread::sleep(SETTLE);
}

/// Pause after deleting a destination, before the next contender.
const SETTLE: Duration = Duration::from_secs(3);
