//! Heartbeats: how the locator learns that a service's instances are still alive.
//!
//! The locator marks an instance that stops heartbeating unhealthy after its TTL, and its
//! instances do not heartbeat themselves: haddock does it for them, from whatever host it can
//! see running. A haddock driving a release does it every [`HEARTBEAT`] (its lease task, in
//! `release::lease`); between releases `haddock heartbeat SERVICE` runs [`run_agent`]. Both need
//! only the Docker hosts and the locator client, so this module sits below `release` and `cli`
//! and depends on neither.

use crate::docker::Host;
use locator_wire::api::InstanceState;
use locator_wire::client::Client;
use std::convert::Infallible;
use std::time::Duration;

/// How often haddock heartbeats the service's instances and its own lease on the release.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long one host may take to list its containers for a heartbeat round. A host that does
/// not answer by then (lost, or its engine hung) gets no heartbeats this round, so its
/// instances turn unhealthy; it must never hold back the heartbeats of the hosts that answer.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// Heartbeats every instance of `service` whose container runs on one of `hosts` (old and new:
/// the locator marks silent instances unhealthy after its TTL). Best effort; the hosts are
/// asked at once, each within [`LIST_TIMEOUT`].
pub async fn heartbeat_once(client: &Client, hosts: &[Host], service: &str) {
    let lists = hosts
        .iter()
        .map(|h| tokio::time::timeout(LIST_TIMEOUT, h.find(service, None)));
    let mut running = Vec::new();
    for (h, listed) in hosts
        .iter()
        .zip(futures_util::future::join_all(lists).await)
    {
        match listed {
            Ok(Ok(list)) => running.extend(list.into_iter().filter(|c| c.running).map(|c| c.id)),
            Ok(Err(e)) => {
                tracing::debug!(host = %h.name, error = %e, "listing containers for heartbeats")
            }
            Err(_) => {
                tracing::debug!(host = %h.name, "no container list within the heartbeat timeout")
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

/// The between-releases agent (`haddock heartbeat SERVICE`): [`heartbeat_once`] every
/// [`HEARTBEAT`], until the process is killed. It never returns, which the `Infallible` result
/// says to the caller.
pub async fn run_agent(client: &Client, hosts: &[Host], service: &str) -> Infallible {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        heartbeat_once(client, hosts, service).await;
    }
}
