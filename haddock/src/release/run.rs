//! [`Run`]: one haddock process driving one release, from its recorded state to a terminal one.
//!
//! `walk` dispatches on the recorded state to one method per state, each idempotent and ending
//! in [`Run::transition`], the only place the release state changes. The canary watch of a
//! `shifting` step is a [`Bake`] of its own; the run hands it the few things it needs
//! ([`Controls`], [`Events`], [`Status`]) rather than itself, so that the bake cannot change the
//! release state behind `transition`'s back. The [`Lease`] and the [`Events`] forwarding run in
//! the background for as long as the run does.

use super::bake::{self, Bake, BakeOutcome, TICK};
use super::controls::{self, Controls};
use super::events::Events;
use super::handover::{self, Direction};
use super::lease::{self, driver_error, Lease};
use super::status::Status;
use super::{ms, steps_to_walk, weights_for, Deployer};
use crate::check::{Checks, Facts};
use crate::drain::{self, Until};
use crate::error::{Error, Result};
use crate::health::{self, Liveness, NotHealthy, Probe};
use crate::heartbeat::heartbeat_once;
use crate::plan::ContainerPlan;
use crate::spec::Spec;
use crate::view::View;
use locator_wire::api::{
    Control, InstanceState, RegisterInstance, Release, ReleaseState, ReleaseUpdate, Service,
    WeightsUpdate,
};
use locator_wire::client::Client;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Log lines kept in the error of an instance that never became healthy.
const LOG_LINES: usize = 30;

/// One new instance of the release.
#[derive(Debug, Clone)]
struct NewInstance {
    host: usize,
    plan: ContainerPlan,
    id: String,
}

/// One haddock process driving one release.
pub(super) struct Run<'a> {
    d: &'a Deployer,
    rec: Release,
    /// When the current state was entered by this process.
    entered: Instant,
    /// Shared with the lease task: what `status` the release record shows.
    status: Status,
    /// Die/oom/unhealthy events of the new containers (watched from the start of `walk`).
    events: Events,
    /// Renews the driver lease and heartbeats the instances while `walk` runs.
    lease: Option<Lease>,
    /// The locator as the watch stream shows it: what the bake, the drain and the abort watch
    /// react to.
    view: View,
    image_healthcheck: Vec<bool>,
    /// Operator controls, and whether the release is paused (by an operator or a breach).
    controls: Controls,
    /// This process as the release's driver (`pid@host`), named in each of its writes.
    holder: String,
}

impl<'a> Run<'a> {
    pub(super) fn new(d: &'a Deployer, rec: Release) -> Run<'a> {
        let holder = lease::holder();
        let controls = Controls::new(d.client.clone(), d.out.clone(), holder.clone(), rec.paused);
        Run {
            d,
            rec,
            entered: Instant::now(),
            status: Status::default(),
            events: Events::default(),
            lease: None,
            view: View::follow(d.client.clone()),
            image_healthcheck: Vec::new(),
            controls,
            holder,
        }
    }

    fn spec(&self) -> &Spec {
        &self.d.spec
    }

    fn client(&self) -> &Client {
        &self.d.client
    }

    fn old_version(&self) -> Option<&str> {
        super::old_version(&self.rec)
    }

    /// Writes to the release as its driver: the locator refuses the write (and this run stops
    /// with [`Error::Driven`]) once another process holds the lease.
    async fn write(&mut self, mut update: ReleaseUpdate) -> Result<()> {
        update.lease = Some(self.holder.clone());
        self.rec = self
            .client()
            .update_release(&self.rec.id, &update)
            .await
            .map_err(|e| driver_error(&self.rec.id, e))?;
        Ok(())
    }

    /// The only way the release state changes: compare and set, so that the move is made
    /// only from the state this run believes the release is in (`state_conflict` otherwise).
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
        update.expect_state = Some(from);
        update.step_ms.entry(from.to_string()).or_insert(ms(took));
        self.write(update).await?;
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

    pub(super) async fn walk(&mut self) -> Result<Release> {
        // The lease before anything else: of two processes that found it lapsed, one drives.
        self.rec = Lease::take(self.client(), &self.rec.id, &self.holder).await?;
        self.start_background();
        let result = self.walk_states().await;
        self.stop_background();
        if !matches!(result, Err(Error::Driven { .. })) {
            Lease::give_up(self.client(), &self.rec.id, &self.holder).await;
        }
        result
    }

    async fn walk_states(&mut self) -> Result<Release> {
        loop {
            let state = self.rec.state;
            let step = match state {
                // An earlier run failed here but could not remove every new container (a host
                // was lost): finish that failure, never go on with the release.
                ReleaseState::Validating
                | ReleaseState::Starting
                | ReleaseState::WaitingHealthy
                    if self.rec.reason.is_some() =>
                {
                    self.fail_cleanly().await
                }
                // Until a user can reach the new version an abort stops the work at once.
                ReleaseState::Validating
                | ReleaseState::Starting
                | ReleaseState::WaitingHealthy => {
                    let id = self.rec.id.clone();
                    let abort = controls::abort_requested(
                        self.view.subscribe(),
                        self.client().clone(),
                        id.clone(),
                    );
                    tokio::select! {
                        r = self.early(state) => r,
                        () = abort => Err(Error::Aborted {
                            release: id,
                            state: state.to_string(),
                        }),
                    }
                }
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
        if matches!(e, Error::Driven { .. }) {
            return e;
        }
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
            // Recorded, so that the next run finishes this failure instead of going on.
            let update = ReleaseUpdate {
                reason: Some(reason),
                ..Default::default()
            };
            if let Err(rec) = self.write(update).await {
                tracing::warn!(release = %self.rec.id, error = %rec, "recording the failure");
            }
            self.d.out.step(
                &format!(
                    "release {} failed, but not every new container could be removed ({cleanup}): \
                     run `haddock release {} {}` again once the host is back to finish",
                    self.rec.id, self.rec.service, self.rec.to_version
                ),
                None,
            );
            return e;
        }
        let update = ReleaseUpdate {
            reason: Some(reason),
            clear_control: true,
            ..Default::default()
        };
        if let Err(rec) = self.transition(ReleaseState::Failed, update).await {
            tracing::warn!(release = %self.rec.id, error = %rec, "recording the failure");
        }
        e
    }

    /// Ends a release an earlier run failed before any user reached it: its new containers
    /// removed on every host, then `failed` with the recorded reason.
    async fn fail_cleanly(&mut self) -> Result<()> {
        self.remove_new().await?;
        let update = ReleaseUpdate {
            reason: self.rec.reason.clone(),
            clear_control: true,
            ..Default::default()
        };
        self.transition(ReleaseState::Failed, update).await
    }

    // --- background: Docker events, heartbeats, lease ---

    fn start_background(&mut self) {
        self.events = Events::spawn(&self.d.hosts, &self.rec.service, &self.rec.id);
        self.lease = Some(Lease::spawn(
            self.d.client.clone(),
            self.d.hosts.clone(),
            self.rec.service.clone(),
            self.rec.id.clone(),
            self.holder.clone(),
            self.status.clone(),
        ));
    }

    fn stop_background(&mut self) {
        self.events.stop();
        if let Some(lease) = &mut self.lease {
            lease.stop();
        }
    }

    // --- the states ---

    /// The states before any user can reach the new version.
    async fn early(&mut self, state: ReleaseState) -> Result<()> {
        match state {
            ReleaseState::Validating => self.validate().await,
            ReleaseState::Starting => self.start().await,
            _ => self.wait_healthy().await,
        }
    }

    async fn validate(&mut self) -> Result<()> {
        // The only state that moves images: before any container of the release exists.
        self.image_healthcheck = self.d.supply_images(&self.rec.to_version).await?;
        if let Some(net) = &self.spec().container.network {
            for h in &self.d.hosts {
                h.ensure_network(net).await?;
            }
        }
        // Before any container mounts them: Docker would make a missing one implicitly,
        // without the spec's driver, options or size.
        for h in &self.d.hosts {
            for v in crate::volume::ensure_all(h, self.spec()).await? {
                self.d
                    .out
                    .step(&format!("volume {v} created on {}", h.name), None);
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
        let all: Vec<usize> = self.d.hosts.iter().map(|h| h.index).collect();
        self.ensure_containers_on(&all).await
    }

    /// [`Self::ensure_containers`] on the given hosts only (one batch of a rolling start).
    async fn ensure_containers_on(&mut self, hosts: &[usize]) -> Result<Vec<NewInstance>> {
        if self.image_healthcheck.len() != self.d.hosts.len() {
            self.image_healthcheck = self.d.supply_images(&self.rec.to_version).await?;
        }
        let plans: Vec<_> = self
            .plans()
            .into_iter()
            .filter(|(h, _)| hosts.contains(h))
            .collect();
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

    /// The hosts in start order, cut into batches of `rollout.max_parallel_hosts` (one batch
    /// of every host when it is 0).
    fn host_batches(&self) -> Vec<Vec<usize>> {
        let hosts: Vec<usize> = self.d.hosts.iter().map(|h| h.index).collect();
        let size = match self.spec().rollout.max_parallel_hosts {
            0 => hosts.len().max(1),
            n => n as usize,
        };
        hosts.chunks(size).map(<[usize]>::to_vec).collect()
    }

    /// The new containers as they are (no creation): whether each runs, or why its host
    /// could not say (an engine that cannot be reached).
    async fn existing_new(&self) -> Vec<(NewInstance, Result<bool>)> {
        // At once: a silently lost host costs one inspect timeout, not one per instance.
        let checks = self.plans().into_iter().map(|(host, plan)| async move {
            let (id, running) = match self.d.hosts[host].inspect(&plan.name).await {
                Ok(found) => {
                    let running = found
                        .as_ref()
                        .is_some_and(|c| matches!(health::liveness(c), Liveness::Running { .. }));
                    (found.and_then(|c| c.id).unwrap_or_default(), Ok(running))
                }
                Err(e) => (String::new(), Err(e)),
            };
            (NewInstance { host, plan, id }, running)
        });
        futures_util::future::join_all(checks).await
    }

    /// Starts the new containers, host batch by host batch: every batch but the last must
    /// pass the health gate before the next starts (a batch that fails it fails the release,
    /// whose containers on every host are then removed); `waiting_healthy` gates the last.
    async fn start(&mut self) -> Result<()> {
        let t = Instant::now();
        let batches = self.host_batches();
        let mut started = 0;
        for (i, batch) in batches.iter().enumerate() {
            let new = self.ensure_containers_on(batch).await?;
            // The deadline counts from the start of the containers, not the image copies.
            let since = Instant::now();
            started += new.len();
            if i + 1 == batches.len() {
                break;
            }
            self.gate(&new, since).await?;
            let names: Vec<&str> = batch
                .iter()
                .map(|h| self.d.hosts[*h].name.as_str())
                .collect();
            self.d.out.step(
                &format!(
                    "host batch {}/{} healthy ({})",
                    i + 1,
                    batches.len(),
                    names.join(", ")
                ),
                Some(since.elapsed()),
            );
        }
        self.d.out.step(
            &format!(
                "started {started} container(s) of {}",
                self.spec().image_ref(&self.rec.to_version)
            ),
            Some(t.elapsed()),
        );
        let mut update = ReleaseUpdate {
            containers: Some(self.plans().into_iter().map(|(_, p)| p.name).collect()),
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

    /// The health gate of `new` (the deadline counts from `since`): every instance healthy,
    /// or the first that is not, with its last log lines. Returns their addresses.
    async fn gate(&self, new: &[NewInstance], since: Instant) -> Result<Vec<SocketAddr>> {
        let hs = self.spec().health.clone();
        let mut addrs = Vec::new();
        for n in new {
            match self.address(n).await {
                Ok(a) => addrs.push(a),
                // No address (it died before Docker gave it a port or an IP): not healthy,
                // with its logs, rather than an infrastructure error.
                Err(Error::Inconsistent(reason)) => {
                    let logs = self.d.hosts[n.host].logs_tail(&n.id, LOG_LINES).await;
                    return Err(Error::Unhealthy {
                        release: self.rec.id.clone(),
                        container: n.plan.name.clone(),
                        reason,
                        logs,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let checks = new.iter().zip(&addrs).map(|(n, addr)| {
            let host = &self.d.hosts[n.host];
            let hs = &hs;
            async move {
                let probe = Probe::new(*addr, hs);
                health::wait_healthy(host, &n.id, &probe, hs, since).await
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
                        reason: format!("{reason} (on {})", self.d.hosts[n.host].name),
                        logs,
                    });
                }
            }
        }
        Ok(addrs)
    }

    async fn wait_healthy(&mut self) -> Result<()> {
        let new = self.ensure_containers().await?;
        let started = self.entered;
        let addrs = self.gate(&new, started).await?;
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
        let mut promoted_by_operator = false;
        while i < steps.len() {
            // A control sent before this weight (while the instances started, or to a release
            // whose driver died) acts before any more users are sent to the new version.
            match self.controls.take(&mut self.rec).await? {
                Some(Control::Abort) => {
                    return self.begin_rollback("aborted by an operator".into()).await
                }
                Some(Control::Promote) => {
                    promoted_by_operator = true;
                    i = steps.len() - 1;
                }
                _ => {}
            }
            let (weight, pause) = steps[i];
            let last = i + 1 == steps.len();
            let manual = self.spec().rollout.manual && self.old_version().is_some();
            if last && manual && !promoted_by_operator {
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
            let facts = crate::hooks::Facts {
                weight: Some(weight),
                ..self.d.facts(&self.rec)
            };
            crate::hooks::notify(
                &self.spec().hooks,
                crate::hooks::Hook::PostStep,
                &facts,
                &self.d.out,
            )
            .await;
            let mut step_ms = BTreeMap::new();
            step_ms.insert(format!("weight_{weight}"), ms(t.elapsed()));
            if last {
                // From the start of this haddock run to every new session on the new version.
                step_ms.insert("tag_to_full".into(), ms(self.d.out.elapsed()));
            }
            self.write(ReleaseUpdate {
                step: Some(u32::try_from(i).unwrap_or(0)),
                step_ms,
                ..Default::default()
            })
            .await?;
            if last {
                self.status.update(|s| {
                    s.bake = None;
                    s.waiting_for = None;
                });
                return self
                    .transition(ReleaseState::Promoted, ReleaseUpdate::default())
                    .await;
            }
            let outcome = self.bake(weight, pause).await?;
            self.status.update(|s| s.bake = None);
            match outcome {
                BakeOutcome::Continue => i += 1,
                BakeOutcome::PromoteNow => {
                    promoted_by_operator = true;
                    i = steps.len() - 1;
                }
                BakeOutcome::RollBack(reason) => return self.begin_rollback(reason).await,
            }
        }
        Ok(())
    }

    /// A manual rollout waits here for `haddock promote` (or `abort`). `Some(reason)` = roll back.
    async fn await_promotion(&mut self) -> Result<Option<String>> {
        self.d
            .out
            .step("waiting for `haddock promote` (manual rollout)", None);
        self.status
            .update(|s| s.waiting_for = Some("promote".into()));
        loop {
            match self.controls.take(&mut self.rec).await? {
                Some(Control::Promote) => return Ok(None),
                Some(Control::Abort) => return Ok(Some("aborted by an operator".into())),
                _ => {}
            }
            if let Some(reason) = self.events.trouble() {
                return Ok(Some(reason));
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Bakes at a weight. The run takes the baseline traffic and a readiness probe of each new
    /// instance (a new instance that is not running, or whose host cannot be reached, rolls
    /// back at once: users already on it have lost it, and there is nothing to bake), then
    /// hands the watch to a [`Bake`].
    async fn bake(&mut self, weight: u32, pause: Duration) -> Result<BakeOutcome> {
        let d = self.d;
        let baseline = bake::traffic(&d.client, &self.rec.service).await?;
        let mut probes = Vec::new();
        let mut addresses = Vec::new();
        for (n, running) in self.existing_new().await {
            let address = match running {
                Ok(true) => self.address(&n).await,
                Ok(false) => {
                    return Ok(BakeOutcome::RollBack(format!(
                        "new instance {} is not running",
                        n.plan.name
                    )))
                }
                Err(e) => Err(e),
            };
            match address {
                Ok(address) => {
                    addresses.push(address.to_string());
                    probes.push((n.plan.name.clone(), Probe::new(address, &d.spec.health)))
                }
                Err(e) => {
                    return Ok(BakeOutcome::RollBack(format!(
                        "the host of new instance {} cannot be reached: {e}",
                        n.plan.name
                    )))
                }
            }
        }
        let facts = Facts {
            service: self.rec.service.clone(),
            version: self.rec.to_version.clone(),
            old_version: self.old_version().unwrap_or_default().to_string(),
            weight,
        };
        let checks = Checks::new(&d.spec.rollout.analysis, facts, addresses, &d.out);
        let mut watch = Bake::new(
            &d.spec, &d.client, &d.out, weight, pause, baseline, probes, checks,
        );
        watch
            .run(
                &mut self.rec,
                &mut self.controls,
                &mut self.events,
                &self.status,
                &mut self.view,
            )
            .await
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
            let instances = self.client().instances(&self.rec.service).await?;
            // Aborted after its promotion: the old instances drain, but their containers still
            // run until `removing`, so they take new sessions again.
            let draining_old: Vec<String> = instances
                .iter()
                .filter(|i| i.version == from && i.state == InstanceState::Draining)
                .map(|i| i.id.clone())
                .collect();
            self.set_instances(&draining_old, InstanceState::Ready)
                .await?;
            let ready_old = instances.iter().any(|i| {
                i.version == from
                    && matches!(
                        i.state,
                        InstanceState::Ready | InstanceState::Unhealthy | InstanceState::Draining
                    )
            });
            if ready_old {
                heartbeat_once(self.client(), &self.d.hosts, &self.rec.service).await;
                self.apply_weights(&weights_for(None, &from, 100)).await?;
                // The new instances may hold a role the old ones handed them at the promotion
                // (if it came; before it, they answer that they hold none).
                handover::run(self.d, &self.rec.service, &self.rec.id, Direction::ToOld).await;
            }
        }
        let ids: Vec<String> = self.plans().into_iter().map(|(_, p)| p.name).collect();
        self.set_instances(&ids, InstanceState::Draining).await?;
        drain::wait(
            &mut self.view,
            &self.d.client,
            &self.rec.service,
            &ids,
            Until::RequestsFinished,
            self.d.spec.container.stop_grace,
        )
        .await?;
        self.remove_new().await?;
        let update = ReleaseUpdate {
            reason: Some(reason.to_string()),
            ..Default::default()
        };
        self.transition(ReleaseState::RolledBack, update).await
    }

    /// Stops and removes the new containers and marks their instances gone, on every host it
    /// can reach: a host that fails (its engine is down) does not keep the others' containers
    /// running. Its error is returned after the others are done, and the release stays where
    /// it is: run again once the host is back, it removes what is left there.
    async fn remove_new(&mut self) -> Result<()> {
        let grace = self.spec().container.stop_grace;
        let (service, release) = (&self.rec.service, &self.rec.id);
        let removals = self.d.hosts.iter().map(|h| async move {
            for c in h.find(service, Some(release)).await? {
                h.stop_and_remove(&c.id, grace).await?;
            }
            Ok::<(), Error>(())
        });
        let results = futures_util::future::join_all(removals).await;
        let mut failed_hosts = Vec::new();
        let mut first_error = None;
        for (h, r) in self.d.hosts.iter().zip(results) {
            if let Err(e) = r {
                tracing::warn!(release = %self.rec.id, host = %h.name, error = %e, "cannot remove the new containers there");
                failed_hosts.push(h.index);
                first_error.get_or_insert(e);
            }
        }
        let ids: Vec<String> = self
            .plans()
            .into_iter()
            .filter(|(h, _)| !failed_hosts.contains(h))
            .map(|(_, p)| p.name)
            .collect();
        self.set_instances(&ids, InstanceState::Gone).await?;
        first_error.map_or(Ok(()), Err)
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

    /// Takes an operator's abort sent after the promotion: back to the old version.
    async fn abort_after_promotion(&mut self) -> Result<bool> {
        if let Some(Control::Abort) = self.controls.take(&mut self.rec).await? {
            self.begin_rollback("aborted by an operator after the promotion".into())
                .await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn promoted(&mut self) -> Result<()> {
        if self.abort_after_promotion().await? {
            return Ok(());
        }
        let old = self.old_instance_ids().await?;
        self.set_instances(&old, InstanceState::Draining).await?;
        self.d
            .out
            .step(&format!("{} old instance(s) draining", old.len()), None);
        // The old instances take no new session now: a role they hold moves to the new ones
        // while both run (the optimizer's cache volume writer), not when they are stopped.
        handover::run(self.d, &self.rec.service, &self.rec.id, Direction::ToNew).await;
        self.transition(ReleaseState::Draining, ReleaseUpdate::default())
            .await
    }

    /// The post-promotion window: the new version judged a while more while the old one
    /// drains. `true` when it ended the release (a breach or an abort: rolling back).
    async fn watch_after_promotion(&mut self) -> Result<bool> {
        let window = self.spec().rollout.analysis.post_promotion;
        if window.is_zero() {
            return Ok(false);
        }
        self.d.out.step(
            &format!(
                "judging {} for {} after the promotion while the old version drains",
                self.rec.to_version,
                crate::output::fmt_duration(window)
            ),
            None,
        );
        let t = Instant::now();
        let abort = controls::abort_requested(
            self.view.subscribe(),
            self.d.client.clone(),
            self.rec.id.clone(),
        );
        let judged = bake::after_promotion(
            self.d.client.clone(),
            self.rec.service.clone(),
            self.rec.to_version.clone(),
            self.old_version().map(String::from),
            self.spec().rollout.analysis.clone(),
            window,
        );
        let breach = tokio::select! {
            r = judged => r?,
            () = abort => return self.abort_after_promotion().await,
        };
        match breach {
            None => {
                self.d.out.step(
                    &format!(
                        "no breach in the {} after the promotion",
                        crate::output::fmt_duration(window)
                    ),
                    Some(t.elapsed()),
                );
                Ok(false)
            }
            Some(reason) => {
                self.begin_rollback(format!("after the promotion: {reason}"))
                    .await?;
                Ok(true)
            }
        }
    }

    async fn drain_old(&mut self) -> Result<()> {
        if self.watch_after_promotion().await? {
            return Ok(());
        }
        let old = self.old_instance_ids().await?;
        let max = self.spec().sessions.max_drain;
        // The drain can last as long as sessions do: an abort meanwhile ends it at once.
        let abort = controls::abort_requested(
            self.view.subscribe(),
            self.d.client.clone(),
            self.rec.id.clone(),
        );
        let drain = drain::wait(
            &mut self.view,
            &self.d.client,
            &self.rec.service,
            &old,
            Until::SessionsExpired,
            max,
        );
        let drained = tokio::select! {
            d = drain => Some(d?),
            () = abort => None,
        };
        let Some(drained) = drained else {
            self.abort_after_promotion().await?;
            return Ok(());
        };
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

#[cfg(test)]
mod tests {
    use locator_wire::api::ReleaseState;

    #[test]
    fn the_walk_follows_the_locators_state_machine() {
        use ReleaseState::*;
        // The happy path this module walks, and the two exits; each move must be legal.
        let path = ReleaseState::HAPPY_PATH;
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{:?} → {:?}", w[0], w[1]);
        }
        for s in [Validating, Starting, WaitingHealthy] {
            assert!(s.can_become(Failed), "{s:?} → failed");
        }
        assert!(Shifting.can_become(RollingBack));
        assert!(RollingBack.can_become(RolledBack));
    }
}
