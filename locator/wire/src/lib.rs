//! The locator's wire contract, in a crate of its own so that the programs that talk to the
//! locator (haddock, the proxy, the tests) link only this: the API types ([`api`]), the typed
//! HTTP client ([`client`]), the `--log-format` every Haddock program shares ([`logging`]) and
//! the common latency buckets ([`metrics`]) — not the server, PostgreSQL or the dashboard.
//! With the `test-util` feature, [`testing::eventually`] is the poller every crate's tests use.
pub mod api;
pub mod client;
pub mod logging;
pub mod metrics;
#[cfg(feature = "test-util")]
pub mod testing;
