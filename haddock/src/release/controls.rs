//! Operator controls (`haddock promote`, `abort`, `pause`, `resume`, and the dashboard buttons)
//! as a driving haddock sees them, and whether the release is paused.
//!
//! Pause and resume are recorded by the locator itself; promote and abort wait in the record
//! until the driver acknowledges them. [`Controls`] is the one reader of both, shared by the
//! bake and a manual rollout's wait for `promote`, so that "paused" means the same in each:
//! paused by an operator, or by an analysis breach when `auto_rollback = false`.

use super::lease::driver_error;
use crate::error::Result;
use crate::output::Output;
use crate::view::SAFETY;
use locator_wire::api::{Control, Release, ReleaseUpdate, Snapshot};
use locator_wire::client::Client;
use tokio::sync::watch;

/// The operator controls of one release, and its pause.
pub(super) struct Controls {
    client: Client,
    out: Output,
    /// This driver, named in the acknowledgement (a write to the release like any other).
    holder: String,
    /// Paused by an operator (recorded in the locator) or by a breach without auto-rollback.
    paused: bool,
    /// The operator's pause as last read from the locator.
    operator_paused: bool,
    breach_paused: bool,
}

impl Controls {
    /// `paused`: as the release record says when the run starts.
    pub(super) fn new(client: Client, out: Output, holder: String, paused: bool) -> Controls {
        Controls {
            client,
            out,
            holder,
            paused,
            operator_paused: paused,
            breach_paused: false,
        }
    }

    /// Whether the bake clock stands still.
    pub(super) fn paused(&self) -> bool {
        self.paused
    }

    /// Pauses the release for an analysis breach (`auto_rollback = false`). `true` the first
    /// time only: the caller says so once, not on every tick the breach lasts.
    pub(super) fn pause_for_breach(&mut self) -> bool {
        if self.breach_paused {
            return false;
        }
        self.breach_paused = true;
        self.paused = true;
        true
    }

    /// Whether `seen` (the release as the watch stream shows it; `None`: not shown) asks for
    /// something this run has not taken yet: a control to acknowledge, or a pause or resume.
    pub(super) fn pending(&self, seen: Option<&Release>) -> bool {
        seen.is_none_or(|r| r.control.is_some() || r.paused != self.operator_paused)
    }

    /// Reads and acknowledges an operator control. `rec` becomes the release as the locator
    /// holds it now (and again after the acknowledgement), so that the run's record stays
    /// current; it is updated in place so that a failed acknowledgement still leaves it as read.
    pub(super) async fn take(&mut self, rec: &mut Release) -> Result<Option<Control>> {
        let fresh = self.client.release(&rec.id).await?;
        if fresh.paused != self.paused {
            self.out.step(
                if fresh.paused {
                    "paused by an operator"
                } else {
                    "resumed by an operator"
                },
                None,
            );
        }
        // Pause and resume are recorded by the locator itself; promote and abort wait for us.
        self.operator_paused = fresh.paused;
        self.paused = fresh.paused || self.breach_paused;
        *rec = fresh;
        let Some(c) = rec.control else {
            return Ok(None);
        };
        *rec = self
            .client
            .update_release(
                &rec.id,
                &ReleaseUpdate {
                    clear_control: true,
                    lease: Some(self.holder.clone()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| driver_error(&rec.id, e))?;
        self.out.step(&format!("operator: {c:?}"), None);
        Ok(Some(c))
    }
}

/// Resolves once an operator has asked to abort `release`: seen on the watch stream the moment
/// it is recorded, or over HTTP after [`SAFETY`] without any change (a stalled stream). For the
/// states whose work must stop at once: the caller races its work against this, and the abort
/// is acknowledged by the state it records.
pub(super) async fn abort_requested(
    mut view: watch::Receiver<Snapshot>,
    client: Client,
    release: String,
) {
    let asked = |r: &Release| r.id == release && r.control == Some(Control::Abort);
    loop {
        if view.borrow_and_update().releases.iter().any(asked) {
            return;
        }
        match tokio::time::timeout(SAFETY, view.changed()).await {
            Ok(Ok(())) => continue,
            // The view stopped (its run is ending): only HTTP is left.
            Ok(Err(_)) => tokio::time::sleep(SAFETY).await,
            Err(_) => {}
        }
        if client.release(&release).await.is_ok_and(|r| asked(&r)) {
            return;
        }
    }
}
