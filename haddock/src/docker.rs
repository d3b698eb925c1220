//! The Docker Engine, through bollard only (never the `docker` CLI).
//!
//! One [`Host`] per spec target. Every container haddock creates carries the labels in
//! [`labels`], so that a resumed or repeated run finds what an earlier (perhaps killed) run
//! created: nothing is ever orphaned, and nothing haddock did not create is ever touched.
//! What goes into a container (name, those labels, limits, health timing) is decided from the
//! spec in [`crate::plan`], without Docker; this module only carries it to the engine and finds
//! it again by its labels.
//!
//! Instance address, two ways (see [`Host::address`]):
//! - a target with an `address` (another host's proxies must reach it): the service port is
//!   published on a free port of the host haddock fixes for the container's life (Docker would
//!   pick a new one at every restart), read back from inspect, and the instance is
//!   `address:published-port`. Ephemeral ports leave any number of versions side by side;
//! - otherwise the container's IP on the spec's network plus the spec's port, reachable from
//!   the same host only (the proxy runs there, or in a container on that network).

use crate::error::{Error, Result};
use crate::plan::{labels, ContainerPlan};
use crate::spec::{Spec, Target};
use bollard::models::{ContainerInspectResponse, EndpointSettings, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, InspectContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Seconds bollard waits for one Docker API call.
const API_TIMEOUT_SECS: u64 = 60;
/// Longest wait for a small question to an engine (its API version, inspect one container,
/// list a service's): an engine that cannot be reached fails the verb in seconds, naming the
/// host, and a host lost mid-release (its connection silently dead) makes the release roll
/// back, not after bollard's [`API_TIMEOUT_SECS`] for every call.
const QUICK_CALL: Duration = Duration::from_secs(10);
/// How often a name conflict whose container cannot be found yet is retried (every 250 ms).
const CREATE_CONFLICT_RETRIES: u32 = 40;

/// One Docker host of a spec's targets.
#[derive(Debug, Clone)]
pub struct Host {
    /// As written in the spec (`unix:///var/run/docker.sock`, `tcp://10.0.0.5:2376`).
    pub name: String,
    /// Position in the spec's `targets` (part of container names).
    pub index: usize,
    /// Instances of the service on this host.
    pub instances: u32,
    /// The spec's `address` of the target: instances publish their port and are reached there.
    pub address: Option<String>,
    docker: Docker,
}

/// What an engine holds under an image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:…`: equal on two engines when they hold the same image.
    pub id: String,
    /// Bytes of all layers, as the engine reports them.
    pub size: u64,
    /// The image has a HEALTHCHECK (its timing then comes from the spec).
    pub healthcheck: bool,
}

/// A container of ours, as found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub version: String,
    pub release: String,
    pub instance: String,
    pub running: bool,
}

/// What happened to a watched container (from the Docker event stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// `die`, `oom` or `health_status: unhealthy` (others are filtered out by the daemon).
    pub action: String,
    pub container: String,
    pub instance: String,
    /// The exit code for `die`.
    pub exit_code: Option<String>,
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn is_conflict(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

/// The start failed because the host port is bound already (by another container or process).
fn is_port_taken(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { message, .. }
            if message.contains("port is already allocated")
                || message.contains("address already in use")
    )
}

/// Where haddock picks the host ports it publishes: Linux's default ephemeral range, which
/// Docker uses for its own picks too.
const PUBLISH_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;
/// Ports tried for one container before its start gives up.
const PORT_ATTEMPTS: usize = 8;

/// A port of [`PUBLISH_PORTS`] not in `used`, probing from a place derived from the container
/// name, so that the instances of one release, started at once, seldom try the same one.
fn free_port(name: &str, used: &std::collections::HashSet<u16>) -> Option<u16> {
    let (lo, hi) = (*PUBLISH_PORTS.start(), *PUBLISH_PORTS.end());
    let span = u32::from(hi - lo) + 1;
    // FNV-1a: a stable spread, no cryptography needed.
    let start = name.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    }) % span;
    (0..span)
        .map(|i| lo + u16::try_from((start + i) % span).unwrap_or(0))
        .find(|p| !used.contains(p))
}

fn is_not_modified(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 304,
            ..
        }
    )
}

impl Host {
    /// Connects to a target (`unix://…` or `tcp://…`, with TLS when the target names its files)
    /// and negotiates the API version down to what the daemon speaks (20.10 speaks 1.41).
    pub async fn connect(target: &Target, index: usize) -> Result<Host> {
        let name = target.host.clone();
        let docker = if let Some(path) = name.strip_prefix("unix://") {
            Docker::connect_with_unix(path, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        } else if let Some(tls) = &target.tls {
            Docker::connect_with_ssl(
                &name,
                &tls.key,
                &tls.cert,
                &tls.ca,
                API_TIMEOUT_SECS,
                bollard::API_DEFAULT_VERSION,
            )
        } else {
            Docker::connect_with_http(&name, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        }
        .map_err(|e| Error::docker(&name, "connect", e))?;
        let docker = quick(docker.negotiate_version())
            .await
            .map_err(|e| Error::docker(&name, "negotiate the API version", e))?;
        Ok(Host {
            name,
            index,
            instances: target.instances,
            address: target.address.clone(),
            docker,
        })
    }

    /// Connects to every target of a spec at once (in the spec's order); the first host that
    /// cannot be reached fails the verb, named in the error, before anything changes.
    pub async fn connect_all(spec: &Spec) -> Result<Vec<Host>> {
        futures_util::future::try_join_all(
            spec.targets
                .iter()
                .enumerate()
                .map(|(i, t)| Host::connect(t, i)),
        )
        .await
    }

    /// The engine of the machine haddock runs on, as the `docker` CLI would reach it:
    /// `DOCKER_HOST` (with `DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH` for TLS) or the default
    /// socket. Only ever an image copy source (`image_source = "copy"`), never a target.
    pub async fn machine() -> Result<Host> {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let tls = std::env::var_os("DOCKER_TLS_VERIFY")
            .filter(|v| !v.is_empty())
            .map(|_| {
                let dir = std::env::var_os("DOCKER_CERT_PATH")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| {
                        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                            .join(".docker")
                    });
                crate::spec::Tls {
                    ca: dir.join("ca.pem"),
                    cert: dir.join("cert.pem"),
                    key: dir.join("key.pem"),
                }
            });
        let target = Target {
            host,
            instances: 0,
            tls,
            address: None,
        };
        Host::connect(&target, usize::MAX).await
    }

    /// The bollard client, for the image module's streams.
    pub(crate) fn engine(&self) -> &Docker {
        &self.docker
    }

    /// Whether `image` (`repo:tag`) is present; `Some(has_healthcheck)` when it is.
    pub async fn image(&self, image: &str) -> Result<Option<bool>> {
        Ok(self.image_info(image).await?.map(|i| i.healthcheck))
    }

    /// What this engine holds under `image` (`repo:tag`); `None` when it does not have it.
    pub async fn image_info(&self, image: &str) -> Result<Option<ImageInfo>> {
        match self.docker.inspect_image(image).await {
            Ok(img) => Ok(Some(ImageInfo {
                id: img.id.unwrap_or_default(),
                size: img.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                healthcheck: img
                    .config
                    .and_then(|c| c.healthcheck)
                    .and_then(|h| h.test)
                    .is_some_and(|t| !t.is_empty() && t[0] != "NONE"),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::docker(
                &self.name,
                format!("inspect image {image}"),
                e,
            )),
        }
    }

    /// Creates the network if it does not exist (a bridge, labelled as ours). Idempotent.
    pub async fn ensure_network(&self, network: &str) -> Result<()> {
        match self
            .docker
            .inspect_network(
                network,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(Error::docker(
                    &self.name,
                    format!("inspect network {network}"),
                    e,
                ))
            }
        }
        let req = NetworkCreateRequest {
            name: network.to_string(),
            driver: Some("bridge".into()),
            labels: Some(HashMap::from([(
                labels::MANAGED_BY.to_string(),
                "haddock".to_string(),
            )])),
            ..Default::default()
        };
        match self.docker.create_network(req).await {
            Ok(_) => Ok(()),
            // Created concurrently by someone else: fine.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(Error::docker(
                &self.name,
                format!("create network {network}"),
                e,
            )),
        }
    }

    /// Creates (unless a container of that name exists: a resumed run) and starts the container.
    /// Returns its id. Idempotent.
    ///
    /// A published port asked as host port 0 gets a fixed one chosen here (free on the host,
    /// see [`free_port`]) rather than Docker's ephemeral pick: Docker picks anew at every start,
    /// so a container its restart policy brought back would answer at a port nobody knows.
    /// A port something else bound meanwhile fails the start: the container is removed and
    /// made again on another port.
    pub async fn create_and_start(
        &self,
        plan: &ContainerPlan,
        image_has_healthcheck: bool,
    ) -> Result<String> {
        if !plan.publish.iter().any(|&(host, _)| host == 0) {
            return self.create_and_start_as(plan, image_has_healthcheck).await;
        }
        let mut tried = Vec::new();
        loop {
            // A resumed run's container keeps the port it was given (create finds it).
            let exists = self.inspect(&plan.name).await?.is_some();
            let mut chosen = plan.clone();
            if !exists {
                let mut used = self.used_ports().await?;
                used.extend(&tried);
                for p in chosen.publish.iter_mut().filter(|p| p.0 == 0) {
                    p.0 = free_port(&plan.name, &used).ok_or_else(|| {
                        Error::Inconsistent(format!(
                            "no free port in {PUBLISH_PORTS:?} on Docker host {}",
                            self.name
                        ))
                    })?;
                    used.insert(p.0);
                    tried.push(p.0);
                }
            }
            match self
                .create_and_start_as(&chosen, image_has_healthcheck)
                .await
            {
                Err(Error::Docker { source, .. })
                    if !exists && is_port_taken(&source) && tried.len() < PORT_ATTEMPTS =>
                {
                    tracing::info!(host = %self.name, container = %plan.name, ports = ?tried, "port taken at start; choosing another");
                    self.remove(&chosen.name).await?;
                }
                other => return other,
            }
        }
    }

    /// Host ports published by the engine's running containers (any service's).
    async fn used_ports(&self) -> Result<std::collections::HashSet<u16>> {
        let opts = ListContainersOptions {
            all: true,
            ..Default::default()
        };
        let list = quick(self.docker.list_containers(Some(opts)))
            .await
            .map_err(|e| Error::docker(&self.name, "list containers", e))?;
        Ok(list
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| p.public_port)
            .collect())
    }

    async fn create_and_start_as(
        &self,
        plan: &ContainerPlan,
        image_has_healthcheck: bool,
    ) -> Result<String> {
        let opts = CreateContainerOptions {
            name: Some(plan.name.clone()),
            ..Default::default()
        };
        // A name conflict is a killed run's container: reuse it. When that run died in the
        // middle of its create call, the daemon may still be creating the container (the name
        // is taken, inspect does not find it yet): ask again for a little while.
        let mut attempts = 0;
        let id = loop {
            match self
                .docker
                .create_container(Some(opts.clone()), plan.create_body(image_has_healthcheck))
                .await
            {
                Ok(r) => break r.id,
                Err(e) if is_conflict(&e) => match self.inspect(&plan.name).await? {
                    Some(c) => break c.id.unwrap_or_else(|| plan.name.clone()),
                    None if attempts < CREATE_CONFLICT_RETRIES => {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    None => {
                        return Err(Error::docker(
                            &self.name,
                            format!("create container {}", plan.name),
                            e,
                        ))
                    }
                },
                Err(e) => {
                    return Err(Error::docker(
                        &self.name,
                        format!("create container {}", plan.name),
                        e,
                    ))
                }
            }
        };
        match self
            .docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
        {
            Ok(()) => Ok(id),
            Err(e) if is_not_modified(&e) => Ok(id), // already running
            Err(e) => Err(Error::docker(
                &self.name,
                format!("start container {}", plan.name),
                e,
            )),
        }
    }

    /// Container inspect; `None` when it does not exist.
    pub async fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>> {
        let inspected = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>);
        match quick(inspected).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::docker(
                &self.name,
                format!("inspect container {id}"),
                e,
            )),
        }
    }

    /// The address proxies and probes connect to: with a target `address`, that address and
    /// the host port Docker published for the service `port`; otherwise the container's IP on
    /// `network` (or the default bridge) and the service port.
    pub async fn address(&self, id: &str, network: Option<&str>, port: u16) -> Result<SocketAddr> {
        let c = self.inspect(id).await?.ok_or_else(|| {
            Error::Inconsistent(format!("container {id} vanished on {}", self.name))
        })?;
        let Some(address) = &self.address else {
            return container_ip(&c, network)
                .map(|ip| SocketAddr::new(ip, port))
                .ok_or_else(|| {
                    Error::Inconsistent(format!(
                        "container {id} has no IP address on network {network:?}"
                    ))
                });
        };
        let published = published_port(&c, port).ok_or_else(|| {
            Error::Inconsistent(format!(
                "container {id} on {} has no host port published for {port}/tcp",
                self.name
            ))
        })?;
        // A DNS name is resolved once, here: proxies dial the registered IP.
        tokio::net::lookup_host((address.as_str(), published))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| {
                Error::Inconsistent(format!(
                    "address {address:?} of Docker host {} does not resolve",
                    self.name
                ))
            })
    }

    /// Changes a running container's limits in place (Engine API `POST /containers/{id}/update`):
    /// no restart. `None` leaves a limit as it is.
    pub async fn update_limits(
        &self,
        id: &str,
        memory: Option<i64>,
        memory_swap: Option<i64>,
        nano_cpus: Option<i64>,
    ) -> Result<()> {
        let body = bollard::models::ContainerUpdateBody {
            memory,
            memory_swap,
            nano_cpus,
            ..Default::default()
        };
        self.docker
            .update_container(id, body)
            .await
            .map_err(|e| Error::docker(&self.name, format!("update container {id}"), e))
    }

    /// The memory a container uses now (one stats sample), in bytes, as `docker stats` counts
    /// it: the cgroup's usage less its inactive page cache (which the kernel drops before it
    /// would OOM-kill). `None` when the engine does not say.
    pub async fn memory_usage(&self, id: &str) -> Result<Option<u64>> {
        let opts = bollard::query_parameters::StatsOptions {
            stream: false,
            one_shot: true,
        };
        let mut stats = std::pin::pin!(self.docker.stats(id, Some(opts)));
        let sample = quick(async { stats.next().await.transpose() })
            .await
            .map_err(|e| Error::docker(&self.name, format!("stats of {id}"), e))?;
        Ok(sample.and_then(|s| {
            let m = s.memory_stats?;
            let cache = m.stats.as_ref().and_then(|st| {
                // cgroup v2 names it `inactive_file`, v1 `total_inactive_file`.
                st.get("inactive_file")
                    .or_else(|| st.get("total_inactive_file"))
                    .copied()
            });
            Some(m.usage?.saturating_sub(cache.unwrap_or(0)))
        }))
    }

    /// The CPUs the engine's host has (`docker info`'s NCPU), if it says.
    pub async fn cpus(&self) -> Result<Option<u32>> {
        let info = quick(self.docker.info())
            .await
            .map_err(|e| Error::docker(&self.name, "info", e))?;
        Ok(info.ncpu.and_then(|n| u32::try_from(n).ok()))
    }

    /// Runs `cmd` inside the running container `id` (Docker's exec, as the container's user,
    /// with its environment) and waits for it, at most `timeout`: its exit code and its output
    /// (stdout then stderr as they came, the last 4 KiB).
    pub async fn exec(&self, id: &str, cmd: &[String], timeout: Duration) -> Result<(i64, String)> {
        let what = || {
            format!(
                "exec {:?} in {id}",
                cmd.first().cloned().unwrap_or_default()
            )
        };
        let config = bollard::models::ExecConfig {
            cmd: Some(cmd.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        const KEEP: usize = 4096;
        let run = async {
            let exec = self.docker.create_exec(id, config).await?;
            // Bytes, decoded once at the end: a character may straddle two chunks.
            let mut out: Vec<u8> = Vec::new();
            if let bollard::exec::StartExecResults::Attached { mut output, .. } =
                self.docker.start_exec(&exec.id, None).await?
            {
                while let Some(chunk) = output.next().await {
                    out.extend_from_slice(&chunk?.into_bytes());
                    if out.len() > 2 * KEEP {
                        out.drain(..out.len() - KEEP);
                    }
                }
            }
            let inspect = self.docker.inspect_exec(&exec.id).await?;
            Ok::<_, bollard::errors::Error>((inspect.exit_code.unwrap_or(-1), out))
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok((code, out))) => {
                let tail = &out[out.len().saturating_sub(KEEP)..];
                Ok((code, String::from_utf8_lossy(tail).into_owned()))
            }
            Ok(Err(e)) => Err(Error::docker(&self.name, what(), e)),
            Err(_) => Err(Error::docker(
                &self.name,
                format!("{} (no exit within {timeout:?})", what()),
                bollard::errors::Error::RequestTimeoutError,
            )),
        }
    }

    /// The last `lines` lines of stdout and stderr (best effort: an error becomes the text).
    pub async fn logs_tail(&self, id: &str, lines: usize) -> String {
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let mut stream = self.docker.logs(id, Some(opts));
        let mut out = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => out.push_str(&chunk.to_string()),
                Err(e) => {
                    out.push_str(&format!("(logs unavailable: {e})"));
                    break;
                }
            }
        }
        out
    }

    /// SIGTERM, up to `grace` for the process to exit, SIGKILL; then remove the container (and
    /// its anonymous volumes; named volumes stay). A container that is already gone is fine.
    pub async fn stop_and_remove(&self, id: &str, grace: Duration) -> Result<()> {
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        match self
            .docker
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(t),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) || is_not_modified(&e) => {}
            Err(e) => return Err(Error::docker(&self.name, format!("stop container {id}"), e)),
        }
        self.remove(id).await
    }

    /// Force-removes a container (kills it if running). Gone already is fine.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            // 404: gone; 409: removal already in progress.
            Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(()),
            Err(e) => Err(Error::docker(
                &self.name,
                format!("remove container {id}"),
                e,
            )),
        }
    }

    /// Our containers of `service` (running or not), optionally only those of one release.
    pub async fn find(&self, service: &str, release: Option<&str>) -> Result<Vec<Managed>> {
        let mut label = vec![
            format!("{}=haddock", labels::MANAGED_BY),
            format!("{}={service}", labels::SERVICE),
        ];
        if let Some(r) = release {
            label.push(format!("{}={r}", labels::RELEASE));
        }
        let opts = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), label)])),
            ..Default::default()
        };
        let list = quick(self.docker.list_containers(Some(opts)))
            .await
            .map_err(|e| Error::docker(&self.name, format!("list containers of {service}"), e))?;
        Ok(list
            .into_iter()
            .map(|c| {
                let l = c.labels.unwrap_or_default();
                let get = |k: &str| l.get(k).cloned().unwrap_or_default();
                Managed {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_string())
                        .unwrap_or_default(),
                    version: get(labels::VERSION),
                    release: get(labels::RELEASE),
                    instance: get(labels::INSTANCE),
                    running: c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING),
                }
            })
            .collect())
    }

    /// Streams `die`, `oom` and `health_status: unhealthy` events of the service's containers,
    /// or of one release's only. The stream ends when the connection to the daemon does.
    pub fn events(
        &self,
        service: &str,
        release: Option<&str>,
    ) -> impl Stream<Item = ContainerEvent> + Send + 'static {
        // Release ids are only unique within one locator: match the service too (Docker ANDs
        // label filters), or another service's release with the same id leaks in.
        let mut label = vec![
            format!("{}=haddock", labels::MANAGED_BY),
            format!("{}={service}", labels::SERVICE),
        ];
        if let Some(release) = release {
            label.push(format!("{}={release}", labels::RELEASE));
        }
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), label),
            (
                "event".to_string(),
                vec![
                    "die".to_string(),
                    "oom".to_string(),
                    "health_status".to_string(),
                ],
            ),
        ]);
        // `since` now: the request is only sent when the stream is first polled, and events
        // between this call and then must not be lost.
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let opts = EventsOptions {
            filters: Some(filters),
            since: Some(since.to_string()),
            ..Default::default()
        };
        self.docker
            .events(Some(opts))
            .take_while(|e| std::future::ready(e.is_ok()))
            .filter_map(|e| {
                std::future::ready(e.ok().and_then(|ev| {
                    let action = ev.action.unwrap_or_default();
                    if action.starts_with("health_status") && !action.ends_with("unhealthy") {
                        return None;
                    }
                    let actor = ev.actor.unwrap_or_default();
                    let attrs = actor.attributes.unwrap_or_default();
                    Some(ContainerEvent {
                        action,
                        container: actor.id.unwrap_or_default(),
                        instance: attrs.get(labels::INSTANCE).cloned().unwrap_or_default(),
                        exit_code: attrs.get("exitCode").cloned(),
                    })
                }))
            })
    }
}

/// A small engine call bounded by [`QUICK_CALL`] (then bollard's own timeout error).
async fn quick<T>(
    call: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, bollard::errors::Error> {
    tokio::time::timeout(QUICK_CALL, call)
        .await
        .unwrap_or(Err(bollard::errors::Error::RequestTimeoutError))
}

/// The host port Docker published for the container's `port`/tcp (the first binding: with
/// IPv6 enabled there is one per address family, on the same port).
pub fn published_port(c: &ContainerInspectResponse, port: u16) -> Option<u16> {
    c.network_settings
        .as_ref()?
        .ports
        .as_ref()?
        .get(&format!("{port}/tcp"))?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.as_deref()?.parse().ok())
}

/// The container's IP on `network` (or on whatever network it has when `None`).
pub fn container_ip(c: &ContainerInspectResponse, network: Option<&str>) -> Option<IpAddr> {
    let settings = c.network_settings.as_ref()?;
    let from_endpoint =
        |e: &EndpointSettings| e.ip_address.as_deref().and_then(|ip| ip.parse().ok());
    let networks = settings.networks.as_ref();
    match network {
        Some(n) => networks?.get(n).and_then(from_endpoint),
        None => settings
            .ip_address
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .or_else(|| networks?.values().find_map(from_endpoint)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{NetworkSettings, PortBinding};

    fn with_ports(ports: Vec<(&str, Option<Vec<PortBinding>>)>) -> ContainerInspectResponse {
        ContainerInspectResponse {
            network_settings: Some(NetworkSettings {
                ports: Some(ports.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn binding(ip: &str, port: &str) -> PortBinding {
        PortBinding {
            host_ip: Some(ip.into()),
            host_port: Some(port.into()),
        }
    }

    #[test]
    fn free_ports_skip_the_used_ones_and_stay_in_range() {
        let none = std::collections::HashSet::new();
        let a = free_port("svc-1-r-h0-i0", &none).unwrap();
        assert!(PUBLISH_PORTS.contains(&a));
        assert_eq!(
            free_port("svc-1-r-h0-i0", &none),
            Some(a),
            "stable for a name"
        );
        let used: std::collections::HashSet<u16> = [a, a.wrapping_add(1)].into();
        let b = free_port("svc-1-r-h0-i0", &used).unwrap();
        assert!(PUBLISH_PORTS.contains(&b) && !used.contains(&b));
        let all: std::collections::HashSet<u16> = PUBLISH_PORTS.collect();
        assert_eq!(free_port("x", &all), None);
    }

    #[test]
    fn the_published_port_is_read_from_inspect() {
        let c = with_ports(vec![
            ("9000/tcp", Some(vec![binding("0.0.0.0", "1111")])),
            (
                "8080/tcp",
                Some(vec![binding("0.0.0.0", "49153"), binding("::", "49153")]),
            ),
        ]);
        assert_eq!(published_port(&c, 8080), Some(49153));
        assert_eq!(published_port(&c, 9000), Some(1111));
        // Exposed but not published, or not there at all.
        let c = with_ports(vec![("8080/tcp", None)]);
        assert_eq!(published_port(&c, 8080), None);
        assert_eq!(published_port(&c, 8081), None);
        assert_eq!(
            published_port(&ContainerInspectResponse::default(), 8080),
            None
        );
    }
}
