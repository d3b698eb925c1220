//! The release: a durable state machine recorded in the locator.
//!
//! ```text
//! validating → starting → waiting_healthy → registered → shifting(step..) → promoted
//!            → draining → removing → done
//! validating | starting | waiting_healthy | registered ──► failed        (no user saw it)
//! registered | shifting | promoted ──► rolling_back ──► rolled_back        (breach or abort)
//! ```
//!
//! [`Run::transition`] is the only place the state changes: it checks
//! `ReleaseState::can_become`, records the move (with the duration of the state it leaves) in
//! the locator, and logs one structured tracing event. The work of each state is idempotent and
//! depends only on the recorded state and on what Docker and the locator hold (containers are
//! found by their labels and deterministic names), so a run killed at any point continues with
//! `haddock release` (same tag) or `haddock resume`: nothing is done twice, nothing is orphaned.
//!
//! Infrastructure errors before any user could reach the new version end the release as
//! `failed` (containers removed); later ones leave it active and resumable (exit 3).

use crate::analysis::{self, Verdict};
use crate::docker::{ContainerEvent, ContainerPlan, Host, Liveness};
use crate::drain::{self, Until};
use crate::error::{Error, Result};
use crate::health::{self, NotHealthy, Probe, Streak};
use crate::image::Supply;
use crate::output::{Output, ReleaseReport};
use crate::spec::Spec;
use locator::api::{
    Control, InstanceState, NewRelease, RegisterInstance, Release, ReleaseState, ReleaseUpdate,
    Service, ServiceSpec, SessionSettings, TrafficByVersion, WeightsUpdate,
};
use locator::client::Client;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// How often a bake looks at events, controls and the traffic figures.
const TICK: Duration = Duration::from_millis(250);
/// How often haddock heartbeats the service's instances and its own lease on the release.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A release whose record was not touched for this long has no live haddock driving it.
pub const LEASE: Duration = Duration::from_secs(5);
/// Log lines kept in the error of an instance that never became healthy.
const LOG_LINES: usize = 30;

/// Everything a release needs: the spec, its Docker hosts, the locator.
#[derive(Debug)]
pub struct Deployer {
    pub client: Client,
    pub spec: Spec,
    pub hosts: Vec<Host>,
    pub out: Output,
    /// Recorded as the release's `who`.
    pub who: String,
}

/// How a release ended when it did not fail (failures are [`Error`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Released,
    /// The service already runs this version: nothing to do.
    AlreadyCurrent,
}

/// One new instance of the release.
#[derive(Debug, Clone)]
struct NewInstance {
    host: usize,
    plan: ContainerPlan,
    id: String,
}

/// The weights for `percent` % of new sessions on `to` (the rest on `from`); zero shares are
/// left out (the locator only takes versions with ready instances).
pub fn weights_for(from: Option<&str>, to: &str, percent: u32) -> WeightsUpdate {
    let percent = percent.min(100);
    let mut weights = BTreeMap::new();
    match from {
        Some(from) if from != to && percent < 100 => {
            weights.insert(from.to_string(), u8::try_from(100 - percent).unwrap_or(100));
            if percent > 0 {
                weights.insert(to.to_string(), u8::try_from(percent).unwrap_or(0));
            }
        }
        _ => {
            weights.insert(to.to_string(), 100);
        }
    }
    let primary_version = (percent >= 100 || from.is_none_or(|f| f == to)).then(|| to.to_string());
    WeightsUpdate {
        weights,
        primary_version,
    }
}

/// The canary steps this release walks: all the spec's steps, or only the final 100 % when
/// there is no old version to split with.
pub fn steps_to_walk(spec: &Spec, from: Option<&str>) -> Vec<(u32, Duration)> {
    let all: Vec<(u32, Duration)> = spec
        .rollout
        .steps
        .iter()
        .map(|s| (s.weight, s.pause))
        .collect();
    match from {
        Some(_) => all,
        None => all.into_iter().filter(|(w, _)| *w >= 100).collect(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Deployer {
    /// Connects to every Docker host of the spec.
    pub async fn new(client: Client, spec: Spec, out: Output) -> Result<Deployer> {
        let hosts = Host::connect_all(&spec).await?;
        let who = std::env::var("HADDOCK_WHO")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "haddock".into());
        Ok(Deployer {
            client,
            spec,
            hosts,
            out,
            who,
        })
    }

    fn service(&self) -> &str {
        &self.spec.service.name
    }

    /// Looks for `repo:tag` on every host, and (`image_source = "copy"`) for where a host that
    /// lacks it will get it from. Changes nothing: a tag that cannot reach every host is exit 2.
    async fn check_images(&self, tag: &str) -> Result<Supply> {
        Supply::survey(&self.spec, &self.hosts, tag).await
    }

    /// Brings `repo:tag` to every host that lacks it (copies, with progress lines), then
    /// `Ok(per-host "image has a HEALTHCHECK")`. Idempotent: hosts that hold it are left alone.
    async fn supply_images(&self, tag: &str) -> Result<Vec<bool>> {
        let supply = self.check_images(tag).await?;
        Ok(supply.fill(&self.hosts, &self.out).await?.healthcheck)
    }

    /// `haddock release SERVICE TAG`: a new release, or the continuation of the active one
    /// when it is to the same tag.
    pub async fn release(&self, tag: &str) -> Result<(Outcome, Option<Release>)> {
        // Nothing is changed before these checks pass.
        self.check_images(tag).await?;
        if let Some(active) = self.client.active_release(self.service()).await? {
            // A release to the same tag whose driver was killed a moment ago still shows a
            // fresh lease: wait for it to lapse rather than refuse, so that "run it again"
            // always continues a crashed release.
            let active = self.await_lease(active, tag).await?;
            if active.to_version == tag && !is_driven(&active) {
                self.out.step(
                    &format!(
                        "continuing active release {} (state {})",
                        active.id, active.state
                    ),
                    None,
                );
                return self
                    .drive(active)
                    .await
                    .map(|r| (Outcome::Released, Some(r)));
            }
            return Err(active_error(&active));
        }
        let current = match self.client.service(self.service()).await {
            Ok(s) => Some(s),
            Err(e) if e.status().is_some_and(|s| s.as_u16() == 404) => None,
            Err(e) => return Err(e.into()),
        };
        let from = current.as_ref().and_then(|s| s.primary_version.clone());
        if from.as_deref() == Some(tag) {
            let mut running = false;
            for h in &self.hosts {
                running |= h
                    .find(self.service(), None)
                    .await?
                    .iter()
                    .any(|c| c.version == tag && c.running);
            }
            if running {
                heartbeat_once(&self.client, &self.hosts, self.service()).await;
                self.out.step(
                    &format!("{} already runs {tag}: nothing to do", self.service()),
                    None,
                );
                return Ok((Outcome::AlreadyCurrent, None));
            }
        }
        let sessions = &self.spec.sessions;
        let settings = SessionSettings {
            cookie_name: sessions.cookie.clone(),
            idle_ttl_ms: ms(sessions.idle_ttl),
            max_drain_ms: ms(sessions.max_drain),
        };
        if current.as_ref().is_none_or(|s| s.sessions != settings) {
            self.client
                .put_service(self.service(), &ServiceSpec { sessions: settings })
                .await?;
        }
        let new = NewRelease {
            service: self.service().to_string(),
            from_version: from,
            to_version: tag.to_string(),
            image: self.spec.image_ref(tag),
            who: self.who.clone(),
        };
        let rec = match self.client.create_release(&new).await {
            Ok(r) => r,
            Err(e) if e.code() == Some("release_active") => {
                return Err(match self.client.active_release(self.service()).await? {
                    Some(a) => active_error(&a),
                    None => e.into(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        self.out.step(
            &format!(
                "release {} of {}: {} → {tag}",
                rec.id,
                self.service(),
                rec.from_version.as_deref().unwrap_or("(none)")
            ),
            None,
        );
        self.drive(rec).await.map(|r| (Outcome::Released, Some(r)))
    }

    /// `haddock resume SERVICE`: continues the active release from its recorded state.
    pub async fn resume(&self) -> Result<Release> {
        let Some(active) = self.client.active_release(self.service()).await? else {
            return Err(Error::BadInput(format!(
                "service {} has no active release to resume",
                self.service()
            )));
        };
        self.check_images(&active.to_version).await?;
        self.out.step(
            &format!("resuming release {} at state {}", active.id, active.state),
            None,
        );
        self.drive(active).await
    }

    /// Walks a release from its recorded state to a terminal one.
    pub async fn drive(&self, rec: Release) -> Result<Release> {
        let mut run = Run::new(self, rec);
        let result = run.walk().await;
        run.stop_background();
        result
    }

    /// The version before the current primary (the `from` of the newest finished release that
    /// made the current primary), for `haddock rollback`.
    pub async fn previous_version(&self) -> Result<String> {
        let service = self.client.service(self.service()).await?;
        let current = service.primary_version.ok_or_else(|| {
            Error::BadInput(format!("service {} has no current version", self.service()))
        })?;
        let history = self.client.history(Some(self.service())).await?;
        history
            .iter()
            .find(|r| r.state == ReleaseState::Done && r.to_version == current)
            .and_then(|r| r.from_version.clone())
            .ok_or_else(|| {
                Error::BadInput(format!(
                    "no earlier version of {} to roll back to (current {current})",
                    self.service()
                ))
            })
    }
}

impl Deployer {
    /// Waits (at most two lease periods) until nobody drives `active`, when it is a release
    /// to `tag`; returns the fresh record. A release to another tag is returned at once.
    async fn await_lease(&self, mut active: Release, tag: &str) -> Result<Release> {
        if active.to_version != tag || !is_driven(&active) {
            return Ok(active);
        }
        self.out.step(
            &format!(
                "release {} is leased by another haddock; waiting up to {}s for the lease to lapse",
                active.id,
                (LEASE * 2).as_secs()
            ),
            None,
        );
        let deadline = Instant::now() + LEASE * 2;
        while is_driven(&active) && !active.state.is_terminal() && Instant::now() < deadline {
            tokio::time::sleep(HEARTBEAT).await;
            active = self.client.release(&active.id).await?;
        }
        Ok(active)
    }
}

fn active_error(r: &Release) -> Error {
    Error::ReleaseActive {
        service: r.service.clone(),
        id: r.id.clone(),
        to_version: r.to_version.clone(),
        state: r.state.to_string(),
    }
}

/// One haddock process driving one release.
struct Run<'a> {
    d: &'a Deployer,
    rec: Release,
    /// When the current state was entered by this process.
    entered: Instant,
    /// Shared with the heartbeat task: what `status` the release record shows.
    status: Arc<Mutex<serde_json::Value>>,
    events: Option<mpsc::UnboundedReceiver<ContainerEvent>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    image_healthcheck: Vec<bool>,
    /// Paused by an operator (recorded in the locator) or by a breach without auto-rollback.
    paused: bool,
    breach_paused: bool,
}

impl<'a> Run<'a> {
    fn new(d: &'a Deployer, rec: Release) -> Run<'a> {
        let paused = rec.paused;
        Run {
            d,
            rec,
            entered: Instant::now(),
            status: Arc::new(Mutex::new(serde_json::json!({}))),
            events: None,
            tasks: Vec::new(),
            image_healthcheck: Vec::new(),
            paused,
            breach_paused: false,
        }
    }

    fn spec(&self) -> &Spec {
        &self.d.spec
    }

    fn client(&self) -> &Client {
        &self.d.client
    }

    fn old_version(&self) -> Option<&str> {
        self.rec
            .from_version
            .as_deref()
            .filter(|f| *f != self.rec.to_version)
    }

    /// The only way the release state changes.
    async fn transition(&mut self, to: ReleaseState, mut update: ReleaseUpdate) -> Result<()> {
        let from = self.rec.state;
        if !from.can_become(to) {
            return Err(Error::Inconsistent(format!(
                "release {}: illegal transition {from} → {to}",
                self.rec.id
            )));
        }
        let took = self.entered.elapsed();
        update.state = Some(to);
        update.step_ms.entry(from.to_string()).or_insert(ms(took));
        self.rec = self.client().update_release(&self.rec.id, &update).await?;
        self.entered = Instant::now();
        tracing::info!(
            release = %self.rec.id,
            service = %self.rec.service,
            from_version = self.rec.from_version.as_deref().unwrap_or(""),
            to_version = %self.rec.to_version,
            from_state = %from,
            to_state = %to,
            took_ms = ms(took),
            reason = self.rec.reason.as_deref().unwrap_or(""),
            "release transition"
        );
        self.d.out.step(&format!("{from} → {to}"), Some(took));
        Ok(())
    }

    async fn walk(&mut self) -> Result<Release> {
        self.start_background();
        loop {
            let state = self.rec.state;
            let step = match state {
                ReleaseState::Validating => self.validate().await,
                ReleaseState::Starting => self.start().await,
                ReleaseState::WaitingHealthy => self.wait_healthy().await,
                ReleaseState::Registered => {
                    self.transition(ReleaseState::Shifting, ReleaseUpdate::default())
                        .await
                }
                ReleaseState::Shifting => self.shift().await,
                ReleaseState::Promoted => self.promoted().await,
                ReleaseState::Draining => self.drain_old().await,
                ReleaseState::Removing => self.remove_old().await,
                ReleaseState::RollingBack => {
                    let reason = self
                        .rec
                        .reason
                        .clone()
                        .unwrap_or_else(|| "rolled back".into());
                    self.roll_back(&reason).await
                }
                ReleaseState::Done => return Ok(self.rec.clone()),
                ReleaseState::RolledBack => {
                    return Err(Error::RolledBack {
                        release: self.rec.id.clone(),
                        reason: self.rec.reason.clone().unwrap_or_default(),
                    })
                }
                ReleaseState::Failed => {
                    return Err(Error::Unhealthy {
                        release: self.rec.id.clone(),
                        container: String::from("(recorded)"),
                        reason: self.rec.reason.clone().unwrap_or_default(),
                        logs: String::new(),
                    })
                }
            };
            if let Err(e) = step {
                return Err(self.on_error(state, e).await);
            }
        }
    }

    /// An error in a state: before any user could reach the new version, the release fails
    /// cleanly (containers removed); later, it stays active and resumable.
    async fn on_error(&mut self, state: ReleaseState, e: Error) -> Error {
        let early = matches!(
            state,
            ReleaseState::Validating | ReleaseState::Starting | ReleaseState::WaitingHealthy
        );
        if !early || matches!(e, Error::Locator(_)) || self.rec.state.is_terminal() {
            if !self.rec.state.is_terminal() {
                self.d.out.step(
                    &format!(
                        "release {} stays at {}: run `haddock resume {}` once the cause is fixed",
                        self.rec.id, self.rec.state, self.rec.service
                    ),
                    None,
                );
            }
            return e;
        }
        let reason = e.to_string();
        if let Err(cleanup) = self.remove_new().await {
            tracing::warn!(release = %self.rec.id, error = %cleanup, "cleanup after a failed start");
            return e;
        }
        let update = ReleaseUpdate {
            reason: Some(reason),
            ..Default::default()
        };
        if let Err(rec) = self.transition(ReleaseState::Failed, update).await {
            tracing::warn!(release = %self.rec.id, error = %rec, "recording the failure");
        }
        e
    }

    // --- background: Docker events, heartbeats, lease ---

    fn start_background(&mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        for h in &self.d.hosts {
            let stream = h.events(&self.rec.service, &self.rec.id);
            let tx = tx.clone();
            self.tasks.push(tokio::spawn(async move {
                use futures_util::StreamExt;
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            }));
        }
        self.events = Some(rx);
        let client = self.d.client.clone();
        let hosts = self.d.hosts.clone();
        let service = self.rec.service.clone();
        let id = self.rec.id.clone();
        let status = self.status.clone();
        let driver = format!("{}@{}", std::process::id(), hostname());
        self.tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                // The lease first: the first tick is immediate, so the record names its driver
                // before any slower work (the heartbeats go to Docker and the locator).
                let s = {
                    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                    s["driver"] = serde_json::json!({ "who": driver, "at_ms": now_ms() });
                    s.clone()
                };
                let lease = ReleaseUpdate {
                    status: Some(s),
                    ..Default::default()
                };
                if let Err(e) = client.update_release(&id, &lease).await {
                    tracing::debug!(release = %id, error = %e, "lease update");
                }
                heartbeat_once(&client, &hosts, &service).await;
            }
        }));
    }

    fn stop_background(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    fn set_status(&self, key: &str, value: serde_json::Value) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s[key] = value;
    }

    // --- the states ---

    async fn validate(&mut self) -> Result<()> {
        // The only state that moves images: before any container of the release exists.
        self.image_healthcheck = self.d.supply_images(&self.rec.to_version).await?;
        if let Some(net) = &self.spec().container.network {
            for h in &self.d.hosts {
                h.ensure_network(net).await?;
            }
        }
        self.transition(ReleaseState::Starting, ReleaseUpdate::default())
            .await
    }

    fn plans(&self) -> Vec<(usize, ContainerPlan)> {
        self.d
            .hosts
            .iter()
            .flat_map(|h| {
                (0..h.instances).map(move |n| {
                    (
                        h.index,
                        ContainerPlan::new(
                            self.spec(),
                            &self.rec.to_version,
                            &self.rec.id,
                            h.index,
                            n,
                        ),
                    )
                })
            })
            .collect()
    }

    /// Creates and starts every new container that is not there yet (idempotent).
    async fn ensure_containers(&mut self) -> Result<Vec<NewInstance>> {
        if self.image_healthcheck.len() != self.d.hosts.len() {
            self.image_healthcheck = self.d.supply_images(&self.rec.to_version).await?;
        }
        let plans = self.plans();
        let starts = plans.iter().map(|(h, plan)| {
            let host = &self.d.hosts[*h];
            let hc = self.image_healthcheck[*h];
            async move { host.create_and_start(plan, hc).await }
        });
        let ids = futures_util::future::try_join_all(starts).await?;
        Ok(plans
            .into_iter()
            .zip(ids)
            .map(|((host, plan), id)| NewInstance { host, plan, id })
            .collect())
    }

    /// The new containers as they are (no creation): `None` for one that vanished.
    async fn existing_new(&self) -> Result<Vec<(NewInstance, bool)>> {
        let mut out = Vec::new();
        for (host, plan) in self.plans() {
            let found = self.d.hosts[host].inspect(&plan.name).await?;
            let running = found
                .as_ref()
                .is_some_and(|c| matches!(crate::docker::liveness(c), Liveness::Running { .. }));
            let id = found.and_then(|c| c.id).unwrap_or_default();
            out.push((NewInstance { host, plan, id }, running));
        }
        Ok(out)
    }

    async fn start(&mut self) -> Result<()> {
        let t = Instant::now();
        let new = self.ensure_containers().await?;
        self.d.out.step(
            &format!(
                "started {} container(s) of {}",
                new.len(),
                self.spec().image_ref(&self.rec.to_version)
            ),
            Some(t.elapsed()),
        );
        let mut update = ReleaseUpdate {
            containers: Some(new.iter().map(|n| n.plan.name.clone()).collect()),
            ..Default::default()
        };
        update
            .step_ms
            .insert("create_start".into(), ms(t.elapsed()));
        self.transition(ReleaseState::WaitingHealthy, update).await
    }

    async fn address(&self, n: &NewInstance) -> Result<SocketAddr> {
        self.d.hosts[n.host]
            .address(
                &n.id,
                self.spec().container.network.as_deref(),
                self.spec().service.port,
            )
            .await
    }

    async fn wait_healthy(&mut self) -> Result<()> {
        let new = self.ensure_containers().await?;
        let started = self.entered;
        let hs = self.spec().health.clone();
        let mut addrs = Vec::new();
        for n in &new {
            addrs.push(self.address(n).await?);
        }
        let checks = new.iter().zip(&addrs).map(|(n, addr)| {
            let host = &self.d.hosts[n.host];
            let hs = &hs;
            async move {
                let probe = Probe::new(*addr, hs);
                health::wait_healthy(host, &n.id, &probe, hs, started).await
            }
        });
        let results = futures_util::future::join_all(checks).await;
        for (n, r) in new.iter().zip(results) {
            match r? {
                Ok(()) => {}
                Err(NotHealthy(reason)) => {
                    let logs = self.d.hosts[n.host].logs_tail(&n.id, LOG_LINES).await;
                    return Err(Error::Unhealthy {
                        release: self.rec.id.clone(),
                        container: n.plan.name.clone(),
                        reason,
                        logs,
                    });
                }
            }
        }
        let healthy = started.elapsed();
        self.d
            .out
            .step(&format!("{} instance(s) healthy", new.len()), Some(healthy));
        // Register (ready, weight 0): the proxies learn the address but send nobody yet.
        let t = Instant::now();
        for (n, addr) in new.iter().zip(&addrs) {
            let reg = RegisterInstance {
                id: n.plan.name.clone(),
                service: self.rec.service.clone(),
                version: self.rec.to_version.clone(),
                address: addr.to_string(),
                docker_host: self.d.hosts[n.host].name.clone(),
                container_id: n.id.clone(),
                labels: n.plan.labels.clone(),
                state: InstanceState::Ready,
            };
            match self.client().register(&reg).await {
                Ok(_) => {}
                // Registered by a run that was killed before recording the transition.
                Err(e) if e.status().is_some_and(|s| s.as_u16() == 409) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Old instances may have gone unhealthy while nobody heartbeat them: refresh them
        // before any weight names their version.
        heartbeat_once(self.client(), &self.d.hosts, &self.rec.service).await;
        self.d.out.step(
            &format!("registered {} instance(s) at weight 0", new.len()),
            Some(t.elapsed()),
        );
        let mut update = ReleaseUpdate::default();
        update.step_ms.insert("healthy".into(), ms(healthy));
        update.step_ms.insert("register".into(), ms(t.elapsed()));
        self.transition(ReleaseState::Registered, update).await
    }

    /// Applies weights with `If-Match`, re-reading the revision when someone else wrote first.
    async fn apply_weights(&self, update: &WeightsUpdate) -> Result<Service> {
        let mut last = None;
        for _ in 0..5 {
            let current = self.client().service(&self.rec.service).await?;
            match self
                .client()
                .set_weights(&self.rec.service, update, Some(current.revision))
                .await
            {
                Ok(s) => return Ok(s),
                Err(e) if e.status().is_some_and(|s| s.as_u16() == 412) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last
            .map(Error::from)
            .unwrap_or_else(|| Error::Inconsistent("weights kept changing".into())))
    }

    async fn shift(&mut self) -> Result<()> {
        let steps = steps_to_walk(self.spec(), self.old_version());
        let first = usize::try_from(self.rec.step)
            .unwrap_or(0)
            .min(steps.len().saturating_sub(1));
        let mut i = first;
        while i < steps.len() {
            let (weight, pause) = steps[i];
            let last = i + 1 == steps.len();
            if last && self.spec().rollout.manual && self.old_version().is_some() {
                if let Some(reason) = self.await_promotion().await? {
                    return self.begin_rollback(reason).await;
                }
            }
            let t = Instant::now();
            let update = weights_for(self.old_version(), &self.rec.to_version, weight);
            self.apply_weights(&update).await?;
            tracing::info!(
                release = %self.rec.id,
                service = %self.rec.service,
                from_version = self.old_version().unwrap_or(""),
                to_version = %self.rec.to_version,
                step = i,
                weight,
                took_ms = ms(t.elapsed()),
                "release weight applied"
            );
            self.d.out.step(
                &format!("weight {weight} % on {}", self.rec.to_version),
                Some(t.elapsed()),
            );
            let mut step_ms = BTreeMap::new();
            step_ms.insert(format!("weight_{weight}"), ms(t.elapsed()));
            if last {
                // From the start of this haddock run to every new session on the new version.
                step_ms.insert("tag_to_full".into(), ms(self.d.out.elapsed()));
            }
            self.rec = self
                .client()
                .update_release(
                    &self.rec.id,
                    &ReleaseUpdate {
                        step: Some(u32::try_from(i).unwrap_or(0)),
                        step_ms,
                        ..Default::default()
                    },
                )
                .await?;
            if last {
                return self
                    .transition(ReleaseState::Promoted, ReleaseUpdate::default())
                    .await;
            }
            match self.bake(weight, pause).await? {
                Bake::Continue => i += 1,
                Bake::PromoteNow => i = steps.len() - 1,
                Bake::RollBack(reason) => return self.begin_rollback(reason).await,
            }
        }
        Ok(())
    }

    /// Reads and acknowledges an operator control.
    async fn take_control(&mut self) -> Result<Option<Control>> {
        let rec = self.client().release(&self.rec.id).await?;
        if rec.paused != self.paused {
            self.d.out.step(
                if rec.paused {
                    "paused by an operator"
                } else {
                    "resumed by an operator"
                },
                None,
            );
        }
        // Pause and resume are recorded by the locator itself; promote and abort wait for us.
        self.paused = rec.paused || self.breach_paused;
        self.rec = rec;
        let Some(c) = self.rec.control else {
            return Ok(None);
        };
        self.rec = self
            .client()
            .update_release(
                &self.rec.id,
                &ReleaseUpdate {
                    clear_control: true,
                    ..Default::default()
                },
            )
            .await?;
        self.d.out.step(&format!("operator: {c:?}"), None);
        Ok(Some(c))
    }

    /// A manual rollout waits here for `haddock promote` (or `abort`). `Some(reason)` = roll back.
    async fn await_promotion(&mut self) -> Result<Option<String>> {
        self.d
            .out
            .step("waiting for `haddock promote` (manual rollout)", None);
        self.set_status("waiting_for", serde_json::json!("promote"));
        loop {
            match self.take_control().await? {
                Some(Control::Promote) => return Ok(None),
                Some(Control::Abort) => return Ok(Some("aborted by an operator".into())),
                _ => {}
            }
            if let Some(reason) = self.new_instance_trouble() {
                return Ok(Some(reason));
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// A die/oom/unhealthy event of a new container, if any arrived.
    fn new_instance_trouble(&mut self) -> Option<String> {
        let ev = self.events.as_mut()?.try_recv().ok()?;
        let what = match ev.action.as_str() {
            "die" => format!(
                "exited with code {}",
                ev.exit_code.as_deref().unwrap_or("?")
            ),
            "oom" => "was killed by the OOM killer".to_string(),
            _ => "is unhealthy (Docker HEALTHCHECK)".to_string(),
        };
        let who = if ev.instance.is_empty() {
            &ev.container
        } else {
            &ev.instance
        };
        Some(format!("new instance {who} {what}"))
    }

    /// Bakes at a weight: watches events, probes, analysis and operator controls.
    async fn bake(&mut self, weight: u32, pause: Duration) -> Result<Bake> {
        let limits = self.spec().rollout.analysis.clone();
        let health = self.spec().health.clone();
        let baseline = self.traffic().await?;
        let mut probes = Vec::new();
        for (n, running) in self.existing_new().await? {
            if !running {
                return Ok(Bake::RollBack(format!(
                    "new instance {} is not running",
                    n.plan.name
                )));
            }
            probes.push((
                n.plan.name.clone(),
                Probe::new(self.address(&n).await?, &health),
                Streak::default(),
            ));
        }
        let mut remaining = pause;
        let mut last_tick = Instant::now();
        let mut next_probe = Instant::now() + health.interval;
        self.set_status(
            "bake",
            serde_json::json!({ "weight": weight, "pause_ms": ms(pause) }),
        );
        if !pause.is_zero() {
            self.d.out.step(
                &format!(
                    "baking {} at {weight} %",
                    crate::output::fmt_duration(pause)
                ),
                None,
            );
        }
        loop {
            if let Some(reason) = self.new_instance_trouble() {
                return Ok(Bake::RollBack(reason));
            }
            if Instant::now() >= next_probe {
                next_probe = Instant::now() + health.interval;
                for (name, probe, streak) in &mut probes {
                    let outcome = probe.check().await;
                    streak.record(outcome.is_ok());
                    if streak.failures >= health.fall {
                        return Ok(Bake::RollBack(format!(
                            "new instance {name} failed {} readiness probes in a row: {}",
                            streak.failures,
                            outcome.err().unwrap_or_default()
                        )));
                    }
                }
            }
            let now = self.traffic().await?;
            let verdict = analysis::judge(
                &baseline,
                &now,
                &self.rec.to_version,
                self.old_version(),
                &limits,
            );
            self.set_status(
                "analysis",
                serde_json::to_value(&verdict).unwrap_or_default(),
            );
            if let Verdict::Breach { reason, .. } = verdict {
                if self.spec().rollout.auto_rollback {
                    return Ok(Bake::RollBack(reason));
                }
                if !self.breach_paused {
                    self.breach_paused = true;
                    self.paused = true;
                    self.d.out.step(
                        &format!("analysis breach, paused (auto_rollback = false): {reason}"),
                        None,
                    );
                }
            }
            match self.take_control().await? {
                Some(Control::Abort) => return Ok(Bake::RollBack("aborted by an operator".into())),
                Some(Control::Promote) => return Ok(Bake::PromoteNow),
                _ => {}
            }
            let elapsed = last_tick.elapsed();
            last_tick = Instant::now();
            if !self.paused {
                remaining = remaining.saturating_sub(elapsed);
            }
            if remaining.is_zero() && !self.paused {
                return Ok(Bake::Continue);
            }
            tokio::time::sleep(TICK.min(if self.paused {
                TICK
            } else {
                remaining.max(Duration::from_millis(1))
            }))
            .await;
        }
    }

    async fn traffic(&self) -> Result<TrafficByVersion> {
        let snap = self.client().snapshot().await?;
        Ok(snap
            .traffic
            .get(&self.rec.service)
            .cloned()
            .unwrap_or_default())
    }

    async fn begin_rollback(&mut self, reason: String) -> Result<()> {
        self.d.out.step(&format!("rolling back: {reason}"), None);
        let update = ReleaseUpdate {
            reason: Some(reason),
            ..Default::default()
        };
        self.transition(ReleaseState::RollingBack, update).await
    }

    /// Everyone back on the old version; the new instances drained of in-flight requests (at
    /// most the stop grace), stopped and removed.
    async fn roll_back(&mut self, reason: &str) -> Result<()> {
        if let Some(from) = self.old_version().map(str::to_string) {
            let ready_old = self
                .client()
                .instances(&self.rec.service)
                .await?
                .iter()
                .any(|i| {
                    i.version == from
                        && matches!(i.state, InstanceState::Ready | InstanceState::Unhealthy)
                });
            if ready_old {
                heartbeat_once(self.client(), &self.d.hosts, &self.rec.service).await;
                self.apply_weights(&weights_for(None, &from, 100)).await?;
            }
        }
        let ids: Vec<String> = self.plans().into_iter().map(|(_, p)| p.name).collect();
        self.set_instances(&ids, InstanceState::Draining).await?;
        drain::wait(
            self.client(),
            &self.rec.service,
            &ids,
            Until::RequestsFinished,
            self.spec().container.stop_grace,
        )
        .await?;
        self.remove_new().await?;
        let update = ReleaseUpdate {
            reason: Some(reason.to_string()),
            ..Default::default()
        };
        self.transition(ReleaseState::RolledBack, update).await
    }

    /// Stops and removes the new containers and marks their instances gone.
    async fn remove_new(&mut self) -> Result<()> {
        let grace = self.spec().container.stop_grace;
        for h in &self.d.hosts {
            for c in h.find(&self.rec.service, Some(&self.rec.id)).await? {
                h.stop_and_remove(&c.id, grace).await?;
            }
        }
        let ids: Vec<String> = self.plans().into_iter().map(|(_, p)| p.name).collect();
        self.set_instances(&ids, InstanceState::Gone).await
    }

    /// Moves the given instances (those the locator knows) to `state`, skipping illegal moves.
    async fn set_instances(&self, ids: &[String], state: InstanceState) -> Result<()> {
        for i in self.client().instances(&self.rec.service).await? {
            if ids.contains(&i.id) && i.state != state && i.state.can_become(state) {
                self.client().set_state(&i.id, state).await?;
            }
        }
        Ok(())
    }

    /// Instances of the service that are not this release's.
    async fn old_instance_ids(&self) -> Result<Vec<String>> {
        let new: Vec<String> = self.plans().into_iter().map(|(_, p)| p.name).collect();
        Ok(self
            .client()
            .instances(&self.rec.service)
            .await?
            .into_iter()
            .filter(|i| !new.contains(&i.id) && i.state != InstanceState::Gone)
            .map(|i| i.id)
            .collect())
    }

    async fn promoted(&mut self) -> Result<()> {
        let old = self.old_instance_ids().await?;
        self.set_instances(&old, InstanceState::Draining).await?;
        self.d
            .out
            .step(&format!("{} old instance(s) draining", old.len()), None);
        self.transition(ReleaseState::Draining, ReleaseUpdate::default())
            .await
    }

    async fn drain_old(&mut self) -> Result<()> {
        let old = self.old_instance_ids().await?;
        let max = self.spec().sessions.max_drain;
        let drained = drain::wait(
            self.client(),
            &self.rec.service,
            &old,
            Until::SessionsExpired,
            max,
        )
        .await?;
        self.d.out.step(
            &if drained.clean {
                "old instances drained".to_string()
            } else {
                format!(
                    "max drain reached with {} live session(s), {} in flight",
                    drained.left.live_sessions, drained.left.in_flight
                )
            },
            Some(drained.waited),
        );
        self.transition(ReleaseState::Removing, ReleaseUpdate::default())
            .await
    }

    async fn remove_old(&mut self) -> Result<()> {
        let grace = self.spec().container.stop_grace;
        let t = Instant::now();
        let mut removed = 0;
        for h in &self.d.hosts {
            for c in h.find(&self.rec.service, None).await? {
                if c.release != self.rec.id {
                    h.stop_and_remove(&c.id, grace).await?;
                    removed += 1;
                }
            }
        }
        let old = self.old_instance_ids().await?;
        self.set_instances(&old, InstanceState::Gone).await?;
        self.d.out.step(
            &format!("removed {removed} old container(s)"),
            Some(t.elapsed()),
        );
        self.transition(ReleaseState::Done, ReleaseUpdate::default())
            .await
    }
}

enum Bake {
    Continue,
    PromoteNow,
    RollBack(String),
}

/// Heartbeats every instance of `service` whose container runs on one of `hosts` (old and new:
/// the locator marks silent instances unhealthy after its TTL). Best effort.
pub async fn heartbeat_once(client: &Client, hosts: &[Host], service: &str) {
    let mut running = Vec::new();
    for h in hosts {
        match h.find(service, None).await {
            Ok(list) => running.extend(list.into_iter().filter(|c| c.running).map(|c| c.id)),
            Err(e) => {
                tracing::debug!(host = %h.name, error = %e, "listing containers for heartbeats")
            }
        }
    }
    let Ok(instances) = client.instances(service).await else {
        return;
    };
    for i in instances {
        if i.state != InstanceState::Gone && running.contains(&i.container_id) {
            if let Err(e) = client.heartbeat(&i.id).await {
                tracing::debug!(instance = %i.id, error = %e, "heartbeat");
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Whether a haddock process is driving this release right now (its lease is fresh).
pub fn is_driven(rec: &Release) -> bool {
    let at = rec
        .status
        .get("driver")
        .and_then(|d| d.get("at_ms"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    now_ms().saturating_sub(at) < ms(LEASE)
}

/// The `--json` report of a release verb.
pub fn report(
    service: &str,
    tag: &str,
    result: &Result<(Outcome, Option<Release>)>,
    out: &Output,
) -> ReleaseReport {
    let mut r = ReleaseReport {
        service: service.to_string(),
        to_version: tag.to_string(),
        total_ms: ms(out.elapsed()),
        ..Default::default()
    };
    match result {
        Ok((outcome, rec)) => {
            r.outcome = match outcome {
                Outcome::Released => "released",
                Outcome::AlreadyCurrent => "already_current",
            }
            .into();
            if let Some(rec) = rec {
                fill(&mut r, rec);
                r.tag_to_full_ms = rec.step_ms.get("tag_to_full").copied();
            }
        }
        Err(e) => {
            r.exit_code = e.exit_code();
            r.outcome = match e {
                Error::RolledBack { .. } => "rolled_back",
                Error::Unhealthy { .. } => "failed",
                _ => "error",
            }
            .into();
            r.error = Some(e.kind().into());
            r.reason = Some(e.to_string());
            // The terminal state an error recorded; other errors left no release ended (bad
            // input before one began, or an infrastructure error: the release stays active and
            // `haddock status` / `haddock resume` take it from its recorded state).
            r.state = match e {
                Error::RolledBack { .. } => Some(ReleaseState::RolledBack.to_string()),
                Error::Unhealthy { .. } => Some(ReleaseState::Failed.to_string()),
                _ => None,
            };
            if let Error::RolledBack { release, .. } | Error::Unhealthy { release, .. } = e {
                r.release = Some(release.clone());
            }
        }
    }
    r
}

fn fill(r: &mut ReleaseReport, rec: &Release) {
    r.release = Some(rec.id.clone());
    r.from_version = rec.from_version.clone();
    r.state = Some(rec.state.to_string());
    r.reason = rec.reason.clone();
    r.step_ms = rec.step_ms.clone();
    r.containers = rec.containers.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        crate::spec::example()
    }

    #[test]
    fn canary_weights_split_new_sessions_and_promotion_sets_the_primary() {
        let w = weights_for(Some("1.4.1"), "1.4.2", 10);
        assert_eq!(w.weights.get("1.4.1"), Some(&90));
        assert_eq!(w.weights.get("1.4.2"), Some(&10));
        assert_eq!(w.primary_version, None);
        let w = weights_for(Some("1.4.1"), "1.4.2", 100);
        assert_eq!(w.weights.len(), 1);
        assert_eq!(w.weights.get("1.4.2"), Some(&100));
        assert_eq!(w.primary_version.as_deref(), Some("1.4.2"));
        let w = weights_for(Some("1.4.1"), "1.4.2", 0);
        assert_eq!(w.weights.len(), 1, "a zero share names no version");
        let first = weights_for(None, "1.0.0", 10);
        assert_eq!(first.weights.get("1.0.0"), Some(&100));
        assert_eq!(first.primary_version.as_deref(), Some("1.0.0"));
    }

    #[test]
    fn a_first_release_goes_straight_to_100() {
        let s = spec();
        assert_eq!(
            steps_to_walk(&s, Some("1"))
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            [10, 50, 100]
        );
        assert_eq!(
            steps_to_walk(&s, None)
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            [100]
        );
    }

    #[test]
    fn the_walk_follows_the_locators_state_machine() {
        use ReleaseState::*;
        // The happy path this module walks, and the two exits; each move must be legal.
        let path = [
            Validating,
            Starting,
            WaitingHealthy,
            Registered,
            Shifting,
            Promoted,
            Draining,
            Removing,
            Done,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{:?} → {:?}", w[0], w[1]);
        }
        for s in [Validating, Starting, WaitingHealthy] {
            assert!(s.can_become(Failed), "{s:?} → failed");
        }
        assert!(Shifting.can_become(RollingBack));
        assert!(RollingBack.can_become(RolledBack));
    }

    #[test]
    fn a_lease_is_fresh_only_for_a_few_seconds() {
        let mut rec = Release {
            id: "r".into(),
            service: "s".into(),
            from_version: None,
            to_version: "1".into(),
            image: "i:1".into(),
            who: "t".into(),
            state: ReleaseState::Shifting,
            step: 0,
            paused: false,
            control: None,
            containers: vec![],
            created_at: 0,
            updated_at: 0,
            finished_at: None,
            reason: None,
            step_ms: BTreeMap::new(),
            status: serde_json::json!({}),
        };
        assert!(!is_driven(&rec));
        rec.status = serde_json::json!({ "driver": { "at_ms": now_ms() } });
        assert!(is_driven(&rec));
        rec.status = serde_json::json!({ "driver": { "at_ms": now_ms() - 60_000 } });
        assert!(!is_driven(&rec));
    }
}
