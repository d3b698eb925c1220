//! Getting a release's image (`repo:tag`) onto every target host before anything of the release
//! runs there. The spec's `service.image_source` says how:
//!
//! - `local` (the default): every target must hold the image already; nothing is moved.
//! - `copy`: a target that lacks it gets it from an engine that has it (the first target holding
//!   it, else the engine of the machine haddock runs on, [`Host::machine`]). The source's
//!   `GET /images/{name}/get` archive is the request body of the target's `POST /images/load`,
//!   chunk by chunk as it arrives, so the image is never held whole in memory; afterwards the
//!   target's image id must equal the source's.
//! - `registry`: every target pulls `repo:tag` from the registry `repo` names
//!   (`POST /images/create`), with [`Credentials`] from the environment or a Docker config file;
//!   afterwards all targets must hold the same image id.
//!
//! [`Supply::survey`] only looks: it is the pre-check of `release` and `resume`, where a tag that
//! cannot reach every target is exit 2 with nothing changed. [`Supply::fill`] moves images; the
//! release runs it in its `validating` state, before any container is created.

use crate::docker::{Host, ImageInfo};
use crate::error::{Error, Result};
use crate::output::Output;
use crate::spec::{ImageSource, Spec};
use bollard::auth::DockerCredentials;
use bollard::query_parameters::{CreateImageOptions, ImportImageOptions};
use bytesize::ByteSize;
use futures_util::StreamExt;
use std::collections::HashMap;
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
    plan: Plan,
}

/// How the targets get the image.
#[derive(Debug)]
enum Plan {
    /// Every target holds it; nothing to move.
    Nothing,
    /// The targets that lack it copy it from this engine, which holds this image.
    Copy(Host, ImageInfo),
    /// Every target pulls it (again: a tag in a registry may have moved), with these credentials.
    Pull(Option<Credentials>),
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

/// One finished pull of an image on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub image: String,
    pub host: String,
    /// Bytes downloaded (the layers the host did not have yet), as the engine reported them.
    pub bytes: u64,
    pub took: Duration,
    pub id: String,
}

impl Pulled {
    /// The progress line of a finished pull.
    pub fn line(&self) -> String {
        format!(
            "pulled {} on {}: {} downloaded in {:.2}s, image id {}",
            self.image,
            self.host,
            ByteSize(self.bytes),
            self.took.as_secs_f64(),
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
    /// The pulls made (`registry`: one per target), in target order.
    pub pulls: Vec<Pulled>,
}

impl Supply {
    /// Looks at every target (and at where the image can come from: the copy source, or the
    /// registry through each target's engine); changes nothing. A target lacking the image with
    /// nowhere to get it from is bad input (exit 2).
    pub async fn survey(spec: &Spec, hosts: &[Host], tag: &str) -> Result<Supply> {
        let creds = match spec.service.image_source {
            ImageSource::Registry => Credentials::find(&spec.service.image)?,
            ImageSource::Local | ImageSource::Copy => None,
        };
        Self::survey_with(spec, hosts, tag, creds).await
    }

    /// [`Supply::survey`] with the registry credentials given (`registry` only), rather than
    /// found in the environment.
    pub async fn survey_with(
        spec: &Spec,
        hosts: &[Host],
        tag: &str,
        creds: Option<Credentials>,
    ) -> Result<Supply> {
        let image = spec.image_ref(tag);
        let mut held = Vec::with_capacity(hosts.len());
        for h in hosts {
            held.push(h.image_info(&image).await?);
        }
        let missing = held.iter().position(Option::is_none);
        let plan = match (spec.service.image_source, missing) {
            (ImageSource::Registry, _) => {
                for h in hosts {
                    // Asks the registry for the tag's manifest through the host's engine: the
                    // same path, trust and credentials as the pull, without pulling anything.
                    if let Err(e) = h
                        .engine()
                        .inspect_registry_image(&image, creds.as_ref().map(|c| c.0.clone()))
                        .await
                    {
                        return Err(registry_error(&image, h, creds.as_ref(), e));
                    }
                }
                Plan::Pull(creds)
            }
            (_, None) => Plan::Nothing,
            (ImageSource::Local, Some(i)) => {
                return Err(Error::UnknownImage {
                    image,
                    host: hosts[i].name.clone(),
                })
            }
            (ImageSource::Copy, Some(_)) => {
                let holder = held
                    .iter()
                    .enumerate()
                    .find_map(|(i, h)| h.as_ref().map(|info| (hosts[i].clone(), info.clone())));
                let (from, info) = match holder {
                    Some(found) => found,
                    None => Self::from_machine(hosts, &image).await?,
                };
                Plan::Copy(from, info)
            }
        };
        Ok(Supply { image, held, plan })
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
            looked: format!(
                "on any Docker host haddock can copy it from ({})",
                looked.join(", ")
            ),
        })
    }

    /// The targets (indices) that lack the image.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.held.len())
            .filter(|&i| self.held[i].is_none())
            .collect()
    }

    /// Whether every target pulls the image from its registry (`registry`).
    pub fn pulls(&self) -> bool {
        matches!(self.plan, Plan::Pull(_))
    }

    /// The engine the missing targets copy from (`copy`, when any target lacks the image).
    pub fn source(&self) -> Option<&str> {
        match &self.plan {
            Plan::Copy(h, _) => Some(h.name.as_str()),
            Plan::Nothing | Plan::Pull(_) => None,
        }
    }

    /// Brings the image to every target that lacks it (`registry`: to every target), all at
    /// once, with progress lines on `out`; `hosts` are the ones [`Supply::survey`] looked at.
    pub async fn fill(self, hosts: &[Host], out: &Output) -> Result<Filled> {
        let (mut copies, mut pulls) = (Vec::new(), Vec::new());
        let mut healthcheck: Vec<Option<bool>> = self
            .held
            .iter()
            .map(|h| h.as_ref().map(|i| i.healthcheck))
            .collect();
        match &self.plan {
            Plan::Nothing => {}
            Plan::Copy(from, info) => {
                let each = self
                    .missing()
                    .into_iter()
                    .map(|i| copy(from, info, &hosts[i], &self.image, out));
                copies = futures_util::future::try_join_all(each).await?;
                // A copied image has the source's id, so its HEALTHCHECK too.
                for h in healthcheck.iter_mut().filter(|h| h.is_none()) {
                    *h = Some(info.healthcheck);
                }
            }
            Plan::Pull(creds) => {
                let each = hosts
                    .iter()
                    .map(|h| pull(h, &self.image, creds.as_ref(), out));
                let done = futures_util::future::try_join_all(each).await?;
                // One tag, one image: a tag moved in the registry between two pulls would
                // leave the hosts running different code under one version.
                if let Some(odd) = done.iter().find(|p| p.1.id != done[0].1.id) {
                    return Err(Error::ImageTransfer {
                        image: self.image.clone(),
                        host: odd.1.host.clone(),
                        reason: format!(
                            "pulled image id {}, but {} pulled {}: the tag moved in the registry during the release; release again",
                            odd.1.id, done[0].1.host, done[0].1.id
                        ),
                    });
                }
                for (i, (hc, p)) in done.into_iter().enumerate() {
                    healthcheck[i] = Some(hc);
                    pulls.push(p);
                }
            }
        }
        Ok(Filled {
            healthcheck: healthcheck
                .into_iter()
                .map(|h| h.unwrap_or(false))
                .collect(),
            copies,
            pulls,
        })
    }
}

/// Registry credentials for the registry of one image: `auth` of the Engine API's
/// `X-Registry-Auth`. Never printed: `Debug` shows where they came from and the user only.
#[derive(Clone)]
pub struct Credentials(DockerCredentials, String);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, from: {}, secret: (not shown) }}",
            self.0.username.as_deref().unwrap_or(""),
            self.1
        )
    }
}

/// The Docker config file key of Docker Hub.
const DOCKER_HUB: &str = "https://index.docker.io/v1/";

/// The registry part of a repository (`10.0.0.1:5000/team/svc` → `10.0.0.1:5000`); `None`
/// for Docker Hub (the first component is no host name).
pub fn registry_of(repo: &str) -> Option<&str> {
    let (first, _) = repo.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

impl Credentials {
    /// A user and password for `registry` (`host[:port]`); `from` says where they came from.
    pub fn new(user: &str, password: &str, registry: &str, from: &str) -> Credentials {
        Credentials(
            DockerCredentials {
                username: Some(user.to_string()),
                password: Some(password.to_string()),
                serveraddress: Some(registry.to_string()),
                ..Default::default()
            },
            from.to_string(),
        )
    }

    /// Where the registry credentials of `repo` come from, first that has them:
    /// `HADDOCK_REGISTRY_USER` and `HADDOCK_REGISTRY_PASSWORD`; else the `auths` entry of the
    /// registry in the Docker config file (`$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`). `None`: anonymous pulls.
    pub fn find(repo: &str) -> Result<Option<Credentials>> {
        let registry = registry_of(repo).unwrap_or(DOCKER_HUB);
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (env("HADDOCK_REGISTRY_USER"), env("HADDOCK_REGISTRY_PASSWORD")) {
            (Some(user), Some(password)) => {
                return Ok(Some(Credentials::new(
                    &user,
                    &password,
                    registry,
                    "HADDOCK_REGISTRY_USER/HADDOCK_REGISTRY_PASSWORD",
                )))
            }
            (None, None) => {}
            _ => {
                return Err(Error::BadInput(
                    "set both HADDOCK_REGISTRY_USER and HADDOCK_REGISTRY_PASSWORD, or neither (nothing was changed)".into(),
                ))
            }
        }
        let path = match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            Some(dir) => std::path::PathBuf::from(dir).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(home) => std::path::PathBuf::from(home).join(".docker/config.json"),
                None => return Ok(None),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::BadInput(format!(
                    "cannot read the Docker config file {}: {e}",
                    path.display()
                )))
            }
        };
        Self::from_config(&text, registry, &path.display().to_string())
    }

    /// The `auths` entry of `registry` in a Docker config file's text (`file` names it in
    /// errors, which never quote the file: it holds secrets).
    fn from_config(text: &str, registry: &str, file: &str) -> Result<Option<Credentials>> {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
            identitytoken: Option<String>,
        }
        let bad = |what: &str| Error::BadInput(format!("Docker config file {file}: {what}"));
        let config: Config = serde_json::from_str(text)
            .map_err(|e| bad(&format!("not a Docker config file (line {})", e.line())))?;
        // The docker CLI writes a registry as given to `docker login`, Docker Hub as a URL.
        let entry = [
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
        .iter()
        .find_map(|k| config.auths.get(k));
        let Some(entry) = entry else { return Ok(None) };
        let (mut username, mut password) = (entry.username.clone(), entry.password.clone());
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    bad(&format!(
                        "auths.{registry}.auth is not base64 of user:password"
                    ))
                })?;
            let (u, p) = decoded.split_once(':').ok_or_else(|| {
                bad(&format!(
                    "auths.{registry}.auth is not base64 of user:password"
                ))
            })?;
            (username, password) = (Some(u.to_string()), Some(p.to_string()));
        }
        if username.is_none() && entry.identitytoken.is_none() {
            return Ok(None);
        }
        Ok(Some(Credentials(
            DockerCredentials {
                username,
                password,
                identitytoken: entry.identitytoken.clone(),
                serveraddress: Some(registry.to_string()),
                ..Default::default()
            },
            file.to_string(),
        )))
    }
}

/// What a refused registry look-up or pull means: an unknown tag or refused credentials are bad
/// input (exit 2, nothing changed); anything else is the infrastructure (exit 3).
fn registry_error(
    image: &str,
    host: &Host,
    creds: Option<&Credentials>,
    e: bollard::errors::Error,
) -> Error {
    let (status, message) = match &e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => (*status_code, message.to_lowercase()),
        bollard::errors::Error::DockerStreamError { error } => (0, error.to_lowercase()),
        _ => (0, String::new()),
    };
    let registry = registry_of(image).unwrap_or("Docker Hub");
    if status == 404
        || message.contains("manifest unknown")
        || message.contains("not found")
        || message.contains("unknown tag")
    {
        return Error::ImageNowhere {
            image: image.to_string(),
            looked: format!("in registry {registry} (asked through {})", host.name),
        };
    }
    if status == 401
        || status == 403
        || message.contains("unauthorized")
        || message.contains("authentication required")
        || message.contains("no basic auth credentials")
        || message.contains("denied")
    {
        let with = creds.map_or_else(
            || "no credentials (set HADDOCK_REGISTRY_USER and HADDOCK_REGISTRY_PASSWORD, or docker login)".to_string(),
            |c| format!("the credentials from {}", c.1),
        );
        return Error::BadInput(format!(
            "registry {registry} refused {image} to {} with {with}: {message} (nothing was changed)",
            host.name
        ));
    }
    Error::docker(
        &host.name,
        format!("look up {image} in registry {registry}"),
        e,
    )
}

/// Pulls `image` on `host`, with a progress line every [`PROGRESS_EVERY`]; returns whether it
/// has a HEALTHCHECK and what was pulled.
async fn pull(
    host: &Host,
    image: &str,
    creds: Option<&Credentials>,
    out: &Output,
) -> Result<(bool, Pulled)> {
    let start = Instant::now();
    out.step(&format!("pulling {image} on {}", host.name), None);
    let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
    let options = CreateImageOptions {
        from_image: Some(repo.to_string()),
        tag: Some(tag.to_string()),
        ..Default::default()
    };
    // The answer streams while the layers download; a slow link may take longer than 60 s.
    let engine = host.engine().clone().with_timeout(COPY_TIMEOUT);
    let mut stream = engine.create_image(Some(options), None, creds.map(|c| c.0.clone()));
    // Per layer: (downloaded, size), from the engine's progress messages.
    let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
    let mut last = Instant::now();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| registry_error(image, host, creds, e))?;
        let (Some(id), Some(detail)) = (info.id, info.progress_detail) else {
            continue;
        };
        if info.status.as_deref() != Some("Downloading") {
            continue;
        }
        let n = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        layers.insert(id, (n(detail.current), n(detail.total)));
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            let (got, of) = layers
                .values()
                .fold((0, 0), |(g, o), (c, t)| (g + c, o + t));
            out.step(
                &format!(
                    "pulling {image} on {}: {} of {} after {:.0}s",
                    host.name,
                    ByteSize(got),
                    ByteSize(of),
                    start.elapsed().as_secs_f64()
                ),
                None,
            );
        }
    }
    let info = host
        .image_info(image)
        .await?
        .ok_or_else(|| Error::ImageTransfer {
            image: image.to_string(),
            host: host.name.clone(),
            reason: "the pull ended without error, but the host has no such image".into(),
        })?;
    let pulled = Pulled {
        image: image.to_string(),
        host: host.name.clone(),
        // The layers' full sizes: a finished download reports only its last chunk.
        bytes: layers.values().map(|(_, total)| total).sum(),
        took: start.elapsed(),
        id: info.id,
    };
    tracing::info!(
        image,
        host = %pulled.host,
        bytes = pulled.bytes,
        took_ms = u64::try_from(pulled.took.as_millis()).unwrap_or(u64::MAX),
        "image pulled"
    );
    out.step(&pulled.line(), Some(pulled.took));
    Ok((info.healthcheck, pulled))
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
    fn registries_are_told_from_docker_hub_names() {
        assert_eq!(
            registry_of("10.213.1.1:5000/haddock/svc"),
            Some("10.213.1.1:5000")
        );
        assert_eq!(
            registry_of("registry.example/svc"),
            Some("registry.example")
        );
        assert_eq!(registry_of("localhost/svc"), Some("localhost"));
        assert_eq!(registry_of("haddock/optimizer"), None);
        assert_eq!(registry_of("optimizer"), None);
    }

    #[test]
    fn config_file_credentials_are_found_decoded_and_never_shown() {
        // base64("ci:s3cret") = "Y2k6czNjcmV0"
        let text = r#"{"auths": {"reg.example:5000": {"auth": "Y2k6czNjcmV0"},
                      "https://other.example": {"username": "u", "password": "p"}}}"#;
        let c = Credentials::from_config(text, "reg.example:5000", "/x/config.json")
            .unwrap()
            .unwrap();
        assert_eq!(c.0.username.as_deref(), Some("ci"));
        assert_eq!(c.0.password.as_deref(), Some("s3cret"));
        assert_eq!(c.0.serveraddress.as_deref(), Some("reg.example:5000"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("Y2k6"),
            "{shown}"
        );
        assert!(shown.contains("/x/config.json"), "{shown}");
        let o = Credentials::from_config(text, "other.example", "f")
            .unwrap()
            .unwrap();
        assert_eq!(o.0.password.as_deref(), Some("p"));
        assert!(Credentials::from_config(text, "none.example", "f")
            .unwrap()
            .is_none());
        let bad = r#"{"auths": {"r": {"auth": "bm9jb2xvbg=="}}}"#; // "nocolon"
        let e = Credentials::from_config(bad, "r", "f")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not base64 of user:password") && !e.contains("nocolon"),
            "{e}"
        );
        let e = Credentials::from_config("{", "r", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a Docker config file"), "{e}");
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
