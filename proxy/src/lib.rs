//! Haddock's reverse proxy: users reach a service only through it. Built on pingora, it pins
//! each user session to one instance with a sealed (encrypted and authenticated) cookie, sends
//! new sessions to versions by the canary weights, lets draining instances finish their
//! sessions, retries failed connections on healthy instances, and reports live sessions to the
//! locator.
//!
//! A proxy carries one service or several ([`services`]: one [`router`] each, chosen per
//! request by host and path). Start reading at [`service`] (the request path, a pingora
//! `ProxyHttp`), which uses
//! [`routing_table`] (built from the locator's snapshot and swapped atomically in [`router`]),
//! [`session`] (the sealed token, with [`opened_tokens`] remembering those a thread opened)
//! and [`balancer`] (the weighted choice). [`watcher`] feeds the
//! router from the locator's watch stream and persists it; [`tracker`] and [`reporter`] count
//! and report sessions; [`metrics`] and [`admin`] expose figures; [`server`] wires it together,
//! with [`request_head`] (the total deadline on a request's head) in front of pingora and
//! [`run_dir`] (the private directory of the upgrade socket). At the edge, [`certificates`]
//! picks the HTTPS listener's certificate by SNI, [`acme`] obtains and renews certificates,
//! and [`edge`] handles the scheme (redirect,
//! HSTS, forwarded headers).

pub mod acme;
pub mod admin;
pub mod balancer;
pub mod certificates;
pub mod config;
pub mod edge;
pub mod error;
pub mod files;
pub mod first_bytes;
pub mod metrics;
pub mod opened_tokens;
pub mod reporter;
pub mod request_head;
pub mod router;
pub mod routing_table;
pub mod run_dir;
pub mod server;
pub mod service;
pub mod services;
pub mod session;
pub mod tracker;
pub mod watcher;

pub use error::ProxyError;
