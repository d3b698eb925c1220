//! Log output of every Haddock program (`locator`, `proxy`, `haddock`): the global
//! `--log-format json|pretty` flag, events on stderr, `RUST_LOG` filtering (default `info`).
//!
//! It lives here because the locator crate is the one every Haddock program already depends on.
//! Stdout stays free for what a program answers (`haddock --json`, `locator bench`).

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// How log events are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (for machines).
    Json,
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Pretty,
}

/// Installs the global subscriber. Call once, first thing in `main`.
///
/// `init` also installs `tracing-log`'s `LogTracer` (a default feature of tracing-subscriber),
/// so records of crates that log through the `log` crate — pingora in the proxy — reach the
/// same output, in the same format and behind the same filter.
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// [`init`] with another filter when `RUST_LOG` is unset (haddock's human mode shows its steps
/// on stdout already, so it logs only warnings there by default).
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Pretty => logs.init(),
    }
}
