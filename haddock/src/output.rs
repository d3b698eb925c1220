//! What a person or a CI pipeline sees.
//!
//! Human mode prints one line per step as it happens, with the time since the verb started and
//! the step's own duration. `--json` prints exactly one JSON object on stdout at the end (the
//! [`ReleaseReport`]); the step lines then go to stderr, so that a pipeline can both parse
//! stdout and keep a readable log. [`report`] builds that object from how a release verb ended;
//! it sits here, beside [`ReleaseReport`], so that every key `--json` prints is decided in one
//! file.

use crate::error::Error;
use locator_wire::api::{Release, ReleaseState};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// Where progress lines go.
#[derive(Debug, Clone)]
pub struct Output {
    json: bool,
    quiet: bool,
    start: Instant,
}

impl Output {
    pub fn new(json: bool) -> Output {
        Output {
            json,
            quiet: false,
            start: Instant::now(),
        }
    }

    /// No progress lines at all (benchmarks, tests).
    pub fn quiet() -> Output {
        Output {
            json: true,
            quiet: true,
            start: Instant::now(),
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// One progress line: `[  1.23s] started 1 container (0.21s)`.
    pub fn step(&self, what: &str, took: Option<Duration>) {
        if self.quiet {
            return;
        }
        let line = match took {
            Some(d) => format!(
                "[{:>7.2}s] {what} ({})",
                self.elapsed().as_secs_f64(),
                fmt_duration(d)
            ),
            None => format!("[{:>7.2}s] {what}", self.elapsed().as_secs_f64()),
        };
        if self.json {
            eprintln!("{line}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// `0.21s`, `1m 3s`.
pub fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

/// The one JSON object `haddock release --json` (and `resume`, `rollback`) prints.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReleaseReport {
    /// `released`, `already_current`, `failed`, `rolled_back`, or `error`.
    pub outcome: String,
    pub exit_code: u8,
    pub service: String,
    pub release: Option<String>,
    pub from_version: Option<String>,
    pub to_version: String,
    /// Final recorded state (`done`, `rolled_back`, `failed`); `null` when the run ended no
    /// release: bad input before one began, or an infrastructure error that left it active.
    pub state: Option<String>,
    pub reason: Option<String>,
    /// Machine-readable error kind (see `Error::kind`).
    pub error: Option<String>,
    /// Duration of each state of the release, as recorded in the locator.
    pub step_ms: BTreeMap<String, u64>,
    /// From the start of this haddock run to all new sessions on the new version.
    pub tag_to_full_ms: Option<u64>,
    pub total_ms: u64,
    pub containers: Vec<String>,
}

/// A duration as the whole milliseconds the locator records (saturating): the release's step
/// times and this report's total are counted the same way.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The `--json` report of a release verb: how it ended (`outcome`, e.g. `released`, with the
/// release record) or the error it failed with.
pub fn report(
    service: &str,
    tag: &str,
    result: std::result::Result<(&str, Option<&Release>), &Error>,
    out: &Output,
) -> ReleaseReport {
    let mut r = ReleaseReport {
        service: service.to_string(),
        to_version: tag.to_string(),
        total_ms: ms(out.elapsed()),
        ..Default::default()
    };
    match result {
        Ok((outcome, rec)) => {
            r.outcome = outcome.into();
            if let Some(rec) = rec {
                fill(&mut r, rec);
                r.tag_to_full_ms = rec.step_ms.get("tag_to_full").copied();
            }
        }
        Err(e) => {
            r.exit_code = e.exit_code();
            r.outcome = match e {
                Error::RolledBack { .. } => "rolled_back",
                Error::Unhealthy { .. } | Error::Aborted { .. } => "failed",
                _ => "error",
            }
            .into();
            r.error = Some(e.kind().into());
            r.reason = Some(e.to_string());
            // The terminal state an error recorded; other errors left no release ended (bad
            // input before one began, or an infrastructure error: the release stays active and
            // `haddock status` / `haddock resume` take it from its recorded state).
            r.state = match e {
                Error::RolledBack { .. } => Some(ReleaseState::RolledBack.to_string()),
                Error::Unhealthy { .. } | Error::Aborted { .. } => {
                    Some(ReleaseState::Failed.to_string())
                }
                _ => None,
            };
            if let Error::RolledBack { release, .. }
            | Error::Unhealthy { release, .. }
            | Error::Aborted { release, .. } = e
            {
                r.release = Some(release.clone());
            }
        }
    }
    r
}

fn fill(r: &mut ReleaseReport, rec: &Release) {
    r.release = Some(rec.id.clone());
    r.from_version = rec.from_version.clone();
    r.state = Some(rec.state.to_string());
    r.reason = rec.reason.clone();
    r.step_ms = rec.step_ms.clone();
    r.containers = rec.containers.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_millis(1234)), "1.23s");
        assert_eq!(fmt_duration(Duration::from_secs(63)), "1m 3s");
    }

    #[test]
    fn the_report_is_one_json_object_with_the_documented_keys() {
        let r = ReleaseReport {
            outcome: "released".into(),
            to_version: "2".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "outcome",
            "exit_code",
            "service",
            "release",
            "from_version",
            "to_version",
            "reason",
            "step_ms",
            "tag_to_full_ms",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }
}
