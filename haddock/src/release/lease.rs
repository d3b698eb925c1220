//! Who drives a release: the driver lease the locator keeps in the release record.
//!
//! A driving haddock takes the lease before it does anything ([`Lease::take`]), renews it every
//! [`HEARTBEAT`], and names itself (`pid@host`) in every write it makes to the release. The
//! locator refuses any of those writes with `lease_held` while another holder's lease is
//! younger than `api::LEASE_MS` by the locator's own clock, so when two haddocks both find a
//! lapsed lease, one takes it and the other stops with [`Error::Driven`]: two processes never
//! drive one release. The same background task heartbeats the service's instances, since it
//! runs on the same clock. [`Lease`] owns that task and stops it when stopped or dropped.

use super::now_ms;
use super::status::Status;
use crate::docker::Host;
use crate::error::{Error, Result};
use crate::heartbeat::{heartbeat_once, HEARTBEAT};
use locator_wire::api::{Release, ReleaseUpdate};
use locator_wire::client::{Client, ClientError};
use std::time::Duration;
use tokio::task::JoinHandle;

/// A lease not renewed for this long has lapsed (the locator's `api::LEASE_MS`).
pub const LEASE: Duration = Duration::from_millis(locator_wire::api::LEASE_MS);

/// Whether a haddock process is driving this release right now (its lease is fresh). Read
/// with this machine's clock, so only a hint for waiting: the locator decides.
pub fn is_driven(rec: &Release) -> bool {
    rec.status
        .driver
        .as_ref()
        .is_some_and(|l| l.is_fresh(now_ms()))
}

/// This process as a lease holder: `pid@hostname`.
pub(super) fn holder() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{}@{host}", std::process::id())
}

/// What a refused driver write means: another process holds the lease (`lease_held`) or moved
/// the release first (`state_conflict`). This process must stop driving; anything else is
/// passed on as it is.
pub(super) fn driver_error(release: &str, e: ClientError) -> Error {
    match e.code() {
        Some("lease_held" | "state_conflict") => Error::Driven {
            release: release.to_string(),
            detail: e.message().to_string(),
        },
        _ => e.into(),
    }
}

/// The lease of one driving run, renewed in the background.
pub(super) struct Lease {
    task: JoinHandle<()>,
}

impl Lease {
    /// Takes the lease on `release` for `holder`, before the run changes anything: refused
    /// with [`Error::Driven`] while another holder's lease is fresh.
    pub(super) async fn take(client: &Client, release: &str, holder: &str) -> Result<Release> {
        let claim = ReleaseUpdate {
            lease: Some(holder.to_string()),
            ..Default::default()
        };
        client
            .update_release(release, &claim)
            .await
            .map_err(|e| driver_error(release, e))
    }

    /// Gives the lease up (best effort) when a run stops, so that `haddock resume` need not
    /// wait for it to lapse. A lease another holder took meanwhile is not touched.
    pub(super) async fn give_up(client: &Client, release: &str, holder: &str) {
        let drop = ReleaseUpdate {
            lease: Some(holder.to_string()),
            drop_lease: true,
            ..Default::default()
        };
        if let Err(e) = client.update_release(release, &drop).await {
            tracing::debug!(release, error = %e, "giving the lease up");
        }
    }

    /// Renews the lease of `holder` on `release` every [`HEARTBEAT`] (publishing `status`
    /// with it) and heartbeats `service`'s instances on `hosts`, until stopped.
    pub(super) fn spawn(
        client: Client,
        hosts: Vec<Host>,
        service: String,
        release: String,
        holder: String,
        status: Status,
    ) -> Lease {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                // The lease first: the first tick is immediate, so the record names its driver
                // before any slower work (the heartbeats go to Docker and the locator).
                let renew = ReleaseUpdate {
                    lease: Some(holder.clone()),
                    status: Some(status.snapshot()),
                    ..Default::default()
                };
                if let Err(e) = client.update_release(&release, &renew).await {
                    // A lost lease also refuses the run's next write, which stops it.
                    tracing::warn!(release = %release, error = %e, "lease renewal");
                }
                heartbeat_once(&client, &hosts, &service).await;
            }
        });
        Lease { task }
    }

    /// Stops renewing: the lease lapses [`LEASE`] after the last renewal.
    pub(super) fn stop(&mut self) {
        self.task.abort();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locator_wire::api::{Lease, ReleaseState, ReleaseStatus};
    use std::collections::BTreeMap;

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
            status: ReleaseStatus::default(),
            actions: Vec::new(),
        };
        assert!(!is_driven(&rec));
        let lease = |at_ms| {
            Some(Lease {
                who: "1@h".into(),
                at_ms,
            })
        };
        rec.status.driver = lease(now_ms());
        assert!(is_driven(&rec));
        rec.status.driver = lease(now_ms() - 60_000);
        assert!(!is_driven(&rec));
    }
}
