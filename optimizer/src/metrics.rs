//! Prometheus metrics of one instance, all named `haddock_optimizer_…`, served at `/metrics`.
//!
//! The request counter and latency histogram follow the convention of every Haddock
//! component (docs/metrics.md): `…_http_requests_total{method,route,status}` and
//! `…_http_request_duration_seconds{method,route}`, `route` a path template.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::StoreStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: &'static str,
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The `outcome` of a read-through (a local miss of `GET`/`HEAD` asked of the peers): one of
/// these, a fixed set like `method`.
pub mod read_through {
    /// A peer had the object; it is now stored here too.
    pub const HIT: &str = "hit";
    /// Every peer asked answered that it does not have it.
    pub const MISS: &str = "miss";
    /// No peer asked had it, and at least one of them failed (unreachable, bad answer).
    pub const FAILED: &str = "failed";
}

/// The `method` label of a request: one of a fixed set, so that a client inventing methods
/// (HTTP allows any token) cannot grow `/metrics` and the process's memory without bound.
/// The same set as `locator::metrics::method_label`, not shared for the reason the buckets
/// below are not: the optimizer depends on no Haddock crate.
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

fn latency_histogram() -> Histogram {
    // The buckets of every Haddock component (`locator::metrics::latency_histogram`, not
    // shared because the optimizer depends on no Haddock crate): 0.1 ms … ~6.6 s in doublings.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// All metrics of the instance.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// Logical object bytes ingested (PUT and pull).
    pub ingested_bytes: Counter,
    /// Chunk bytes actually added to the store for them.
    pub stored_bytes: Counter,
    pub dedup_ratio: Gauge<f64, AtomicU64>,
    pub chunk_store_bytes: Gauge,
    pub chunk_count: Gauge,
    pub corrupt_chunks: Counter,
    pub writer: Gauge,
    pub pull_transferred_bytes: Counter,
    /// Local misses of object reads asked of the peers, by outcome ([`read_through`]).
    pub read_through: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("haddock_optimizer");
        let m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            ingested_bytes: Counter::default(),
            stored_bytes: Counter::default(),
            dedup_ratio: Gauge::default(),
            chunk_store_bytes: Gauge::default(),
            chunk_count: Gauge::default(),
            corrupt_chunks: Counter::default(),
            writer: Gauge::default(),
            pull_transferred_bytes: Counter::default(),
            read_through: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer (headers)",
            m.latency.clone(),
        );
        registry.register(
            "http_request_bytes",
            "Request body bytes received",
            m.bytes_in.clone(),
        );
        registry.register(
            "http_response_bytes",
            "Object and chunk bytes sent",
            m.bytes_out.clone(),
        );
        registry.register(
            "ingested_bytes",
            "Logical object bytes ingested",
            m.ingested_bytes.clone(),
        );
        registry.register(
            "stored_bytes",
            "Chunk bytes added to the store by ingests",
            m.stored_bytes.clone(),
        );
        registry.register(
            "dedup_ratio",
            "Ingested bytes per stored byte since start (dedup and compression)",
            m.dedup_ratio.clone(),
        );
        registry.register(
            "chunk_store_bytes",
            "Size of the chunk store",
            m.chunk_store_bytes.clone(),
        );
        registry.register(
            "chunks",
            "Estimated number of stored chunks",
            m.chunk_count.clone(),
        );
        registry.register(
            "corrupt_chunks",
            "Chunks that failed verification on read",
            m.corrupt_chunks.clone(),
        );
        registry.register(
            "writer",
            "1 when this instance is the cache volume's writer",
            m.writer.clone(),
        );
        registry.register(
            "pull_transferred_bytes",
            "Chunk bytes fetched from peers by pulls (read-through included)",
            m.pull_transferred_bytes.clone(),
        );
        registry.register(
            "read_through",
            "Local misses of object reads asked of the peers, by outcome",
            m.read_through.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Accounts one ingest.
    pub fn ingested(&self, logical: u64, stored: u64) {
        self.ingested_bytes.inc_by(logical);
        self.stored_bytes.inc_by(stored);
        let stored = self.stored_bytes.get().max(1) as f64;
        self.dedup_ratio
            .set(self.ingested_bytes.get() as f64 / stored);
    }

    /// The text exposition, with the store gauges sampled now.
    pub fn encode(&self, stats: Option<StoreStats>, writer: bool) -> String {
        if let Some(s) = stats {
            self.chunk_store_bytes.set(s.chunk_bytes as i64);
            self.chunk_count.set(s.chunk_count_estimate as i64);
        }
        self.writer.set(i64::from(writer));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_a_fixed_label_set() {
        assert_eq!(method_label(&http::Method::PUT), "PUT");
        assert_eq!(method_label(&http::Method::OPTIONS), "OTHER");
        let invented = http::Method::from_bytes(b"INVENTED").unwrap();
        assert_eq!(method_label(&invented), "OTHER");
    }

    #[test]
    fn exposition_lists_the_metrics() {
        let m = Metrics::new();
        m.ingested(1000, 100);
        m.requests
            .get_or_create(&RequestLabels {
                method: "GET",
                route: "/v1/objects/{key}",
                status: 200,
            })
            .inc();
        m.read_through
            .get_or_create(&OutcomeLabels {
                outcome: read_through::HIT,
            })
            .inc();
        let text = m.encode(
            Some(StoreStats {
                chunk_bytes: 42,
                ..Default::default()
            }),
            true,
        );
        for needle in [
            "haddock_optimizer_http_requests_total{method=\"GET\",route=\"/v1/objects/{key}\",status=\"200\"} 1",
            "haddock_optimizer_dedup_ratio 10",
            "haddock_optimizer_chunk_store_bytes 42",
            "haddock_optimizer_writer 1",
            "haddock_optimizer_read_through_total{outcome=\"hit\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} not in\n{text}");
        }
    }
}
