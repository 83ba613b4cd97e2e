//! Signals. SIGINT and SIGTERM go through `ctrlc` (its `termination` feature): the first begins
//! the shutdown, a second exits at once. SIGHUP means "reload": it is blocked in every thread and
//! taken synchronously with sigwait(2) by a thread of its own, so no handler — not even the one
//! ctrlc also installs for SIGHUP — ever runs for it.

use nix::sys::signal::{SigSet, Signal};

use crate::logger;
use crate::threads;

/// Exit code when a second SIGINT/SIGTERM arrives during the shutdown.
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Blocks SIGHUP in the calling thread and, through inheritance, in every thread it starts later.
/// Call first thing in `main`, before any thread exists.
pub fn block_sighup() -> nix::Result<()> {
    hup_set().thread_block()
}

/// Installs the handlers: `stop` runs on SIGINT/SIGTERM and returns false if a shutdown was
/// already under way (the process then exits at once with code 130); `reload` runs on SIGHUP, on
/// its own thread, one call at a time.
pub fn install<S, R>(stop: S, reload: R) -> Result<(), String>
where
    S: Fn() -> bool + Send + 'static,
    R: Fn() + Send + 'static,
{
    ctrlc::set_handler(move || {
        if !stop() {
            logger::warn!("second signal during shutdown: exiting now");
            std::process::exit(EXIT_SECOND_SIGNAL);
        }
    })
    .map_err(|e| format!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
    // A reload parses the config file (toml): a stack generous for an unoptimised build too.
    threads::spawn(
        "sighup".into(),
        Some(256 * 1024),
        Box::new(move || {
            let set = hup_set();
            loop {
                match set.wait() {
                    Ok(Signal::SIGHUP) => reload(),
                    Ok(_) => {}
                    Err(e) => {
                        logger::error!("waiting for SIGHUP failed: {e}; reload disabled");
                        return;
                    }
                }
            }
        }),
    )
    .map_err(|e| format!("cannot start the SIGHUP thread: {e}"))?;
    Ok(())
}

fn hup_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGHUP);
    set
}
