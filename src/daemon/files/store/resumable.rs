//! Beginning a resumable upload: its partial body claimed through the index (`resume`,
//! `partials`), a silent holder in this process taken over (`holders`), and the sweep that
//! removes expired partials and rebuilds the index.

use std::fs::File;
use std::io;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use crate::daemon::files::holders::{Holder, TakeOver};
use crate::daemon::files::resume::{self, Claim, Limits};
use crate::logger;
use crate::proto::decimal::Fixed;

use super::{Pending, Store, StoreError, io_err};

/// How long a resumable upload waits for the partial body it would continue while another
/// connection still holds it (typically the one just cut, not yet given up by the server).
const HELD_GRACE: Duration = Duration::from_secs(3);
/// How often it looks again meanwhile.
const HELD_POLL: Duration = Duration::from_millis(20);
/// How often, at most, uploads sweep expired partial bodies away.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl Store {
    /// How long partial bodies of resumable uploads are kept, and how many bytes they may claim.
    pub fn resume_limits(&self) -> Limits {
        Limits {
            keep: self.cfg.resume_keep,
            max_bytes: self.cfg.resume_max_bytes,
            max_count: self.cfg.resume_max_count,
        }
    }

    /// At start-up: removes expired partial bodies; returns their names and how many were kept.
    pub fn sweep_partials(&self) -> Result<(Vec<String>, usize), StoreError> {
        let dir = self.current_handle()?;
        *self
            .last_sweep
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        resume::sweep(&self.partials, &dir, self.resume_limits())
            .map_err(io_err("clean up partial uploads"))
    }

    /// Removes expired partial bodies (all of them when resuming is off) and rebuilds the index
    /// of the others at most once every `SWEEP_EVERY`, so they go even when no resumable upload
    /// comes: one listing of the directory per minute at most, on the uploading worker, which
    /// holds no lock while it lists.
    pub(super) fn sweep_now_and_then(&self, dir: &File) {
        {
            let mut last = self
                .last_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        match resume::sweep(&self.partials, dir, self.resume_limits()) {
            Ok((removed, _)) => {
                for name in removed {
                    logger::info!("removed expired partial upload {name}");
                }
            }
            Err(e) => logger::warn!("cannot clean up partial uploads: {e}"),
        }
    }

    /// `begin` for a resumable frame: continues the partial body kept for this size and checksum,
    /// or starts one that is kept if the upload is cut off. Returns the offset the body continues
    /// from (0 for a new one). A partial held by a connection in this process that has gone quiet
    /// (`holders::QUIET`) is taken over: that connection is ended, and the partial continued once
    /// its worker lets it go. When the upload cannot be resumable (resuming off, over
    /// `files.resume_max_bytes`, its partial held by a live upload) it is an ordinary one from 0.
    /// `holder` is this upload's connection, listed as the partial's holder while it runs.
    pub fn begin_resumable(
        &self,
        name: &str,
        size: u64,
        checksum: &[u8; 32],
        holder: Option<Holder>,
    ) -> Result<(Pending<'_>, u64), StoreError> {
        if size > self.cfg.max_file_size {
            return Err(StoreError::TooLarge {
                size,
                max: self.cfg.max_file_size,
            });
        }
        let dir = self.current_handle()?;
        self.check_name(&dir, name)?;
        let mut waited_until = Instant::now() + HELD_GRACE;
        let claimed = loop {
            let found = resume::claim(
                &self.partials,
                &dir,
                checksum,
                size,
                name,
                self.resume_limits(),
                self.cfg.file_mode,
            )
            .map_err(io_err("keep a partial upload"))?;
            match found {
                Claim::Got(c) => break Some(c),
                Claim::Held(file_name) if Instant::now() < waited_until => {
                    if let TakeOver::Ended { peer, quiet } =
                        self.holders.take_over_if_quiet(&file_name)
                    {
                        let by = holder.as_ref().map_or("", |h| h.peer.as_str());
                        logger::warn!(
                            "{by} takes over partial upload {file_name} from {peer}, silent for {} s: that connection is ended",
                            Fixed::secs(quiet, 1)
                        );
                        waited_until = waited_until.max(Instant::now() + HELD_GRACE);
                    }
                    std::thread::sleep(HELD_POLL);
                }
                Claim::Held(_) | Claim::No => break None,
            }
        };
        let Some(claimed) = claimed else {
            return self.begin(name, size).map(|p| (p, 0));
        };
        let held = holder.map(|h| self.holders.hold(&claimed.file_name, h));
        let listed = self.partials.listed(&dir, &claimed.file_name);
        let offset = claimed.offset;
        // On an error the claimed file closes (unlocked) and the partial stays for later.
        let reservation = self.reserve(&dir, size - offset)?;
        let mut file = claimed.file;
        io::Seek::seek(&mut file, io::SeekFrom::Start(offset))
            .map_err(io_err("continue a partial upload"))?;
        Ok((
            Pending {
                reservation,
                dir,
                file,
                temp_name: claimed.file_name,
                name: name.to_string(),
                size,
                written: offset,
                flushed: offset,
                done: false,
                keep: true,
                _held: held,
                _listed: Some(listed),
            },
            offset,
        ))
    }
}
