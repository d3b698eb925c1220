//! Feeds the router from the locator's watch stream and keeps a copy on disk.
//!
//! The watcher applies each event to its own [`Snapshot`] (the same `apply` the locator's other
//! clients use), installs a new routing table when the event concerns our service, and writes
//! the snapshot to `<state-dir>/routing.json` (temp file + rename, so a crash never leaves half
//! a file). When the locator is down the proxy keeps serving on its last table and reconnects
//! with exponential backoff, resuming from the last revision it saw.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use locator_wire::api::{Change, Snapshot, WatchEvent};
use locator_wire::client::Client;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::error::ProxyError;
use crate::files::write_atomically;
use crate::services::Services;

/// File name of the persisted snapshot inside the state directory.
pub const STATE_FILE: &str = "routing.json";

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Reads a persisted snapshot; `Ok(None)` when there is none yet.
pub fn load_state(path: &Path) -> Result<Option<Snapshot>, ProxyError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ProxyError::State {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ProxyError::CorruptState {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Writes a snapshot atomically (temp file in the same directory, fsync, rename).
pub fn save_state(path: &Path, snapshot: &Snapshot) -> Result<(), ProxyError> {
    let io = |source| ProxyError::State {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec(snapshot).map_err(|e| io(std::io::Error::other(e)))?;
    write_atomically(path, &bytes, 0o644).map_err(io)
}

/// Whether an event changes what the routing table of `service` is built from, judged against
/// the snapshot `before` it. An instance's `load` (the proxies' session sums, rewritten every
/// second while users are on it) is not: the table routes by state, address and version only,
/// and rebuilding it (and fsyncing `routing.json`) for every report cost each proxy a table
/// and a disk write per second.
fn concerns(event: &WatchEvent, before: &Snapshot, service: &str) -> bool {
    match &event.change {
        Change::Snapshot(_) => true,
        Change::Instance(i) if i.service != service => false,
        Change::Instance(i) => event
            .change
            .is_routing(before.instances.iter().find(|old| old.id == i.id)),
        Change::Service(s) if s.name != service => false,
        change => change.is_routing(None),
    }
}

/// The background task following the locator.
#[derive(Debug)]
pub struct Watcher {
    services: Arc<Services>,
    client: Client,
    state_file: Option<PathBuf>,
    initial: Snapshot,
}

impl Watcher {
    /// `initial` is what was loaded from the state file (or empty); the watch resumes after
    /// its revision.
    pub fn new(
        services: Arc<Services>,
        client: Client,
        state_file: Option<PathBuf>,
        initial: Snapshot,
    ) -> Self {
        Watcher {
            services,
            client,
            state_file,
            initial,
        }
    }

    fn persist(&self, snapshot: &Snapshot) {
        if let Some(path) = &self.state_file {
            self.services.edge.state_saves.inc();
            if let Err(e) = save_state(path, snapshot) {
                tracing::warn!(error = %e, "could not persist the routing snapshot");
            }
        }
    }

    /// Follows the watch stream until shutdown.
    pub async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut snapshot = self.initial.clone();
        let mut backoff = MIN_BACKOFF;
        let mut reported_down = false;
        // The first watch of the process asks for the whole snapshot, not for what followed
        // the persisted one: that one was kept for the services this proxy carried then (a
        // proxy started without `--service`, or with another list, needs the others' too).
        // Later reconnects resume after the last revision seen.
        let mut whole_seen = false;
        loop {
            let since = (whole_seen && snapshot.revision > 0).then_some(snapshot.revision);
            // Only this proxy's services (every one, for a discovering proxy), and only what
            // routes: the others' events, session sums and heartbeat times are none of its
            // business (at a thousand proxies and ten thousand instances they were most of the
            // locator's work).
            let only = self.services.watch_filter();
            match self.client.watch_only(since, &only, true).await {
                Ok(stream) => {
                    let mut stream = Box::pin(stream);
                    loop {
                        let next = tokio::select! {
                            next = stream.next() => next,
                            _ = shutdown.changed() => return,
                        };
                        match next {
                            Some(Ok(event)) => {
                                if reported_down {
                                    tracing::info!("locator reachable again");
                                    reported_down = false;
                                }
                                backoff = MIN_BACKOFF;
                                whole_seen = true;
                                // The services whose routing the event changes (a service
                                // a discovering proxy does not carry yet is added by install).
                                let routers = self.services.routers();
                                let concerned: Vec<&str> = routers
                                    .iter()
                                    .filter(|r| concerns(&event, &snapshot, &r.service))
                                    .map(|r| r.service.as_str())
                                    .collect();
                                snapshot.apply(&event);
                                // For a discovering proxy: a snapshot, or an event of a
                                // service it does not carry yet but the snapshot now has
                                // (an instance may be heard of before its service).
                                let new_service = self.services.discovers()
                                    && event.change.service().is_none_or(|name| {
                                        !routers.iter().any(|r| r.service == name)
                                            && snapshot.service(name).is_some()
                                    });
                                if !concerned.is_empty() || new_service {
                                    self.services
                                        .install(&snapshot, |name| concerned.contains(&name));
                                    self.persist(&snapshot);
                                } else if let Change::Instance(i) = &event.change {
                                    if let Some(r) = routers.iter().find(|r| r.service == i.service)
                                    {
                                        r.metrics.load_only_events.inc();
                                    }
                                }
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "watch stream broke");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Err(e) => {
                    if !reported_down {
                        tracing::warn!(error = %e, "locator unreachable; serving on the last routing table");
                        reported_down = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing_table::tests::{instance, snapshot};
    use locator_wire::api::InstanceState;

    #[test]
    fn state_round_trips_and_missing_state_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert!(load_state(&path).unwrap().is_none());
        let s = snapshot(
            &[("1", 100)],
            vec![instance("a", "1", 1, InstanceState::Ready)],
        );
        save_state(&path, &s).unwrap();
        assert_eq!(load_state(&path).unwrap(), Some(s));
        // Nothing but the state file is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            load_state(&path),
            Err(ProxyError::CorruptState { .. })
        ));
    }

    #[test]
    fn only_events_about_our_service_rebuild_the_table() {
        let s = snapshot(&[("1", 100)], vec![]);
        let mut other = instance("x", "1", 1, InstanceState::Ready);
        other.service = "other".into();
        let ev = |change| WatchEvent {
            revision: 9,
            change,
        };
        assert!(concerns(&ev(Change::Snapshot(s.clone())), &s, "svc"));
        assert!(concerns(
            &ev(Change::Service(s.services[0].clone())),
            &s,
            "svc"
        ));
        assert!(!concerns(&ev(Change::Instance(other)), &s, "svc"));
        let a = instance("a", "1", 1, InstanceState::Ready);
        assert!(
            concerns(&ev(Change::Instance(a.clone())), &s, "svc"),
            "a new instance"
        );
        let with_a = snapshot(&[("1", 100)], vec![a.clone()]);
        let mut busier = a.clone();
        busier.load.live_sessions = 40;
        busier.load.in_flight = 3;
        assert!(
            !concerns(&ev(Change::Instance(busier)), &with_a, "svc"),
            "session sums are not a routing change"
        );
        let mut draining = a.clone();
        draining.state = InstanceState::Draining;
        assert!(concerns(&ev(Change::Instance(draining)), &with_a, "svc"));
        let mut moved = a;
        moved.address = "127.0.0.1:9".into();
        assert!(concerns(&ev(Change::Instance(moved)), &with_a, "svc"));
    }
}
