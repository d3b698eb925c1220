//! Sends this proxy's live sessions, in-flight requests and per-version traffic to the locator
//! (`POST /v1/sessions`) every second and soon after a change, so that haddock can tell when a
//! draining instance is empty and judge a canary. It also expires idle sessions.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use locator_wire::api::{InstanceLoad, SessionReport};
use locator_wire::client::Client;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::router::Router;
use crate::services::Services;
use crate::session::now_ms;

const PERIOD: Duration = Duration::from_secs(1);
/// Changes arriving in a burst are folded into one report.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Latency windows rotate this often, so the reported p99 covers the last 5–10 s.
const WINDOW: Duration = Duration::from_secs(5);
/// Between whole reports, only changes are sent ([`SessionReport::changes_since`]): before a
/// thousand instances a whole report is a thousand entries a second per proxy, which at a
/// thousand proxies was most of the locator's work. A whole one still goes this often, so that
/// the locator forgets instances this proxy no longer knows of.
const WHOLE_EVERY: Duration = Duration::from_secs(60);

/// The background reporting task.
#[derive(Debug)]
pub struct Reporter {
    router: Arc<Router>,
    client: Client,
    proxy_id: String,
}

impl Reporter {
    pub fn new(router: Arc<Router>, client: Client, proxy_id: String) -> Self {
        Reporter {
            router,
            client,
            proxy_id,
        }
    }

    /// Expires idle sessions and builds the report (also publishing the per-instance gauges).
    pub fn report(&self) -> SessionReport {
        let router = &self.router;
        let table = router.table.load();
        router.tracker.sweep(now_ms(), table.settings.idle_ttl_ms);
        let live = router.tracker.live_by_instance();
        let mut instances = BTreeMap::new();
        // Every instance of the table is listed, zeros included: a zero is what says "drained".
        for r in table.routes() {
            let load = InstanceLoad {
                live_sessions: live.get(&r.id).copied().unwrap_or(0),
                in_flight: r.in_flight.load(Ordering::Relaxed),
            };
            router
                .metrics
                .set_instance_load(&r.id, load.live_sessions, load.in_flight);
            instances.insert(r.id.to_string(), load);
        }
        SessionReport {
            proxy_id: self.proxy_id.clone(),
            service: router.service.clone(),
            instances,
            versions: router.metrics.version_traffic(),
            seq: 0,
            base: None,
        }
    }

    pub async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut last_rotation = Instant::now();
        let mut last_sent: Option<SessionReport> = None;
        let mut last_sent_at = Instant::now();
        let mut last_whole_at: Option<Instant> = None;
        let mut failing = false;
        loop {
            if self.router.is_retired() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(PERIOD) => {}
                _ = self.router.tracker.changed.notified() => {
                    tokio::time::sleep(DEBOUNCE).await;
                }
                _ = shutdown.changed() => return,
            }
            if last_rotation.elapsed() >= WINDOW {
                self.router.metrics.rotate_windows();
                last_rotation = Instant::now();
            }
            let mut report = self.report();
            // Unchanged figures are still re-sent every period: the locator ages out proxies
            // that go quiet.
            let unchanged = last_sent.as_ref().is_some_and(|l| {
                (&l.instances, &l.versions) == (&report.instances, &report.versions)
            });
            if unchanged && last_sent_at.elapsed() < PERIOD {
                continue;
            }
            // Numbered, so that a locator whose copy is another report than the one these
            // changes are based on refuses them (see `SessionReport::base`).
            report.seq = last_sent.as_ref().map_or(1, |l| l.seq + 1);
            let whole_due = last_whole_at.is_none_or(|at| at.elapsed() >= WHOLE_EVERY);
            let previous = last_sent.as_ref().filter(|_| !whole_due);
            match self.client.report_session_changes(&report, previous).await {
                Ok(whole) => {
                    if failing {
                        tracing::info!("session reports accepted again");
                        failing = false;
                    }
                    last_sent = Some(report);
                    last_sent_at = Instant::now();
                    if whole {
                        last_whole_at = Some(last_sent_at);
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "could not report sessions to the locator");
                        failing = true;
                    }
                }
            }
        }
    }
}

/// The reporters of every carried service, as tasks of one background service: pingora gives
/// each background service a runtime and a thread of its own, which for 300 services was
/// 1.5 MiB of memory a service. A service a discovering proxy starts carrying gets its reporter
/// when it is added; a retired service's reporter ends by itself.
#[derive(Debug)]
pub struct Reporters {
    services: Arc<Services>,
    client: Client,
    proxy_id: String,
}

impl Reporters {
    pub fn new(services: Arc<Services>, client: Client, proxy_id: String) -> Self {
        Reporters {
            services,
            client,
            proxy_id,
        }
    }
}

#[async_trait]
impl BackgroundService for Reporters {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        // Routers, not names: a service retired and then carried again has a new router.
        let mut started: Vec<Arc<Router>> = Vec::new();
        loop {
            started.retain(|r| !r.is_retired());
            while tasks.try_join_next().is_some() {}
            for router in self.services.routers() {
                if started.iter().any(|r| Arc::ptr_eq(r, &router)) {
                    continue;
                }
                started.push(router.clone());
                let reporter = Reporter::new(router, self.client.clone(), self.proxy_id.clone());
                let shutdown = shutdown.clone();
                tasks.spawn(async move { reporter.run(shutdown).await });
            }
            tokio::select! {
                _ = self.services.added() => {}
                _ = shutdown.changed() => break,
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Options;
    use crate::routing_table::tests::{instance, snapshot};
    use crate::session::CookieKeys;
    use locator_wire::api::InstanceState;

    #[test]
    fn reports_every_instance_with_its_sessions_and_in_flight() {
        let router = Router::new("svc", CookieKeys::random(), Options::default());
        router.install(&snapshot(
            &[("1", 100)],
            vec![
                instance("a", "1", 1, InstanceState::Ready),
                instance("b", "1", 2, InstanceState::Draining),
            ],
        ));
        let a: Arc<str> = "a".into();
        router.tracker.touch(1, &a, now_ms(), 60_000);
        router.tracker.touch(2, &a, now_ms(), 60_000);
        let _busy = crate::tracker::InFlight::enter(&router.tracker.in_flight_counter("b"));
        let r =
            Reporter::new(router, Client::new("http://127.0.0.1:9", None), "p1".into()).report();
        assert_eq!(r.service, "svc");
        assert_eq!(
            r.instances["a"],
            InstanceLoad {
                live_sessions: 2,
                in_flight: 0
            }
        );
        assert_eq!(
            r.instances["b"],
            InstanceLoad {
                live_sessions: 0,
                in_flight: 1
            }
        );
    }
}
