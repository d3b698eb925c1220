//! Heartbeats: how the locator learns that a service's instances are still alive.
//!
//! The locator marks an instance that stops heartbeating unhealthy after its TTL, and its
//! instances do not heartbeat themselves: haddock does it for them, from whatever host it can
//! see running. A haddock driving a release does it every [`HEARTBEAT`] (its lease task, in
//! `release::lease`); between releases `haddock heartbeat SERVICE` runs [`run_agent`]. Both need
//! only the Docker hosts and the locator client, so this module sits below `release` and `cli`
//! and depends on neither.

use crate::docker::Host;
use crate::health::Probe;
use crate::spec::Spec;
use futures_util::StreamExt;
use locator_wire::api::{Instance, InstanceState};
use locator_wire::client::Client;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::time::Duration;

/// How often haddock heartbeats the service's instances and its own lease on the release.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long one host may take to list its containers for a heartbeat round. A host that does
/// not answer by then (lost, or its engine hung) gets no heartbeats this round, so its
/// instances turn unhealthy; it must never hold back the heartbeats of the hosts that answer.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// What the hosts answered about the service's containers in one round: the running ones
/// and the ones that exist but do not run (exited, or between two starts of their restart
/// policy). A host that did not answer within [`LIST_TIMEOUT`] contributes to neither.
#[derive(Debug, Default)]
struct Listing {
    running: HashSet<String>,
    stopped: HashSet<String>,
}

async fn list(hosts: &[Host], service: &str) -> Listing {
    let lists = hosts
        .iter()
        .map(|h| tokio::time::timeout(LIST_TIMEOUT, h.find(service, None)));
    let mut out = Listing::default();
    for (h, listed) in hosts
        .iter()
        .zip(futures_util::future::join_all(lists).await)
    {
        match listed {
            Ok(Ok(list)) => {
                for c in list {
                    if c.running {
                        out.running.insert(c.id);
                    } else {
                        out.stopped.insert(c.id);
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(host = %h.name, error = %e, "listing containers for heartbeats")
            }
            Err(_) => {
                tracing::debug!(host = %h.name, "no container list within the heartbeat timeout")
            }
        }
    }
    out
}

/// Heartbeats every instance of `service` whose container runs on one of `hosts` (old and new:
/// the locator marks silent instances unhealthy after its TTL). Best effort; the hosts are
/// asked at once, each within [`LIST_TIMEOUT`].
pub async fn heartbeat_once(client: &Client, hosts: &[Host], service: &str) {
    let listing = list(hosts, service).await;
    if let Ok(instances) = client.instances(service).await {
        heartbeat(client, &instances, &listing).await;
    }
}

/// One request for all of them (`POST /v1/heartbeats`): a host agent's cost to the locator is
/// one request a second, however many instances it runs.
async fn heartbeat(client: &Client, instances: &[Instance], listing: &Listing) {
    let ids: Vec<String> = instances
        .iter()
        .filter(|i| i.state != InstanceState::Gone && listing.running.contains(&i.container_id))
        .map(|i| i.id.clone())
        .collect();
    if ids.is_empty() {
        return;
    }
    match client.heartbeats(&ids).await {
        Ok(h) if !h.unknown.is_empty() => {
            tracing::debug!(unknown = ?h.unknown, "heartbeats for instances the locator forgot")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "heartbeats"),
    }
}

/// The between-releases agent (`haddock heartbeat SERVICE`): heartbeats every [`HEARTBEAT`],
/// until the process is killed. It never returns, which the `Infallible` result says to the
/// caller.
///
/// It also keeps the locator true to what Docker does between releases: a ready instance whose
/// container dies (Docker's `die` event, or found stopped by a round) is marked unhealthy at
/// once, so proxies stop sending it anyone before its restart policy brings it back. An
/// unhealthy instance whose container runs is ready again once its readiness probe (the spec's
/// `[health]`) passes `rise` times in a row. The agent does not heartbeat unhealthy instances:
/// the locator would revive one on a heartbeat after a silence, probe or not.
pub async fn run_agent(client: &Client, hosts: &[Host], spec: &Spec) -> Infallible {
    let service = spec.service.name.as_str();
    let (tx, mut died) = tokio::sync::mpsc::unbounded_channel::<String>();
    for h in hosts {
        let (h, tx, service) = (h.clone(), tx.clone(), service.to_string());
        tokio::spawn(async move {
            loop {
                let mut events = std::pin::pin!(h.events(&service, None));
                while let Some(e) = events.next().await {
                    if e.action == "die" {
                        let _ = tx.send(e.container);
                    }
                }
                // The engine closed the stream (restarted, or unreachable): follow it again.
                tokio::time::sleep(HEARTBEAT).await;
            }
        });
    }
    let mut watch = Watchdog::default();
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let listing = list(hosts, service).await;
                let Ok(instances) = client.instances(service).await else { continue };
                let alive: Vec<Instance> = instances
                    .iter()
                    .filter(|i| i.state != InstanceState::Unhealthy)
                    .cloned()
                    .collect();
                heartbeat(client, &alive, &listing).await;
                watch.round(client, spec, &instances, &listing).await;
            }
            Some(container) = died.recv() => {
                let Ok(instances) = client.instances(service).await else { continue };
                if let Some(i) = instances.iter().find(|i| i.container_id == container) {
                    take_out(client, i, "its container died").await;
                }
            }
        }
    }
}

/// Ready → unhealthy (proxies stop sending it anyone).
async fn take_out(client: &Client, i: &Instance, why: &str) {
    if i.state != InstanceState::Ready {
        return;
    }
    match client.set_state(&i.id, InstanceState::Unhealthy).await {
        Ok(_) => tracing::warn!(instance = %i.id, why, "instance taken out of rotation"),
        Err(e) => tracing::warn!(instance = %i.id, error = %e, "marking an instance unhealthy"),
    }
}

/// The agent's memory between rounds: consecutive passing probes of each unhealthy instance.
#[derive(Debug, Default)]
struct Watchdog {
    passes: HashMap<String, u32>,
}

impl Watchdog {
    /// Takes out ready instances whose container is found stopped, and probes the unhealthy
    /// ones whose container runs (all at once: a hung instance must not delay the heartbeats of
    /// the others past the locator's TTL), bringing back those that passed `rise` times.
    async fn round(
        &mut self,
        client: &Client,
        spec: &Spec,
        instances: &[Instance],
        listing: &Listing,
    ) {
        for i in instances {
            if listing.stopped.contains(&i.container_id) {
                take_out(client, i, "its container is not running").await;
            }
        }
        let candidates: Vec<&Instance> = instances
            .iter()
            .filter(|i| {
                i.state == InstanceState::Unhealthy && listing.running.contains(&i.container_id)
            })
            .collect();
        self.passes
            .retain(|id, _| candidates.iter().any(|i| &i.id == id));
        let probes = candidates.iter().map(|i| async move {
            match i.address.parse() {
                Ok(addr) => Probe::new(addr, &spec.health).check().await.is_ok(),
                Err(_) => false,
            }
        });
        let results = futures_util::future::join_all(probes).await;
        for (i, ok) in candidates.into_iter().zip(results) {
            let passes = self.passes.entry(i.id.clone()).or_insert(0);
            *passes = if ok { *passes + 1 } else { 0 };
            if *passes < spec.health.rise {
                continue;
            }
            // Read it again: a release may have moved it meanwhile (draining, gone), and a
            // stale `ready` written over that would send it new users.
            match client.instance(&i.id).await {
                Ok(now) if now.state == InstanceState::Unhealthy => {}
                _ => continue,
            }
            match client.set_state(&i.id, InstanceState::Ready).await {
                Ok(_) => {
                    tracing::warn!(instance = %i.id, "instance back in rotation: its readiness probe passes");
                    self.passes.remove(&i.id);
                }
                Err(e) => tracing::warn!(instance = %i.id, error = %e, "marking an instance ready"),
            }
        }
    }
}
