//! The service locator: the single source of truth that haddock writes and proxies read.
//!
//! It holds services (with their canary weights), instances (with their lifecycle and the
//! proxies' live session counts) and releases (a durable record per release, at most one active
//! per service), and pushes every change to watchers instead of waiting to be polled.
//!
//! Start with [`api`] (the wire types every component shares) and [`client`] (the typed HTTP
//! client haddock and the proxy use): both live in the small `locator-wire` crate, which is
//! all haddock and the proxy link, and are re-exported here. Inside the server: [`state`] holds every rule, [`store`]
//! makes the rules' events durable (embedded log or PostgreSQL), [`server`] is the HTTP layer
//! with [`auth`] and [`connections`] (timeouts, the connection cap), and [`watch`] streams
//! changes. `serve` is what `locator serve` runs; [`logging`] is the `--log-format` every
//! Haddock program shares.
pub mod auth;
pub mod bench;
pub mod connections;
pub mod dashboard;
pub mod error;
pub mod metrics;
pub mod reports;
pub mod scale;
pub mod serve;
pub mod server;
pub mod state;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod watch;

pub use locator_wire::{api, client, logging};
