//! The optimizer: Haddock's WAN-optimization data plane, the service Haddock releases. It
//! stores byte streams deduplicated (FastCDC chunks, BLAKE3-addressed, lz4-compressed, in
//! RocksDB) behind an HTTP API, syncs objects between sites by transferring only missing
//! chunks (on request, and on a local miss from its `peers` on other hosts), and lets several
//! instances (old and new version during a release) share one cache volume. Start reading at
//! `cli::serve`, then `server` (routes), `store` (the data and its invariants) and `volume`
//! (how instances share the cache; also docs/optimizer.md).

pub mod auth;
pub mod bench;
pub mod chunker;
pub mod cli;
pub mod encoder;
pub mod error;
pub mod format;
pub mod manifest;
pub mod metrics;
/// The peer optimizers pulls and read-through fetch from: `--peer` and locator discovery.
pub mod peers;
pub mod server;
pub mod store;
pub mod sync;
pub mod volume;

pub use error::{Error, Result};
