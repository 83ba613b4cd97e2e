//! The units and the Debian package under a real systemd 252: boots a Debian 12 container with
//! its own systemd as PID 1 (`systemd-nspawn -b`, scripts in `tests/systemd_real/`), installs
//! ferryd with the commands of README's install section and checks, in sequence: start after
//! `READY=1`, echo, reload (a valid file reloads, an invalid one fails `systemctl reload` and the
//! daemon keeps serving), `ferryd ctl` on the shipped unit's control socket (list, say, a user
//! refused), `/run/lock`, `/dev/shm` and `/etc/ferryd` read-only to the service,
//! switching between the plain and the socket-activated setup both ways without a restart, the
//! warning when both are enabled at boot, a watchdog restart, and the package's install, remove,
//! reinstall and purge.
//!
//! Needs root and `systemd-nspawn`, `debootstrap`, `nsenter`, `dpkg-deb`, `strip`, `readelf`,
//! `pgrep` (Debian packages systemd-container, debootstrap, util-linux, dpkg, binutils, procps),
//! so it is ignored unless the `real-peers` feature is on: `bash tests/real-peers.sh` installs
//! them and runs it (`.ci/run` calls that). With the feature on it never skips: a missing tool,
//! or a run as an ordinary user, fails the test saying what is missing. The container root is
//! built once into `/var/tmp/ferryd-sd-root` (about a minute, needs a Debian mirror) and reused;
//! each run boots it on an overlay in a temp dir, so runs never see each other's changes.
//! The binary installed is the one cargo built for the tests, copied to `target/release/ferryd`
//! in the directory the container sees as `/src`, so README's commands run unchanged.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{TempDir, bin, need, need_root, run_for, wait_until};

/// Where the container root is cached between runs.
const ROOT_CACHE: &str = "/var/tmp/ferryd-sd-root";
/// How long building the root may take (debootstrap from a mirror).
const MAKE_ROOT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long one command inside the container may take.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a condition polled inside the container may take to hold.
const WAIT: Duration = Duration::from_secs(30);

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/systemd_real")
}

fn script(name: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(scripts().join(name));
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A booted container; dropping it powers it off and removes its overlay.
struct Container {
    name: String,
    /// The overlay's upper layer, the nspawn pid and the console log (boot.sh's `RUN`).
    run: TempDir,
    /// What the container sees at `/src`.
    src: PathBuf,
}

impl Container {
    fn boot(src: &Path) -> Container {
        let run = TempDir::new();
        let name = format!("ferryd-test-{}", std::process::id());
        let c = Container {
            name,
            run,
            src: src.to_path_buf(),
        };
        c.start();
        c
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("ROOT", ROOT_CACHE)
            .env("RUN", self.run.path())
            .env("NAME", &self.name)
            .env("BIND", &self.src);
    }

    fn start(&self) {
        let mut cmd = script("boot.sh");
        self.env(&mut cmd);
        let out = run_for(cmd, "boot.sh", Duration::from_secs(90));
        assert!(out.status.success(), "boot.sh failed: {}", text(&out));
    }

    fn shutdown(&self) {
        let mut cmd = script("shutdown.sh");
        self.env(&mut cmd);
        let out = run_for(cmd, "shutdown.sh", Duration::from_secs(60));
        assert!(out.status.success(), "shutdown.sh failed: {}", text(&out));
    }

    /// Power off and boot again; what the run changed stays.
    fn reboot(&self) {
        self.shutdown();
        self.start();
    }

    /// Runs `cmd` (bash) inside the container.
    fn sh(&self, cmd: &str) -> Output {
        let mut c = script("ct.sh");
        c.arg(cmd);
        self.env(&mut c);
        run_for(c, cmd, CMD_TIMEOUT)
    }

    /// Runs `cmd`, asserts it succeeded, returns its stdout trimmed.
    fn ok(&self, cmd: &str) -> String {
        let out = self.sh(cmd);
        assert!(out.status.success(), "`{cmd}` failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `cmd`, asserts it failed, returns its stdout and stderr.
    fn fails(&self, cmd: &str) -> String {
        let out = self.sh(cmd);
        assert!(!out.status.success(), "`{cmd}` succeeded: {}", text(&out));
        text(&out)
    }

    /// Polls `cmd` until it succeeds; panics with `what` and the last output if it never does.
    fn wait(&self, what: &str, cmd: &str) {
        let mut last = None;
        let held = wait_until(WAIT, || {
            let out = self.sh(cmd);
            let ok = out.status.success();
            last = Some(out);
            ok
        });
        assert!(
            held,
            "{what}: `{cmd}` did not succeed within {WAIT:?}; last: {}\n{}",
            last.as_ref().map(text).unwrap_or_default(),
            String::from_utf8_lossy(
                &self
                    .sh("systemctl --no-pager status 'ferryd*'; journalctl -b --no-pager -n 40")
                    .stdout
            )
        );
    }

    fn active(&self, unit: &str) -> String {
        let out = self.sh(&format!("systemctl is-active {unit}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn prop(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -P {prop} {unit}"))
    }

    /// One line through the TCP echo at 127.0.0.1:7878.
    fn echo(&self, line: &str) {
        let got = self.ok(&format!(
            "printf '%s\\n' {line} | timeout 10 nc -N 127.0.0.1 7878"
        ));
        assert_eq!(got, line, "echo through 127.0.0.1:7878");
    }

    fn journal(&self, unit: &str) -> String {
        self.ok(&format!("journalctl -b --no-pager -o cat -u {unit}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let mut cmd = script("shutdown.sh");
        self.env(&mut cmd);
        let _ = cmd.output();
    }
}

/// The `sudo` lines of the first `sh` block of README's install section, without `sudo` and
/// trailing comments.
fn readme_install_commands() -> Vec<String> {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let section = readme
        .split("\n## Install as a systemd service\n")
        .nth(1)
        .expect("README has an install section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the install section starts with a sh block");
    let cmds: Vec<String> = block
        .lines()
        .filter_map(|l| l.strip_prefix("sudo "))
        .map(|l| l.split("  #").next().unwrap_or(l).trim().to_string())
        .collect();
    assert!(
        cmds.iter().any(|c| c.contains("enable --now ferryd")),
        "README's install block enables ferryd: {cmds:?}"
    );
    cmds
}

/// The directory the container sees at `/src`: the repo's `systemd/`, the test binary as
/// `target/release/ferryd` and the package built from it in `target/debian/`.
fn stage(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let units = dir.join("systemd");
    fs::create_dir_all(&units).unwrap();
    for entry in fs::read_dir(repo.join("systemd")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), units.join(entry.file_name())).unwrap();
        }
    }
    let release = dir.join("target/release");
    fs::create_dir_all(&release).unwrap();
    fs::copy(bin(), release.join("ferryd")).unwrap();
    fs::set_permissions(release.join("ferryd"), fs::Permissions::from_mode(0o755)).unwrap();
    // Only the container's root must be able to read it; nspawn binds it as it is.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();

    let mut cmd = Command::new("bash");
    cmd.arg(repo.join("systemd/deb/build-deb.sh"))
        .arg(release.join("ferryd"))
        .arg(dir.join("target/debian"));
    let out = run_for(cmd, "build-deb.sh", Duration::from_secs(60));
    assert!(out.status.success(), "build-deb.sh failed: {}", text(&out));
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(deb.is_file(), "build-deb.sh printed {}", deb.display());

    // The packaged binary is stripped: no symbol table, no debug sections.
    let x = dir.join("extracted");
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&x)
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg-deb -x: {}", text(&out));
    let out = Command::new("readelf")
        .args(["-S", "--wide"])
        .arg(x.join("usr/bin/ferryd"))
        .output()
        .unwrap();
    let sections = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && sections.contains(".text"),
        "readelf: {}",
        text(&out)
    );
    assert!(
        [".symtab", ".debug_info", ".debug_line"]
            .iter()
            .all(|s| !sections.contains(s)),
        "the packaged binary is not stripped:\n{sections}"
    );
    // The manual pages, where `man ferryd` and `man ferryd.toml` look after `dpkg -i`.
    for page in [
        "usr/share/man/man8/ferryd.8.gz",
        "usr/share/man/man5/ferryd.toml.5.gz",
    ] {
        assert!(x.join(page).is_file(), "the package has no /{page}");
    }
    fs::remove_dir_all(&x).unwrap();
    deb.strip_prefix(dir).unwrap().to_path_buf()
}

#[test]
#[cfg_attr(
    not(feature = "real-peers"),
    ignore = "real peer: systemd-nspawn, debootstrap, pgrep (systemd-container, debootstrap, procps), as root; run bash tests/real-peers.sh"
)]
fn units_and_package_under_systemd_252() {
    let t0 = Instant::now();
    need_root("the real-systemd test (it boots a container)");
    need("systemd-nspawn", "systemd-container");
    need("debootstrap", "debootstrap");
    need("nsenter", "util-linux");
    need("mount", "mount");
    need("dpkg-deb", "dpkg");
    need("strip", "binutils");
    need("readelf", "binutils");
    // tests/systemd_real/ct.sh finds the container's init with it.
    need("pgrep", "procps");
    let mut cmd = script("make-root.sh");
    cmd.env("ROOT", ROOT_CACHE);
    let out = run_for(cmd, "make-root.sh", MAKE_ROOT_TIMEOUT);
    assert!(out.status.success(), "make-root.sh failed: {}", text(&out));
    eprintln!("container root ready after {:.1?}", t0.elapsed());

    let staged = TempDir::new();
    let deb = stage(staged.path());
    let deb = format!("/src/{}", deb.display());
    let ct = Container::boot(staged.path());
    eprintln!("booted after {:.1?}", t0.elapsed());

    install_as_readme_says(&ct);
    console(&ct);
    reload(&ct);
    read_only_paths(&ct);
    switching(&ct);
    both_enabled_at_boot(&ct);
    watchdog(&ct);
    eprintln!("units checked after {:.1?}", t0.elapsed());
    package(&ct, &deb);
    eprintln!("package checked after {:.1?}", t0.elapsed());
}

/// README's commands; `systemctl enable --now` returns once the daemon sent `READY=1`, and by
/// then the port accepts (no retry here).
fn install_as_readme_says(ct: &Container) {
    for cmd in readme_install_commands() {
        ct.ok(&format!("cd /src && {cmd}"));
        if cmd.contains("enable --now ferryd") {
            assert_eq!(ct.active("ferryd"), "active");
            ct.echo("hello");
            let status = ct.prop("ferryd", "StatusText");
            assert!(status.contains(" open, "), "STATUS= is shown: {status:?}");
            let log = ct.journal("ferryd");
            assert!(log.contains("listening on 127.0.0.1:7878"), "{log}");
        }
    }
    assert_eq!(ct.prop("ferryd", "NRestarts"), "0");
}

/// `ferryd ctl` with the shipped unit, its config and its sandbox: the socket sits in
/// `RuntimeDirectory=ferryd` (writable though `/run` is read-only), mode 0600, owned by the
/// dynamic user; root lists a held echo client and says a line to it; another user is refused.
fn console(ct: &Container) {
    let mode = ct.ok("stat -c '%a %U' /run/ferryd/control.sock");
    assert!(mode.starts_with("600 "), "{mode}");
    ct.ok(r#"systemd-run --unit=ferryd-held --collect -p StandardOutput=file:/root/held.out sh -c '(printf "held\n"; sleep 120) | nc 127.0.0.1 7878'"#);
    ct.wait(
        "the held client is listed",
        "ferryd ctl list | grep -q ' echo '",
    );
    let list = ct.ok("ferryd ctl list");
    assert!(list.starts_with("peer "), "{list}");
    let json = ct.ok("ferryd ctl list --json");
    assert!(json.contains("\"state\":\"echo\""), "{json}");
    ct.ok("ferryd ctl say hello from systemd");
    ct.wait(
        "the operator's line reached the client",
        r"grep -qx '\[server\] hello from systemd' /root/held.out",
    );
    let out = ct.fails("setpriv --reuid=65534 --regid=65534 --clear-groups ferryd ctl list");
    assert!(out.contains("Permission denied"), "{out}");
    ct.ok("systemctl stop ferryd-held");
    let log = ct.journal("ferryd");
    assert!(
        log.contains("control socket on /run/ferryd/control.sock"),
        "{log}"
    );
}

/// A valid file reloads; an invalid one (a bad value, a missing key file) fails
/// `systemctl reload` with the reason in the journal, and the same daemon keeps serving.
fn reload(ct: &Container) {
    let pid = ct.prop("ferryd", "MainPID");
    ct.ok("systemctl reload ferryd");
    ct.wait(
        "reloaded",
        "journalctl -b -o cat -u ferryd | grep -q '^reloaded'",
    );
    ct.ok("cp /etc/ferryd/config.toml /root/config.good");
    let bad = [
        (
            "printf '[server]\\nport = 0\\n' >> /etc/ferryd/config.toml",
            "server.port = 0",
        ),
        (
            "sed -i 's|^\\[files\\]$|[files]\\ntoken_file = \"/etc/ferryd/missing.key\"|' /etc/ferryd/config.toml",
            "missing.key",
        ),
    ];
    for (edit, reason) in bad {
        ct.ok(&format!(
            "cp /root/config.good /etc/ferryd/config.toml && {edit}"
        ));
        let out = ct.fails("systemctl reload ferryd");
        assert!(out.contains("Job for ferryd.service failed"), "{out}");
        let log = ct.journal("ferryd");
        assert!(
            log.contains(reason),
            "the journal says why ({reason}):\n{log}"
        );
        assert_eq!(ct.active("ferryd"), "active");
        assert_eq!(ct.prop("ferryd", "MainPID"), pid, "the same daemon runs");
        ct.echo("still-serving");
    }
    ct.ok("cp /root/config.good /etc/ferryd/config.toml");
    ct.ok("systemctl reload ferryd");
    assert_eq!(ct.prop("ferryd", "MainPID"), pid);
    assert_eq!(ct.prop("ferryd", "NRestarts"), "0");
}

/// World-writable, system-wide `/run/lock` and `/dev/shm`, and `/etc/ferryd`, are read-only
/// mounts inside the service; its state directory is writable. The probe runs as root in the
/// service's mount namespace, so only the mount flags can stop it.
fn read_only_paths(ct: &Container) {
    let pid = ct.prop("ferryd", "MainPID");
    for dir in ["/run/lock", "/dev/shm", "/etc/ferryd", "/run"] {
        let out = ct.fails(&format!("nsenter -t {pid} -m touch {dir}/ferryd-probe"));
        assert!(out.contains("Read-only file system"), "{dir}: {out}");
    }
    ct.ok(&format!(
        "nsenter -t {pid} -m sh -c 'touch /var/lib/ferryd/uploads/.probe && rm /var/lib/ferryd/uploads/.probe'"
    ));
}

/// Starting either setup stops the other first: both starts succeed, the port answers at once,
/// nothing is restarted, nothing reports the port in use.
fn switching(ct: &Container) {
    ct.ok("cd /src && install -m 0644 systemd/ferryd-activated.socket systemd/ferryd-activated.service /etc/systemd/system/ && systemctl daemon-reload");
    for round in 0..2 {
        ct.ok("systemctl start ferryd-activated.socket");
        assert_eq!(ct.active("ferryd"), "inactive", "round {round}");
        assert_eq!(ct.active("ferryd-activated.socket"), "active");
        ct.echo("via-socket");
        assert_eq!(ct.active("ferryd-activated.service"), "active");
        // The activated unit has the control socket too.
        let stats = ct.ok("ferryd ctl stats");
        assert!(stats.contains("status: "), "{stats}");
        // Its ExecReload= check runs where it cannot make AF_INET sockets, and still passes.
        ct.ok("systemctl reload ferryd-activated.service");

        ct.ok("systemctl start ferryd");
        assert_eq!(ct.active("ferryd"), "active");
        assert_eq!(ct.active("ferryd-activated.socket"), "inactive");
        assert_eq!(ct.active("ferryd-activated.service"), "inactive");
        ct.echo("via-service");
    }
    assert_eq!(ct.prop("ferryd", "NRestarts"), "0");
    assert_eq!(ct.prop("ferryd-activated.service", "NRestarts"), "0");
    let log = ct.ok("journalctl -b --no-pager -o cat -u 'ferryd*'");
    assert!(!log.contains("in use"), "{log}");
}

/// With both setups enabled the socket wins at boot, and says so at warning priority.
fn both_enabled_at_boot(ct: &Container) {
    ct.ok("systemctl enable ferryd-activated.socket");
    ct.reboot();
    ct.wait(
        "the socket is up after the reboot",
        "systemctl is-active -q ferryd-activated.socket",
    );
    assert_eq!(ct.active("ferryd"), "inactive");
    let warn = ct.ok("journalctl -b --no-pager -o cat -p warning -u ferryd-activated.socket");
    assert!(warn.contains("both enabled"), "{warn}");
    ct.ok("systemctl disable ferryd-activated.socket && systemctl start ferryd");
    assert_eq!(ct.active("ferryd-activated.socket"), "inactive");
    ct.echo("after-reboot");
}

/// A stopped daemon stops feeding the watchdog: systemd kills it and `Restart=` brings it back.
/// `WatchdogSec=` is shortened with a drop-in so the test does not wait 30 s.
fn watchdog(ct: &Container) {
    ct.ok("mkdir -p /etc/systemd/system/ferryd.service.d && printf '[Service]\\nWatchdogSec=2\\n' > /etc/systemd/system/ferryd.service.d/watchdog.conf && systemctl daemon-reload && systemctl restart ferryd");
    let pid = ct.prop("ferryd", "MainPID");
    let restarts = ct.prop("ferryd", "NRestarts");
    ct.ok(&format!("kill -STOP {pid}"));
    ct.wait(
        "restarted by the watchdog",
        &format!(
            "[ \"$(systemctl show -P NRestarts ferryd)\" != {restarts} ] && systemctl is-active -q ferryd && [ \"$(systemctl show -P MainPID ferryd)\" != {pid} ]"
        ),
    );
    let log = ct.journal("ferryd");
    assert!(log.contains("Watchdog timeout"), "{log}");
    ct.echo("after-watchdog");
    ct.ok("rm -r /etc/systemd/system/ferryd.service.d && systemctl daemon-reload && systemctl restart ferryd");
}

/// The package after the hand-made install is gone: installing enables nothing; remove stops
/// the daemon and keeps config and enable links; a reinstall starts what was enabled; purge
/// removes config and links and keeps the uploads.
fn package(ct: &Container, deb: &str) {
    ct.ok("systemctl disable --now ferryd ferryd-activated.socket && rm /etc/systemd/system/ferryd* /usr/local/bin/ferryd && rm -r /etc/ferryd && systemctl daemon-reload");

    let out = ct.ok(&format!("dpkg -i {deb}"));
    assert!(out.contains("enable one setup"), "{out}");
    for unit in ["ferryd", "ferryd-activated.socket"] {
        assert_eq!(ct.active(unit), "inactive", "{unit} after install");
        let state = ct.sh(&format!("systemctl is-enabled {unit}"));
        assert_eq!(
            String::from_utf8_lossy(&state.stdout).trim(),
            "disabled",
            "{unit}"
        );
    }
    ct.ok("systemctl enable --now ferryd");
    ct.echo("packaged");
    // The package's config sets the control socket.
    assert!(ct.ok("ferryd ctl list").starts_with("peer "));
    // The packaged units' Exec lines (ExecReload= runs the binary too) point at /usr/bin.
    ct.ok("systemctl reload ferryd");
    ct.ok("printf 'kept\\n' > /root/kept.txt && ferryd send --to 127.0.0.1:7878 /root/kept.txt");
    ct.ok("test -f /var/lib/private/ferryd/uploads/kept.txt");

    ct.ok("dpkg -r ferryd");
    assert_eq!(ct.active("ferryd"), "inactive");
    ct.fails("pgrep -x ferryd");
    ct.fails("test -e /usr/bin/ferryd");
    ct.ok("test -f /etc/ferryd/config.toml");

    ct.ok(&format!("dpkg -i {deb}"));
    assert_eq!(ct.ok("systemctl is-enabled ferryd"), "enabled");
    assert_eq!(
        ct.active("ferryd"),
        "active",
        "a reinstall starts what is enabled"
    );
    ct.echo("reinstalled");

    let out = ct.ok("dpkg -P ferryd");
    assert!(
        out.contains("uploads kept in /var/lib/private/ferryd"),
        "{out}"
    );
    assert_eq!(ct.active("ferryd"), "inactive");
    ct.fails("pgrep -x ferryd");
    ct.fails("test -e /etc/ferryd");
    ct.fails("ls /etc/systemd/system/*.wants/ferryd*");
    ct.ok("test -f /var/lib/private/ferryd/uploads/kept.txt");

    ct.ok(&format!("dpkg -i {deb}"));
    assert_eq!(
        ct.active("ferryd"),
        "inactive",
        "after a purge nothing is enabled"
    );
    ct.ok("dpkg -P ferryd");
}
