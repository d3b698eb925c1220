//! Haddock, the deployer: `haddock release <service> <tag>` takes a service from one image tag
//! to the next without dropping a user.
//!
//! Start reading at [`spec`] (what a release is told to do, and every rule a spec must meet),
//! then [`release`] (the state machine recorded in the locator): `release/mod.rs` (the
//! [`release::Deployer`]: checks before a release begins, which release to drive), `run.rs` (one
//! method per state, and `Run::transition`, the only place the state changes), `bake.rs` (the
//! watch at each canary weight), then what the run hands the bake or keeps in the background
//! (`controls.rs`, `events.rs`, `status.rs`, `lease.rs`) and the weight arithmetic
//! (`weights.rs`). The release uses [`docker`] (the Docker Engine through bollard), [`plan`]
//! (what goes into each container), [`image`] (getting the image onto every host), [`health`],
//! [`analysis`], [`drain`] and [`heartbeat`] (keeping instances alive in the locator, during and
//! between releases); [`volume`] makes the spec's volumes and serves `haddock volume`. [`cli`] maps verbs to it and [`error`] every failure to an exit code;
//! [`output`] is what users and CI see.
pub mod accessory;
pub mod analysis;
pub mod check;
pub mod cli;
pub mod docker;
pub mod drain;
pub mod error;
pub mod health;
pub mod heartbeat;
pub mod hooks;
pub mod image;
pub mod limits;
pub mod logs;
pub mod output;
pub mod plan;
pub mod release;
pub mod spec;
pub mod view;
pub mod volume;
