//! The state every part of the proxy shares: the current routing table (behind an
//! [`ArcSwap`], so the request path never takes a lock), the cookie keys, the session tracker
//! and the metrics. The watcher installs snapshots here; the service reads from here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use locator_wire::api::Snapshot;

use crate::edge::EdgeOptions;
use crate::metrics::Metrics;
use crate::routing_table::RoutingTable;
use crate::session::CookieKeys;
use crate::tracker::Tracker;

/// Tunables of the request path.
#[derive(Debug, Clone)]
pub struct Options {
    /// Largest request body buffered so that an idempotent request can be replayed on another
    /// instance. Pingora's own replay buffer holds at most 64 KiB, so larger values are capped.
    pub max_replay_body: usize,
    /// Attempts per request, the first one included (connect failures and resets).
    pub max_attempts: usize,
    /// TCP connect timeout to an instance.
    pub connect_timeout: Duration,
    /// Cap on tracked sessions (memory bound of the tracker).
    pub max_tracked_sessions: usize,
    /// Total time a client may take to send a request's head (request line and headers).
    pub header_timeout: Duration,
    /// Redirect to HTTPS, HSTS, forwarded headers.
    pub edge: EdgeOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_replay_body: 64 * 1024,
            max_attempts: 4,
            connect_timeout: Duration::from_secs(2),
            max_tracked_sessions: 1_000_000,
            header_timeout: Duration::from_secs(10),
            edge: EdgeOptions::default(),
        }
    }
}

/// Shared proxy state.
#[derive(Debug)]
pub struct Router {
    pub service: String,
    pub table: ArcSwap<RoutingTable>,
    pub keys: CookieKeys,
    pub tracker: Tracker,
    pub metrics: Metrics,
    pub options: Options,
    /// Set when a discovering proxy stops carrying the service (gone from the locator): its
    /// reporter then stops.
    retired: AtomicBool,
}

impl Router {
    pub fn new(service: &str, keys: CookieKeys, options: Options) -> Arc<Self> {
        Arc::new(Router {
            service: service.to_string(),
            table: ArcSwap::from_pointee(RoutingTable::empty(service)),
            keys,
            tracker: Tracker::new(options.max_tracked_sessions),
            metrics: Metrics::new(service),
            options,
            retired: AtomicBool::new(false),
        })
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Rebuilds the routing table from `snapshot` and swaps it in; requests in progress keep
    /// the table they started with.
    pub fn install(&self, snapshot: &Snapshot) {
        let table = RoutingTable::build(snapshot, &self.service, &self.tracker, &self.metrics);
        self.metrics.table_revision.set(table.revision as i64);
        self.metrics.table_installs.inc();
        tracing::info!(
            revision = table.revision,
            instances = table.routes().len(),
            ready = table.has_ready(),
            "routing table installed"
        );
        self.table.store(Arc::new(table));
    }
}
