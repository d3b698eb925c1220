//! The rules: a pure in-memory model of everything the locator holds.
//!
//! Both stores share this one model so that every validation rule is written once. A write is
//! two steps: [`State::execute`] checks a [`Command`] against the current state and returns the
//! [`WatchEvent`]s it would commit (nothing is mutated, so a refused command changes nothing);
//! the store makes those events durable and then feeds them to [`State::apply`]. Replaying the
//! same events therefore rebuilds the same state, which is how the embedded store recovers and
//! how PostgreSQL replicas follow each other.

use crate::api::*;
use crate::error::Error;
use crate::reports::Reports;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Docker refuses a memory cap below 6 MiB; a record of one would be a lie.
const MIN_DOCKER_MEMORY: u64 = 6 * 1024 * 1024;

/// A proxy that has not reported for this long no longer counts in the sums.
pub const SESSION_REPORT_TTL_MS: u64 = 5_000;

/// A service's session sums are published (as instance-load and traffic events) on a proxy's
/// report at most this often; the reports in between are kept, and the next report after the
/// period or the sweep (every second at most) publishes their sums. Before, every report of
/// every proxy was an event broadcast to every watcher: with a thousand proxies, a thousand
/// events a second, each to a thousand streams.
pub const LOAD_PUBLISH_MS: u64 = 1_000;

/// What a command may depend on besides the state: the clock and the configured TTL.
/// Passed in (never read inside) so that the rules stay deterministic and testable.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now: UnixMillis,
    pub heartbeat_ttl_ms: u64,
    /// [`LOAD_PUBLISH_MS`] unless configured (`locator serve --load-publish-interval`; 0:
    /// every report publishes, as before the scale work — the simulator's baseline).
    pub load_publish_ms: u64,
}

/// One write request, already parsed and authorised.
#[derive(Debug, Clone)]
pub enum Command {
    PutService {
        name: String,
        spec: ServiceSpec,
    },
    SetWeights {
        service: String,
        update: WeightsUpdate,
        if_match: Option<Revision>,
    },
    Register(RegisterInstance),
    /// `haddock update` changed limits in place: keep the record.
    RecordLimits {
        service: String,
        change: NewLimitsChange,
    },
    /// `haddock lock acquire` (`Some`) or `release` (`None`): the service's deploy lock.
    Lock {
        service: String,
        lock: Option<NewLock>,
    },
    SetState {
        id: String,
        state: InstanceState,
    },
    Heartbeat {
        id: String,
    },
    /// A host agent's heartbeats for many instances at once.
    Heartbeats {
        ids: Vec<String>,
    },
    Sessions(SessionReport),
    CreateRelease(NewRelease),
    UpdateRelease {
        id: String,
        update: ReleaseUpdate,
    },
    Control {
        id: String,
        control: Control,
        /// The name of the token that sent it.
        who: String,
    },
    /// The background sweep: heartbeat TTL and ageing of proxies' reports.
    Sweep,
}

/// What a successful command answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Service(Service),
    Instance(Instance),
    /// Boxed, as in [`Change::Release`].
    Release(Box<Release>),
    Accepted,
    Heartbeats(HeartbeatsAccepted),
}

/// The result of [`State::execute`]: events to commit (possibly none) and the answer.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub events: Vec<WatchEvent>,
    pub reply: Reply,
}

/// Everything the locator knows. Serialised whole as the embedded store's snapshot file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub revision: Revision,
    services: BTreeMap<String, Service>,
    /// Gone instances are kept so that a retried `gone` or a late lookup still finds them.
    instances: BTreeMap<String, Instance>,
    /// All releases, finished ones included (the history).
    releases: BTreeMap<String, Release>,
    traffic: BTreeMap<String, TrafficByVersion>,
    /// The proxies' latest reports and their sums. Ephemeral: reports are re-sent every
    /// second, so they are never written to disk.
    #[serde(skip)]
    reports: Reports,
    /// When this process started counting reports and heartbeats: sums are not aged before
    /// every live proxy had a chance to report, or a restart would briefly show draining
    /// instances as empty; and no instance is found silent before it had a TTL to be heard.
    #[serde(skip)]
    reports_since: UnixMillis,
    /// When each instance was last heard, in memory ([`State::hear`]). A heartbeat of a ready,
    /// starting or draining instance changes nothing anyone routes or records by, so it is not
    /// an event: at ten thousand instances, writing each one every TTL/4 was more than half of
    /// all events, each fsynced, logged and sent to every watcher of the whole state. An
    /// instance's `last_heartbeat` as read is the later of this and the recorded one.
    #[serde(skip)]
    heard: std::collections::HashMap<String, UnixMillis>,
    /// When each service's sums were last published on a report (see [`LOAD_PUBLISH_MS`]).
    /// Ephemeral, like the reports.
    #[serde(skip)]
    loads_published: BTreeMap<String, UnixMillis>,
}

/// Allocates consecutive revisions to the events of one command.
struct Batch {
    next: Revision,
    events: Vec<WatchEvent>,
}

impl Batch {
    fn peek(&self) -> Revision {
        self.next
    }
    fn push(&mut self, change: Change) -> Revision {
        let revision = self.next;
        self.next += 1;
        self.events.push(WatchEvent { revision, change });
        revision
    }
}

impl State {
    /// The instance ids a heartbeat command names (none for other commands).
    pub fn heartbeat_ids(command: &Command) -> &[String] {
        match command {
            Command::Heartbeat { id } => std::slice::from_ref(id),
            Command::Heartbeats { ids } => ids,
            _ => &[],
        }
    }

    /// Whether `change`, applied to this state, can alter a proxy's routing table (see
    /// [`Change::is_routing`]).
    pub fn is_routing(&self, change: &Change) -> bool {
        let before = match change {
            Change::Instance(i) => self.instances.get(&i.id),
            _ => None,
        };
        change.is_routing(before)
    }

    /// Starts counting proxies' reports from `now` (see `reports_since`).
    pub fn start_reports(&mut self, now: UnixMillis) {
        self.reports_since = now;
    }

    // ----- reads -----

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_of(None)
    }

    /// [`State::snapshot`] of `only` these services when given (what a watch filtered to them
    /// starts from); only their records are copied.
    pub fn snapshot_of(&self, only: Option<&std::collections::BTreeSet<String>>) -> Snapshot {
        let wanted = |service: &str| only.is_none_or(|set| set.contains(service));
        Snapshot {
            revision: self.revision,
            services: self
                .services
                .values()
                .filter(|s| wanted(&s.name))
                .cloned()
                .collect(),
            instances: self
                .instances
                .values()
                .filter(|i| i.state != InstanceState::Gone && wanted(&i.service))
                .map(|i| self.as_heard(i))
                .collect(),
            releases: self
                .releases
                .values()
                .filter(|r| !r.state.is_terminal() && wanted(&r.service))
                .cloned()
                .collect(),
            traffic: self
                .traffic
                .iter()
                .filter(|(service, _)| wanted(service))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn services(&self) -> Vec<Service> {
        self.services.values().cloned().collect()
    }

    pub fn service(&self, name: &str) -> Result<Service, Error> {
        self.services
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownService(name.to_string()))
    }

    /// Live (not gone) instances, of one service or of all.
    pub fn instances(&self, service: Option<&str>) -> Result<Vec<Instance>, Error> {
        if let Some(s) = service {
            self.service(s)?;
        }
        Ok(self
            .instances
            .values()
            .filter(|i| i.state != InstanceState::Gone)
            .filter(|i| service.is_none_or(|s| i.service == s))
            .map(|i| self.as_heard(i))
            .collect())
    }

    /// One instance, gone ones included.
    pub fn instance(&self, id: &str) -> Result<Instance, Error> {
        self.instances
            .get(id)
            .map(|i| self.as_heard(i))
            .ok_or_else(|| Error::UnknownInstance(id.to_string()))
    }

    /// `inst` with `last_heartbeat` the later of the recorded and the heard one.
    fn as_heard(&self, inst: &Instance) -> Instance {
        let mut inst = inst.clone();
        if let Some(at) = self.heard.get(&inst.id) {
            inst.last_heartbeat = inst.last_heartbeat.max(*at);
        }
        inst
    }

    /// Records heartbeats that [`Command::Heartbeat`] or [`Command::Heartbeats`] accepted
    /// (the store calls it once the command succeeded), or that another replica heard.
    /// Unknown and gone ids are skipped.
    pub fn hear<'a>(&mut self, heard: impl IntoIterator<Item = (&'a str, UnixMillis)>) {
        for (id, at) in heard {
            if self
                .instances
                .get(id)
                .is_some_and(|i| i.state != InstanceState::Gone)
            {
                let heard = self.heard.entry(id.to_string()).or_default();
                *heard = (*heard).max(at);
            }
        }
    }

    /// Ready instances not heard of (here, recorded, or since the start) for `for_ms`: the
    /// ones another PostgreSQL replica may have heard.
    pub fn quiet(&self, now: UnixMillis, for_ms: u64) -> Vec<String> {
        self.instances
            .values()
            .filter(|i| {
                i.state == InstanceState::Ready && now.saturating_sub(self.seen(i)) > for_ms
            })
            .map(|i| i.id.clone())
            .collect()
    }

    /// When `inst` was last known alive: heard here, recorded, or (after a restart, when
    /// nothing was heard yet) the start, so that every instance gets a TTL to be heard.
    fn seen(&self, inst: &Instance) -> UnixMillis {
        self.heard
            .get(&inst.id)
            .copied()
            .unwrap_or(0)
            .max(inst.last_heartbeat)
            .max(self.reports_since)
    }

    /// Every heartbeat heard here, with its time (the PostgreSQL store shares them).
    pub fn heard(&self) -> Vec<(String, UnixMillis)> {
        self.heard
            .iter()
            .map(|(id, at)| (id.clone(), *at))
            .collect()
    }

    /// Releases newest first, optionally of one service and only unfinished ones.
    pub fn releases(&self, service: Option<&str>, active_only: bool) -> Vec<Release> {
        let mut out: Vec<Release> = self
            .releases
            .values()
            .filter(|r| service.is_none_or(|s| r.service == s))
            .filter(|r| !active_only || !r.state.is_terminal())
            .cloned()
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse((r.created_at, release_seq(&r.id))));
        out
    }

    pub fn release(&self, id: &str) -> Result<Release, Error> {
        self.releases
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownRelease(id.to_string()))
    }

    // ----- writes -----

    /// Applies one committed event. Events must come in revision order; the stores ensure it.
    pub fn apply(&mut self, event: &WatchEvent) {
        self.revision = self.revision.max(event.revision);
        match &event.change {
            Change::Snapshot(s) => {
                self.services = s
                    .services
                    .iter()
                    .map(|x| (x.name.clone(), x.clone()))
                    .collect();
                self.instances = s
                    .instances
                    .iter()
                    .map(|x| (x.id.clone(), x.clone()))
                    .collect();
                self.releases = s
                    .releases
                    .iter()
                    .map(|x| (x.id.clone(), x.clone()))
                    .collect();
                self.traffic = s.traffic.clone();
            }
            Change::Service(s) => {
                self.services.insert(s.name.clone(), s.clone());
            }
            Change::Instance(i) => {
                if i.state == InstanceState::Gone {
                    self.heard.remove(&i.id);
                }
                self.instances.insert(i.id.clone(), i.clone());
            }
            Change::Release(r) => {
                self.releases.insert(r.id.clone(), (**r).clone());
            }
            Change::Traffic { service, traffic } => {
                self.traffic.insert(service.clone(), traffic.clone());
            }
        }
    }

    /// Logs what `event` changes in the lifecycle of a release, as one structured event each
    /// (call it before [`State::apply`]): an instance or release changing state, a release
    /// moving to another canary step or getting an operator control, a service registered or
    /// its weights changed.
    /// Fields match haddock's `release transition` event (`release`, `service`,
    /// `from_version`, `to_version`, `from_state`, `to_state`) so that one query follows a
    /// release through both logs. Heartbeats and session sums change too often to be logged.
    pub fn log_change(&self, event: &WatchEvent) {
        let revision = event.revision;
        match &event.change {
            Change::Instance(i) => {
                let from = self.instances.get(&i.id).map(|old| old.state);
                if from == Some(i.state) {
                    return;
                }
                let release = self.active_release(&i.service);
                tracing::info!(
                    revision,
                    release = release.map(|r| r.id.as_str()),
                    service = %i.service,
                    instance = %i.id,
                    version = %i.version,
                    from_state = from.map(tracing::field::display),
                    to_state = %i.state,
                    "instance state change"
                );
            }
            Change::Release(r) => {
                let old = self.releases.get(&r.id);
                let message = match old {
                    Some(o) if o.state == r.state && o.step == r.step => {
                        if (o.paused, o.control) == (r.paused, r.control) {
                            return;
                        }
                        "release control"
                    }
                    Some(o) if o.state == r.state => "release step",
                    _ => "release state change",
                };
                tracing::info!(
                    revision,
                    release = %r.id,
                    service = %r.service,
                    from_version = r.from_version.as_deref().unwrap_or(""),
                    to_version = %r.to_version,
                    from_state = old.map(|o| tracing::field::display(o.state)),
                    to_state = %r.state,
                    step = r.step,
                    paused = r.paused,
                    control = r.control.map(tracing::field::debug),
                    reason = r.reason.as_deref().unwrap_or(""),
                    "{message}"
                );
            }
            Change::Service(s) => {
                let old = self.services.get(&s.name);
                if old.is_some_and(|o| {
                    (&o.weights, &o.primary_version) == (&s.weights, &s.primary_version)
                }) {
                    return;
                }
                let weights = s
                    .weights
                    .iter()
                    .map(|(v, w)| format!("{v}={w}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let release = self.active_release(&s.name);
                let message = match old {
                    Some(_) => "weights change",
                    None => "service registered",
                };
                tracing::info!(
                    revision,
                    release = release.map(|r| r.id.as_str()),
                    service = %s.name,
                    from_version = release.and_then(|r| r.from_version.as_deref()),
                    to_version = release.map(|r| r.to_version.as_str()),
                    weights = %weights,
                    primary_version = s.primary_version.as_deref().unwrap_or(""),
                    "{message}"
                );
            }
            Change::Snapshot(_) | Change::Traffic { .. } => {}
        }
    }

    /// The unfinished release of `service`, if any.
    fn active_release(&self, service: &str) -> Option<&Release> {
        self.releases
            .values()
            .find(|r| r.service == service && !r.state.is_terminal())
    }

    /// Checks a proxy's report and cuts it to what this locator knows
    /// ([`State::known_report`]): the proxy must be named and the service known, and a report
    /// of changes needs the proxy's live report numbered its `base` in `reports` (409
    /// `full_report_needed` otherwise: the proxy then sends the whole report).
    pub fn checked_report(
        &self,
        report: &SessionReport,
        reports: &Reports,
        now: UnixMillis,
    ) -> Result<SessionReport, Error> {
        if report.proxy_id.trim().is_empty() {
            return Err(Error::InvalidInput("proxy_id must not be empty".into()));
        }
        self.service(&report.service)?;
        if report.base.is_some_and(|base| {
            reports
                .live(&report.service, &report.proxy_id, now)
                .is_none_or(|live| live.seq != base)
        }) {
            return Err(Error::FullReportNeeded {
                proxy: report.proxy_id.clone(),
                service: report.service.clone(),
            });
        }
        Ok(self.known_report(report))
    }

    /// Takes a proxy's report into the sums ([`State::checked_report`] first). The embedded
    /// store calls it before [`Command::Sessions`], which publishes the sums when due.
    pub fn accept_report(&mut self, report: &SessionReport, now: UnixMillis) -> Result<(), Error> {
        let known = self.checked_report(report, &self.reports, now)?;
        self.reports.record(known, now);
        Ok(())
    }

    /// Whether a report of `service` now publishes the service's sums.
    fn loads_due(&self, service: &str, ctx: Ctx) -> bool {
        self.loads_published
            .get(service)
            .is_none_or(|at| ctx.now >= at.saturating_add(ctx.load_publish_ms))
    }

    /// A report of `service` was accepted: if it published the sums (the same rule
    /// [`Command::Sessions`] applied), the period starts again.
    pub fn note_report(&mut self, service: &str, ctx: Ctx) {
        if self.loads_due(service, ctx) {
            self.loads_published.insert(service.to_string(), ctx.now);
        }
    }

    /// The part of `report` about things this locator knows: instances of the report's service
    /// that are not gone, and versions that an instance of the service runs (or ran: a version
    /// whose instances were just removed still gets its last figures) or that its weights name.
    ///
    /// The rest is dropped rather than refused. Reports are held in memory, in PostgreSQL and
    /// (as traffic sums) in every snapshot, so made-up keys must not be stored: 2 000 invented
    /// versions once grew the snapshot to 1.6 MB. Refusing the whole report instead would break
    /// a legitimate proxy whose report races a registration or a removal, and the proxy would
    /// lose its other figures for that second; an entry the locator learns about later is
    /// counted from the proxy's next report (one a second).
    pub fn known_report(&self, report: &SessionReport) -> SessionReport {
        let service = self.services.get(&report.service);
        let weighted = |v: &str| service.is_some_and(|s| s.weights.contains_key(v));
        // Reported versions are nearly always the weighted ones. Only when one is not are the
        // service's running versions gathered, in one scan of the instances (not one per
        // reported version: a report of V versions against I instances was O(V × I)); a scan
        // per report was itself most of the locator's work at a thousand proxies before ten
        // thousand instances.
        let running: std::collections::BTreeSet<&str> =
            if report.versions.keys().all(|v| weighted(v)) {
                Default::default()
            } else {
                self.instances
                    .values()
                    .filter(|i| i.service == report.service)
                    .map(|i| i.version.as_str())
                    .collect()
            };
        let instances = report
            .instances
            .iter()
            .filter(|(id, _)| {
                self.instances
                    .get(*id)
                    .is_some_and(|i| i.service == report.service && i.state != InstanceState::Gone)
            })
            .map(|(id, load)| (id.clone(), *load))
            .collect();
        let versions = report
            .versions
            .iter()
            .filter(|(version, _)| weighted(version) || running.contains(version.as_str()))
            .map(|(version, traffic)| (version.clone(), *traffic))
            .collect();
        SessionReport {
            proxy_id: report.proxy_id.clone(),
            service: report.service.clone(),
            instances,
            versions,
            seq: report.seq,
            base: report.base,
        }
    }

    /// Replaces every report (the PostgreSQL store sums the replicas' shares this way).
    pub fn set_reports(&mut self, reports: Reports) {
        self.reports = reports;
    }

    /// Keeps `other`'s reports and heartbeats (local knowledge) when the rest of the state is
    /// reloaded.
    pub fn take_reports_from(&mut self, other: State) {
        self.reports = other.reports;
        self.reports_since = other.reports_since;
        self.heard = other.heard;
    }

    /// Forgets reports that aged out.
    pub fn prune_reports(&mut self, now: UnixMillis) {
        self.reports.prune(now);
    }

    /// Checks `command` against the rules and returns the events that carry it out, numbered
    /// from `self.revision + 1`. Refused commands return the error and no events.
    pub fn execute(&self, command: &Command, ctx: Ctx) -> Result<Outcome, Error> {
        let mut batch = Batch {
            next: self.revision + 1,
            events: Vec::new(),
        };
        let reply = match command {
            Command::PutService { name, spec } => self.put_service(name, spec, &mut batch)?,
            Command::SetWeights {
                service,
                update,
                if_match,
            } => self.set_weights(service, update, *if_match, &mut batch)?,
            Command::Register(r) => self.register(r, ctx, &mut batch)?,
            Command::RecordLimits { service, change } => {
                self.record_limits(service, change, ctx, &mut batch)?
            }
            Command::Lock { service, lock } => {
                self.lock(service, lock.as_ref(), ctx, &mut batch)?
            }
            Command::SetState { id, state } => self.set_state(id, *state, ctx, &mut batch)?,
            Command::Heartbeat { id } => self.heartbeat(id, ctx, &mut batch)?,
            Command::Heartbeats { ids } => self.heartbeats(ids, ctx, &mut batch)?,
            Command::Sessions(report) => self.sessions(report, ctx, &mut batch)?,
            Command::CreateRelease(n) => self.create_release(n, ctx, &mut batch)?,
            Command::UpdateRelease { id, update } => {
                self.update_release(id, update, ctx, &mut batch)?
            }
            Command::Control { id, control, who } => {
                self.control(id, *control, who, ctx, &mut batch)?
            }
            Command::Sweep => self.sweep(ctx, &mut batch),
        };
        Ok(Outcome {
            events: batch.events,
            reply,
        })
    }

    fn put_service(&self, name: &str, spec: &ServiceSpec, b: &mut Batch) -> Result<Reply, Error> {
        check_name("service name", name, 63)?;
        let s = &spec.sessions;
        if s.cookie_name.is_empty()
            || !s
                .cookie_name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        {
            return Err(Error::InvalidInput(format!(
                "sessions.cookie_name `{}` must be a non-empty cookie token (letters, digits, -_.)",
                s.cookie_name
            )));
        }
        if s.idle_ttl_ms == 0 || s.max_drain_ms == 0 {
            return Err(Error::InvalidInput(
                "sessions.idle_ttl_ms and sessions.max_drain_ms must be > 0".into(),
            ));
        }
        let routes = spec.routes.checked().map_err(Error::InvalidInput)?;
        for other in self.services.values().filter(|o| o.name != name) {
            let same_prefix = other.routes.path_prefix == routes.path_prefix;
            if let Some(host) = routes.hosts.iter().find(|h| other.routes.hosts.contains(h)) {
                if same_prefix {
                    return Err(Error::RouteTaken {
                        host: host.clone(),
                        prefix: routes.path_prefix.clone().unwrap_or_else(|| "/".into()),
                        service: other.name.clone(),
                    });
                }
            }
        }
        let service = match self.services.get(name) {
            // Same settings: a no-op, so that re-applying a spec does not wake every watcher.
            Some(cur) if cur.sessions == *s && cur.routes == routes => {
                return Ok(Reply::Service(cur.clone()))
            }
            Some(cur) => Service {
                sessions: s.clone(),
                revision: b.peek(),
                routes,
                ..cur.clone()
            },
            None => Service {
                name: name.to_string(),
                sessions: s.clone(),
                weights: BTreeMap::new(),
                primary_version: None,
                revision: b.peek(),
                limit_changes: Vec::new(),
                lock: None,
                routes,
            },
        };
        b.push(Change::Service(service.clone()));
        Ok(Reply::Service(service))
    }

    fn ready_versions(&self, service: &str) -> std::collections::BTreeSet<&str> {
        self.instances
            .values()
            .filter(|i| i.service == service && i.state == InstanceState::Ready)
            .map(|i| i.version.as_str())
            .collect()
    }

    fn set_weights(
        &self,
        name: &str,
        update: &WeightsUpdate,
        if_match: Option<Revision>,
        b: &mut Batch,
    ) -> Result<Reply, Error> {
        let cur = self.service(name)?;
        if let Some(expected) = if_match {
            if expected != cur.revision {
                return Err(Error::RevisionMismatch {
                    service: name.to_string(),
                    expected,
                    actual: cur.revision,
                });
            }
        }
        let ready = self.ready_versions(name);
        let mut sum = 0u32;
        for (version, weight) in &update.weights {
            if *weight > 100 {
                return Err(Error::InvalidWeights(format!(
                    "weight {weight} of version `{version}` is not a percentage (0..=100)"
                )));
            }
            // Weight 0 on a version without ready instances is refused too: it would let a
            // proxy believe a version exists that it cannot route to.
            if !ready.contains(version.as_str()) {
                return Err(Error::InvalidWeights(format!(
                    "version `{version}` of `{name}` has no ready instance"
                )));
            }
            sum += u32::from(*weight);
        }
        if sum != 100 {
            return Err(Error::InvalidWeights(format!(
                "weights sum to {sum}, not 100"
            )));
        }
        let mut primary = cur.primary_version.clone();
        if let Some(p) = &update.primary_version {
            if !ready.contains(p.as_str()) {
                return Err(Error::InvalidWeights(format!(
                    "primary version `{p}` of `{name}` has no ready instance"
                )));
            }
            primary = Some(p.clone());
        } else if primary.is_none() {
            // The first version to own all traffic becomes the primary without being named.
            primary = update
                .weights
                .iter()
                .find(|(_, w)| **w == 100)
                .map(|(v, _)| v.clone());
        }
        if cur.weights == update.weights && cur.primary_version == primary {
            return Ok(Reply::Service(cur));
        }
        let service = Service {
            weights: update.weights.clone(),
            primary_version: primary,
            revision: b.peek(),
            ..cur
        };
        b.push(Change::Service(service.clone()));
        Ok(Reply::Service(service))
    }

    /// Appends an in-place limit change to the service's record (the last
    /// [`LIMIT_CHANGES_KEPT`]). Every instance must be a live instance of the service and
    /// change at least one limit to a value Docker would take.
    fn record_limits(
        &self,
        service: &str,
        change: &NewLimitsChange,
        ctx: Ctx,
        b: &mut Batch,
    ) -> Result<Reply, Error> {
        let cur = self.service(service)?;
        if change.who.trim().is_empty()
            || change.who.len() > 256
            || change.who.chars().any(char::is_control)
        {
            return Err(Error::InvalidInput(
                "who must be 1..=256 characters without control characters".into(),
            ));
        }
        if change.instances.is_empty() {
            return Err(Error::InvalidInput(
                "a limits change names at least one instance".into(),
            ));
        }
        for i in &change.instances {
            let known = self.instance(&i.id)?;
            if known.service != service || known.state == InstanceState::Gone {
                return Err(Error::UnknownInstance(i.id.clone()));
            }
            if i.memory_to.is_none() && i.nano_cpus_to.is_none() {
                return Err(Error::InvalidInput(format!(
                    "instance {}: memory_to or nano_cpus_to is needed",
                    i.id
                )));
            }
            if i.memory_to.is_some_and(|m| m != 0 && m < MIN_DOCKER_MEMORY) {
                return Err(Error::InvalidInput(format!(
                    "instance {}: memory_to below Docker's minimum of {MIN_DOCKER_MEMORY} bytes",
                    i.id
                )));
            }
        }
        let mut changes = cur.limit_changes.clone();
        changes.push(LimitsChange {
            at: ctx.now,
            who: change.who.clone(),
            instances: change.instances.clone(),
        });
        let excess = changes.len().saturating_sub(LIMIT_CHANGES_KEPT);
        changes.drain(..excess);
        let next = Service {
            limit_changes: changes,
            revision: b.peek(),
            ..cur
        };
        b.push(Change::Service(next.clone()));
        Ok(Reply::Service(next))
    }

    /// Takes (`Some`) or gives up (`None`) the service's deploy lock. A held lock is not taken
    /// over (the holder, or anyone who means to, releases it first); giving up a lock nobody
    /// holds changes nothing.
    fn lock(
        &self,
        service: &str,
        lock: Option<&NewLock>,
        ctx: Ctx,
        b: &mut Batch,
    ) -> Result<Reply, Error> {
        let cur = self.service(service)?;
        let next = match (lock, &cur.lock) {
            (None, None) => return Ok(Reply::Service(cur)),
            (None, Some(_)) => None,
            (Some(_), Some(held)) => {
                return Err(Error::ServiceLocked {
                    service: service.to_string(),
                    who: held.who.clone(),
                    message: held.message.clone(),
                })
            }
            (Some(new), None) => {
                for (what, value, max) in [("who", &new.who, 256), ("message", &new.message, 1024)]
                {
                    if value.trim().is_empty()
                        || value.len() > max
                        || value.chars().any(char::is_control)
                    {
                        return Err(Error::InvalidInput(format!(
                            "{what} must be 1..={max} characters without control characters"
                        )));
                    }
                }
                Some(DeployLock {
                    who: new.who.clone(),
                    message: new.message.clone(),
                    at: ctx.now,
                })
            }
        };
        let next = Service {
            lock: next,
            revision: b.peek(),
            ..cur
        };
        b.push(Change::Service(next.clone()));
        Ok(Reply::Service(next))
    }

    fn register(&self, r: &RegisterInstance, ctx: Ctx, b: &mut Batch) -> Result<Reply, Error> {
        self.service(&r.service)?;
        check_name("instance id", &r.id, 128)?;
        check_name("version", &r.version, 128)?;
        check_address(&r.address)?;
        if !matches!(r.state, InstanceState::Starting | InstanceState::Ready) {
            return Err(Error::InvalidInput(format!(
                "an instance registers as starting or ready, not {}",
                r.state
            )));
        }
        if let Some(cur) = self.instances.get(&r.id) {
            if cur.state != InstanceState::Gone {
                let same = cur.service == r.service
                    && cur.version == r.version
                    && cur.address == r.address
                    && cur.docker_host == r.docker_host
                    && cur.container_id == r.container_id
                    && cur.labels == r.labels;
                // A retried registration (haddock resuming) answers what is there.
                return if same {
                    Ok(Reply::Instance(cur.clone()))
                } else {
                    Err(Error::InstanceExists(r.id.clone()))
                };
            }
        }
        let instance = Instance {
            id: r.id.clone(),
            service: r.service.clone(),
            version: r.version.clone(),
            address: r.address.clone(),
            docker_host: r.docker_host.clone(),
            container_id: r.container_id.clone(),
            labels: r.labels.clone(),
            state: r.state,
            registered_at: ctx.now,
            last_heartbeat: ctx.now,
            load: InstanceLoad::default(),
        };
        b.push(Change::Instance(instance.clone()));
        Ok(Reply::Instance(instance))
    }

    fn set_state(
        &self,
        id: &str,
        state: InstanceState,
        ctx: Ctx,
        b: &mut Batch,
    ) -> Result<Reply, Error> {
        let cur = self.instance(id)?;
        if cur.state == state {
            return Ok(Reply::Instance(cur));
        }
        let mut next = instance_moved(&cur, state, ctx)?;
        if state == InstanceState::Unhealthy {
            // Judged, not silent: its heartbeats (if any) must not revive it. Recording now
            // holds also right after a restart, when nothing was heard yet.
            next.last_heartbeat = ctx.now;
        }
        b.push(Change::Instance(next.clone()));
        Ok(Reply::Instance(next))
    }

    /// A heartbeat: the store then [hears](State::hear) it. Only an unhealthy instance's
    /// heartbeat can be an event (see below); the others are held in memory.
    fn heartbeat(&self, id: &str, ctx: Ctx, b: &mut Batch) -> Result<Reply, Error> {
        let cur = self.instance(id)?;
        // Silence is measured from the *recorded* time: an unhealthy instance's heartbeats
        // are recorded (below), a ready one's are not, so the recorded time of one the sweep
        // demoted is old. The heard time could be fresh on a replica that heard it just
        // before another demoted it, and the instance would then never come back.
        let age = ctx.now.saturating_sub(self.instances[id].last_heartbeat);
        let next = match cur.state {
            InstanceState::Gone => return Ok(Reply::Instance(cur)),
            // Only an instance that went unhealthy by *silence* is revived by a heartbeat; one
            // that haddock marked unhealthy while it kept heartbeating stays so.
            InstanceState::Unhealthy if age > ctx.heartbeat_ttl_ms => {
                instance_moved(&cur, InstanceState::Ready, ctx)?
            }
            // An unhealthy instance's heartbeats are still recorded, every TTL/4: after a
            // restart (nothing heard yet) they tell one that haddock judged unhealthy while it
            // kept beating, which stays so, from one that went silent, which its next
            // heartbeat revives. There are few unhealthy instances.
            InstanceState::Unhealthy if age >= ctx.heartbeat_ttl_ms / 4 => Instance {
                last_heartbeat: ctx.now,
                ..cur
            },
            _ => {
                return Ok(Reply::Instance(Instance {
                    last_heartbeat: ctx.now,
                    ..cur
                }))
            }
        };
        b.push(Change::Instance(next.clone()));
        Ok(Reply::Instance(next))
    }

    /// [`State::heartbeat`] for each of `ids` (each once); unknown ids are reported, not an
    /// error: one instance removed meanwhile must not cost the others their heartbeat.
    fn heartbeats(&self, ids: &[String], ctx: Ctx, b: &mut Batch) -> Result<Reply, Error> {
        if ids.len() > MAX_HEARTBEATS {
            return Err(Error::InvalidInput(format!(
                "at most {MAX_HEARTBEATS} ids per request, not {}",
                ids.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        let (mut accepted, mut unknown) = (0, Vec::new());
        for id in ids {
            if !seen.insert(id.as_str()) {
                continue;
            }
            match self.heartbeat(id, ctx, b) {
                Ok(_) => accepted += 1,
                Err(Error::UnknownInstance(_)) => unknown.push(id.clone()),
                Err(e) => return Err(e),
            }
        }
        Ok(Reply::Heartbeats(HeartbeatsAccepted { accepted, unknown }))
    }

    /// Publishes the sums of the report's service when due ([`LOAD_PUBLISH_MS`]); the store
    /// took the report in first ([`State::accept_report`]). Only changed sums become events,
    /// so proxies re-sending the same figures every second cost nothing.
    fn sessions(&self, report: &SessionReport, ctx: Ctx, b: &mut Batch) -> Result<Reply, Error> {
        self.service(&report.service)?;
        if !self.loads_due(&report.service, ctx) {
            // Kept in the sums; they go out with the next due report or sweep.
            return Ok(Reply::Accepted);
        }
        let mut changed = BTreeMap::new();
        self.recompute(&report.service, ctx.now, &mut changed, b);
        for inst in changed.into_values() {
            b.push(Change::Instance(inst));
        }
        Ok(Reply::Accepted)
    }

    /// Compares one service's sums with what was published; changed instances land in
    /// `changed` (merged with changes the caller already made), a changed traffic sum is
    /// pushed.
    fn recompute(
        &self,
        service: &str,
        now: UnixMillis,
        changed: &mut BTreeMap<String, Instance>,
        b: &mut Batch,
    ) {
        for inst in self.instances.values() {
            if inst.service != service || inst.state == InstanceState::Gone {
                continue;
            }
            let load = self.reports.load(service, &inst.id);
            let current = changed.get(&inst.id).unwrap_or(inst);
            if current.load != load {
                let next = Instance {
                    load,
                    ..current.clone()
                };
                changed.insert(inst.id.clone(), next);
            }
        }
        let traffic = self.reports.traffic(service, now);
        let empty = TrafficByVersion::new();
        if *self.traffic.get(service).unwrap_or(&empty) != traffic {
            b.push(Change::Traffic {
                service: service.to_string(),
                traffic,
            });
        }
    }

    fn sweep(&self, ctx: Ctx, b: &mut Batch) -> Reply {
        let mut changed = BTreeMap::new();
        for inst in self.instances.values() {
            // Only `ready` is demoted: a starting instance is haddock's to judge, and a draining
            // one keeps its sessions until haddock removes it.
            if inst.state == InstanceState::Ready
                && ctx.now.saturating_sub(self.seen(inst)) > ctx.heartbeat_ttl_ms
            {
                if let Ok(next) = instance_moved(inst, InstanceState::Unhealthy, ctx) {
                    changed.insert(inst.id.clone(), next);
                }
            }
        }
        // Once every proxy had time to report since this process started, every service's
        // sums are kept true (reports age out); before, only those of services that have
        // reports (a report between two due ones waits for this).
        let settled = ctx.now >= self.reports_since.saturating_add(SESSION_REPORT_TTL_MS);
        for service in self.services.keys() {
            if settled || self.reports.live_of(service, ctx.now).next().is_some() {
                self.recompute(service, ctx.now, &mut changed, b);
            }
        }
        for inst in changed.into_values() {
            b.push(Change::Instance(inst));
        }
        Reply::Accepted
    }

    fn create_release(&self, n: &NewRelease, ctx: Ctx, b: &mut Batch) -> Result<Reply, Error> {
        if let Some(held) = self.service(&n.service)?.lock {
            return Err(Error::ServiceLocked {
                service: n.service.clone(),
                who: held.who,
                message: held.message,
            });
        }
        check_name("to_version", &n.to_version, 128)?;
        if let Some(from) = &n.from_version {
            check_name("from_version", from, 128)?;
        }
        if n.image.trim().is_empty() {
            return Err(Error::InvalidInput("image must not be empty".into()));
        }
        if let Some(active) = self.active_release(&n.service) {
            return Err(Error::ReleaseActive {
                service: n.service.clone(),
                id: active.id.clone(),
                state: active.state.to_string(),
            });
        }
        let release = Release {
            id: format!("rel-{}", b.peek()),
            service: n.service.clone(),
            from_version: n.from_version.clone(),
            to_version: n.to_version.clone(),
            image: n.image.clone(),
            who: n.who.clone(),
            state: ReleaseState::Validating,
            step: 0,
            paused: false,
            control: None,
            containers: Vec::new(),
            created_at: ctx.now,
            updated_at: ctx.now,
            finished_at: None,
            reason: None,
            step_ms: BTreeMap::new(),
            status: ReleaseStatus::default(),
            actions: Vec::new(),
        };
        b.push(Change::Release(release.clone().into()));
        Ok(Reply::Release(release.into()))
    }

    fn update_release(
        &self,
        id: &str,
        u: &ReleaseUpdate,
        ctx: Ctx,
        b: &mut Batch,
    ) -> Result<Reply, Error> {
        let cur = self.release(id)?;
        if let Some(holder) = &u.lease {
            if holder.trim().is_empty() || holder.len() > 256 {
                return Err(Error::InvalidInput(
                    "lease must name its holder (1..=256 characters, e.g. pid@host)".into(),
                ));
            }
        } else if u.drop_lease {
            return Err(Error::InvalidInput(
                "drop_lease needs the holder giving it up in lease".into(),
            ));
        }
        let held = cur.status.driver.as_ref().filter(|l| l.is_fresh(ctx.now));
        if let (Some(holder), Some(lease)) = (&u.lease, held) {
            if *holder != lease.who {
                return Err(Error::LeaseHeld {
                    id: id.to_string(),
                    holder: lease.who.clone(),
                    age_ms: ctx.now.saturating_sub(lease.at_ms),
                });
            }
        }
        if let Some(expected) = u.expect_state {
            if expected != cur.state {
                // The move this update makes was already made: a retry after an answer lost
                // on the way (the lease check above shows no one else drives the release).
                if u.state == Some(cur.state) {
                    return Ok(Reply::Release(cur.into()));
                }
                return Err(Error::StateConflict {
                    id: id.to_string(),
                    expected: expected.to_string(),
                    actual: cur.state.to_string(),
                });
            }
        }
        let mut next = cur.clone();
        if let Some(state) = u.state {
            if state != cur.state {
                if cur.state.is_terminal() {
                    return Err(Error::ReleaseFinished(id.to_string()));
                }
                if !cur.state.can_become(state) {
                    return Err(Error::IllegalTransition {
                        what: "release",
                        id: id.to_string(),
                        from: cur.state.to_string(),
                        to: state.to_string(),
                    });
                }
                next.state = state;
                if state.is_terminal() {
                    next.finished_at = Some(ctx.now);
                }
            }
        }
        if let Some(step) = u.step {
            next.step = step;
        }
        if let Some(reason) = &u.reason {
            next.reason = Some(reason.clone());
        }
        if let Some(containers) = &u.containers {
            next.containers = containers.clone();
        }
        next.step_ms
            .extend(u.step_ms.iter().map(|(k, v)| (k.clone(), *v)));
        if let Some(status) = &u.status {
            // The lease is the locator's to record: a status never sets or clears it.
            next.status = ReleaseStatus {
                driver: next.status.driver.take(),
                ..status.clone()
            };
        }
        if let Some(holder) = &u.lease {
            next.status.driver = if u.drop_lease || next.state.is_terminal() {
                None
            } else {
                Some(Lease {
                    who: holder.clone(),
                    at_ms: ctx.now,
                })
            };
        }
        if u.clear_control {
            next.control = None;
        }
        // Identical update: a retry of something already committed, answered as a success.
        if next == cur {
            return Ok(Reply::Release(cur.into()));
        }
        if cur.state.is_terminal() {
            return Err(Error::ReleaseFinished(id.to_string()));
        }
        next.updated_at = ctx.now;
        b.push(Change::Release(next.clone().into()));
        Ok(Reply::Release(next.into()))
    }

    fn control(
        &self,
        id: &str,
        control: Control,
        who: &str,
        ctx: Ctx,
        b: &mut Batch,
    ) -> Result<Reply, Error> {
        let cur = self.release(id)?;
        if cur.state.is_terminal() {
            return Err(Error::ReleaseFinished(id.to_string()));
        }
        if let Some(why) = control_refusal(cur.state, control) {
            return Err(Error::ControlRefused {
                id: id.to_string(),
                state: cur.state.to_string(),
                why: why.to_string(),
            });
        }
        let mut next = cur.clone();
        match control {
            Control::Pause => next.paused = true,
            Control::Resume => next.paused = false,
            Control::Promote | Control::Abort => next.control = Some(control),
        }
        if next == cur {
            return Ok(Reply::Release(cur.into()));
        }
        next.actions.push(OperatorAction {
            control,
            who: who.to_string(),
            at: ctx.now,
        });
        let excess = next.actions.len().saturating_sub(ACTIONS_KEPT);
        next.actions.drain(..excess);
        next.updated_at = ctx.now;
        b.push(Change::Release(next.clone().into()));
        Ok(Reply::Release(next.into()))
    }

    /// The services a command would change, as far as this state knows (an unknown instance
    /// or release names none: the command then fails on its own). A token scoped to some
    /// services may only send commands whose every service is among them.
    pub fn services_of(&self, command: &Command) -> Vec<String> {
        match command {
            Command::PutService { name: service, .. }
            | Command::SetWeights { service, .. }
            | Command::RecordLimits { service, .. }
            | Command::Lock { service, .. } => vec![service.clone()],
            Command::Register(r) => vec![r.service.clone()],
            Command::Sessions(r) => vec![r.service.clone()],
            Command::CreateRelease(n) => vec![n.service.clone()],
            Command::SetState { id, .. } | Command::Heartbeat { id } => self
                .instances
                .get(id)
                .map(|i| i.service.clone())
                .into_iter()
                .collect(),
            Command::Heartbeats { ids } => {
                let services: std::collections::BTreeSet<&str> = ids
                    .iter()
                    .filter_map(|id| self.instances.get(id))
                    .map(|i| i.service.as_str())
                    .collect();
                services.into_iter().map(str::to_string).collect()
            }
            Command::UpdateRelease { id, .. } | Command::Control { id, .. } => {
                self.release(id).map(|r| r.service).into_iter().collect()
            }
            Command::Sweep => Vec::new(),
        }
    }
}

/// Why an operator control means nothing in `state` (of an unfinished release), if it does not.
/// Pause and promote act on the canary steps, so they end with the promotion; abort sends
/// users back to the old version as long as its containers run, so it ends at `removing`.
fn control_refusal(state: ReleaseState, control: Control) -> Option<&'static str> {
    use ReleaseState::*;
    let before_promotion = matches!(
        state,
        Validating | Starting | WaitingHealthy | Registered | Shifting
    );
    match control {
        Control::Resume => None,
        Control::Pause | Control::Promote if before_promotion => None,
        Control::Pause | Control::Promote if state == RollingBack => {
            Some("it is rolling back to the old version")
        }
        Control::Pause => Some("the new version is promoted: there is no canary step left to pause"),
        Control::Promote => Some("it is already promoted"),
        Control::Abort if state == Removing => Some(
            "the old version's containers are being removed, so there is nothing to go back to; release the old tag instead",
        ),
        Control::Abort if state == RollingBack => Some("it is already rolling back"),
        Control::Abort => None,
    }
}

/// The only way an existing instance's state changes (`set_state`, a heartbeat's revival, the
/// sweeper's expiry): the move must be one [`InstanceState::can_become`] allows; becoming
/// ready is proof of life, so the heartbeat clock restarts (without it the sweeper could
/// demote it again at once). A registration creates an instance rather than moving one; the
/// from → to line is logged when the change commits ([`State::log_change`]).
fn instance_moved(cur: &Instance, to: InstanceState, ctx: Ctx) -> Result<Instance, Error> {
    if !cur.state.can_become(to) {
        return Err(Error::IllegalTransition {
            what: "instance",
            id: cur.id.clone(),
            from: cur.state.to_string(),
            to: to.to_string(),
        });
    }
    let mut next = Instance {
        state: to,
        ..cur.clone()
    };
    if to == InstanceState::Ready {
        next.last_heartbeat = ctx.now;
    }
    Ok(next)
}

/// The numeric part of `rel-<revision>`, so that history sorts correctly within a millisecond.
fn release_seq(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn check_name(what: &str, value: &str, max: usize) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:+".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "{what} `{value}` must be 1..={max} characters of letters, digits and -_.:+"
        )))
    }
}

/// `host:port` with a DNS name, an IPv4 address or a bracketed IPv6 address, and a port > 0.
pub fn check_address(address: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::InvalidAddress(format!("address `{address}`: {why}")));
    let Some((host, port)) = address.rsplit_once(':') else {
        return bad("expected host:port");
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return bad("port must be 1..=65535"),
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => bad("bad IPv6 address"),
        };
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        });
    if name_ok {
        Ok(())
    } else {
        bad("host must be a DNS name, an IPv4 address or [IPv6]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Ctx = Ctx {
        now: 1_000_000,
        heartbeat_ttl_ms: 10_000,
        load_publish_ms: LOAD_PUBLISH_MS,
    };

    /// Runs a command as the embedded store does: a report is taken in first, reports age
    /// out before a sweep, and a report's publication and heartbeats are noted once it
    /// succeeded.
    fn run(state: &mut State, cmd: Command, ctx: Ctx) -> Result<Reply, Error> {
        match &cmd {
            Command::Sessions(r) => state.accept_report(r, ctx.now)?,
            Command::Sweep => state.prune_reports(ctx.now),
            _ => {}
        }
        let out = state.execute(&cmd, ctx)?;
        for e in &out.events {
            assert_eq!(e.revision, state.revision + 1, "events are consecutive");
            state.apply(e);
        }
        if let Command::Sessions(r) = &cmd {
            state.note_report(&r.service, ctx);
        }
        let heard = State::heartbeat_ids(&cmd).to_vec();
        state.hear(heard.iter().map(|id| (id.as_str(), ctx.now)));
        Ok(out.reply)
    }

    /// How many events `cmd` would commit, run on a copy of the state.
    fn events_of(state: &State, cmd: Command, ctx: Ctx) -> u64 {
        let mut copy = state.clone();
        run(&mut copy, cmd, ctx).unwrap();
        copy.revision - state.revision
    }

    fn spec() -> ServiceSpec {
        ServiceSpec {
            sessions: SessionSettings {
                cookie_name: "hd".into(),
                idle_ttl_ms: 1000,
                max_drain_ms: 5000,
            },
            routes: Default::default(),
        }
    }

    fn inst(id: &str, version: &str, state: InstanceState) -> Command {
        Command::Register(RegisterInstance {
            id: id.into(),
            service: "svc".into(),
            version: version.into(),
            address: "127.0.0.1:8080".into(),
            docker_host: String::new(),
            container_id: String::new(),
            labels: BTreeMap::new(),
            state,
        })
    }

    fn with_service() -> State {
        let mut s = State::default();
        run(
            &mut s,
            Command::PutService {
                name: "svc".into(),
                spec: spec(),
            },
            T,
        )
        .unwrap();
        s
    }

    fn weights(pairs: &[(&str, u8)]) -> WeightsUpdate {
        WeightsUpdate {
            weights: pairs.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
            primary_version: None,
        }
    }

    #[test]
    fn weights_need_ready_versions_and_sum_100() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        run(&mut s, inst("b", "2", InstanceState::Starting), T).unwrap();
        let set = |w| Command::SetWeights {
            service: "svc".into(),
            update: w,
            if_match: None,
        };
        let e = run(&mut s, set(weights(&[("1", 90), ("2", 10)])), T).unwrap_err();
        assert_eq!(e.code(), "invalid_weights");
        let e = run(&mut s, set(weights(&[("1", 90)])), T).unwrap_err();
        assert!(e.to_string().contains("sum to 90"), "{e}");
        let e = run(&mut s, set(weights(&[("1", 101)])), T).unwrap_err();
        assert_eq!(e.code(), "invalid_weights");
        let rev = s.revision;
        let e = run(&mut s, set(weights(&[("1", 100), ("2", 0)])), T).unwrap_err();
        assert_eq!(e.code(), "invalid_weights");
        assert_eq!(s.revision, rev, "nothing changed");
        let Reply::Service(svc) = run(&mut s, set(weights(&[("1", 100)])), T).unwrap() else {
            panic!()
        };
        assert_eq!(
            svc.primary_version.as_deref(),
            Some("1"),
            "first 100 % becomes primary"
        );
        assert_eq!(svc.revision, s.revision);
    }

    #[test]
    fn limit_changes_are_kept_checked_and_bounded() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let change = |id: &str, to: Option<u64>| Command::RecordLimits {
            service: "svc".into(),
            change: NewLimitsChange {
                who: "alice".into(),
                instances: vec![InstanceLimits {
                    id: id.into(),
                    memory_from: Some(256 << 20),
                    memory_to: to,
                    nano_cpus_from: None,
                    nano_cpus_to: None,
                }],
            },
        };
        let rev = s.revision;
        for (bad, code) in [
            (change("nope", Some(512 << 20)), "unknown_instance"),
            (change("a", None), "invalid_input"),
            (change("a", Some(1 << 20)), "invalid_input"),
        ] {
            assert_eq!(run(&mut s, bad, T).unwrap_err().code(), code);
        }
        let mut nobody = change("a", Some(512 << 20));
        if let Command::RecordLimits { change, .. } = &mut nobody {
            change.who = " ".into();
        }
        assert_eq!(run(&mut s, nobody, T).unwrap_err().code(), "invalid_input");
        assert_eq!(s.revision, rev, "a refused record changes nothing");
        let Reply::Service(svc) = run(&mut s, change("a", Some(512 << 20)), T).unwrap() else {
            panic!()
        };
        assert_eq!(svc.limit_changes.len(), 1);
        assert_eq!(svc.limit_changes[0].at, T.now);
        assert_eq!(svc.limit_changes[0].instances[0].memory_to, Some(512 << 20));
        for n in 0..LIMIT_CHANGES_KEPT as u64 + 5 {
            run(&mut s, change("a", Some((64 + n) << 20)), T).unwrap();
        }
        let svc = s.service("svc").unwrap();
        assert_eq!(svc.limit_changes.len(), LIMIT_CHANGES_KEPT, "bounded");
        assert_eq!(
            svc.limit_changes.last().unwrap().instances[0].memory_to,
            Some((64 + LIMIT_CHANGES_KEPT as u64 + 4) << 20),
            "the newest kept"
        );
    }

    #[test]
    fn a_held_deploy_lock_refuses_releases_and_a_second_lock_until_released() {
        let mut s = with_service();
        let lock = |who: &str, message: &str| Command::Lock {
            service: "svc".into(),
            lock: Some(NewLock {
                who: who.into(),
                message: message.into(),
            }),
        };
        let unlock = Command::Lock {
            service: "svc".into(),
            lock: None,
        };
        let release = Command::CreateRelease(NewRelease {
            service: "svc".into(),
            from_version: None,
            to_version: "2".into(),
            image: "img:2".into(),
            who: "ci".into(),
        });
        let rev = s.revision;
        for bad in [
            lock(" ", "why"),
            lock("alice", ""),
            lock("alice", "a\u{7}b"),
        ] {
            assert_eq!(run(&mut s, bad, T).unwrap_err().code(), "invalid_input");
        }
        assert_eq!(run(&mut s, unlock.clone(), T).map(|_| ()), Ok(()));
        assert_eq!(
            s.revision, rev,
            "refusals and a no-op unlock change nothing"
        );

        let Reply::Service(svc) = run(&mut s, lock("alice", "db migration"), T).unwrap() else {
            panic!()
        };
        let held = svc.lock.unwrap();
        assert_eq!((held.who.as_str(), held.at), ("alice", T.now));
        let e = run(&mut s, release.clone(), T).unwrap_err();
        assert_eq!(e.code(), "service_locked");
        assert!(e.to_string().contains("alice: db migration"), "{e}");
        let e = run(&mut s, lock("bob", "mine now"), T).unwrap_err();
        assert_eq!(e.code(), "service_locked", "a held lock is not taken over");

        let Reply::Service(svc) = run(&mut s, unlock, T).unwrap() else {
            panic!()
        };
        assert_eq!(svc.lock, None);
        assert!(matches!(run(&mut s, release, T), Ok(Reply::Release(_))));
    }

    #[test]
    fn if_match_compares_the_service_revision() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let rev = s.service("svc").unwrap().revision;
        let cmd = |m| Command::SetWeights {
            service: "svc".into(),
            update: weights(&[("1", 100)]),
            if_match: Some(m),
        };
        let e = run(&mut s, cmd(rev + 7), T).unwrap_err();
        assert_eq!(e.code(), "revision_mismatch");
        run(&mut s, cmd(rev), T).unwrap();
    }

    #[test]
    fn instance_lifecycle_and_heartbeat_ttl() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let later = Ctx {
            now: T.now + 10_001,
            ..T
        };
        run(&mut s, Command::Sweep, later).unwrap();
        assert_eq!(s.instance("a").unwrap().state, InstanceState::Unhealthy);
        run(&mut s, Command::Heartbeat { id: "a".into() }, later).unwrap();
        assert_eq!(
            s.instance("a").unwrap().state,
            InstanceState::Ready,
            "revived"
        );
        run(
            &mut s,
            Command::SetState {
                id: "a".into(),
                state: InstanceState::Draining,
            },
            later,
        )
        .unwrap();
        let e = run(
            &mut s,
            Command::SetState {
                id: "a".into(),
                state: InstanceState::Starting,
            },
            later,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot move instance `a` from draining to starting"
        );
        // Explicitly unhealthy while heartbeating: a heartbeat does not revive it.
        run(&mut s, inst("b", "1", InstanceState::Ready), later).unwrap();
        run(
            &mut s,
            Command::SetState {
                id: "b".into(),
                state: InstanceState::Unhealthy,
            },
            later,
        )
        .unwrap();
        run(
            &mut s,
            Command::Heartbeat { id: "b".into() },
            Ctx {
                now: later.now + 3000,
                ..T
            },
        )
        .unwrap();
        assert_eq!(s.instance("b").unwrap().state, InstanceState::Unhealthy);
    }

    /// A ready instance's heartbeats are held in memory, not written: they keep it ready past
    /// the TTL and show in its `last_heartbeat`, and silence still demotes it.
    #[test]
    fn heartbeats_are_heard_not_written() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let at = |ms| Ctx {
            now: T.now + ms,
            ..T
        };
        let beat = || Command::Heartbeat { id: "a".into() };
        assert_eq!(events_of(&s, beat(), at(8_000)), 0);
        run(&mut s, beat(), at(8_000)).unwrap();
        assert_eq!(s.instance("a").unwrap().last_heartbeat, T.now + 8_000);
        run(&mut s, Command::Sweep, at(15_000)).unwrap();
        assert_eq!(s.instance("a").unwrap().state, InstanceState::Ready);
        run(&mut s, Command::Sweep, at(18_001)).unwrap();
        assert_eq!(s.instance("a").unwrap().state, InstanceState::Unhealthy);
        // An unhealthy instance's heartbeats are recorded (every TTL/4), so that a restarted
        // locator still tells a silent one from one judged unhealthy while beating.
        assert_eq!(events_of(&s, beat(), at(18_001)), 1, "the revival");
    }

    /// A locator that restarts has heard nothing yet: every instance gets one TTL from the
    /// start before it can be found silent.
    #[test]
    fn after_a_restart_instances_get_a_ttl_to_be_heard() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let restart = T.now + 60_000;
        let mut s: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        s.start_reports(restart);
        let at = |ms| Ctx {
            now: restart + ms,
            ..T
        };
        run(&mut s, Command::Sweep, at(9_000)).unwrap();
        assert_eq!(s.instance("a").unwrap().state, InstanceState::Ready);
        run(&mut s, Command::Sweep, at(10_001)).unwrap();
        assert_eq!(s.instance("a").unwrap().state, InstanceState::Unhealthy);
    }

    #[test]
    fn batched_heartbeats_count_each_known_instance_once() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        run(&mut s, inst("b", "1", InstanceState::Ready), T).unwrap();
        let later = Ctx {
            now: T.now + 2500,
            ..T
        };
        let ids = ["a", "b", "a", "gone"].map(String::from).to_vec();
        let Reply::Heartbeats(h) = run(&mut s, Command::Heartbeats { ids }, later).unwrap() else {
            panic!("not a heartbeats reply")
        };
        assert_eq!((h.accepted, h.unknown), (2, vec!["gone".to_string()]));
        for id in ["a", "b"] {
            assert_eq!(
                s.instance(id).unwrap().last_heartbeat,
                later.now,
                "{id} heard"
            );
        }
        let too_many = vec!["a".to_string(); MAX_HEARTBEATS + 1];
        assert!(matches!(
            s.execute(&Command::Heartbeats { ids: too_many }, later),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn session_reports_sum_over_proxies_and_age_out() {
        let mut s = with_service();
        s.start_reports(T.now);
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let report = |proxy: &str, n: u64| {
            Command::Sessions(SessionReport {
                proxy_id: proxy.into(),
                service: "svc".into(),
                instances: [(
                    "a".to_string(),
                    InstanceLoad {
                        live_sessions: n,
                        in_flight: 1,
                    },
                )]
                .into(),
                versions: [(
                    "1".to_string(),
                    VersionTraffic {
                        requests: 10 * n,
                        responses_5xx: n,
                        p99_ms: n as f64,
                    },
                )]
                .into(),
                seq: 0,
                base: None,
            })
        };
        run(&mut s, report("p1", 3), T).unwrap();
        run(
            &mut s,
            report("p2", 4),
            Ctx {
                now: T.now + 2000,
                ..T
            },
        )
        .unwrap();
        let a = s.instance("a").unwrap();
        assert_eq!(
            a.load,
            InstanceLoad {
                live_sessions: 7,
                in_flight: 2
            }
        );
        let t = s.snapshot().traffic["svc"]["1"];
        assert_eq!((t.requests, t.responses_5xx, t.p99_ms), (70, 7, 4.0));
        // Same figures again: no event.
        let again = Ctx {
            now: T.now + 2100,
            ..T
        };
        assert_eq!(events_of(&s, report("p2", 4), again), 0);
        // p1 ages out.
        run(
            &mut s,
            Command::Sweep,
            Ctx {
                now: T.now + 5500,
                ..T
            },
        )
        .unwrap();
        assert_eq!(s.instance("a").unwrap().load.live_sessions, 4);
    }

    /// Reports within [`LOAD_PUBLISH_MS`] of a published one write nothing; the sweep (or the
    /// next due report) publishes their sums.
    #[test]
    fn reports_between_publications_are_summed_by_the_next_one() {
        let mut s = with_service();
        s.start_reports(T.now);
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let at = |ms| Ctx {
            now: T.now + ms,
            ..T
        };
        let first = sessions("p1", &[("a", 2)], &[]);
        assert_eq!(
            events_of(&s, first.clone(), at(0)),
            1,
            "the first report publishes"
        );
        run(&mut s, first, at(0)).unwrap();
        for (proxy, ms) in [("p2", 100), ("p3", 400), ("p4", 900)] {
            let report = sessions(proxy, &[("a", 1)], &[]);
            assert_eq!(
                events_of(&s, report.clone(), at(ms)),
                0,
                "{proxy} published within the period"
            );
            run(&mut s, report, at(ms)).unwrap();
        }
        assert_eq!(s.instance("a").unwrap().load.live_sessions, 2);
        // The sweep publishes what the reports in between said, before the reports settled.
        run(&mut s, Command::Sweep, at(950)).unwrap();
        assert_eq!(s.instance("a").unwrap().load.live_sessions, 5);
        // A report after the period publishes at once.
        assert_eq!(events_of(&s, sessions("p2", &[("a", 3)], &[]), at(1000)), 1);
    }

    fn sessions(proxy: &str, instances: &[(&str, u64)], versions: &[(&str, u64)]) -> Command {
        Command::Sessions(SessionReport {
            proxy_id: proxy.into(),
            service: "svc".into(),
            instances: instances
                .iter()
                .map(|(id, n)| {
                    let load = InstanceLoad {
                        live_sessions: *n,
                        in_flight: *n,
                    };
                    (id.to_string(), load)
                })
                .collect(),
            versions: versions
                .iter()
                .map(|(v, n)| {
                    let t = VersionTraffic {
                        requests: *n,
                        responses_5xx: *n,
                        p99_ms: 1.0,
                    };
                    (v.to_string(), t)
                })
                .collect(),
            seq: 0,
            base: None,
        })
    }

    /// A report of changes applies to the proxy's previous report; without one (a restarted
    /// locator), or with another one than it is based on, it is refused with
    /// `full_report_needed` and counts nothing.
    #[test]
    fn a_report_of_changes_needs_the_previous_report() {
        let mut s = with_service();
        s.start_reports(T.now);
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        run(&mut s, inst("b", "1", InstanceState::Ready), T).unwrap();
        let changes = |proxy: &str, instances: &[(&str, u64)]| {
            let Command::Sessions(mut r) = sessions(proxy, instances, &[]) else {
                unreachable!()
            };
            r.base = Some(0);
            Command::Sessions(r)
        };
        assert!(matches!(
            run(&mut s, changes("p1", &[("a", 5)]), T),
            Err(Error::FullReportNeeded { .. })
        ));
        assert_eq!(s.instance("a").unwrap().load.live_sessions, 0);
        run(&mut s, sessions("p1", &[("a", 2), ("b", 3)], &[]), T).unwrap();
        let later = Ctx {
            now: T.now + 1000,
            ..T
        };
        run(&mut s, changes("p1", &[("a", 0)]), later).unwrap();
        let loads = (
            s.instance("a").unwrap().load.live_sessions,
            s.instance("b").unwrap().load.live_sessions,
        );
        assert_eq!(loads, (0, 3), "b kept its figure from the whole report");
        // Changes based on another report than the copy held (the proxy came back from
        // another replica, or a late retry) are refused too.
        let Command::Sessions(mut newer) = sessions("p1", &[("a", 1)], &[]) else {
            unreachable!()
        };
        newer.seq = 7;
        run(&mut s, Command::Sessions(newer), later).unwrap();
        assert!(matches!(
            run(&mut s, changes("p1", &[("a", 4)]), later),
            Err(Error::FullReportNeeded { .. })
        ));
        assert_eq!(s.reports.live("svc", "p1", later.now).unwrap().seq, 7);
        // The previous report ages out: changes are refused again.
        let aged = Ctx {
            now: later.now + SESSION_REPORT_TTL_MS,
            ..T
        };
        assert!(matches!(
            run(&mut s, changes("p1", &[("a", 1)]), aged),
            Err(Error::FullReportNeeded { .. })
        ));
    }

    #[test]
    fn session_sums_saturate_instead_of_wrapping() {
        let mut s = with_service();
        s.start_reports(T.now);
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        run(
            &mut s,
            sessions("p1", &[("a", u64::MAX)], &[("1", u64::MAX)]),
            T,
        )
        .unwrap();
        // Wrapping would turn MAX + 2 into 1.
        run(&mut s, sessions("p2", &[("a", 2)], &[("1", 2)]), T).unwrap();
        let load = s.instance("a").unwrap().load;
        assert_eq!((load.live_sessions, load.in_flight), (u64::MAX, u64::MAX));
        let t = s.snapshot().traffic["svc"]["1"];
        assert_eq!((t.requests, t.responses_5xx), (u64::MAX, u64::MAX));
    }

    #[test]
    fn session_reports_keep_only_known_instances_and_versions() {
        let mut s = with_service();
        s.start_reports(T.now);
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        run(&mut s, inst("b", "2", InstanceState::Ready), T).unwrap();
        run(
            &mut s,
            Command::SetState {
                id: "b".into(),
                state: InstanceState::Gone,
            },
            T,
        )
        .unwrap();
        let invented: Vec<(String, u64)> = (0..2000).map(|i| (format!("v{i:04}"), 1)).collect();
        let mut versions: Vec<(&str, u64)> =
            invented.iter().map(|(v, n)| (v.as_str(), *n)).collect();
        // "2" only has a gone instance: a report racing its removal still counts it.
        versions.extend([("1", 5), ("2", 6)]);
        // "b" is gone, "x" was never registered: a racing report is accepted, they are ignored.
        let report = sessions("p1", &[("a", 3), ("b", 4), ("x", 9)], &versions);
        let before = serde_json::to_vec(&s.snapshot()).unwrap().len();
        assert_eq!(run(&mut s, report, T).unwrap(), Reply::Accepted);
        let traffic = &s.snapshot().traffic["svc"];
        assert_eq!(traffic.keys().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!((traffic["1"].requests, traffic["2"].requests), (5, 6));
        assert_eq!(s.instance("a").unwrap().load.live_sessions, 3);
        assert_eq!(s.instance("b").unwrap().load.live_sessions, 0);
        assert!(s.instance("x").is_err(), "a report registers nothing");
        // What is remembered for the next sums is the filtered report too.
        let kept = s.reports.live("svc", "p1", T.now).unwrap();
        assert_eq!(kept.instances.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(kept.versions.keys().collect::<Vec<_>>(), ["1", "2"]);
        let after = serde_json::to_vec(&s.snapshot()).unwrap().len();
        assert!(
            after < before + 200,
            "snapshot grew from {before} to {after} bytes"
        );
    }

    #[test]
    fn one_active_release_per_service() {
        let mut s = with_service();
        let new = Command::CreateRelease(NewRelease {
            service: "svc".into(),
            from_version: None,
            to_version: "2".into(),
            image: "img:2".into(),
            who: "ci".into(),
        });
        let Reply::Release(r) = run(&mut s, new.clone(), T).unwrap() else {
            panic!()
        };
        let e = run(&mut s, new.clone(), T).unwrap_err();
        assert_eq!(e.code(), "release_active");
        assert!(e.to_string().contains(&r.id));
        let upd = |state| Command::UpdateRelease {
            id: r.id.clone(),
            update: ReleaseUpdate {
                state: Some(state),
                ..Default::default()
            },
        };
        let e = run(&mut s, upd(ReleaseState::Done), T).unwrap_err();
        assert_eq!(e.code(), "illegal_transition");
        run(&mut s, upd(ReleaseState::Failed), T).unwrap();
        let done = s.release(&r.id).unwrap();
        assert_eq!(done.finished_at, Some(T.now));
        run(&mut s, upd(ReleaseState::Failed), T).unwrap(); // idempotent retry
        let e = run(&mut s, upd(ReleaseState::Starting), T).unwrap_err();
        assert_eq!(e.code(), "release_finished");
        let Reply::Release(r2) = run(
            &mut s,
            new,
            Ctx {
                now: T.now + 1,
                ..T
            },
        )
        .unwrap() else {
            panic!()
        };
        let history = s.releases(Some("svc"), false);
        assert_eq!(history[0].id, r2.id, "newest first");
        assert_eq!(s.releases(None, true).len(), 1);
        run(
            &mut s,
            Command::Control {
                id: r2.id.clone(),
                control: Control::Pause,
                who: "alice".into(),
            },
            T,
        )
        .unwrap();
        run(
            &mut s,
            Command::Control {
                id: r2.id.clone(),
                control: Control::Abort,
                who: "alice".into(),
            },
            T,
        )
        .unwrap();
        let r2 = s.release(&r2.id).unwrap();
        assert!(r2.paused);
        assert_eq!(r2.control, Some(Control::Abort));
        // Each control is kept under its sender's name.
        let did: Vec<(Control, &str)> = r2
            .actions
            .iter()
            .map(|a| (a.control, a.who.as_str()))
            .collect();
        assert_eq!(did, [(Control::Pause, "alice"), (Control::Abort, "alice")]);
    }

    /// A release of `svc` walked to `state` along the happy path.
    fn release_at(s: &mut State, state: ReleaseState) -> Release {
        let Reply::Release(r) = run(
            s,
            Command::CreateRelease(NewRelease {
                service: "svc".into(),
                from_version: Some("1".into()),
                to_version: "2".into(),
                image: "img:2".into(),
                who: "ci".into(),
            }),
            T,
        )
        .unwrap() else {
            panic!()
        };
        let path = ReleaseState::HAPPY_PATH;
        for next in path.iter().skip(1) {
            if s.release(&r.id).unwrap().state == state {
                break;
            }
            let update = ReleaseUpdate {
                state: Some(*next),
                ..Default::default()
            };
            run(
                s,
                Command::UpdateRelease {
                    id: r.id.clone(),
                    update,
                },
                T,
            )
            .unwrap();
        }
        s.release(&r.id).unwrap()
    }

    #[test]
    fn a_state_update_names_the_state_it_leaves_and_a_stale_one_is_refused() {
        let mut s = with_service();
        let r = release_at(&mut s, ReleaseState::Shifting);
        let cas = |expect, to| Command::UpdateRelease {
            id: r.id.clone(),
            update: ReleaseUpdate {
                expect_state: Some(expect),
                state: Some(to),
                ..Default::default()
            },
        };
        run(
            &mut s,
            cas(ReleaseState::Shifting, ReleaseState::Promoted),
            T,
        )
        .unwrap();
        // The same move sent again (its answer was lost) is answered, not refused.
        run(
            &mut s,
            cas(ReleaseState::Shifting, ReleaseState::Promoted),
            T,
        )
        .unwrap();
        // A second driver that still believes the release is shifting cannot roll it back.
        let e = run(
            &mut s,
            cas(ReleaseState::Shifting, ReleaseState::RollingBack),
            T,
        )
        .unwrap_err();
        assert_eq!(e.code(), "state_conflict");
        assert_eq!(e.status(), http::StatusCode::CONFLICT);
        assert!(
            e.to_string().contains("promoted") && e.to_string().contains("shifting"),
            "{e}"
        );
        assert_eq!(s.release(&r.id).unwrap().state, ReleaseState::Promoted);
    }

    #[test]
    fn one_holder_drives_a_release_until_its_lease_lapses() {
        let mut s = with_service();
        let r = release_at(&mut s, ReleaseState::Shifting);
        let lease = |who: &str, step| Command::UpdateRelease {
            id: r.id.clone(),
            update: ReleaseUpdate {
                lease: Some(who.into()),
                step: Some(step),
                ..Default::default()
            },
        };
        let at = |ms| Ctx {
            now: T.now + ms,
            ..T
        };
        run(&mut s, lease("1@a", 1), at(0)).unwrap();
        let e = run(&mut s, lease("2@b", 2), at(LEASE_MS - 1)).unwrap_err();
        assert_eq!(e.code(), "lease_held");
        assert!(e.to_string().contains("1@a"), "{e}");
        assert_eq!(
            s.release(&r.id).unwrap().step,
            1,
            "a refused update changes nothing"
        );
        // Renewed by its holder, the lease holds on.
        run(&mut s, lease("1@a", 1), at(LEASE_MS - 1)).unwrap();
        assert!(run(&mut s, lease("2@b", 2), at(LEASE_MS + 1)).is_err());
        // Silent for LEASE_MS, it lapses and the other takes it.
        run(&mut s, lease("2@b", 2), at(2 * LEASE_MS)).unwrap();
        let rec = s.release(&r.id).unwrap();
        assert_eq!(
            rec.status.driver.as_ref().map(|l| l.who.as_str()),
            Some("2@b")
        );
        assert_eq!(rec.step, 2);
        // A status never touches the lease; dropping it frees the release at once.
        let status = Command::UpdateRelease {
            id: r.id.clone(),
            update: ReleaseUpdate {
                status: Some(ReleaseStatus {
                    waiting_for: Some("promote".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        run(&mut s, status, at(2 * LEASE_MS)).unwrap();
        assert!(s.release(&r.id).unwrap().status.driver.is_some());
        let drop = Command::UpdateRelease {
            id: r.id.clone(),
            update: ReleaseUpdate {
                lease: Some("2@b".into()),
                drop_lease: true,
                ..Default::default()
            },
        };
        run(&mut s, drop, at(2 * LEASE_MS)).unwrap();
        assert!(s.release(&r.id).unwrap().status.driver.is_none());
        run(&mut s, lease("1@a", 3), at(2 * LEASE_MS)).unwrap();
    }

    #[test]
    fn controls_are_refused_where_they_mean_nothing() {
        use ReleaseState::*;
        let control = |s: &mut State, id: &str, control| {
            run(
                s,
                Command::Control {
                    id: id.into(),
                    control,
                    who: "alice".into(),
                },
                T,
            )
        };
        for (state, abort_ok, pause_ok) in [
            (Validating, true, true),
            (Shifting, true, true),
            (Promoted, true, false),
            (Draining, true, false),
            (Removing, false, false),
        ] {
            let mut s = with_service();
            let r = release_at(&mut s, state);
            assert_eq!(r.state, state);
            for (c, ok) in [
                (Control::Pause, pause_ok),
                (Control::Promote, pause_ok),
                (Control::Abort, abort_ok),
            ] {
                match control(&mut s, &r.id, c) {
                    Ok(_) => assert!(ok, "{c:?} in {state}"),
                    Err(e) => {
                        assert!(!ok, "{c:?} in {state}: {e}");
                        assert_eq!(e.code(), "control_refused");
                        assert!(e.to_string().contains(&state.to_string()), "{e}");
                    }
                }
            }
            control(&mut s, &r.id, Control::Resume).unwrap();
        }
    }

    #[test]
    fn a_draining_instance_can_return_to_ready() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let set = |state| Command::SetState {
            id: "a".into(),
            state,
        };
        run(&mut s, set(InstanceState::Draining), T).unwrap();
        let later = Ctx {
            now: T.now + 10,
            ..T
        };
        run(&mut s, set(InstanceState::Ready), later).unwrap();
        let a = s.instance("a").unwrap();
        assert_eq!(a.state, InstanceState::Ready);
        assert_eq!(a.last_heartbeat, later.now, "ready again is proof of life");
        run(&mut s, set(InstanceState::Gone), T).unwrap();
        let e = run(&mut s, set(InstanceState::Ready), T).unwrap_err();
        assert_eq!(e.code(), "illegal_transition");
    }

    #[test]
    fn addresses_are_checked() {
        for ok in ["127.0.0.1:80", "optimizer-1:8080", "[::1]:9000", "a.b.c:1"] {
            check_address(ok).unwrap();
        }
        for bad in [
            "127.0.0.1",
            ":80",
            "host:0",
            "host:99999",
            "a b:80",
            "[zz]:80",
            "http://x:80",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replaying_events_rebuilds_the_same_state() {
        let mut s = with_service();
        run(&mut s, inst("a", "1", InstanceState::Ready), T).unwrap();
        let mut log = Vec::new();
        let mut replica = State::default();
        let mut live = State::default();
        for cmd in [
            Command::PutService {
                name: "svc".into(),
                spec: spec(),
            },
            inst("a", "1", InstanceState::Ready),
            Command::SetWeights {
                service: "svc".into(),
                update: weights(&[("1", 100)]),
                if_match: None,
            },
        ] {
            let out = live.execute(&cmd, T).unwrap();
            for e in out.events {
                live.apply(&e);
                log.push(e);
            }
        }
        for e in &log {
            replica.apply(e);
        }
        assert_eq!(replica.snapshot(), live.snapshot());
    }

    /// Runs `cmd` like [`run`], returning the events [`State::log_change`] wrote as JSON.
    fn logged(state: &mut State, cmd: Command, ctx: Ctx) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = state.execute(&cmd, ctx).unwrap();
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for e in &out.events {
                state.log_change(e);
                state.apply(e);
            }
        });
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"].clone())
            .collect()
    }

    #[test]
    fn every_state_change_is_one_log_event() {
        let mut s = State::default();
        let put = Command::PutService {
            name: "svc".into(),
            spec: spec(),
        };
        let ev = logged(&mut s, put, T);
        assert_eq!(
            (ev.len(), &ev[0]["message"]),
            (1, &"service registered".into())
        );

        let ev = logged(&mut s, inst("a", "1", InstanceState::Starting), T);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0]["message"], "instance state change");
        assert_eq!(
            (&ev[0]["instance"], &ev[0]["to_state"]),
            (&"a".into(), &"starting".into())
        );
        assert!(ev[0].get("from_state").is_none(), "{ev:?}");

        let new = Command::CreateRelease(NewRelease {
            service: "svc".into(),
            from_version: Some("1".into()),
            to_version: "2".into(),
            image: "img:2".into(),
            who: "ci".into(),
        });
        let ev = logged(&mut s, new, T);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0]["message"], "release state change");
        let id = ev[0]["release"].as_str().unwrap().to_string();
        assert_eq!(ev[0]["service"], "svc");
        assert_eq!(
            (&ev[0]["from_version"], &ev[0]["to_version"]),
            (&"1".into(), &"2".into())
        );
        assert_eq!(ev[0]["to_state"], "validating");

        let ready = Command::SetState {
            id: "a".into(),
            state: InstanceState::Ready,
        };
        let ev = logged(&mut s, ready, T);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (&ev[0]["from_state"], &ev[0]["to_state"]),
            (&"starting".into(), &"ready".into())
        );
        assert_eq!(ev[0]["release"], id.as_str(), "the active release is named");
        assert_eq!(ev[0]["version"], "1");

        let ev = logged(
            &mut s,
            Command::SetWeights {
                service: "svc".into(),
                update: weights(&[("1", 100)]),
                if_match: None,
            },
            T,
        );
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (&ev[0]["message"], &ev[0]["weights"]),
            (&"weights change".into(), &"1=100".into())
        );

        let update = |u: ReleaseUpdate| Command::UpdateRelease {
            id: id.clone(),
            update: u,
        };
        let ev = logged(
            &mut s,
            update(ReleaseUpdate {
                state: Some(ReleaseState::Starting),
                ..Default::default()
            }),
            T,
        );
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (&ev[0]["from_state"], &ev[0]["to_state"]),
            (&"validating".into(), &"starting".into())
        );
        let ev = logged(
            &mut s,
            update(ReleaseUpdate {
                step: Some(1),
                ..Default::default()
            }),
            T,
        );
        assert_eq!(
            (ev.len(), &ev[0]["message"], &ev[0]["step"]),
            (1, &"release step".into(), &serde_json::json!(1))
        );
        let ev = logged(
            &mut s,
            Command::Control {
                id: id.clone(),
                control: Control::Pause,
                who: "alice".into(),
            },
            T,
        );
        assert_eq!(
            (ev.len(), &ev[0]["message"], &ev[0]["paused"]),
            (1, &"release control".into(), &true.into())
        );

        // Bookkeeping that changes no state is not logged.
        let mut step_ms = BTreeMap::new();
        step_ms.insert("x".to_string(), 1);
        assert!(logged(
            &mut s,
            update(ReleaseUpdate {
                step_ms,
                ..Default::default()
            }),
            T
        )
        .is_empty());
        let later = Ctx {
            now: T.now + 5_000,
            ..T
        };
        assert!(logged(&mut s, Command::Heartbeat { id: "a".into() }, later).is_empty());
    }
}
