//! Getting a release's image (`repo:tag`) onto every target host before anything of the release
//! runs there. The spec's `service.image_source` says how:
//!
//! - `local` (the default): every target must hold the image already; nothing is moved.
//! - `copy`: a target that lacks it gets it from an engine that has it (the first target holding
//!   it, else the engine of the machine haddock runs on, [`Host::machine`]). The source's
//!   `GET /images/{name}/get` archive is the request body of the target's `POST /images/load`,
//!   chunk by chunk as it arrives, so the image is never held whole in memory; afterwards the
//!   target's image id must equal the source's.
//!
//! [`Supply::survey`] only looks: it is the pre-check of `release` and `resume`, where a tag that
//! cannot reach every target is exit 2 with nothing changed. [`Supply::fill`] moves images; the
//! release runs it in its `validating` state, before any container is created.

use crate::docker::{Host, ImageInfo};
use crate::error::{Error, Result};
use crate::output::Output;
use crate::spec::{ImageSource, Spec};
use bollard::query_parameters::ImportImageOptions;
use bytesize::ByteSize;
use futures_util::StreamExt;
use std::future::ready;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long one image import may take before its answer arrives: the engine answers only once
/// it has read the whole archive, so the Engine API's usual 60 s would cut off large images.
const COPY_TIMEOUT: Duration = Duration::from_secs(3600);
/// A running copy prints how far it got this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Where `repo:tag` is, and where the targets that lack it will get it from.
#[derive(Debug)]
pub struct Supply {
    image: String,
    /// Per target (spec order): what it holds now; `None` where the image is missing.
    held: Vec<Option<ImageInfo>>,
    /// The copy source when some target lacks the image (`copy` only): the engine and its image.
    from: Option<(Host, ImageInfo)>,
}

/// One finished copy of an image to one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub image: String,
    pub from: String,
    pub to: String,
    /// Bytes of the archive that went from the source to the target.
    pub bytes: u64,
    /// Chunks the archive arrived in (and was passed on in).
    pub chunks: u64,
    /// The most bytes read from the source and not yet handed to the target at any moment:
    /// what the copy held in memory (one chunk when it streams; the archive if it buffered).
    pub peak_in_flight: u64,
    pub took: Duration,
    /// The image id, equal on both engines.
    pub id: String,
}

impl Copied {
    /// The progress line of a finished copy.
    pub fn line(&self) -> String {
        let secs = self.took.as_secs_f64().max(0.001);
        format!(
            "copied {} from {} to {}: {} in {:.2}s ({}/s), image id {} matches",
            self.image,
            self.from,
            self.to,
            ByteSize(self.bytes),
            secs,
            ByteSize((self.bytes as f64 / secs) as u64),
            short_id(&self.id)
        )
    }
}

/// What [`Supply::fill`] did and found.
#[derive(Debug, Clone)]
pub struct Filled {
    /// Per target (spec order): the image has a HEALTHCHECK.
    pub healthcheck: Vec<bool>,
    /// The copies made, in target order (none when every target held the image).
    pub copies: Vec<Copied>,
}

impl Supply {
    /// Looks at every target (and, to copy, at where the image can come from); changes nothing.
    /// A target lacking the image with nowhere to get it from is bad input (exit 2).
    pub async fn survey(spec: &Spec, hosts: &[Host], tag: &str) -> Result<Supply> {
        let image = spec.image_ref(tag);
        let mut held = Vec::with_capacity(hosts.len());
        for h in hosts {
            held.push(h.image_info(&image).await?);
        }
        let Some(missing) = held.iter().position(Option::is_none) else {
            return Ok(Supply {
                image,
                held,
                from: None,
            });
        };
        match spec.service.image_source {
            ImageSource::Local => Err(Error::UnknownImage {
                image,
                host: hosts[missing].name.clone(),
            }),
            ImageSource::Copy => {
                let from = match held.iter().position(Option::is_some) {
                    Some(i) => held[i].clone().map(|info| (hosts[i].clone(), info)),
                    None => Some(Self::from_machine(hosts, &image).await?),
                };
                Ok(Supply { image, held, from })
            }
        }
    }

    /// No target holds the image: this machine's engine is the last place to copy from.
    async fn from_machine(hosts: &[Host], image: &str) -> Result<(Host, ImageInfo)> {
        let mut looked: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        match Host::machine().await {
            // A target already: looked at above.
            Ok(m) if hosts.iter().any(|h| h.name == m.name) => {}
            Ok(m) => match m.image_info(image).await {
                Ok(Some(info)) => return Ok((m, info)),
                Ok(None) => looked.push(format!("{} (this machine's engine)", m.name)),
                Err(e) => looked.push(format!("this machine's engine: {e}")),
            },
            Err(e) => looked.push(format!("this machine's engine: {e}")),
        }
        Err(Error::ImageNowhere {
            image: image.to_string(),
            looked: looked.join(", "),
        })
    }

    /// The targets (indices) that lack the image.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.held.len())
            .filter(|&i| self.held[i].is_none())
            .collect()
    }

    /// The engine the missing targets copy from, when any target lacks the image.
    pub fn source(&self) -> Option<&str> {
        self.from.as_ref().map(|(h, _)| h.name.as_str())
    }

    /// Brings the image to every target that lacks it (all at once, one stream each), with
    /// progress lines on `out`; `hosts` are the ones [`Supply::survey`] looked at.
    pub async fn fill(self, hosts: &[Host], out: &Output) -> Result<Filled> {
        let missing = self.missing();
        let copies = match (&self.from, missing.is_empty()) {
            (_, true) => Vec::new(),
            (Some((from, info)), false) => {
                let copies = missing
                    .iter()
                    .map(|&i| copy(from, info, &hosts[i], &self.image, out));
                futures_util::future::try_join_all(copies).await?
            }
            (None, false) => {
                return Err(Error::Inconsistent(format!(
                    "image {} is missing on {} and no copy source was found",
                    self.image, hosts[missing[0]].name
                )))
            }
        };
        // A copied image has the source's id, so its HEALTHCHECK too.
        let copied_hc = self.from.as_ref().is_some_and(|(_, i)| i.healthcheck);
        let healthcheck = self
            .held
            .iter()
            .map(|h| h.as_ref().map_or(copied_hc, |i| i.healthcheck))
            .collect();
        Ok(Filled {
            healthcheck,
            copies,
        })
    }
}

/// `sha256:0123456789ab…` → `0123456789ab`.
fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

/// Bytes read from the source and handed to the target, and the most ever between the two.
#[derive(Debug, Default)]
struct Meter {
    read: AtomicU64,
    taken: AtomicU64,
    peak: AtomicU64,
    chunks: AtomicU64,
}

impl Meter {
    fn read(&self, n: usize) {
        let read = self.read.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        let held = read.saturating_sub(self.taken.load(Ordering::Relaxed));
        self.peak.fetch_max(held, Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
    }

    fn taken(&self, n: usize) -> u64 {
        self.taken.fetch_add(n as u64, Ordering::Relaxed) + n as u64
    }
}

/// One export → import stream from `from` to `to`, then the image id check.
async fn copy(
    from: &Host,
    info: &ImageInfo,
    to: &Host,
    image: &str,
    out: &Output,
) -> Result<Copied> {
    let start = Instant::now();
    out.step(
        &format!(
            "copying {image} ({}) from {} to {}",
            ByteSize(info.size),
            from.name,
            to.name
        ),
        None,
    );
    let meter = Arc::new(Meter::default());
    let export_error = Arc::new(Mutex::new(None::<bollard::errors::Error>));
    let body = {
        let (at_read, at_take, failed) = (meter.clone(), meter.clone(), export_error.clone());
        let (out, image, target, size) =
            (out.clone(), image.to_string(), to.name.clone(), info.size);
        let mut last = Instant::now();
        from.engine()
            .export_image(image.as_str())
            .map(move |item| match item {
                Ok(chunk) => {
                    at_read.read(chunk.len());
                    Some(chunk)
                }
                Err(e) => {
                    *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    None
                }
            })
            // An export that breaks off ends the body early: the import then fails on a short
            // archive, and the export's own error is the one reported.
            .take_while(|chunk| ready(chunk.is_some()))
            .filter_map(ready)
            .map(move |chunk| {
                let sent = at_take.taken(chunk.len());
                if last.elapsed() >= PROGRESS_EVERY {
                    last = Instant::now();
                    out.step(
                        &format!(
                            "copying {image} to {target}: {} of about {} after {:.0}s",
                            ByteSize(sent),
                            ByteSize(size),
                            start.elapsed().as_secs_f64()
                        ),
                        None,
                    );
                }
                chunk
            })
    };
    let engine = to.engine().clone().with_timeout(COPY_TIMEOUT);
    let options = ImportImageOptions {
        quiet: true,
        ..Default::default()
    };
    let mut load = engine.import_image_stream(options, body, None);
    let mut load_error = None;
    while let Some(item) = load.next().await {
        if let Err(e) = item {
            load_error = Some(e);
            break;
        }
    }
    drop(load);
    let export_error = export_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(e) = export_error {
        return Err(Error::docker(
            &from.name,
            format!("export image {image}"),
            e,
        ));
    }
    if let Some(e) = load_error {
        return Err(Error::docker(&to.name, format!("import image {image}"), e));
    }
    let transfer = |reason: String| Error::ImageTransfer {
        image: image.to_string(),
        host: to.name.clone(),
        reason,
    };
    let got = to.image_info(image).await?.ok_or_else(|| {
        transfer(format!(
            "the import from {} ended without error, but the host has no {image}",
            from.name
        ))
    })?;
    if got.id != info.id {
        return Err(transfer(format!(
            "image id after the copy is {}, but {} has {}: the engines disagree on what {image} is (check both engines' image stores)",
            got.id, from.name, info.id
        )));
    }
    let copied = Copied {
        image: image.to_string(),
        from: from.name.clone(),
        to: to.name.clone(),
        bytes: meter.taken.load(Ordering::Relaxed),
        chunks: meter.chunks.load(Ordering::Relaxed),
        peak_in_flight: meter.peak.load(Ordering::Relaxed),
        took: start.elapsed(),
        id: got.id,
    };
    tracing::info!(
        image,
        from = %copied.from,
        to = %copied.to,
        bytes = copied.bytes,
        chunks = copied.chunks,
        peak_in_flight = copied.peak_in_flight,
        took_ms = u64::try_from(copied.took.as_millis()).unwrap_or(u64::MAX),
        "image copied"
    );
    out.step(&copied.line(), Some(copied.took));
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_reads_as_bytes_time_rate_and_id() {
        let c = Copied {
            image: "svc:1".into(),
            from: "unix:///var/run/docker.sock".into(),
            to: "tcp://10.0.0.2:2376".into(),
            bytes: 3_000_000,
            chunks: 100,
            peak_in_flight: 32_768,
            took: Duration::from_millis(1500),
            id: "sha256:0123456789abcdef0123".into(),
        };
        let line = c.line();
        assert!(
            line.starts_with(
                "copied svc:1 from unix:///var/run/docker.sock to tcp://10.0.0.2:2376: "
            ),
            "{line}"
        );
        assert!(line.contains("in 1.50s"), "{line}");
        assert!(line.ends_with("image id 0123456789ab matches"), "{line}");
    }

    #[test]
    fn the_meter_keeps_the_most_bytes_between_source_and_target() {
        let m = Meter::default();
        m.read(10);
        m.taken(10);
        m.read(30);
        m.read(5);
        m.taken(35);
        assert_eq!(m.peak.load(Ordering::Relaxed), 35);
        assert_eq!(m.chunks.load(Ordering::Relaxed), 3);
    }
}
