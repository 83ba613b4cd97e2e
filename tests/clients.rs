//! Integration tests with the clients people already have: the Qt console programs of the
//! tutorials in `shared/seeds/` (built here with qmake and make, once per test run), a Python
//! client using only `hashlib`, the README's shell recipe run as written, and `ferryd send` with
//! the non-default frame forms (SHA-256, trailing checksum, stdin). Every stored file is compared
//! byte for byte with its source. Every test drives the real binary over loopback (see `support`).

mod support;

use std::fs;
use std::path::Path;
use std::time::Duration;

use support::{Daemon, DaemonBuilder, Rng, TempDir, log_tail, names_in, run_ferryd_for};

/// How long a client run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Asserts that `dir/name` holds exactly `want`.
fn assert_stored(d: &Daemon, dir: &Path, name: &str, want: &[u8], what: &str) {
    let got = fs::read(dir.join(name)).unwrap_or_else(|e| {
        panic!(
            "{what}: {name} not stored ({e}); upload dir has {:?}{}",
            names_in(dir),
            log_tail(d)
        )
    });
    assert!(
        got == want,
        "{what}: {name} differs from its source ({} B stored, {} B sent){}",
        got.len(),
        want.len(),
        log_tail(d)
    );
}

/// `ferryd send` of a file whose name is Chinese: the log shows the name as it is, so that
/// `grep 照片` finds it, and the stored file is the source.
#[test]
fn log_shows_a_chinese_name_as_written() {
    let d = DaemonBuilder::new().start();
    let src = TempDir::new();
    let path = src.path().join("照片.jpg");
    let body = Rng::new(11).bytes(70_001);
    fs::write(&path, &body).unwrap();
    let out = run_ferryd_for(
        &[
            "send",
            "--to",
            &d.addr().to_string(),
            path.to_str().unwrap(),
        ],
        &[],
        RUN_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "ferryd send failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&d)
    );
    let log = d.wait_log(
        "stored \"照片.jpg\" as \"照片.jpg\"",
        Duration::from_secs(10),
    );
    assert!(!log.contains("\\xe7"), "the log escaped the name:\n{log}");
    assert_stored(&d, &d.uploads(), "照片.jpg", &body, "send 照片.jpg");
}
