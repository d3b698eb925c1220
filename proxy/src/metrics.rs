//! Prometheus metrics (`/metrics` on the admin port, names `haddock_proxy_…`) and the
//! per-version traffic figures the reporter sends to the locator for canary analysis.
//!
//! The request path never looks a metric up by label: each route of the routing table holds
//! [`RouteMetrics`] handles resolved when the table is built, so recording is a few atomic adds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use locator::api::VersionTraffic;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    version: String,
    instance: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

type HistogramFamily = Family<VersionLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs … ~3.3 s in doublings: fine enough for p99 dashboards, cheap to record.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    live_sessions: Family<InstanceLabels, Gauge>,
    in_flight: Family<InstanceLabels, Gauge>,
    rejected_tokens: Family<ReasonLabels, Counter>,
    pub retries: Counter,
    pub sessions_created: Counter,
    pub sessions_moved: Counter,
    pub no_instance: Counter,
    pub table_revision: Gauge,
    windows: RwLock<HashMap<String, Arc<VersionWindow>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("haddock_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let live_sessions = Family::<InstanceLabels, Gauge>::default();
        let in_flight = Family::<InstanceLabels, Gauge>::default();
        let rejected_tokens = Family::<ReasonLabels, Counter>::default();
        let retries = Counter::default();
        let sessions_created = Counter::default();
        let sessions_moved = Counter::default();
        let no_instance = Counter::default();
        let table_revision = Gauge::default();
        registry.register(
            "requests",
            "Requests by version, instance and status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response, by version",
            latency.clone(),
        );
        registry.register(
            "live_sessions",
            "Sessions seen within the idle TTL, by instance",
            live_sessions.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being proxied, by instance",
            in_flight.clone(),
        );
        registry.register(
            "rejected_tokens",
            "Session tokens ignored (malformed, bad signature, expired)",
            rejected_tokens.clone(),
        );
        registry.register(
            "retries",
            "Requests sent again to another instance",
            retries.clone(),
        );
        registry.register("sessions_created", "New sessions", sessions_created.clone());
        registry.register(
            "sessions_moved",
            "Sessions moved off a gone or unhealthy instance",
            sessions_moved.clone(),
        );
        registry.register(
            "no_instance",
            "Requests answered 503 because no instance was ready",
            no_instance.clone(),
        );
        registry.register(
            "routing_revision",
            "Locator revision of the routing table in use",
            table_revision.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            live_sessions,
            in_flight,
            rejected_tokens,
            retries,
            sessions_created,
            sessions_moved,
            no_instance,
            table_revision,
            windows: RwLock::new(HashMap::new()),
        }
    }

    /// Resolves the handles one route records into (called when a routing table is built).
    pub fn route(&self, version: &str, instance: &str) -> RouteMetrics {
        let class = |c: &str| {
            self.requests
                .get_or_create(&RequestLabels {
                    version: version.to_string(),
                    instance: instance.to_string(),
                    class: c.to_string(),
                })
                .clone()
        };
        RouteMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            latency: self
                .latency
                .get_or_create(&VersionLabels {
                    version: version.to_string(),
                })
                .clone(),
            window: self.window(version),
        }
    }

    fn window(&self, version: &str) -> Arc<VersionWindow> {
        if let Some(w) = self
            .windows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(version)
        {
            return w.clone();
        }
        self.windows
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(version.to_string())
            .or_default()
            .clone()
    }

    pub fn token_rejected(&self, reason: &str) {
        self.rejected_tokens
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Publishes the tracker's per-instance figures as gauges.
    pub fn set_instance_load(&self, instance: &str, live: u64, in_flight: u64) {
        let l = InstanceLabels {
            instance: instance.to_string(),
        };
        self.live_sessions.get_or_create(&l).set(live as i64);
        self.in_flight.get_or_create(&l).set(in_flight as i64);
    }

    /// Per-version cumulative counts and recent p99, for the session report.
    pub fn version_traffic(&self) -> std::collections::BTreeMap<String, VersionTraffic> {
        self.windows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(v, w)| (v.clone(), w.traffic()))
            .collect()
    }

    /// Starts a new latency window for every version (the reporter calls this every few
    /// seconds, so that p99 reflects the last two windows rather than all time).
    pub fn rotate_windows(&self) {
        for w in self
            .windows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            w.rotate();
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Handles one route records into.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    by_class: [Counter; 5],
    latency: Histogram,
    window: Arc<VersionWindow>,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.latency.observe(elapsed.as_secs_f64());
        self.window.record(status >= 500, elapsed);
    }
}

/// Log-spaced latency buckets: four per octave of microseconds, up to 2^24 µs (16 s).
const BUCKETS: usize = 96;

fn bucket_of(elapsed: Duration) -> usize {
    let us = elapsed.as_micros().max(1) as f64;
    ((us.log2() * 4.0) as usize).min(BUCKETS - 1)
}

fn bucket_upper_ms(i: usize) -> f64 {
    2f64.powf((i + 1) as f64 / 4.0) / 1000.0
}

/// Traffic of one version: cumulative counts plus two rotating latency windows for p99.
#[derive(Debug)]
pub struct VersionWindow {
    requests: AtomicU64,
    responses_5xx: AtomicU64,
    current: AtomicUsize,
    buckets: [[AtomicU64; BUCKETS]; 2],
}

impl Default for VersionWindow {
    fn default() -> Self {
        VersionWindow {
            requests: AtomicU64::new(0),
            responses_5xx: AtomicU64::new(0),
            current: AtomicUsize::new(0),
            buckets: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl VersionWindow {
    pub fn record(&self, is_5xx: bool, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if is_5xx {
            self.responses_5xx.fetch_add(1, Ordering::Relaxed);
        }
        let w = self.current.load(Ordering::Relaxed) & 1;
        self.buckets[w][bucket_of(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    fn rotate(&self) {
        let next = (self.current.load(Ordering::Relaxed) + 1) & 1;
        for b in &self.buckets[next] {
            b.store(0, Ordering::Relaxed);
        }
        self.current.store(next, Ordering::Relaxed);
    }

    /// p99 over both windows, as the upper bound of the bucket it falls in (0 without data).
    pub fn p99_ms(&self) -> f64 {
        let counts: Vec<u64> = (0..BUCKETS)
            .map(|i| {
                self.buckets[0][i].load(Ordering::Relaxed)
                    + self.buckets[1][i].load(Ordering::Relaxed)
            })
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (total * 99).div_ceil(100);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper_ms(i);
            }
        }
        bucket_upper_ms(BUCKETS - 1)
    }

    pub fn traffic(&self) -> VersionTraffic {
        VersionTraffic {
            requests: self.requests.load(Ordering::Relaxed),
            responses_5xx: self.responses_5xx.load(Ordering::Relaxed),
            p99_ms: self.p99_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_tracks_the_slow_tail_within_a_bucket() {
        let w = VersionWindow::default();
        for _ in 0..980 {
            w.record(false, Duration::from_micros(500));
        }
        for _ in 0..20 {
            w.record(true, Duration::from_millis(40));
        }
        let p99 = w.p99_ms();
        assert!((40.0..=40.0 * 1.2).contains(&p99), "p99 {p99}");
        let t = w.traffic();
        assert_eq!((t.requests, t.responses_5xx), (1000, 20));
        // Two rotations forget the old latencies but keep the cumulative counts.
        w.rotate();
        w.rotate();
        assert_eq!(w.p99_ms(), 0.0);
        assert_eq!(w.traffic().requests, 1000);
    }

    #[test]
    fn exposition_uses_the_haddock_proxy_prefix() {
        let m = Metrics::new();
        m.route("1.0", "a").record(503, Duration::from_millis(3));
        m.retries.inc();
        let text = m.encode();
        assert!(
            text.contains(
                "haddock_proxy_requests_total{version=\"1.0\",instance=\"a\",class=\"5xx\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("haddock_proxy_retries_total 1"));
        assert!(text.contains("haddock_proxy_request_duration_seconds_bucket"));
        assert_eq!(m.version_traffic()["1.0"].responses_5xx, 1);
    }
}
