//! The locator's wire types: what haddock writes, what proxies and dashboards read.
//!
//! These types are the contract between the three programs, so they live here and the other
//! crates depend on `locator` for them (see docs/architecture.md). Everything is plain serde
//! JSON; unknown fields are rejected on input so that a typo in a client fails loudly.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One monotonic counter bumped by every committed write; watchers resume from it.
pub type Revision = u64;

/// Milliseconds since the Unix epoch (what every timestamp on the wire is).
pub type UnixMillis = u64;

/// Period of the empty keep-alive line on watch streams. Clients treat three missed ones as a
/// dead locator ([`crate::client::Client::with_watch_silence`]).
pub const WATCH_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// Session settings of a service (from the deploy spec's `[sessions]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// Name of the sticky-session cookie the proxy sets.
    pub cookie_name: String,
    /// A session idle for longer than this has expired.
    pub idle_ttl_ms: u64,
    /// Upper bound on how long a draining instance is kept for its sessions.
    pub max_drain_ms: u64,
}

/// Body of `PUT /v1/services/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub sessions: SessionSettings,
    /// Where users reach the service through a proxy carrying several services.
    #[serde(default, skip_serializing_if = "Routes::is_empty")]
    pub routes: Routes,
}

/// The requests of a service, among the services one proxy carries (the deploy spec's
/// `[service] hosts` and `path_prefix`): a request is the service's when its host is one of
/// `hosts` (`*.example.com`: any one label before it) and its path starts with `path_prefix`.
/// Empty: the service is reached only through a proxy that carries it alone or as its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    /// Host names, lower case, without port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// A path prefix (`/api`), matched on whole segments; `None`: every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Plain-HTTP requests for the service are answered with a 308 to the same URL over
    /// HTTPS, by every proxy that serves HTTPS (a proxy's `--redirect-https` does it for all
    /// of its services).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redirect_https: bool,
    /// `Strict-Transport-Security: max-age=N` on the service's answers over HTTPS, in place
    /// of the proxy's `--hsts-max-age`; `None`: the proxy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts_max_age_s: Option<u64>,
}

/// Whether `name` is a DNS host name: labels of 1 to 63 letters, digits and hyphens, none
/// starting or ending with a hyphen, 253 characters at most.
pub fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

/// Host names a service may declare at most (each is matched per request at the proxies).
pub const MAX_ROUTE_HOSTS: usize = 32;

/// The longest HSTS max-age a service may ask for: two years of 365.25 days, as a spec's `"2y"`
/// reads (a larger figure is more likely milliseconds given for seconds than a policy, and a
/// browser keeps it that long).
pub const MAX_HSTS_MAX_AGE_S: u64 = 2 * 31_557_600;

impl Routes {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.path_prefix.is_none()
            && !self.redirect_https
            && self.hsts_max_age_s.is_none()
    }

    /// The routes checked and normalised, or what is wrong with them (the locator's rule, which
    /// haddock also applies to a spec): hosts are DNS names, or `*.` and one, lower case, each
    /// once; the path prefix starts with `/`, has no empty, `.` or `..` segment and no trailing
    /// `/` (`/` alone means every path: no prefix); the HSTS max-age is at most
    /// [`MAX_HSTS_MAX_AGE_S`].
    pub fn checked(&self) -> Result<Routes, String> {
        if let Some(age) = self.hsts_max_age_s.filter(|a| *a > MAX_HSTS_MAX_AGE_S) {
            return Err(format!(
                "hsts_max_age: at most {MAX_HSTS_MAX_AGE_S} seconds (two years), not {age}"
            ));
        }
        if self.hosts.len() > MAX_ROUTE_HOSTS {
            return Err(format!(
                "hosts: at most {MAX_ROUTE_HOSTS}, not {}",
                self.hosts.len()
            ));
        }
        let mut hosts: Vec<String> = Vec::new();
        for host in &self.hosts {
            let lower = host.to_ascii_lowercase();
            if !is_dns_name(lower.strip_prefix("*.").unwrap_or(&lower)) {
                return Err(format!(
                    "hosts: `{host}` is not a host name (letters, digits, hyphens; `*.` may start it)"
                ));
            }
            if !hosts.contains(&lower) {
                hosts.push(lower);
            }
        }
        let path_prefix = match self.path_prefix.as_deref() {
            None | Some("/") => None,
            Some(p) => {
                let ok = p.len() <= 256
                    && p.starts_with('/')
                    && p[1..].split('/').all(|seg| {
                        !seg.is_empty()
                            && seg != "."
                            && seg != ".."
                            && seg
                                .bytes()
                                .all(|c| c.is_ascii_graphic() && c != b'?' && c != b'#')
                    });
                if !ok {
                    return Err(format!(
                        "path_prefix: `{p}` is not a path like /api (no trailing /, no empty, . or .. segment)"
                    ));
                }
                Some(p.to_string())
            }
        };
        Ok(Routes {
            hosts,
            path_prefix,
            redirect_https: self.redirect_https,
            hsts_max_age_s: self.hsts_max_age_s,
        })
    }

    /// Whether a request for `host` (lower case, no port) and `path` is the service's: the host
    /// is one of the hosts (a wildcard covers one label), and the path is the prefix or under it.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        let host_ok = self.hosts.iter().any(|h| match h.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => h == host,
        });
        host_ok
            && self.path_prefix.as_deref().is_none_or(|p| {
                path.strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    }
}

/// A service as the locator holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub sessions: SessionSettings,
    /// Share of *new sessions* per version, summing to 100 (empty until a version is ready).
    pub weights: BTreeMap<String, u8>,
    /// The version that owns 100 % outside a release: where orphaned sessions go.
    pub primary_version: Option<String>,
    /// Revision of the last write to this service (what `If-Match` compares against).
    pub revision: Revision,
    /// In-place limit changes of its instances (`haddock update`), oldest first, the last
    /// [`LIMIT_CHANGES_KEPT`] only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limit_changes: Vec<LimitsChange>,
    /// The deploy lock (`haddock lock acquire`): while it is held the locator refuses new
    /// releases of the service (409 `service_locked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<DeployLock>,
    /// Its host names and path prefix at a proxy carrying several services.
    #[serde(default, skip_serializing_if = "Routes::is_empty")]
    pub routes: Routes,
}

/// Body of `PUT /v1/services/{name}/lock`: who takes the service's deploy lock, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLock {
    pub who: String,
    pub message: String,
}

/// A held deploy lock: a [`NewLock`] and when the locator took it. Accepts unknown fields, as
/// everything that travels inside [`Service`] does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployLock {
    pub who: String,
    pub message: String,
    pub at: UnixMillis,
}

/// How many [`LimitsChange`]s a service keeps.
pub const LIMIT_CHANGES_KEPT: usize = 20;

/// Body of `POST /v1/services/{name}/limits`: who changed the memory or CPU limits of which
/// running instances, from what to what. The change itself is Docker's (haddock applies it on
/// the hosts first); the locator keeps the record, so that `status`, `history` and the
/// dashboard show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLimitsChange {
    pub who: String,
    pub instances: Vec<InstanceLimits>,
}

/// One entry of [`Service::limit_changes`]: a [`NewLimitsChange`] and when the locator took
/// it. Unknown fields are accepted here and in [`InstanceLimits`] (unlike in request bodies):
/// these travel inside `Service`, in snapshots and watch events, and a field added later must
/// not make an older proxy or haddock drop the whole routing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsChange {
    pub at: UnixMillis,
    pub who: String,
    pub instances: Vec<InstanceLimits>,
}

/// One instance's limits before and after a limits change (`None`: that limit unchanged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceLimits {
    pub id: String,
    /// Memory cap in bytes (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_to: Option<u64>,
    /// CPU limit in billionths of a CPU (Docker's `NanoCpus`; 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nano_cpus_from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nano_cpus_to: Option<u64>,
}

/// Body of `PUT /v1/services/{name}/weights` (with `If-Match: <revision>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsUpdate {
    pub weights: BTreeMap<String, u8>,
    /// Set when this write also makes a version the primary (promotion, rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_version: Option<String>,
}

/// The lifecycle of one instance (one container of one version).
///
/// ```text
/// starting  → ready | unhealthy | gone
/// ready     → draining | unhealthy | gone
/// unhealthy → ready | draining | gone     (ready: heartbeats resume after a silence)
/// draining  → ready | unhealthy | gone    (ready: a release aborted after its promotion)
/// gone      → nothing: a removed instance is history (its id may register anew)
/// ```
/// Legal moves are exactly those in [`InstanceState::can_become`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Ready,
    Unhealthy,
    Draining,
    Gone,
}

impl InstanceState {
    /// Whether `self → next` is a legal transition. Staying in the same state is not a
    /// transition (callers treat it as a no-op, which keeps retries idempotent).
    pub fn can_become(self, next: InstanceState) -> bool {
        use InstanceState::*;
        matches!(
            (self, next),
            (Starting, Ready | Unhealthy | Gone)
                | (Ready, Draining | Unhealthy | Gone)
                | (Unhealthy, Ready | Draining | Gone)
                // Back to ready: a release aborted after promotion returns users to the old
                // version while its containers still run.
                | (Draining, Ready | Gone | Unhealthy)
        )
    }

    /// Whether a proxy may send *new* sessions here.
    pub fn accepts_new_sessions(self) -> bool {
        self == InstanceState::Ready
    }

    /// Whether a proxy keeps existing sessions here.
    pub fn keeps_sessions(self) -> bool {
        matches!(self, InstanceState::Ready | InstanceState::Draining)
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Draining => "draining",
            InstanceState::Gone => "gone",
        };
        f.write_str(s)
    }
}

/// Body of `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterInstance {
    pub id: String,
    pub service: String,
    pub version: String,
    /// `host:port` the proxy connects to.
    pub address: String,
    #[serde(default)]
    pub docker_host: String,
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Initial state; `starting` unless the caller already checked health.
    #[serde(default = "starting")]
    pub state: InstanceState,
}

fn starting() -> InstanceState {
    InstanceState::Starting
}

/// Body of `PUT /v1/instances/{id}/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateChange {
    pub state: InstanceState,
}

/// Live load of one instance, summed over every proxy that reported recently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceLoad {
    pub live_sessions: u64,
    pub in_flight: u64,
}

/// An instance as the locator holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub service: String,
    pub version: String,
    pub address: String,
    pub docker_host: String,
    pub container_id: String,
    pub labels: BTreeMap<String, String>,
    pub state: InstanceState,
    pub registered_at: UnixMillis,
    pub last_heartbeat: UnixMillis,
    /// Sum of the proxies' reports (zero when no proxy reports).
    pub load: InstanceLoad,
}

/// Cumulative traffic figures of one version as seen by one proxy since it started.
/// Haddock's canary analysis works on the difference between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionTraffic {
    pub requests: u64,
    pub responses_5xx: u64,
    /// p99 latency over the proxy's recent window, in milliseconds.
    pub p99_ms: f64,
}

/// Body of `POST /v1/sessions` (role `proxy`): one proxy's view, sent every second and on change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionReport {
    pub proxy_id: String,
    pub service: String,
    /// Keyed by instance id.
    pub instances: BTreeMap<String, InstanceLoad>,
    /// Keyed by version.
    #[serde(default)]
    pub versions: BTreeMap<String, VersionTraffic>,
    /// This report's number: each of a proxy's reports of a service counts up from its first
    /// (0: not numbered, for clients that only send whole reports).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    /// Set: `instances` lists only the instances whose figures changed since this proxy's
    /// report number `base` (a zero for one that emptied); the others keep theirs. A proxy
    /// before a thousand instances sends a few entries a second instead of a thousand. When
    /// the locator's live copy of this proxy's report is not number `base` (it has none: it
    /// restarted, the report aged out, the proxy moved to another replica; or another one: the
    /// proxy came back from another replica, a late retry) it answers 409
    /// `full_report_needed` and counts nothing: send the whole report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl SessionReport {
    /// The report of what changed from `previous` (this proxy's last accepted report of the
    /// same service) to `self`: the instances whose figures differ, a zero for each that
    /// `previous` had and `self` lacks, and every version's traffic (a few lines); numbered
    /// `self.seq`, based on `previous.seq`.
    pub fn changes_since(&self, previous: &SessionReport) -> SessionReport {
        let mut instances: BTreeMap<String, InstanceLoad> = self
            .instances
            .iter()
            .filter(|(id, load)| previous.instances.get(*id) != Some(*load))
            .map(|(id, load)| (id.clone(), *load))
            .collect();
        for id in previous.instances.keys() {
            if !self.instances.contains_key(id) {
                instances.insert(id.clone(), InstanceLoad::default());
            }
        }
        SessionReport {
            proxy_id: self.proxy_id.clone(),
            service: self.service.clone(),
            instances,
            versions: self.versions.clone(),
            seq: self.seq,
            base: Some(previous.seq),
        }
    }

    /// Applies a report of changes ([`SessionReport::changes_since`]) to this whole report.
    /// A zero removes the entry: when sums are made, an absent instance counts as zero.
    pub fn apply_changes(&mut self, changes: SessionReport) {
        self.seq = changes.seq;
        for (id, load) in changes.instances {
            if load == InstanceLoad::default() {
                self.instances.remove(&id);
            } else {
                self.instances.insert(id, load);
            }
        }
        self.versions = changes.versions;
    }
}

/// Body of `POST /v1/heartbeats` (role `deploy`): one host agent's heartbeats for all its
/// instances in one request, instead of one request per instance per second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeats {
    pub ids: Vec<String>,
}

/// The most instance ids one `POST /v1/heartbeats` may carry.
pub const MAX_HEARTBEATS: usize = 10_000;

/// Answer of `POST /v1/heartbeats`: how many were heard, and the ids the locator does not know
/// (an instance removed meanwhile; the others still count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatsAccepted {
    pub accepted: usize,
    pub unknown: Vec<String>,
}

/// Traffic of one version summed over the proxies (p99 is the worst proxy's).
pub type TrafficByVersion = BTreeMap<String, VersionTraffic>;

/// The release lifecycle, in the order a release walks it.
///
/// ```text
/// validating → starting → waiting_healthy → registered → shifting(step..) → promoted
///            → draining → removing → done
/// validating | starting | waiting_healthy | registered ──(failure, abort)──► failed
/// registered | shifting | promoted | draining ──(breach, abort)──► rolling_back → rolled_back
/// ```
/// `removing` is past the point of return: the old version's containers are going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    Validating,
    Starting,
    WaitingHealthy,
    Registered,
    Shifting,
    Promoted,
    Draining,
    Removing,
    Done,
    RollingBack,
    RolledBack,
    Failed,
}

impl ReleaseState {
    /// The states a release that succeeds walks, in order (each a legal move from the one
    /// before).
    pub const HAPPY_PATH: [ReleaseState; 9] = [
        ReleaseState::Validating,
        ReleaseState::Starting,
        ReleaseState::WaitingHealthy,
        ReleaseState::Registered,
        ReleaseState::Shifting,
        ReleaseState::Promoted,
        ReleaseState::Draining,
        ReleaseState::Removing,
        ReleaseState::Done,
    ];

    /// A terminal release no longer holds the service's release lock.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ReleaseState::Done | ReleaseState::RolledBack | ReleaseState::Failed
        )
    }

    /// Whether `self → next` is a legal move of the release state machine.
    pub fn can_become(self, next: ReleaseState) -> bool {
        use ReleaseState::*;
        if self.is_terminal() {
            return false;
        }
        match next {
            Failed => matches!(self, Validating | Starting | WaitingHealthy | Registered),
            // After promotion too, while the old version's containers still run (`removing`
            // is where they go): the fast way back Argo Rollouts and Swarm give.
            RollingBack => matches!(self, Registered | Shifting | Promoted | Draining),
            RolledBack => self == RollingBack,
            _ => {
                let at = |s| Self::HAPPY_PATH.iter().position(|x| *x == s);
                matches!((at(self), at(next)), (Some(a), Some(b)) if b == a + 1)
            }
        }
    }
}

impl std::fmt::Display for ReleaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// An operator's request to a running release (dashboard buttons, `haddock promote` …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Promote,
    Abort,
    Pause,
    Resume,
}

/// Body of `POST /v1/releases` (role `deploy`): takes the service's release lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRelease {
    pub service: String,
    pub from_version: Option<String>,
    pub to_version: String,
    /// Full image reference, `repo:tag`.
    pub image: String,
    pub who: String,
}

/// Body of `PATCH /v1/releases/{id}` (role `deploy`): one step of the state machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ReleaseState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Containers this release created (so a resumed haddock finds them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<Vec<String>>,
    /// Duration of a finished step, merged into [`Release::step_ms`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub step_ms: BTreeMap<String, u64>,
    /// What the driver shows on the dashboard (bake, analysis, what it waits for). Replaces
    /// the recorded one, except `driver`, which only `lease` sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ReleaseStatus>,
    /// Set to acknowledge (clear) a pending operator control.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear_control: bool,
    /// Compare and set: the state the sender believes the release is in. A release in
    /// another state refuses the whole update with 409 `state_conflict`, so two processes
    /// never both move one release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_state: Option<ReleaseState>,
    /// Takes or renews the driver lease for this holder (`pid@host`). Refused with 409
    /// `lease_held` while another holder's lease is younger than [`LEASE_MS`] by the
    /// locator's clock; the whole update is then refused with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Gives the lease up (a driver that stops), so the next `haddock resume` need not wait
    /// for it to lapse. Only the holder named in `lease` can give it up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_lease: bool,
}

/// A driver lease lapses when its holder has not renewed it for this long (haddock renews
/// every second). Measured by the locator's clock, so drivers' clocks need not agree.
pub const LEASE_MS: u64 = 5_000;

/// Who drives a release: taken and renewed through `ReleaseUpdate::lease`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// `pid@hostname` of the haddock process.
    pub who: String,
    /// When the locator last renewed it.
    pub at_ms: UnixMillis,
}

impl Lease {
    /// Whether the lease is still held at `now` (younger than [`LEASE_MS`]).
    pub fn is_fresh(&self, now: UnixMillis) -> bool {
        now.saturating_sub(self.at_ms) < LEASE_MS
    }
}

/// A canary bake in progress: the weight, and when it ends. The dashboard counts down from
/// these recorded times (the same on every screen and after a reload).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BakeStatus {
    pub weight: u32,
    pub pause_ms: u64,
    /// When this bake began.
    #[serde(default)]
    pub started_at_ms: UnixMillis,
    /// When it ends if nothing pauses it; `None` while paused (the timer is frozen).
    #[serde(default)]
    pub until_ms: Option<UnixMillis>,
    /// What is left of the pause (while paused: frozen at the moment of the pause).
    #[serde(default)]
    pub remaining_ms: u64,
}

/// What a release's driver reports beside its state: shown on the dashboard and by
/// `haddock status`, read by a second haddock to know whether the release is driven.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseStatus {
    /// The driver lease (set by the locator from `ReleaseUpdate::lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<Lease>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<BakeStatus>,
    /// The canary analysis' last verdict, as haddock's `analysis::Verdict` serialises it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<serde_json::Value>,
    /// What a paused release waits for (`promote` in a manual rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// Reads a recorded status written before it was typed (`null`, or an object with unknown
/// keys): unknown keys are dropped, `null` is the default.
fn lenient_status<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ReleaseStatus, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).unwrap_or_default())
}

/// A durable release record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub id: String,
    pub service: String,
    pub from_version: Option<String>,
    pub to_version: String,
    pub image: String,
    pub who: String,
    pub state: ReleaseState,
    /// Index into the spec's rollout steps while shifting.
    pub step: u32,
    pub paused: bool,
    /// Pending operator request, cleared by haddock when it acts on it.
    pub control: Option<Control>,
    pub containers: Vec<String>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    pub finished_at: Option<UnixMillis>,
    pub reason: Option<String>,
    pub step_ms: BTreeMap<String, u64>,
    #[serde(default, deserialize_with = "lenient_status")]
    pub status: ReleaseStatus,
    /// The operators' controls of this release, oldest first (the last [`ACTIONS_KEPT`]):
    /// who paused, resumed, promoted or aborted it, and when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<OperatorAction>,
}

/// How many operator actions a release record keeps.
pub const ACTIONS_KEPT: usize = 32;

/// One operator control of a release, under the name of the token that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorAction {
    pub control: Control,
    pub who: String,
    pub at: UnixMillis,
}

/// Everything a watcher needs to start from (also the answer to `GET /v1/snapshot`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub revision: Revision,
    pub services: Vec<Service>,
    pub instances: Vec<Instance>,
    /// Active (non-terminal) releases only; history has its own endpoint.
    pub releases: Vec<Release>,
    pub traffic: BTreeMap<String, TrafficByVersion>,
}

/// One line of `GET /v1/watch?since=REV` (newline-delimited JSON):
/// `{"revision": 7, "kind": "service", ...the entity's fields}`.
///
/// Serde is written by hand because `Service` and `Snapshot` carry a `revision` of their own,
/// which a derived `#[serde(flatten)]` would emit twice and then refuse to read back. On the
/// wire the key appears once; for those two kinds it is the entity's revision too (a change to
/// a service is a write to it; a snapshot is taken at the event's revision).
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub revision: Revision,
    pub change: Change,
}

impl Serialize for WatchEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut value = serde_json::to_value(&self.change).map_err(S::Error::custom)?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| S::Error::custom("a change serialises to an object"))?;
        map.insert("revision".into(), self.revision.into());
        value.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for WatchEvent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let revision = value
            .get("revision")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| D::Error::missing_field("revision"))?;
        let change = Change::deserialize(value).map_err(D::Error::custom)?;
        Ok(WatchEvent { revision, change })
    }
}

/// What changed. A watcher that fell behind (or passed no `since`) first gets a `snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    Snapshot(Snapshot),
    Service(Service),
    Instance(Instance),
    /// Boxed: a release record is twice the size of the other changes.
    Release(Box<Release>),
    Traffic {
        service: String,
        traffic: TrafficByVersion,
    },
}

impl Change {
    /// The service this change is about; `None` for a snapshot (about every service).
    pub fn service(&self) -> Option<&str> {
        match self {
            Change::Snapshot(_) => None,
            Change::Service(s) => Some(&s.name),
            Change::Instance(i) => Some(&i.service),
            Change::Release(r) => Some(&r.service),
            Change::Traffic { service, .. } => Some(service),
        }
    }

    /// Whether this change can alter a proxy's routing table, given the instance it replaces
    /// (`before`, for an instance change). Proxies route by a service's settings and by each
    /// instance's state, address and version; session sums, heartbeat times, releases and
    /// traffic figures move every second and route nothing, so a `?routing=true` watcher never
    /// hears of them.
    pub fn is_routing(&self, before: Option<&Instance>) -> bool {
        match self {
            Change::Snapshot(_) | Change::Service(_) => true,
            Change::Instance(i) => before.is_none_or(|old| {
                (old.state, &old.address, &old.version) != (i.state, &i.address, &i.version)
            }),
            Change::Release(_) | Change::Traffic { .. } => false,
        }
    }
}

impl Snapshot {
    /// Applies one watch event, so that every watcher keeps the same view the locator has.
    pub fn apply(&mut self, event: &WatchEvent) {
        self.revision = self.revision.max(event.revision);
        match &event.change {
            Change::Snapshot(s) => {
                *self = s.clone();
                self.revision = event.revision;
            }
            Change::Service(s) => upsert(&mut self.services, s.clone(), |x| x.name == s.name),
            Change::Instance(i) => {
                if i.state == InstanceState::Gone {
                    self.instances.retain(|x| x.id != i.id);
                } else {
                    upsert(&mut self.instances, i.clone(), |x| x.id == i.id);
                }
            }
            Change::Release(r) => {
                if r.state.is_terminal() {
                    self.releases.retain(|x| x.id != r.id);
                } else {
                    upsert(&mut self.releases, (**r).clone(), |x| x.id == r.id);
                }
            }
            Change::Traffic { service, traffic } => {
                self.traffic.insert(service.clone(), traffic.clone());
            }
        }
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    pub fn instances_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances.iter().filter(move |i| i.service == service)
    }

    pub fn active_release(&self, service: &str) -> Option<&Release> {
        self.releases.iter().find(|r| r.service == service)
    }
}

fn upsert<T>(items: &mut Vec<T>, item: T, same: impl Fn(&T) -> bool) {
    match items.iter_mut().find(|x| same(x)) {
        Some(slot) => *slot = item,
        None => items.push(item),
    }
}

/// The error body of every non-2xx answer: `{ "error": { "code", "message" } }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `illegal_transition`, `release_active`.
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_of_changes_lists_what_moved_and_zeros_what_left() {
        let load = |n| InstanceLoad {
            live_sessions: n,
            in_flight: 0,
        };
        let report = |instances: &[(&str, u64)]| SessionReport {
            proxy_id: "p".into(),
            service: "s".into(),
            instances: instances
                .iter()
                .map(|(id, n)| (id.to_string(), load(*n)))
                .collect(),
            versions: BTreeMap::from([("1".to_string(), VersionTraffic::default())]),
            seq: 0,
            base: None,
        };
        let before = report(&[("a", 1), ("b", 2), ("c", 3)]);
        let now = report(&[("a", 1), ("b", 5), ("d", 0)]);
        let changes = now.changes_since(&before);
        assert_eq!(changes.base, Some(before.seq));
        assert_eq!(
            changes.instances,
            BTreeMap::from([
                ("b".to_string(), load(5)),
                ("c".to_string(), load(0)),
                ("d".to_string(), load(0)),
            ])
        );
        assert_eq!(changes.versions, now.versions, "traffic goes whole");
        assert!(now.changes_since(&now).instances.is_empty());
        let mut applied = before.clone();
        applied.apply_changes(changes);
        assert_eq!(
            applied.instances,
            BTreeMap::from([("a".to_string(), load(1)), ("b".to_string(), load(5))]),
            "zeros are dropped, as an absent instance counts as zero"
        );
    }

    #[test]
    fn routes_are_checked_normalised_and_matched() {
        let routes = |hosts: &[&str], prefix: Option<&str>| Routes {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path_prefix: prefix.map(str::to_string),
            ..Routes::default()
        };
        let ok = routes(
            &["Shop.Example.com", "*.shop.example.com", "shop.example.com"],
            Some("/api"),
        )
        .checked()
        .unwrap();
        assert_eq!(ok.hosts, ["shop.example.com", "*.shop.example.com"]);
        assert!(ok.matches("shop.example.com", "/api"));
        assert!(ok.matches("eu.shop.example.com", "/api/cart"));
        assert!(!ok.matches("shop.example.com", "/apix"));
        assert!(!ok.matches("shop.example.com", "/"));
        assert!(!ok.matches("a.b.shop.example.com", "/api"));
        assert!(!ok.matches("other.example.com", "/api"));
        assert_eq!(
            routes(&["a.b"], Some("/")).checked().unwrap().path_prefix,
            None
        );
        for (bad, says) in [
            (routes(&["a b"], None), "not a host name"),
            (routes(&["-a.b"], None), "not a host name"),
            (routes(&["a..b"], None), "not a host name"),
            (routes(&["*.*.b"], None), "not a host name"),
            (routes(&["a.b:80"], None), "not a host name"),
            (routes(&["a.b"], Some("api")), "not a path"),
            (routes(&["a.b"], Some("/api/")), "not a path"),
            (routes(&["a.b"], Some("/a/../b")), "not a path"),
            (routes(&["a.b"], Some("/a?x")), "not a path"),
            (routes(&vec!["a.b"; 33], None), "at most 32"),
            (
                Routes {
                    hsts_max_age_s: Some(MAX_HSTS_MAX_AGE_S + 1),
                    ..routes(&["a.b"], None)
                },
                "hsts_max_age: at most 63115200 seconds",
            ),
        ] {
            let err = bad.checked().unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_services_https_policy_is_kept_and_sent_only_when_set() {
        let policy = Routes {
            redirect_https: true,
            hsts_max_age_s: Some(MAX_HSTS_MAX_AGE_S),
            ..Routes::default()
        };
        // Without hosts it still counts: a proxy carrying the service alone applies it.
        assert!(!policy.is_empty());
        assert_eq!(policy.checked().unwrap(), policy);
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(json, r#"{"redirect_https":true,"hsts_max_age_s":63115200}"#);
        assert_eq!(serde_json::from_str::<Routes>(&json).unwrap(), policy);
        // What a locator of the release before wrote still reads, as no policy.
        let before: Routes = serde_json::from_str(r#"{"hosts":["a.b"]}"#).unwrap();
        assert!(!before.redirect_https && before.hsts_max_age_s.is_none());
        assert_eq!(serde_json::to_string(&Routes::default()).unwrap(), "{}");
    }

    #[test]
    fn instance_transitions_follow_the_lifecycle() {
        use InstanceState::*;
        assert!(Starting.can_become(Ready));
        assert!(Ready.can_become(Draining));
        assert!(Draining.can_become(Gone));
        assert!(!Gone.can_become(Ready));
        // Back to ready: an abort after the promotion returns users to the old version.
        assert!(Draining.can_become(Ready));
        assert!(!Draining.can_become(Starting));
        assert!(!Starting.can_become(Draining));
        assert!(!Ready.can_become(Ready));
    }

    #[test]
    fn release_walks_forward_one_step_at_a_time() {
        use ReleaseState::*;
        assert!(Validating.can_become(Starting));
        assert!(Shifting.can_become(Promoted));
        assert!(!Validating.can_become(Done));
        assert!(Shifting.can_become(RollingBack));
        assert!(
            Draining.can_become(RollingBack),
            "abort after the promotion"
        );
        assert!(
            !Removing.can_become(RollingBack),
            "past the point of return"
        );
        assert!(!Done.can_become(Failed));
        assert_eq!(WaitingHealthy.to_string(), "waiting_healthy");
    }

    #[test]
    fn snapshot_apply_drops_gone_instances_and_finished_releases() {
        let mut snap = Snapshot::default();
        let inst = Instance {
            id: "a".into(),
            service: "s".into(),
            version: "1".into(),
            address: "127.0.0.1:1".into(),
            docker_host: String::new(),
            container_id: String::new(),
            labels: BTreeMap::new(),
            state: InstanceState::Ready,
            registered_at: 0,
            last_heartbeat: 0,
            load: InstanceLoad::default(),
        };
        snap.apply(&WatchEvent {
            revision: 3,
            change: Change::Instance(inst.clone()),
        });
        assert_eq!(snap.instances.len(), 1);
        assert_eq!(snap.revision, 3);
        let gone = Instance {
            state: InstanceState::Gone,
            ..inst
        };
        snap.apply(&WatchEvent {
            revision: 4,
            change: Change::Instance(gone),
        });
        assert!(snap.instances.is_empty());
    }

    #[test]
    fn watch_events_round_trip_with_one_revision_key() {
        let service = Service {
            name: "s".into(),
            sessions: SessionSettings {
                cookie_name: "c".into(),
                idle_ttl_ms: 1,
                max_drain_ms: 1,
            },
            weights: BTreeMap::new(),
            primary_version: None,
            revision: 9,
            limit_changes: vec![LimitsChange {
                at: 5,
                who: "ci".into(),
                instances: vec![InstanceLimits {
                    id: "i1".into(),
                    memory_from: Some(256 << 20),
                    memory_to: Some(512 << 20),
                    nano_cpus_from: None,
                    nano_cpus_to: None,
                }],
            }],
            lock: Some(DeployLock {
                who: "ops".into(),
                message: "freeze".into(),
                at: 7,
            }),
            routes: Default::default(),
        };
        let snap = Snapshot {
            revision: 9,
            services: vec![service.clone()],
            ..Default::default()
        };
        for change in [Change::Service(service), Change::Snapshot(snap)] {
            let event = WatchEvent {
                revision: 9,
                change,
            };
            let line = serde_json::to_string(&event).unwrap();
            assert_eq!(
                line.matches("\"revision\"").count(),
                1 + line.matches("\"services\"").count(),
                "{line}"
            );
            assert_eq!(serde_json::from_str::<WatchEvent>(&line).unwrap(), event);
            let mut view = Snapshot::default();
            view.apply(&event);
            assert_eq!(view.revision, 9);
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<StateChange>(r#"{"state":"ready","x":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"));
    }
}
