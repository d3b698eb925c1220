//! The deploy spec: how one service is released (`deploy-specs/<service>.toml`).
//!
//! [`Spec::load`] is the only way in: it parses with serde + toml (unknown keys rejected),
//! then runs every semantic rule in [`validate`], and reports each problem as
//! `file:line:col: key.path: what was expected`. Nothing is touched before a spec loads.
//! Every key, its default and an example are in docs/spec-reference.md.

mod source;
mod validate;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use source::SourceMap;

/// A validated deploy spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub service: ServiceSection,
    #[serde(default)]
    pub container: ContainerSection,
    pub health: HealthSection,
    pub rollout: RolloutSection,
    pub sessions: SessionsSection,
    /// Docker hosts to run instances on; one local instance when omitted.
    #[serde(default = "default_targets")]
    pub targets: Vec<Target>,
    /// Long-lived companions beside the service on its hosts (`haddock accessory`).
    #[serde(default)]
    pub accessories: Vec<Accessory>,
    /// Commands run around a release (`crate::hooks`).
    #[serde(default)]
    pub hooks: HooksSection,
}

/// `[hooks]`: commands (program and arguments, no shell) run with the release's facts in
/// `HADDOCK_*` variables. `pre_release` can stop a release; the others only report.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksSection {
    /// After the checks, before anything changes; a failure stops the release (exit 2).
    #[serde(default)]
    pub pre_release: Vec<String>,
    /// After each canary weight is applied (`HADDOCK_WEIGHT`).
    #[serde(default)]
    pub post_step: Vec<String>,
    /// After the release is done (old version removed).
    #[serde(default)]
    pub post_release: Vec<String>,
    /// After a rollback (`HADDOCK_REASON`).
    #[serde(default)]
    pub post_rollback: Vec<String>,
    /// Longest a hook may run before it is killed (and, for `pre_release`, fails).
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HooksSection {
    fn default() -> Self {
        HooksSection {
            pre_release: Vec::new(),
            post_step: Vec::new(),
            post_release: Vec::new(),
            post_rollback: Vec::new(),
            timeout: default_hook_timeout(),
        }
    }
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub name: String,
    /// Image repository without tag; the tag comes at release time.
    pub image: String,
    /// How `image:TAG` gets onto every target host (`local`, `copy` or `registry`).
    #[serde(default)]
    pub image_source: ImageSource,
    /// Port the service listens on inside the container.
    pub port: u16,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Arguments passed to the image's entrypoint (`{port}` and `{instance}` are substituted).
    #[serde(default)]
    pub args: Vec<String>,
    /// Host names users reach the service by, at a proxy that carries several services
    /// (`*.example.com` covers one label). Empty: only a proxy carrying it alone (or as its
    /// default) serves it.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path prefix of the service at those hosts (`/api`; whole segments).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Plain-HTTP requests for the service get a 308 to HTTPS from every proxy that serves
    /// HTTPS, whatever that proxy's `--redirect-https`.
    #[serde(default)]
    pub redirect_https: bool,
    /// `Strict-Transport-Security` max-age on the service's answers over HTTPS (`"365d"`; at
    /// most two years), in place of the proxy's `--hsts-max-age`. Unset: the proxy's.
    #[serde(default, with = "humantime_serde")]
    pub hsts_max_age: Option<Duration>,
}

impl ServiceSection {
    /// The routes the locator is given for this service.
    pub fn routes(&self) -> locator_wire::api::Routes {
        locator_wire::api::Routes {
            hosts: self.hosts.clone(),
            path_prefix: self.path_prefix.clone(),
            redirect_https: self.redirect_https,
            hsts_max_age_s: self.hsts_max_age.map(|d| d.as_secs()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSection {
    /// Memory cap, e.g. "512MiB".
    #[serde(default = "default_memory")]
    pub memory: bytesize::ByteSize,
    /// Relative CPU weight (Docker's `CpuShares`, 2..=262144).
    #[serde(default = "default_cpu_shares")]
    pub cpu_shares: u32,
    /// `no`, `always`, `unless-stopped` or `on-failure:N`.
    #[serde(default = "default_restart")]
    pub restart: String,
    /// Docker network the containers join (the proxy must reach them on it).
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Seconds between SIGTERM and SIGKILL when an instance is stopped.
    #[serde(default = "default_stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// DNS servers of the instances (Docker's `--dns`): IP addresses, or `accessory:NAME` for
    /// an accessory's fixed `ip`. On a user-defined network Docker's embedded DNS still
    /// answers container names and forwards every other lookup to these.
    #[serde(default)]
    pub dns: Vec<String>,
    /// A command haddock runs *inside* each instance being replaced on a host once the
    /// replacing instances there take every new session (after the promotion; after an abort
    /// past it, inside the new instances, the old ones replacing them): the moment a stateful
    /// service hands a role over (the optimizer: its cache volume's writer), while both still
    /// run. `{successors}` becomes the replacing instances' ids on that host, comma-separated;
    /// `{port}` the service port. A failure is reported and the release goes on: stopping the
    /// old instance later hands the role over the slow way. Empty: nothing is run.
    #[serde(default)]
    pub handover: Vec<String>,
}

impl Default for ContainerSection {
    fn default() -> Self {
        ContainerSection {
            memory: default_memory(),
            cpu_shares: default_cpu_shares(),
            restart: default_restart(),
            network: None,
            volumes: Vec::new(),
            stop_grace: default_stop_grace(),
            dns: Vec::new(),
            handover: Vec::new(),
        }
    }
}

/// A companion container beside the service (`[[accessories]]`, what Kamal calls an
/// accessory): one per host it runs on, started, replaced and removed by `haddock accessory`,
/// never by a release, so a release leaves it running untouched.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accessory {
    /// DNS label, unique in the spec; the container is `SERVICE-NAME-hI` on target I.
    pub name: String,
    /// Full image reference with its tag (`repo:tag`): an accessory is not released by tag.
    pub image: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Published ports, `HOST:CONTAINER` or `HOST:CONTAINER/udp` (on every host address).
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<AccessoryVolume>,
    #[serde(default = "default_accessory_memory")]
    pub memory: bytesize::ByteSize,
    #[serde(default = "default_restart")]
    pub restart: String,
    /// Docker network it joins; the service's `container.network` when unset.
    #[serde(default)]
    pub network: Option<String>,
    /// Fixed IPv4 address on that network: kept across `reboot`, and what `accessory:NAME`
    /// in `container.dns` means. Docker gives fixed addresses only on a network created with
    /// a subnet (`docker network create --subnet`).
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// The targets (their `host`) it runs on; every target when empty.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "default_stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
}

/// A named volume an accessory mounts (made by Docker when missing, like `docker run -v`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessoryVolume {
    pub name: String,
    pub mount: String,
    #[serde(default)]
    pub read_only: bool,
}

impl Accessory {
    /// The network it joins: its own, else the service's.
    pub fn network<'a>(&'a self, spec: &'a Spec) -> Option<&'a str> {
        self.network
            .as_deref()
            .or(spec.container.network.as_deref())
    }

    /// Whether it runs on target `host` (a target's `host` string).
    pub fn runs_on(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }

    pub fn restart_policy(&self) -> RestartPolicy {
        self.restart.parse().unwrap_or(RestartPolicy::No)
    }
}

/// A published accessory port, `HOST:CONTAINER[/tcp|/udp]` → `(host, container, protocol)`.
pub fn parse_port(s: &str) -> Result<(u16, u16, &str), String> {
    let (ports, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let parsed = ports
        .split_once(':')
        .and_then(|(h, c)| Some((h.parse::<u16>().ok()?, c.parse::<u16>().ok()?)));
    match parsed {
        Some((h, c)) if h > 0 && c > 0 && matches!(proto, "tcp" | "udp") => Ok((h, c, proto)),
        _ => Err(format!(
            "{s:?} is not a published port (HOST:CONTAINER or HOST:CONTAINER/udp, ports 1..=65535)"
        )),
    }
}

impl Spec {
    /// The accessory called `name`.
    pub fn accessory(&self, name: &str) -> Option<&Accessory> {
        self.accessories.iter().find(|a| a.name == name)
    }

    /// `container.dns` as addresses (`accessory:NAME` replaced by that accessory's `ip`); a
    /// loaded spec has an `ip` for every accessory it names there.
    pub fn dns_servers(&self) -> Vec<String> {
        self.container
            .dns
            .iter()
            .filter_map(|d| match d.strip_prefix("accessory:") {
                Some(name) => self.accessory(name)?.ip.map(|ip| ip.to_string()),
                None => Some(d.clone()),
            })
            .collect()
    }

    /// The accessories `container.dns` names: they must run before an instance starts.
    pub fn dns_accessories(&self) -> Vec<&Accessory> {
        self.container
            .dns
            .iter()
            .filter_map(|d| self.accessory(d.strip_prefix("accessory:")?))
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// Named Docker volume (shared by the old and the new version).
    pub name: String,
    /// Absolute mount point inside the container.
    pub mount: String,
    /// Volume driver a missing volume is created with (Docker's default, `local`, when unset).
    #[serde(default)]
    pub driver: Option<String>,
    /// Driver options a missing volume is created with (`docker volume create --opt`).
    #[serde(default)]
    pub driver_opts: BTreeMap<String, String>,
    /// Capacity. Only the local driver can enforce one here: haddock creates the volume as a
    /// tmpfs of this size (memory-backed; see docs/spec-reference.md for what that costs).
    #[serde(default)]
    pub size: Option<bytesize::ByteSize>,
    /// Mounted read-only into every instance.
    #[serde(default)]
    pub read_only: bool,
}

impl VolumeMount {
    /// Whether the spec says how the volume is made (driver, options or size). A volume that
    /// says nothing accepts whatever volume of that name exists, as before these keys existed.
    pub fn declares_creation(&self) -> bool {
        self.driver.is_some() || !self.driver_opts.is_empty() || self.size.is_some()
    }

    /// The driver a missing volume is created with.
    pub fn driver(&self) -> &str {
        self.driver.as_deref().unwrap_or("local")
    }

    /// The driver options a missing volume is created with: the spec's, or for a `size` the
    /// local driver's tmpfs options (the only way it enforces a capacity).
    pub fn creation_opts(&self) -> BTreeMap<String, String> {
        match self.size {
            Some(size) => BTreeMap::from([
                ("type".to_string(), "tmpfs".to_string()),
                ("device".to_string(), "tmpfs".to_string()),
                ("o".to_string(), format!("size={}", size.as_u64())),
            ]),
            None => self.driver_opts.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// HTTP readiness path, e.g. "/readyz".
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes before an instance counts as healthy.
    #[serde(default = "one")]
    pub rise: u32,
    /// Consecutive failures before an instance counts as unhealthy.
    #[serde(default = "three")]
    pub fall: u32,
    /// An instance not healthy by then has failed to start.
    #[serde(with = "humantime_serde")]
    pub start_deadline: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    pub steps: Vec<Step>,
    #[serde(default)]
    pub analysis: Analysis,
    #[serde(default = "yes")]
    pub auto_rollback: bool,
    /// When true the release waits for `haddock promote` after the last canary step.
    #[serde(default)]
    pub manual: bool,
    /// Hosts that start their new instances at once: a batch starts and passes the health gate
    /// before the next batch starts. 0 (the default) starts every host at once.
    #[serde(default)]
    pub max_parallel_hosts: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Percentage of new sessions sent to the new version (u32 so that 150 gets a clear error).
    pub weight: u32,
    /// Bake time at this weight while the analysis watches.
    #[serde(default, with = "humantime_serde")]
    pub pause: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// Highest tolerated share of 5xx answers of the new version (0.0..=1.0).
    #[serde(default = "default_max_5xx")]
    pub max_5xx_ratio: f64,
    /// Highest tolerated p99 latency of the new version.
    #[serde(default = "default_max_p99", with = "humantime_serde")]
    pub max_p99: Duration,
    /// Requests the new version must have served before it is judged.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Against the stable version over the same window: the new version's 5xx ratio may exceed
    /// the stable one's by at most this much (0.01 = one percentage point). Off when unset.
    #[serde(default)]
    pub max_5xx_over_stable: Option<f64>,
    /// Against the stable version over the same window: the new version's p99 may be at most
    /// this many times the stable one's (≥ 1.0). Off when unset.
    #[serde(default)]
    pub max_p99_vs_stable: Option<f64>,
    /// A bake that ends before the new version served `min_requests` is inconclusive: it is
    /// first extended by this much (0: not extended) while traffic may still come.
    #[serde(default, with = "humantime_serde")]
    pub extend_inconclusive: Duration,
    /// What an inconclusive bake does after its extension.
    #[serde(default)]
    pub on_inconclusive: OnInconclusive,
    /// After the promotion, the new version is judged this long more (same limits) while the
    /// old one drains: a breach sends users back to the old version while it still runs.
    /// 0 (the default): not judged after the promotion.
    #[serde(default, with = "humantime_serde")]
    pub post_promotion: Duration,
    /// The Prometheus server the `prometheus` checks query (`http://host:9090`).
    #[serde(default)]
    pub prometheus: Option<String>,
    /// Checks each canary step must pass besides the proxies' figures.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// A custom check of a canary step (`[[rollout.analysis.checks]]`): an HTTP URL that must
/// answer 2xx (and, with `json_pointer`, hold a number within bounds), or a Prometheus query
/// whose every value must lie within bounds. It is measured every `interval` of each bake;
/// `failure_limit` failures in a row roll the release back, and a step only ends well when the
/// check's latest measurement passed. `{service}`, `{version}` (the new one), `{old_version}`
/// and `{weight}` are replaced in the URL and the query; `{instance}` (host:port of a new
/// instance) makes an HTTP check measure every new instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default)]
    pub prometheus: Option<String>,
    /// With `http`: the JSON field (RFC 6901 pointer, `/cache/hit_ratio`) that must be a number
    /// within `min`/`max`.
    #[serde(default)]
    pub json_pointer: Option<String>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_failure_limit")]
    pub failure_limit: u32,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_failure_limit() -> u32 {
    2
}

/// What a canary step does when its bake (and extension) ended without enough traffic to
/// judge the new version (`rollout.analysis.on_inconclusive`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInconclusive {
    /// Go on to the next step (what every release did before the key existed), saying so.
    #[default]
    Pass,
    /// Pause the release for an operator: `haddock resume` goes on, `promote` or `abort` decide.
    Pause,
    /// Roll the release back: a version nobody could judge does not reach more users.
    Fail,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            max_5xx_ratio: default_max_5xx(),
            max_p99: default_max_p99(),
            min_requests: default_min_requests(),
            max_5xx_over_stable: None,
            max_p99_vs_stable: None,
            extend_inconclusive: Duration::ZERO,
            on_inconclusive: OnInconclusive::Pass,
            post_promotion: Duration::ZERO,
            prometheus: None,
            checks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsSection {
    #[serde(default = "default_cookie")]
    pub cookie: String,
    /// A session idle for longer than this has expired.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// Old instances are removed after this even if sessions remain.
    #[serde(with = "humantime_serde")]
    pub max_drain: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `unix:///var/run/docker.sock` or `tcp://host:port`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Instances of the service on this host.
    #[serde(default = "one")]
    pub instances: u32,
    /// TLS files for `tcp://` hosts.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// The address (IP or DNS name, no port) by which proxies on other hosts and haddock reach
    /// this host's instances. Set: the service port is published on an ephemeral port of the
    /// host and each instance registers at `address:published-port`. Unset: the container's
    /// IP on the spec's network, reachable only from the same host (a proxy there).
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How a release's image reaches the target hosts (docs/spec-reference.md, `image_source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSource {
    /// Every target must already hold `image:TAG` (built or loaded there); the default, and
    /// what every spec meant before the key existed.
    #[default]
    Local,
    /// Targets that lack `image:TAG` get it from one that has it (or from the engine of the
    /// machine haddock runs on), exported and imported through the Engine API.
    Copy,
    /// Every target pulls `image:TAG` from the registry `image` names (Engine API
    /// `POST /images/create`), with credentials from the environment or a Docker config file.
    Registry,
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageSource::Local => "local",
            ImageSource::Copy => "copy",
            ImageSource::Registry => "registry",
        })
    }
}

/// A container restart policy, parsed from the spec's string form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    No,
    Always,
    UnlessStopped,
    OnFailure(u32),
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(RestartPolicy::No),
            "always" => Ok(RestartPolicy::Always),
            "unless-stopped" => Ok(RestartPolicy::UnlessStopped),
            _ => match s.strip_prefix("on-failure:").map(str::parse::<u32>) {
                Some(Ok(n)) if n >= 1 => Ok(RestartPolicy::OnFailure(n)),
                _ => Err(format!(
                    "{s:?} is not a restart policy (expected \"no\", \"always\", \"unless-stopped\" or \"on-failure:N\" with N >= 1)"
                )),
            },
        }
    }
}

impl ContainerSection {
    /// The restart policy; always valid on a loaded spec.
    pub fn restart_policy(&self) -> RestartPolicy {
        self.restart.parse().unwrap_or(RestartPolicy::No)
    }
}

/// One problem in a spec, positioned in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecIssue {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// Dotted key path, e.g. `rollout.steps[1].weight` (empty for syntax errors).
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for SpecIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.col)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a spec could not be loaded: every problem found, one per line.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read spec {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<SpecIssue>),
}

impl Spec {
    /// Reads, parses and validates a spec file.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Spec::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates spec text; `file` is only used in messages.
    pub fn parse(file: &str, text: &str) -> Result<Spec, SpecError> {
        let map = SourceMap::new(text);
        let issue = |span: Option<std::ops::Range<usize>>, path: String, message: String| {
            let (line, col) = map.line_col(span.map_or(0, |s| s.start));
            SpecIssue {
                file: file.to_string(),
                line,
                col,
                path,
                message,
            }
        };
        let spec: Spec = toml::from_str(text).map_err(|e| {
            let mut span = e.span();
            let mut path = span
                .as_ref()
                .and_then(|s| map.path_at(s.start))
                .unwrap_or_default()
                .to_string();
            // serde reports an unknown key at its table; point at the key itself instead.
            let unknown = e
                .message()
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next());
            if let Some(key) = unknown {
                let key_path = if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                if let Some(key_span) = map.span_of_exact(&key_path) {
                    (span, path) = (Some(key_span), key_path);
                }
            }
            // The toml parser has an empty message for some syntax errors (a lone carriage
            // return, found by the `deploy_spec` fuzz target): never show a bare position.
            let message = match e.message().trim() {
                "" => "invalid TOML syntax".to_string(),
                m => m.to_string(),
            };
            SpecError::Invalid(vec![issue(span, path, message)])
        })?;
        let problems = validate::check(&spec);
        if problems.is_empty() {
            return Ok(spec);
        }
        Err(SpecError::Invalid(
            problems
                .into_iter()
                .map(|(path, message)| issue(map.span_of(&path), path, message))
                .collect(),
        ))
    }

    /// `repo:tag` for a release of `version` (a redeploy's `1.1.0+2` runs image tag `1.1.0`).
    pub fn image_ref(&self, version: &str) -> String {
        format!("{}:{}", self.service.image, image_tag(version))
    }
}

/// The image tag a version runs: the version itself, or for a redeploy (`1.1.0+2`, see
/// `haddock release --redeploy`) the part before `+`. Docker tags cannot hold a `+`, so a
/// version with one is never mistaken for a tag, and weights, labels and instance names can
/// tell the redeploy's containers from the ones it replaces.
pub fn image_tag(version: &str) -> &str {
    version.split_once('+').map_or(version, |(tag, _)| tag)
}

/// The redeploy number of `version` when it is a redeploy of `tag` (`1.1.0+2` of `1.1.0` → 2;
/// `1.1.0` itself → 0), else `None`.
pub fn redeploy_number(version: &str, tag: &str) -> Option<u32> {
    match version.split_once('+') {
        None => (version == tag).then_some(0),
        Some((t, n)) if t == tag => n.parse().ok(),
        Some(_) => None,
    }
}

/// The shipped example spec, shared by the unit tests of every module.
#[cfg(test)]
pub(crate) const EXAMPLE: &str = include_str!("../../../deploy-specs/optimizer.toml");

/// [`EXAMPLE`], parsed.
#[cfg(test)]
pub(crate) fn example() -> Spec {
    Spec::parse("optimizer.toml", EXAMPLE).unwrap()
}

fn default_targets() -> Vec<Target> {
    vec![Target {
        host: default_host(),
        instances: 1,
        tls: None,
        address: None,
    }]
}
fn default_host() -> String {
    "unix:///var/run/docker.sock".into()
}
fn default_memory() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(512)
}
fn default_accessory_memory() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(64)
}
fn default_cpu_shares() -> u32 {
    1024
}
fn default_restart() -> String {
    "unless-stopped".into()
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_max_5xx() -> f64 {
    0.01
}
fn default_max_p99() -> Duration {
    Duration::from_millis(500)
}
fn default_min_requests() -> u64 {
    50
}
fn default_cookie() -> String {
    "haddock_session".into()
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}
fn yes() -> bool {
    true
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn a_redeploy_runs_the_image_of_its_tag() {
        assert_eq!(image_tag("1.1.0"), "1.1.0");
        assert_eq!(image_tag("1.1.0+3"), "1.1.0");
        assert_eq!(example().image_ref("1.1.0+3"), "haddock/optimizer:1.1.0");
    }

    #[test]
    fn redeploy_numbers_count_only_redeploys_of_the_same_tag() {
        assert_eq!(redeploy_number("1.1.0", "1.1.0"), Some(0));
        assert_eq!(redeploy_number("1.1.0+12", "1.1.0"), Some(12));
        assert_eq!(redeploy_number("1.1.0+x", "1.1.0"), None);
        assert_eq!(redeploy_number("1.1.0+1", "1.1"), None);
        assert_eq!(redeploy_number("1.1.00", "1.1.0"), None);
    }
}
