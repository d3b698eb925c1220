//! Prometheus metrics (`/metrics` on the admin port, names `haddock_proxy_…`, every one
//! labelled with the proxy's `service`) and the per-version traffic figures the reporter sends
//! to the locator for canary analysis.
//!
//! The request counter and latency histogram follow the convention of every Haddock component
//! (docs/metrics.md): `haddock_proxy_http_requests_total{version,instance_id,status}` and
//! `haddock_proxy_http_request_duration_seconds{version,instance_id}`. There is no `route`
//! label: the proxy forwards any path of its service, so the upstream instance takes its place.
//! The label is `instance_id`, not `instance`, because Prometheus reserves `instance` for the
//! scrape target (it would rename ours to `exported_instance`).
//!
//! The request path never looks a metric up by label: each route of the routing table holds
//! [`RouteMetrics`] handles resolved when the table is built (a status's counter on its first
//! use), so recording is a few atomic adds.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use locator_wire::api::VersionTraffic;
use locator_wire::metrics::latency_histogram;

use crate::certificates::TlsCounters;
use crate::request_head::HeadCounters;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    version: String,
    instance_id: String,
    /// The status sent to the user; `0` when none was (the user went away first).
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    version: String,
    instance_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

type HistogramFamily = Family<UpstreamLabels, Histogram, fn() -> Histogram>;

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
    pub untracked_sessions: Counter,
    pub table_revision: Gauge,
    /// Routing tables built and installed (a routing change: weights, instance state/address).
    pub table_installs: Counter,
    /// Events about this service that changed only session sums: no rebuild, no write (each
    /// was a table and an fsync before).
    pub load_only_events: Counter,
    windows: RwLock<HashMap<String, Arc<VersionWindow>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics of a proxy carrying `service`.
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "haddock_proxy",
            [(Cow::Borrowed("service"), Cow::Owned(service.to_string()))].into_iter(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let live_sessions = Family::<InstanceLabels, Gauge>::default();
        let in_flight = Family::<InstanceLabels, Gauge>::default();
        let rejected_tokens = Family::<ReasonLabels, Counter>::default();
        let retries = Counter::default();
        let sessions_created = Counter::default();
        let sessions_moved = Counter::default();
        let no_instance = Counter::default();
        let untracked_sessions = Counter::default();
        let table_revision = Gauge::default();
        let table_installs = Counter::default();
        let load_only_events = Counter::default();
        registry.register(
            "routing_load_only_events",
            "Watch events about this service that changed only session sums (no rebuild)",
            load_only_events.clone(),
        );
        registry.register(
            "routing_table_installs",
            "Routing tables built and installed after a routing change",
            table_installs.clone(),
        );
        registry.register(
            "http_requests",
            "Requests answered, by version, instance and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to the end of the response, by version and instance",
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
            "Session tokens ignored (malformed, bad signature, expired, from the future)",
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
            "untracked_sessions",
            "Requests of new sessions not counted because the tracker was full of live sessions",
            untracked_sessions.clone(),
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
            untracked_sessions,
            table_revision,
            table_installs,
            load_only_events,
            windows: RwLock::new(HashMap::new()),
        }
    }

    /// Resolves the handles one route records into (called when a routing table is built).
    pub fn route(&self, version: &str, instance_id: &str) -> RouteMetrics {
        let upstream = UpstreamLabels {
            version: version.to_string(),
            instance_id: instance_id.to_string(),
        };
        RouteMetrics {
            latency: self.latency.get_or_create(&upstream).clone(),
            requests: Arc::new(StatusCounters {
                family: self.requests.clone(),
                upstream,
                by_status: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
            }),
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
    pub fn set_instance_load(&self, instance_id: &str, live: u64, in_flight: u64) {
        let l = InstanceLabels {
            instance_id: instance_id.to_string(),
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

/// The process's own counters, which belong to no carried service: connections (request
/// heads), TLS handshakes and certificates, requests for no service. Exported without a
/// `service` label (they were once counted under the first service's).
pub struct EdgeMetrics {
    registry: Registry,
    /// Requests whose host and path no carried service takes, with no default service (404).
    pub unknown_host: Counter,
    /// `routing.json` writes (each one fsynced; one file for every carried service).
    pub state_saves: Counter,
    pub request_heads: HeadCounters,
    pub tls: TlsCounters,
}

impl std::fmt::Debug for EdgeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeMetrics").finish_non_exhaustive()
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("haddock_proxy");
        let unknown_host = Counter::default();
        registry.register(
            "unknown_host_requests",
            "Requests answered 404 because no carried service's routes take their host and path",
            unknown_host.clone(),
        );
        let state_saves = Counter::default();
        registry.register(
            "routing_state_saves",
            "Writes of the persisted routing snapshot (each fsynced)",
            state_saves.clone(),
        );
        let request_heads = HeadCounters::default();
        registry.register(
            "request_header_timeouts",
            "Connections answered 408 because the request head did not arrive within --header-timeout-ms",
            request_heads.timed_out.clone(),
        );
        registry.register(
            "request_headers_too_large",
            "Connections answered 431 because the request head was larger than 64 KiB",
            request_heads.too_large.clone(),
        );
        // The resolver counts in handles of the family's two series (a counter clone shares
        // its value), so a handshake never looks a label up.
        let handshakes_refused = Family::<ReasonLabels, Counter>::default();
        let reason = |r: &str| {
            handshakes_refused
                .get_or_create(&ReasonLabels { reason: r.into() })
                .clone()
        };
        let tls = TlsCounters {
            no_sni: reason("no_sni"),
            unknown_host: reason("unknown_host"),
            ..TlsCounters::default()
        };
        registry.register(
            "tls_handshakes_refused",
            "TLS handshakes refused: the hello named no host and no default is set (no_sni), or a host no certificate covers (unknown_host)",
            handshakes_refused,
        );
        registry.register(
            "tls_certificates",
            "Certificate pairs being served",
            tls.loaded.clone(),
        );
        registry.register(
            "tls_acme_orders_failed",
            "ACME orders that failed (CA unreachable, challenge refused, …); retried with a doubling pause",
            tls.acme_failures.clone(),
        );
        registry.register(
            "tls_acme_certificates_issued",
            "Certificates obtained over ACME (first issue and renewals)",
            tls.acme_issued.clone(),
        );
        registry.register(
            "tls_certificates_refused",
            "Certificate pairs refused when read (expired, not yet valid, key mismatch, unreadable)",
            tls.refused.clone(),
        );
        EdgeMetrics {
            registry,
            unknown_host,
            state_saves,
            request_heads,
            tls,
        }
    }
}

impl EdgeMetrics {
    /// The Prometheus text exposition of these counters alone.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One OpenMetrics text made of several registries' (one per carried service): each family's
/// `# HELP`/`# TYPE`/`# UNIT` lines once, then its samples from every part, and one `# EOF`.
/// prometheus-client encodes a registry as a whole document; two of them concatenated would
/// repeat families and end twice, which a scraper refuses.
pub fn merge_openmetrics(parts: &[String]) -> String {
    // Family name -> (descriptor lines, samples), in first-seen order.
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, (Vec<String>, Vec<String>)> = HashMap::new();
    for part in parts {
        let mut current = String::new();
        for line in part.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (_kind, name) = (words.next(), words.next().unwrap_or(""));
                current = name.to_string();
                let family = families.entry(current.clone()).or_insert_with(|| {
                    order.push(current.clone());
                    (Vec::new(), Vec::new())
                });
                if !family.0.iter().any(|l| l == line) {
                    family.0.push(line.to_string());
                }
                continue;
            }
            if let Some(family) = families.get_mut(&current) {
                family.1.push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let (descriptors, samples) = &families[&name];
        for line in descriptors.iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

/// Status codes are three digits (and `0` for no response): one counter slot for each.
const STATUS_SLOTS: usize = 1000;

/// One route's request counters, one per status, each taken from the family on first use.
struct StatusCounters {
    family: Family<RequestLabels, Counter>,
    upstream: UpstreamLabels,
    by_status: Box<[OnceLock<Counter>]>,
}

impl StatusCounters {
    fn inc(&self, status: u16) {
        let slot = usize::from(status).min(STATUS_SLOTS - 1);
        self.by_status[slot]
            .get_or_init(|| {
                self.family
                    .get_or_create(&RequestLabels {
                        version: self.upstream.version.clone(),
                        instance_id: self.upstream.instance_id.clone(),
                        status: slot as u16,
                    })
                    .clone()
            })
            .inc();
    }
}

/// Handles one route records into.
#[derive(Clone)]
pub struct RouteMetrics {
    requests: Arc<StatusCounters>,
    latency: Histogram,
    window: Arc<VersionWindow>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("upstream", &self.requests.upstream)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    /// Records one request: `sent` is the status the user got (`0`: none), `service` the
    /// outcome the instance owns (its status, or 502 when it failed the request), `None` when
    /// the client or the proxy itself ended the request. Only owned outcomes feed the version's
    /// figures the canary analysis reads: an anonymous client must not be able to fail a canary
    /// by hanging up or sending garbage.
    pub fn record(&self, sent: u16, service: Option<u16>, elapsed: Duration) {
        self.requests.inc(sent);
        self.latency.observe(elapsed.as_secs_f64());
        if let Some(status) = service {
            self.window.record(status >= 500, elapsed);
        }
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
    fn several_services_metrics_are_one_document() {
        let a = Metrics::new("a");
        let b = Metrics::new("b");
        a.retries.inc();
        b.retries.inc();
        b.retries.inc();
        let merged = merge_openmetrics(&[a.encode(), b.encode()]);
        assert_eq!(merged.matches("# EOF").count(), 1);
        assert!(merged.ends_with("# EOF\n"));
        assert_eq!(
            merged
                .matches("# TYPE haddock_proxy_retries counter")
                .count(),
            1
        );
        let type_at = merged.find("# TYPE haddock_proxy_retries counter").unwrap();
        let a_at = merged
            .find("haddock_proxy_retries_total{service=\"a\"} 1")
            .unwrap();
        let b_at = merged
            .find("haddock_proxy_retries_total{service=\"b\"} 2")
            .unwrap();
        assert!(type_at < a_at && a_at < b_at, "{merged}");
        // Every family of one registry is there once.
        assert_eq!(
            merged.matches("# TYPE ").count(),
            a.encode().matches("# TYPE ").count()
        );
    }

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
        let m = Metrics::new("svc");
        let route = m.route("1.0", "a");
        route.record(503, Some(503), Duration::from_millis(3));
        route.record(503, Some(503), Duration::from_millis(3));
        route.record(200, Some(200), Duration::from_millis(1));
        // A client that hung up: counted by status 0, not in the version's figures.
        route.record(0, None, Duration::from_millis(1));
        m.retries.inc();
        let text = m.encode();
        for needle in [
            "haddock_proxy_http_requests_total{service=\"svc\",version=\"1.0\",instance_id=\"a\",status=\"503\"} 2",
            "haddock_proxy_http_requests_total{service=\"svc\",version=\"1.0\",instance_id=\"a\",status=\"200\"} 1",
            "haddock_proxy_http_request_duration_seconds_bucket{service=\"svc\",le=\"6.5536\",version=\"1.0\",instance_id=\"a\"} 4",
            "haddock_proxy_retries_total{service=\"svc\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} not in\n{text}");
        }
        assert!(text.contains(
            "haddock_proxy_http_requests_total{service=\"svc\",version=\"1.0\",instance_id=\"a\",status=\"0\"} 1"
        ));
        let t = &m.version_traffic()["1.0"];
        assert_eq!((t.requests, t.responses_5xx), (3, 2));
    }
}
