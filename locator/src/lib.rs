//! The service locator: the single source of truth that haddock writes and proxies read.
//!
//! Start with [`api`] (the wire types every component shares), then [`client`] (the typed
//! HTTP client haddock and the proxy use).
pub mod api;
pub mod client;
