//! The command line: verbs, their arguments and the exit codes CI pipelines rely on.

use crate::spec::{Spec, SpecError};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Exit codes of every verb (documented in docs/operations.md).
pub mod exit {
    /// Released, or the check passed.
    pub const OK: u8 = 0;
    /// The release was rolled back (or failed before any user saw it).
    pub const ROLLED_BACK: u8 = 1;
    /// Bad input: a malformed spec, an unknown tag, a bad flag. Nothing was changed.
    pub const BAD_INPUT: u8 = 2;
    /// Infrastructure error: Docker or the locator unreachable.
    pub const INFRA: u8 = 3;
}

#[derive(Debug, Parser)]
#[command(
    name = "haddock",
    version,
    about = "Zero-downtime blue-green and canary releases of services in Docker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a deploy spec: prints "ok" or every problem as file:line:col.
    Check {
        /// Path to the spec, e.g. deploy-specs/optimizer.toml.
        spec: PathBuf,
    },
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Check { spec } => check(&spec),
    }
}

fn check(path: &std::path::Path) -> u8 {
    match Spec::load(path) {
        Ok(_) => {
            println!("ok");
            exit::OK
        }
        Err(e @ (SpecError::Invalid(_) | SpecError::Read { .. })) => {
            eprintln!("{e}");
            exit::BAD_INPUT
        }
    }
}
