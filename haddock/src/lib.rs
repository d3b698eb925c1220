//! Haddock, the deployer: `haddock release <service> <tag>` takes a service from one image tag
//! to the next without dropping a user.
//!
//! Start reading at [`spec`] (what a release is told to do, and every rule a spec must meet),
//! then [`release`] (the state machine recorded in the locator), which uses [`docker`] (the
//! Docker Engine through bollard), [`image`] (getting the image onto every host), [`health`], [`analysis`] and [`drain`]. [`cli`] maps verbs
//! to it and [`error`] every failure to an exit code; [`output`] is what users and CI see.
pub mod analysis;
pub mod cli;
pub mod docker;
pub mod drain;
pub mod error;
pub mod health;
pub mod image;
pub mod output;
pub mod release;
pub mod spec;
