//! Prometheus metrics, all named `haddock_locator_…`, served at `/metrics`.
//!
//! Every Haddock component exports `haddock_<component>_http_requests_total` and
//! `haddock_<component>_http_request_duration_seconds`: the histogram carries the counter's
//! labels minus `status`, and the buckets of [`latency_histogram`] (docs/metrics.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `method` label of a request: one of a fixed set, never the method as sent.
///
/// HTTP lets a client invent any method token, and every distinct label value is a new time
/// series kept for the life of the process: 500 anonymous requests with made-up 4 KB methods
/// once grew `/metrics` from 54 KB to 43 MB. The methods the API routes use (and the few a
/// client may plausibly send) keep their name; everything else is `OTHER`.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// [`method_label`]: bounded cardinality.
    pub method: &'static str,
    /// The route template (`/v1/services/{name}`), never the raw path: bounded cardinality.
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// [`method_label`]: bounded cardinality.
    pub method: &'static str,
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

pub use locator_wire::metrics::latency_histogram;

/// Every metric the locator exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Latest committed revision seen by this process.
    pub revision: Gauge,
    /// Per service, the revision of its latest event that can change a routing table: what a
    /// proxy's `haddock_proxy_routing_revision` of that service catches up to (proxies hear
    /// only routing events, so the overall revision runs ahead of them).
    pub routing_revision: Family<ServiceLabels, Gauge>,
    /// Events published to watchers (committed here or received from another replica).
    pub events: Counter,
    /// Durable commits (one fsync or one database transaction, possibly several writes).
    pub commits: Counter,
    pub commit_seconds: Histogram,
    /// Open watch streams.
    pub watchers: Gauge,
    /// Open HTTP connections (at most `--max-connections`).
    pub connections: Gauge,
    /// Connections closed at accept because `--max-connections` were open.
    pub connections_shed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("haddock_locator");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let revision = Gauge::default();
        let routing_revision = Family::<ServiceLabels, Gauge>::default();
        let events = Counter::default();
        let commits = Counter::default();
        let commit_seconds = latency_histogram();
        let watchers = Gauge::default();
        let connections = Gauge::default();
        let connections_shed = Counter::default();
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (watch streams: time to the first byte)",
            request_seconds.clone(),
        );
        registry.register("revision", "Latest committed revision", revision.clone());
        registry.register(
            "routing_revision",
            "Revision of the latest event of the service that can change a routing table",
            routing_revision.clone(),
        );
        registry.register(
            "watch_events",
            "Events published to watchers",
            events.clone(),
        );
        registry.register("commits", "Durable commits", commits.clone());
        registry.register(
            "commit_duration_seconds",
            "Time to make one batch of writes durable",
            commit_seconds.clone(),
        );
        registry.register("watchers", "Open watch streams", watchers.clone());
        registry.register("connections", "Open HTTP connections", connections.clone());
        registry.register(
            "connections_shed",
            "Connections closed at accept because the connection cap was reached",
            connections_shed.clone(),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            revision,
            routing_revision,
            events,
            commits,
            commit_seconds,
            watchers,
            connections,
            connections_shed,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_a_fixed_label_set() {
        for (sent, label) in [
            ("GET", "GET"),
            ("HEAD", "HEAD"),
            ("PUT", "PUT"),
            ("POST", "POST"),
            ("PATCH", "PATCH"),
            ("DELETE", "DELETE"),
            ("OPTIONS", "OTHER"),
            ("get", "OTHER"),
            ("FROBNICATE", "OTHER"),
        ] {
            let method = http::Method::from_bytes(sent.as_bytes()).unwrap();
            assert_eq!(method_label(&method), label, "{sent}");
        }
    }

    #[test]
    fn names_are_prefixed() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                method: "GET",
                route: "/healthz",
                status: 200,
            })
            .inc();
        m.request_seconds
            .get_or_create(&RouteLabels {
                method: "GET",
                route: "/healthz",
            })
            .observe(0.001);
        let text = m.render();
        for needle in [
            "haddock_locator_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 1",
            "haddock_locator_http_request_duration_seconds_bucket{le=\"6.5536\",method=\"GET\",route=\"/healthz\"} 1",
            "haddock_locator_revision",
        ] {
            assert!(text.contains(needle), "{needle} not in\n{text}");
        }
    }
}
