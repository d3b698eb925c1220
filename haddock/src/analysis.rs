//! Canary analysis: is the new version worse than the spec tolerates?
//!
//! The proxies report cumulative per-version counters (requests, 5xx) and a recent-window p99
//! to the locator, which sums them ([`locator_wire::api::TrafficByVersion`]). Haddock reads them at
//! the start of a bake (the baseline) and then every tick: the new version is judged on the
//! *difference* (what it served during this release), and only once that difference reaches
//! `min_requests` — a canary at 10 % with three requests proves nothing either way. The old
//! version's figures over the same window are reported next to it (the delta a human wants).

use crate::spec::Analysis;
use locator_wire::api::{TrafficByVersion, VersionTraffic};
use serde::Serialize;

/// The outcome of one look at the figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Not enough requests on the new version yet.
    Waiting { requests: u64, min_requests: u64 },
    /// Within thresholds.
    Pass(Figures),
    /// Over a threshold: roll back.
    Breach { figures: Figures, reason: String },
    /// The bake (and its extension) ended with fewer than `min_requests` on the new version:
    /// nothing can be said either way (`rollout.analysis.on_inconclusive` decides).
    Inconclusive { requests: u64, min_requests: u64 },
}

/// What the new (and the old) version did since the baseline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub requests: u64,
    pub ratio_5xx: f64,
    pub p99_ms: f64,
    /// The old version over the same window, when it served any.
    pub old_ratio_5xx: Option<f64>,
    pub old_p99_ms: Option<f64>,
}

/// Counters served between two cumulative readings. A reading lower than the baseline means a
/// proxy restarted (its counters began again): the new reading alone is then the best estimate.
pub fn delta(before: &VersionTraffic, now: &VersionTraffic) -> VersionTraffic {
    if now.requests < before.requests || now.responses_5xx < before.responses_5xx {
        return *now;
    }
    VersionTraffic {
        requests: now.requests - before.requests,
        responses_5xx: now.responses_5xx - before.responses_5xx,
        p99_ms: now.p99_ms,
    }
}

fn ratio(t: &VersionTraffic) -> f64 {
    if t.requests == 0 {
        0.0
    } else {
        t.responses_5xx as f64 / t.requests as f64
    }
}

/// Judges version `new` (against `old`, for the report) between two readings of the traffic.
pub fn judge(
    baseline: &TrafficByVersion,
    now: &TrafficByVersion,
    new: &str,
    old: Option<&str>,
    limits: &Analysis,
) -> Verdict {
    let zero = VersionTraffic::default();
    let window = |v: &str| {
        delta(
            baseline.get(v).unwrap_or(&zero),
            now.get(v).unwrap_or(&zero),
        )
    };
    let n = window(new);
    if n.requests < limits.min_requests.max(1) {
        return Verdict::Waiting {
            requests: n.requests,
            min_requests: limits.min_requests,
        };
    }
    let o = old.map(window).filter(|o| o.requests > 0);
    let figures = Figures {
        requests: n.requests,
        ratio_5xx: ratio(&n),
        p99_ms: n.p99_ms,
        old_ratio_5xx: o.as_ref().map(ratio),
        old_p99_ms: o.as_ref().map(|o| o.p99_ms),
    };
    let max_p99_ms = limits.max_p99.as_secs_f64() * 1000.0;
    let reason = if figures.ratio_5xx > limits.max_5xx_ratio {
        Some(format!(
            "version {new} answered {:.1} % 5xx over {} requests (max {:.1} %{})",
            figures.ratio_5xx * 100.0,
            figures.requests,
            limits.max_5xx_ratio * 100.0,
            figures
                .old_ratio_5xx
                .map(|r| format!("; old version {:.1} %", r * 100.0))
                .unwrap_or_default()
        ))
    } else if figures.p99_ms > max_p99_ms {
        Some(format!(
            "version {new} p99 latency {:.0} ms over {} requests (max {max_p99_ms:.0} ms{})",
            figures.p99_ms,
            figures.requests,
            figures
                .old_p99_ms
                .map(|p| format!("; old version {p:.0} ms"))
                .unwrap_or_default()
        ))
    } else {
        against_stable(&figures, n.p99_ms, o.as_ref(), new, limits)
    };
    match reason {
        Some(reason) => Verdict::Breach { figures, reason },
        None => Verdict::Pass(figures),
    }
}

/// A p99 difference smaller than this is never a breach against the stable version: at a few
/// milliseconds, twice as slow is the noise of a busy machine, not a worse version.
pub const P99_SLACK_MS: f64 = 10.0;

/// The relative limits (`max_5xx_over_stable`, `max_p99_vs_stable`): the new version against
/// the stable one over the same window, so that a slow day fails no good version and a bad
/// version cannot hide under the absolute limits. Judged only when the stable version served
/// `min_requests` in the window too: a comparison with a handful of requests is noise.
fn against_stable(
    f: &Figures,
    p99_ms: f64,
    stable: Option<&VersionTraffic>,
    new: &str,
    limits: &Analysis,
) -> Option<String> {
    let s = stable.filter(|s| s.requests >= limits.min_requests.max(1))?;
    let stable_ratio = ratio(s);
    if let Some(points) = limits.max_5xx_over_stable {
        if f.ratio_5xx > stable_ratio + points {
            return Some(format!(
                "version {new} answered {:.1} % 5xx over {} requests, the stable version {:.1} % \
                 over {} in the same window (at most {:.1} points more)",
                f.ratio_5xx * 100.0,
                f.requests,
                stable_ratio * 100.0,
                s.requests,
                points * 100.0
            ));
        }
    }
    if let Some(factor) = limits.max_p99_vs_stable {
        if p99_ms > s.p99_ms * factor && p99_ms - s.p99_ms > P99_SLACK_MS {
            return Some(format!(
                "version {new} p99 latency {p99_ms:.0} ms is {:.1}× the stable version's {:.0} ms \
                 in the same window (at most {factor}×)",
                p99_ms / s.p99_ms.max(f64::MIN_POSITIVE),
                s.p99_ms
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(requests: u64, responses_5xx: u64, p99_ms: f64) -> VersionTraffic {
        VersionTraffic {
            requests,
            responses_5xx,
            p99_ms,
        }
    }

    fn limits() -> Analysis {
        Analysis {
            max_5xx_ratio: 0.05,
            max_p99: Duration::from_millis(500),
            min_requests: 50,
            max_5xx_over_stable: None,
            max_p99_vs_stable: None,
            extend_inconclusive: Duration::ZERO,
            on_inconclusive: crate::spec::OnInconclusive::Pass,
            post_promotion: Duration::ZERO,
            prometheus: None,
            checks: Vec::new(),
        }
    }

    fn relative() -> Analysis {
        Analysis {
            max_5xx_over_stable: Some(0.01),
            max_p99_vs_stable: Some(1.5),
            ..limits()
        }
    }

    #[test]
    fn three_times_slower_than_stable_breaches_under_the_absolute_limit() {
        let now = traffic(&[("2", t(100, 0, 150.0)), ("1", t(900, 0, 50.0))]);
        assert!(matches!(
            judge(&TrafficByVersion::new(), &now, "2", Some("1"), &limits()),
            Verdict::Pass(_)
        ));
        match judge(&TrafficByVersion::new(), &now, "2", Some("1"), &relative()) {
            Verdict::Breach { reason, .. } => {
                assert!(
                    reason.contains("3.0× the stable version's 50 ms"),
                    "{reason}"
                )
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_slow_day_for_both_versions_passes() {
        let now = traffic(&[("2", t(100, 3, 400.0)), ("1", t(900, 25, 350.0))]);
        assert!(matches!(
            judge(&TrafficByVersion::new(), &now, "2", Some("1"), &relative()),
            Verdict::Pass(_)
        ));
    }

    #[test]
    fn more_5xx_than_stable_breaches_and_small_or_thin_differences_do_not() {
        // 4 % against stable's 1 %: under the absolute 5 %, three points over stable.
        let now = traffic(&[("2", t(100, 4, 5.0)), ("1", t(1000, 10, 5.0))]);
        match judge(&TrafficByVersion::new(), &now, "2", Some("1"), &relative()) {
            Verdict::Breach { reason, .. } => assert!(reason.contains("1.0 %"), "{reason}"),
            v => panic!("{v:?}"),
        }
        // A few milliseconds are noise, whatever the factor.
        let jitter = traffic(&[("2", t(100, 0, 9.0)), ("1", t(1000, 0, 2.0))]);
        assert!(matches!(
            judge(
                &TrafficByVersion::new(),
                &jitter,
                "2",
                Some("1"),
                &relative()
            ),
            Verdict::Pass(_)
        ));
        // A stable version with fewer than min_requests in the window is not compared.
        let thin = traffic(&[("2", t(100, 0, 150.0)), ("1", t(10, 0, 10.0))]);
        assert!(matches!(
            judge(&TrafficByVersion::new(), &thin, "2", Some("1"), &relative()),
            Verdict::Pass(_)
        ));
    }

    fn traffic(pairs: &[(&str, VersionTraffic)]) -> TrafficByVersion {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn nothing_is_judged_before_min_requests() {
        let base = traffic(&[("2", t(100, 0, 1.0))]);
        let now = traffic(&[("2", t(149, 49, 1.0))]);
        assert_eq!(
            judge(&base, &now, "2", Some("1"), &limits()),
            Verdict::Waiting {
                requests: 49,
                min_requests: 50
            }
        );
    }

    #[test]
    fn the_5xx_ratio_is_judged_on_the_window_only() {
        // 100 old 5xx before the baseline must not count against the canary.
        let base = traffic(&[("2", t(1000, 100, 1.0)), ("1", t(5000, 0, 2.0))]);
        let now = traffic(&[("2", t(1100, 103, 3.0)), ("1", t(5900, 9, 2.0))]);
        match judge(&base, &now, "2", Some("1"), &limits()) {
            Verdict::Pass(f) => {
                assert_eq!(f.requests, 100);
                assert!((f.ratio_5xx - 0.03).abs() < 1e-9);
                assert!((f.old_ratio_5xx.unwrap() - 0.01).abs() < 1e-9);
            }
            v => panic!("{v:?}"),
        }
        let bad = traffic(&[("2", t(1100, 110, 3.0))]);
        match judge(&base, &bad, "2", Some("1"), &limits()) {
            Verdict::Breach { reason, .. } => assert!(reason.contains("10.0 % 5xx"), "{reason}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_slow_version_breaches_on_p99() {
        let now = traffic(&[("2", t(60, 0, 750.0))]);
        match judge(&TrafficByVersion::new(), &now, "2", None, &limits()) {
            Verdict::Breach { reason, .. } => {
                assert!(reason.contains("p99 latency 750 ms"), "{reason}")
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_restarted_proxy_does_not_produce_negative_windows() {
        assert_eq!(delta(&t(500, 5, 1.0), &t(20, 1, 2.0)), t(20, 1, 2.0));
        assert_eq!(delta(&t(500, 5, 1.0), &t(520, 6, 2.0)), t(20, 1, 2.0));
    }
}
