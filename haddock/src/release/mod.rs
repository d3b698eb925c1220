//! The release: a durable state machine recorded in the locator.
//!
//! ```text
//! validating → starting → waiting_healthy → registered → shifting(step..) → promoted
//!            → draining → removing → done
//! validating | starting | waiting_healthy | registered ──► failed   (no user saw it; abort)
//! registered | shifting | promoted | draining ──► rolling_back ──► rolled_back (breach, abort)
//! ```
//! `removing` is past the point of return: the old version's containers are going.
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
//!
//! Reading order: this file ([`Deployer`]: the checks before a release begins, and which
//! release to drive), then `run.rs` (one method per state), `bake.rs` (the watch at each canary
//! weight), and what a run hands the bake and keeps going in the background: `controls.rs`
//! (operator controls, pause), `events.rs` (Docker events of the new containers), `status.rs`
//! (what the record's `status` shows), `lease.rs` (who drives the release). `weights.rs` is the
//! arithmetic of a canary step; `preview.rs` is `haddock plan`, the dry run.

mod bake;
mod controls;
mod events;
mod handover;
mod lease;
mod preview;
mod run;
mod status;
mod weights;

pub use lease::{is_driven, LEASE};
pub use preview::Preview;
pub use weights::{steps_to_walk, weights_for};

use crate::docker::Host;
use crate::error::{Error, Result};
use crate::heartbeat::{heartbeat_once, HEARTBEAT};
use crate::image::Supply;
use crate::output::Output;
use crate::spec::Spec;
use locator_wire::api::{NewRelease, Release, ReleaseState, ServiceSpec, SessionSettings};
use locator_wire::client::Client;
use run::Run;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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

impl Outcome {
    /// Its name in the `--json` report.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Released => "released",
            Outcome::AlreadyCurrent => "already_current",
        }
    }
}

/// Milliseconds since the Unix epoch (the lease's clock, as the locator records it).
/// Who haddock says it is: `$HADDOCK_WHO`, else `$USER`, else `haddock`. Only a claim: the
/// locator records every change under the name of the token that made it, and the hooks after
/// the release started are told that name; the `pre_release` hook, which runs before the
/// locator is asked, gets this.
pub fn operator() -> String {
    std::env::var("HADDOCK_WHO")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "haddock".into())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) use crate::output::ms;

/// The version users are on before `rec`, unless the release is to that same version (then
/// there is nothing to split traffic with). Shared by the run and its bake.
fn old_version(rec: &Release) -> Option<&str> {
    rec.from_version.as_deref().filter(|f| *f != rec.to_version)
}

impl Deployer {
    /// Connects to every Docker host of the spec.
    pub async fn new(client: Client, spec: Spec, out: Output) -> Result<Deployer> {
        let hosts = Host::connect_all(&spec).await?;
        Ok(Deployer {
            client,
            spec,
            hosts,
            out,
            who: operator(),
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
        self.check_before(tag).await?;
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
        // A held deploy lock stops a new release before anything changes (the locator refuses
        // to create one too; this says so before the session settings are written).
        if let Some(lock) = current.as_ref().and_then(|s| s.lock.as_ref()) {
            return Err(Error::locked(self.service(), lock));
        }
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
                // Advice only: an engine that cannot say must not fail "nothing to do".
                if let Err(e) = self.report_limit_drift(tag).await {
                    tracing::warn!(error = %e, "comparing the running limits with the spec");
                }
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
        // Normalised as the locator stores them, so that an unchanged spec changes nothing.
        // (A spec whose routes fail the check was refused when it was read.)
        let raw = self.spec.service.routes();
        let routes = raw.checked().unwrap_or(raw);
        if current
            .as_ref()
            .is_none_or(|s| s.sessions != settings || s.routes != routes)
        {
            self.client
                .put_service(
                    self.service(),
                    &ServiceSpec {
                        sessions: settings,
                        routes,
                    },
                )
                .await?;
        }
        // The last word before anything changes: the spec's pre_release hook.
        let facts = crate::hooks::Facts {
            service: self.service().to_string(),
            from_version: from.clone(),
            to_version: tag.to_string(),
            who: self.who.clone(),
            ..Default::default()
        };
        crate::hooks::gate(&self.spec.hooks, &facts, &self.out).await?;
        let new = NewRelease {
            service: self.service().to_string(),
            from_version: from,
            to_version: tag.to_string(),
            image: self.spec.image_ref(tag),
            who: self.who.clone(),
        };
        let rec = match self.client.create_release(&new).await {
            Ok(r) => r,
            Err(e) if e.code() == Some("service_locked") => {
                let service = self.client.service(self.service()).await?;
                return Err(match &service.lock {
                    Some(lock) => Error::locked(self.service(), lock),
                    None => e.into(),
                });
            }
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

    /// `haddock release SERVICE TAG --redeploy`: the version a redeploy of `tag` releases.
    ///
    /// Weights, labels and instance names go by version, so containers made from the same
    /// image with another spec (args, env, volumes, network) need a version of their own to
    /// share the canary with the ones they replace: `TAG+N`, one more than any `TAG+…` the
    /// service has had (its history and its current version). An active, undriven release of
    /// a redeploy of `tag` is continued (run it again after a crash, as for a tag). When the
    /// service does not run `tag`, a redeploy is an ordinary release of `tag`.
    pub async fn redeploy_version(&self, tag: &str) -> Result<String> {
        let service = self.service();
        if let Some(active) = self.client.active_release(service).await? {
            if crate::spec::redeploy_number(&active.to_version, tag).is_some_and(|n| n > 0) {
                return Ok(active.to_version);
            }
        }
        let current = match self.client.service(service).await {
            Ok(s) => s.primary_version,
            Err(e) if e.status().is_some_and(|s| s.as_u16() == 404) => None,
            Err(e) => return Err(e.into()),
        };
        let Some(current) = current.filter(|v| crate::spec::image_tag(v) == tag) else {
            self.out.step(
                &format!("{service} does not run {tag}: releasing it as a new version"),
                None,
            );
            return Ok(tag.to_string());
        };
        let history = self.client.history(Some(service)).await?;
        let last = history
            .iter()
            .map(|r| r.to_version.as_str())
            .chain([current.as_str()])
            .filter_map(|v| crate::spec::redeploy_number(v, tag))
            .max()
            .unwrap_or(0);
        let version = format!("{tag}+{}", last + 1);
        self.out.step(
            &format!(
                "redeploying {service}: {current} → {version} (image tag {tag}, containers from \
                 the spec as it is now)"
            ),
            None,
        );
        Ok(version)
    }

    /// The checks a release of `version` passes before anything changes (and `plan` runs
    /// too): the image on every host or where it comes from, the volumes against the spec,
    /// the DNS accessories running. Returns how the image reaches the hosts.
    async fn check_before(&self, version: &str) -> Result<Supply> {
        let supply = self.check_images(version).await?;
        self.check_volumes().await?;
        crate::accessory::check_dns(&self.hosts, &self.spec).await?;
        Ok(supply)
    }

    /// Refuses (nothing changed) when a volume the spec declares exists on a host as something
    /// else: Docker cannot change it, and the release would run on a volume the spec does not
    /// describe. Missing volumes are created later, in `validating`.
    async fn check_volumes(&self) -> Result<()> {
        for h in &self.hosts {
            crate::volume::check_all(h, &self.spec).await?;
        }
        Ok(())
    }

    /// Says when the running instances' memory cap is not the spec's (a release of the same
    /// tag changes nothing, so a new cap needs `haddock update`).
    async fn report_limit_drift(&self, tag: &str) -> Result<()> {
        let want = self.spec.container.memory.as_u64();
        for h in &self.hosts {
            for c in h.find(self.service(), None).await? {
                if c.version != tag || !c.running {
                    continue;
                }
                let Some(inspect) = h.inspect(&c.id).await? else {
                    continue;
                };
                let have = inspect
                    .host_config
                    .and_then(|hc| hc.memory)
                    .and_then(|m| u64::try_from(m).ok());
                if let Some(have) = have.filter(|&m| m != want) {
                    self.out.step(
                        &format!(
                            "{} runs with a memory cap of {}, the spec says {}: apply it in place \
                             with `haddock update {} --memory {}`",
                            c.name,
                            bytesize::ByteSize(have).to_string_as(true),
                            self.spec.container.memory.to_string_as(true),
                            self.service(),
                            self.spec.container.memory.as_u64()
                        ),
                        None,
                    );
                }
            }
        }
        Ok(())
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

    /// Walks a release from its recorded state to a terminal one, then runs the spec's
    /// `post_release` or `post_rollback` hook.
    pub async fn drive(&self, rec: Release) -> Result<Release> {
        let mut facts = self.facts(&rec);
        let result = Run::new(self, rec).walk().await;
        let hook = match &result {
            Ok(r) if r.state == ReleaseState::Done => Some(crate::hooks::Hook::PostRelease),
            Err(Error::RolledBack { reason, .. }) => {
                facts.reason = Some(reason.clone());
                Some(crate::hooks::Hook::PostRollback)
            }
            _ => None,
        };
        if let Some(hook) = hook {
            crate::hooks::notify(&self.spec.hooks, hook, &facts, &self.out).await;
        }
        result
    }

    /// What the hooks are told about release `rec`.
    fn facts(&self, rec: &Release) -> crate::hooks::Facts {
        crate::hooks::Facts {
            service: rec.service.clone(),
            release: Some(rec.id.clone()),
            from_version: rec.from_version.clone(),
            to_version: rec.to_version.clone(),
            // The locator's record: the name of the token that started the release.
            who: rec.who.clone(),
            ..Default::default()
        }
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
    /// `haddock rollback SERVICE VERSION`: `version` when the service has run it (a finished
    /// release made it the primary); anything else is bad input naming the versions it ran.
    pub async fn earlier_version(&self, version: &str) -> Result<String> {
        let history = self.client.history(Some(self.service())).await?;
        let ran: Vec<&str> = history
            .iter()
            .filter(|r| r.state == ReleaseState::Done)
            .map(|r| r.to_version.as_str())
            .collect();
        if ran.contains(&version) {
            return Ok(version.to_string());
        }
        let mut known: Vec<&str> = Vec::new();
        for v in ran {
            if !known.contains(&v) {
                known.push(v);
            }
        }
        Err(Error::BadInput(format!(
            "{} has never run {version:?}; versions it ran, newest first: {}",
            self.service(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )))
    }

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
