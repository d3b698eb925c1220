//! What every Haddock component's metrics share: the latency buckets, so that histograms of
//! the locator, the proxy and the deployer line up in one panel.

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// The latency buckets of every Haddock component: 0.1 ms … ~6.6 s in doublings.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}
