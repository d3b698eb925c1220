//! The on-disk format of a cache volume, and the rule that lets two versions share one.
//!
//! During a release the old and the new optimizer serve from the same volume, and after a
//! rollback the old one writes there again. That is only safe when each can read what the
//! other wrote. So every volume carries a marker, `<cache>/format.json`:
//!
//! ```json
//! {"format": 2, "readable_by": 1}
//! ```
//!
//! - `format`: the newest format any writer has used on this volume (it never goes down);
//! - `readable_by`: the oldest optimizer format that may still open the volume. A *compatible*
//!   change (an optional manifest field older versions ignore) leaves it where it was; an
//!   incompatible one raises it, and older versions then refuse the volume.
//!
//! An instance checks the marker at start, **before it touches the volume** (no lock file, no
//! secondary directory, no RocksDB open), and refuses to start with a clear error when it is
//! too old for it; the writer checks it again when it takes the volume over, then records its
//! own format there before its first write. A volume without a marker but with a database was
//! written by format 1 (the optimizers before markers).
//!
//! Formats so far:
//! 1. manifests of `{size, digest, chunks}`;
//! 2. manifests may carry `format` and `content_type` (the `Content-Type` an object was PUT
//!    with, served back on GET); format 1 ignores both, so format 2 is readable by 1.
//!
//! The cargo feature `format-v1` builds an optimizer that writes format 1, as the releases
//! before format 2 did: the test image `haddock/optimizer:1.0.0` is built that way, so that
//! every release test crosses a real format change.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The format this build writes.
pub const FORMAT: u32 = if cfg!(feature = "format-v1") { 1 } else { 2 };

/// The oldest format this build can read and write.
pub const OLDEST_READABLE: u32 = 1;

/// The oldest format that can share a volume this build wrote: format 2 only adds optional
/// manifest fields that format 1 ignores.
pub const READABLE_BY: u32 = 1;

/// The marker's file name in the cache directory.
pub const MARKER: &str = "format.json";

/// The contents of `format.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeFormat {
    pub format: u32,
    pub readable_by: u32,
}

impl VolumeFormat {
    /// What this build makes of a volume in `current` format once it has written there.
    fn after_write(current: Option<VolumeFormat>) -> VolumeFormat {
        let ours = VolumeFormat {
            format: FORMAT,
            readable_by: READABLE_BY,
        };
        match current {
            None => ours,
            Some(c) => VolumeFormat {
                format: c.format.max(ours.format),
                readable_by: c.readable_by.max(ours.readable_by),
            },
        }
    }
}

/// The format marker of one cache directory.
pub struct Marker {
    dir: PathBuf,
}

impl Marker {
    pub fn new(cache_dir: &Path) -> Marker {
        Marker {
            dir: cache_dir.to_owned(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(MARKER)
    }

    /// The volume's format: the marker's, format 1 for a database without one, `None` for a
    /// volume nothing was written to yet. Reads only.
    pub fn read(&self) -> Result<Option<VolumeFormat>> {
        match std::fs::read(self.path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::IncompatibleFormat(format!(
                    "{} is not a format marker ({e}); this optimizer writes format {FORMAT}",
                    self.path().display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(self.dir.join("db").exists().then_some(VolumeFormat {
                    format: 1,
                    readable_by: 1,
                }))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Refuses a volume this build cannot read. Reads only: called before the volume is
    /// touched, at start and before each takeover.
    pub fn check(&self) -> Result<Option<VolumeFormat>> {
        let found = self.read()?;
        if let Some(f) = found {
            if f.readable_by > FORMAT {
                return Err(Error::IncompatibleFormat(format!(
                    "the cache volume {} has on-disk format {}, which optimizers of format {} \
                     or later can open; this one reads formats {OLDEST_READABLE} to {FORMAT}. \
                     Nothing was changed: release a newer version, or give this one a volume of its own",
                    self.dir.display(),
                    f.format,
                    f.readable_by
                )));
            }
            if f.format < OLDEST_READABLE {
                return Err(Error::IncompatibleFormat(format!(
                    "the cache volume {} has on-disk format {}, older than the oldest this \
                     optimizer reads ({OLDEST_READABLE}). Nothing was changed",
                    self.dir.display(),
                    f.format
                )));
            }
        }
        Ok(found)
    }

    /// Checks the volume again and records that this build writes there, before its first
    /// write (called by the writer, holding the volume's leader lock). Atomic: a crash leaves
    /// the old marker or the new one.
    pub fn claim(&self) -> Result<VolumeFormat> {
        let current = self.check()?;
        let next = VolumeFormat::after_write(current);
        if current != Some(next) || !self.path().exists() {
            let json = serde_json::to_vec(&next).map_err(|e| Error::Internal(e.to_string()))?;
            crate::volume::replace_file(&self.path(), &json)?;
            tracing::info!(from = ?current, to = ?next, "recorded the cache volume's format");
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(json: Option<&str>, db: bool) -> (tempfile::TempDir, Marker) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(j) = json {
            std::fs::write(dir.path().join(MARKER), j).unwrap();
        }
        if db {
            std::fs::create_dir(dir.path().join("db")).unwrap();
        }
        let m = Marker::new(dir.path());
        (dir, m)
    }

    #[test]
    fn a_fresh_volume_has_no_format_and_a_database_without_marker_is_format_1() {
        assert_eq!(marker(None, false).1.check().unwrap(), None);
        assert_eq!(
            marker(None, true).1.check().unwrap(),
            Some(VolumeFormat {
                format: 1,
                readable_by: 1
            })
        );
    }

    #[test]
    fn a_volume_that_needs_a_newer_optimizer_is_refused_and_left_alone() {
        let (dir, m) = marker(Some(r#"{"format": 99, "readable_by": 99}"#), true);
        let e = m.check().unwrap_err().to_string();
        assert!(
            e.contains("format 99") && e.contains("Nothing was changed"),
            "{e}"
        );
        assert!(m.claim().is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(MARKER)).unwrap(),
            r#"{"format": 99, "readable_by": 99}"#
        );
        for bad in [
            "",
            "{",
            r#"{"format": 1}"#,
            r#"{"format":1,"readable_by":1,"x":1}"#,
        ] {
            let (_d, m) = marker(Some(bad), false);
            let e = m.check().unwrap_err().to_string();
            assert!(e.contains("not a format marker"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_newer_compatible_volume_is_opened_and_its_format_never_goes_down() {
        let (_d, m) = marker(Some(r#"{"format": 7, "readable_by": 1}"#), true);
        let after = m.claim().unwrap();
        assert_eq!(after.format, 7);
        assert_eq!(after.readable_by, READABLE_BY);
        assert_eq!(m.read().unwrap(), Some(after));
    }

    #[test]
    fn the_writer_records_its_format_on_a_fresh_volume() {
        let (_d, m) = marker(None, false);
        assert_eq!(
            m.claim().unwrap(),
            VolumeFormat {
                format: FORMAT,
                readable_by: READABLE_BY
            }
        );
        assert_eq!(m.read().unwrap().unwrap().format, FORMAT);
    }
}
