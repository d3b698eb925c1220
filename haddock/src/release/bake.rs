//! The bake: the watch over one canary weight, from the moment the weight is applied until its
//! pause is over, an operator steps in, or something says "roll back".
//!
//! It looks, in this order, at the Docker events of the new containers, the readiness probes
//! (every health interval; `fall` failures in a row end the bake), the analysis of the
//! locator's traffic figures against the bake's baseline, and the operator controls — each
//! time the locator changes (pushed on the watch stream, [`View`]), a Docker event arrives, a
//! probe is due, or [`SAFETY`] passed. The pause only counts down while the release is not
//! paused. A [`Bake`] owns what
//! only it uses (limits, baseline, probes, what is left of the pause) and is handed the rest by
//! the run; it never changes the release state: it says what should happen ([`BakeOutcome`])
//! and the run makes the transition.

use super::controls::Controls;
use super::events::Events;
use super::status::Status;
use super::{ms, now_ms, old_version};
use crate::analysis::{self, Verdict};
use crate::check::Checks;
use crate::error::Result;
use crate::health::{Probe, Streak};
use crate::output::{fmt_duration, Output};
use crate::spec::{Analysis, HealthSection, OnInconclusive, Spec};
use crate::view::{View, SAFETY};
use locator_wire::api::{BakeStatus, Control, Release, TrafficByVersion};
use locator_wire::client::Client;
use std::time::{Duration, Instant};

/// How often a manual rollout looks for `haddock promote`.
pub(super) const TICK: Duration = Duration::from_millis(250);

/// How a bake ended.
pub(super) enum BakeOutcome {
    /// The pause is over: on to the next step.
    Continue,
    /// An operator said `promote`: straight to the last (100 %) step.
    PromoteNow,
    /// Roll the release back, for this reason.
    RollBack(String),
}

/// The service's traffic figures by version, as the locator aggregates them from the proxies.
pub(super) async fn traffic(client: &Client, service: &str) -> Result<TrafficByVersion> {
    let snap = client.snapshot().await?;
    Ok(snap.traffic.get(service).cloned().unwrap_or_default())
}

/// The watch after the promotion (`rollout.analysis.post_promotion`): judges `new` on what
/// it served since this call, for `window`, against the same limits as the bakes. `Some`
/// reason on a breach; `None` once the window passed without one (too little traffic to judge
/// is no reason to send users back). Reads the locator directly every [`TICK`]: the drain
/// that runs beside it owns the watch stream's view.
pub(super) async fn after_promotion(
    client: Client,
    service: String,
    new: String,
    old: Option<String>,
    limits: Analysis,
    window: Duration,
) -> Result<Option<String>> {
    let baseline = traffic(&client, &service).await?;
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        tokio::time::sleep(TICK.min(deadline.saturating_duration_since(Instant::now()))).await;
        let now = traffic(&client, &service).await?;
        if let Verdict::Breach { reason, .. } =
            analysis::judge(&baseline, &now, &new, old.as_deref(), &limits)
        {
            return Ok(Some(reason));
        }
    }
    Ok(None)
}

impl Bake {
    /// The bake ran out with `requests` of `min_requests` on the new version. First extends it
    /// (once, by `extend_inconclusive`); then, as `on_inconclusive` says, goes on (`None`
    /// with nothing left to bake), pauses for an operator (`None`, paused), or rolls back.
    fn inconclusive(
        &mut self,
        requests: u64,
        min_requests: u64,
        extended: &mut bool,
        controls: &mut Controls,
        status: &Status,
    ) -> Option<BakeOutcome> {
        let extra = self.limits.extend_inconclusive;
        if !*extended && !extra.is_zero() {
            *extended = true;
            self.remaining = extra;
            self.out.step(
                &format!(
                    "step {} %: {requests} of {min_requests} requests, too few to judge; baking up \
                     to {} more",
                    self.weight,
                    fmt_duration(extra)
                ),
                None,
            );
            return None;
        }
        *extended = true;
        let verdict = Verdict::Inconclusive {
            requests,
            min_requests,
        };
        status.update(|s| s.analysis = serde_json::to_value(&verdict).ok());
        let what = format!(
            "step {} % inconclusive: the new version served {requests} of the {min_requests} \
             requests it needs to be judged",
            self.weight
        );
        match self.limits.on_inconclusive {
            OnInconclusive::Pass => {
                self.out
                    .step(&format!("{what}; going on (on_inconclusive = pass)"), None);
                None
            }
            OnInconclusive::Fail => Some(BakeOutcome::RollBack(what)),
            OnInconclusive::Pause => {
                if controls.pause_for_breach() {
                    self.out.step(
                        &format!(
                            "{what}; paused for an operator (on_inconclusive = pause): `haddock \
                             resume` goes on, `promote` or `abort` decide"
                        ),
                        None,
                    );
                }
                None
            }
        }
    }

    /// A breach of the analysis or a check: roll back, or with `auto_rollback = false` pause
    /// for an operator (saying so once) and bake on.
    fn breach(&mut self, reason: String, controls: &mut Controls) -> Option<BakeOutcome> {
        if self.auto_rollback {
            return Some(BakeOutcome::RollBack(reason));
        }
        if controls.pause_for_breach() {
            self.out.step(
                &format!("analysis breach, paused (auto_rollback = false): {reason}"),
                None,
            );
        }
        None
    }

    /// Shows the latest verdict, and the custom checks' latest measurements beside it, in the
    /// release's status.
    fn show(&self, status: &Status, verdict: &Verdict) {
        let mut shown = serde_json::to_value(verdict).ok();
        if let Some(serde_json::Value::Object(o)) = shown.as_mut() {
            if !self.checks.is_empty() {
                o.insert(
                    "checks".into(),
                    serde_json::to_value(self.checks.latest()).unwrap_or_default(),
                );
            }
        }
        status.update(|s| s.analysis = shown);
    }

    /// Records the bake in the release's status: when it ends while the timer runs, what is
    /// left while it is paused (the dashboard counts down from these).
    fn record(&self, status: &Status, started_at_ms: u64, paused: bool) {
        let remaining_ms = ms(self.remaining);
        status.update(|s| {
            s.bake = Some(BakeStatus {
                weight: self.weight,
                pause_ms: ms(self.pause),
                started_at_ms,
                until_ms: (!paused).then(|| now_ms().saturating_add(remaining_ms)),
                remaining_ms,
            })
        });
    }
}

/// One bake at one weight.
pub(super) struct Bake {
    client: Client,
    out: Output,
    weight: u32,
    pause: Duration,
    /// What is left of the pause (it does not count down while the release is paused).
    remaining: Duration,
    limits: Analysis,
    health: HealthSection,
    auto_rollback: bool,
    /// The traffic figures when the bake began: only what came after is judged.
    baseline: TrafficByVersion,
    /// A readiness probe per new instance, by instance name, with its run of outcomes.
    probes: Vec<(String, Probe, Streak)>,
    /// The step's custom checks (`rollout.analysis.checks`).
    checks: Checks,
}

impl Bake {
    /// A bake of `pause` at `weight`, judged against `baseline`, probing each named instance
    /// and measuring the custom checks.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        spec: &Spec,
        client: &Client,
        out: &Output,
        weight: u32,
        pause: Duration,
        baseline: TrafficByVersion,
        probes: Vec<(String, Probe)>,
        checks: Checks,
    ) -> Bake {
        Bake {
            client: client.clone(),
            out: out.clone(),
            weight,
            pause,
            remaining: pause,
            limits: spec.rollout.analysis.clone(),
            health: spec.health.clone(),
            auto_rollback: spec.rollout.auto_rollback,
            baseline,
            probes: probes
                .into_iter()
                .map(|(name, probe)| (name, probe, Streak::default()))
                .collect(),
            checks,
        }
    }

    /// Watches until the bake ends. `rec` is the run's record of the release: reading the
    /// controls refreshes it. `status` is what the release record shows (the bake and the
    /// latest analysis verdict).
    pub(super) async fn run(
        &mut self,
        rec: &mut Release,
        controls: &mut Controls,
        events: &mut Events,
        status: &Status,
        view: &mut View,
    ) -> Result<BakeOutcome> {
        let mut last_tick = Instant::now();
        let mut next_probe = Instant::now() + self.health.interval;
        let started_at_ms = now_ms();
        self.record(status, started_at_ms, controls.paused());
        // The controls over HTTP at once, then whenever the watch stream shows one pending,
        // and at least every SAFETY.
        let mut controls_read = Instant::now() - SAFETY;
        // Whether the bake was extended for too little traffic (an inconclusive bake is one
        // that ends `Waiting`), and whether it has decided what to do about it.
        let (mut extended, mut decided) = (false, false);
        if !self.pause.is_zero() {
            self.out.step(
                &format!("baking {} at {} %", fmt_duration(self.pause), self.weight),
                None,
            );
        }
        loop {
            if let Some(reason) = events.trouble() {
                return Ok(BakeOutcome::RollBack(reason));
            }
            if Instant::now() >= next_probe {
                next_probe = Instant::now() + self.health.interval;
                for (name, probe, streak) in &mut self.probes {
                    let outcome = probe.check().await;
                    streak.record(outcome.is_ok());
                    if streak.failures >= self.health.fall {
                        return Ok(BakeOutcome::RollBack(format!(
                            "new instance {name} failed {} readiness probes in a row: {}",
                            streak.failures,
                            outcome.err().unwrap_or_default()
                        )));
                    }
                }
            }
            let now = if view.is_live() {
                view.traffic(&rec.service)
            } else {
                traffic(&self.client, &rec.service).await?
            };
            let verdict = analysis::judge(
                &self.baseline,
                &now,
                &rec.to_version,
                old_version(rec),
                &self.limits,
            );
            let waiting = match verdict {
                Verdict::Waiting {
                    requests,
                    min_requests,
                } => Some((requests, min_requests)),
                _ => None,
            };
            let check_breach = self.checks.measure_due().await;
            if !decided {
                self.show(status, &verdict);
            }
            let breach = match &verdict {
                Verdict::Breach { reason, .. } => Some(reason.clone()),
                _ => check_breach,
            };
            if let Some(reason) = breach {
                if let Some(outcome) = self.breach(reason, controls) {
                    return Ok(outcome);
                }
            }
            if controls.pending(view.release(&rec.id).as_ref()) || controls_read.elapsed() >= SAFETY
            {
                controls_read = Instant::now();
                match controls.take(rec).await? {
                    Some(Control::Abort) => {
                        return Ok(BakeOutcome::RollBack("aborted by an operator".into()))
                    }
                    Some(Control::Promote) => return Ok(BakeOutcome::PromoteNow),
                    _ => {}
                }
            }
            let elapsed = last_tick.elapsed();
            last_tick = Instant::now();
            if !controls.paused() {
                self.remaining = self.remaining.saturating_sub(elapsed);
            }
            self.record(status, started_at_ms, controls.paused());
            if self.remaining.is_zero() && !controls.paused() {
                // Like the analysis, the checks judge only a bake that lasted.
                let checked = if self.pause.is_zero() {
                    None
                } else {
                    self.checks.verdict_at_end().await
                };
                if let Some(reason) = checked {
                    self.show(status, &verdict);
                    if let Some(outcome) = self.breach(reason, controls) {
                        return Ok(outcome);
                    }
                    if controls.paused() {
                        continue;
                    }
                }
                // A bake of zero judges nothing, so it cannot be inconclusive either.
                let judged = !self.pause.is_zero() && !decided;
                match waiting.filter(|_| judged) {
                    None => return Ok(BakeOutcome::Continue),
                    Some((requests, min_requests)) => {
                        if let Some(outcome) = self.inconclusive(
                            requests,
                            min_requests,
                            &mut extended,
                            controls,
                            status,
                        ) {
                            return Ok(outcome);
                        }
                        // Extended: bake on. Otherwise it is decided: `pass` goes on now,
                        // `pause` once an operator resumes.
                        if self.remaining.is_zero() {
                            decided = true;
                            if !controls.paused() {
                                return Ok(BakeOutcome::Continue);
                            }
                        }
                    }
                }
            }
            let mut wait = next_probe
                .min(self.checks.next_due().unwrap_or(next_probe))
                .saturating_duration_since(Instant::now());
            if !controls.paused() {
                wait = wait.min(self.remaining);
            }
            tokio::select! {
                () = view.changed(wait.max(Duration::from_millis(1))) => {}
                reason = events.next_trouble() => return Ok(BakeOutcome::RollBack(reason)),
            }
        }
    }
}
