//! Haddock, the deployer: `haddock release <service> <tag>` takes a service from one image tag
//! to the next without dropping a user.
//!
//! Start reading at [`spec`] (what a release is told to do, and every rule a spec must meet),
//! then [`cli`] (the verbs and their exit codes).
pub mod cli;
pub mod spec;
