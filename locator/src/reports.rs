//! The proxies' session reports, and the sums they add up to.
//!
//! Every proxy reports each service it carries about once a second: each instance's live
//! sessions and in-flight requests, and each version's traffic. [`Reports`] keeps the latest
//! report per (service, proxy) and, per service, each instance's running sum, which every
//! report adjusts by what it changed. So a report costs what it changed, not the size of its
//! service times the number of proxies: at a thousand proxies before a thousand instances a
//! service, summing every report again on each publication was two thirds of the locator's
//! CPU. Traffic is summed at publication (a few versions per report; p99 is a maximum, which
//! cannot be taken out of a running sum).
//!
//! Reports are never written to disk: proxies send them every second, so a restarted locator
//! has them all again within [`SESSION_REPORT_TTL_MS`].

use crate::api::{InstanceLoad, SessionReport, TrafficByVersion, UnixMillis};
use crate::state::SESSION_REPORT_TTL_MS;
use std::collections::{BTreeMap, HashMap};

/// Each instance's exact sum: u128, so that a report's figures can always be taken out again
/// (a saturated u64 could not be); clamped to u64 when read.
type Sum = (u128, u128);

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Reports {
    /// The latest whole report per (service, proxy), with when it arrived. Zeros are not
    /// kept: an instance absent from a report counts as zero.
    latest: BTreeMap<(String, String), (UnixMillis, SessionReport)>,
    /// Per service, per instance: the sum over `latest`.
    sums: HashMap<String, HashMap<String, Sum>>,
}

impl Reports {
    /// Reports replacing these (the PostgreSQL store shares each replica's sums this way).
    pub fn from_whole(reports: impl IntoIterator<Item = (UnixMillis, SessionReport)>) -> Self {
        let mut all = Reports::default();
        for (at, report) in reports {
            all.record(report, at);
        }
        all
    }

    /// The live report `proxy` last sent for `service`.
    pub fn live(&self, service: &str, proxy: &str, now: UnixMillis) -> Option<&SessionReport> {
        self.latest
            .get(&(service.to_string(), proxy.to_string()))
            .filter(|(at, _)| is_live(*at, now))
            .map(|(_, r)| r)
    }

    /// The live reports of `service`.
    pub fn live_of<'a>(
        &'a self,
        service: &'a str,
        now: UnixMillis,
    ) -> impl Iterator<Item = &'a SessionReport> + 'a {
        self.latest
            .range((service.to_string(), String::new())..)
            .take_while(move |((s, _), _)| s == service)
            .filter(move |(_, (at, _))| is_live(*at, now))
            .map(|(_, (_, r))| r)
    }

    /// Records a report, whole or of changes ([`SessionReport::base`]), already cut to
    /// what the locator knows. Changes without a previous report count as a whole report (the
    /// caller refuses them first: see `State::checked_report`).
    pub fn record(&mut self, report: SessionReport, now: UnixMillis) {
        let key = (report.service.clone(), report.proxy_id.clone());
        let sums = self.sums.entry(report.service.clone()).or_default();
        match self.latest.get_mut(&key) {
            Some((at, base)) if report.base.is_some() => {
                for (id, load) in &report.instances {
                    let old = base.instances.get(id).copied().unwrap_or_default();
                    adjust(sums, id, old, *load);
                }
                base.apply_changes(report);
                *at = now;
            }
            previous => {
                if let Some((_, old)) = previous {
                    for (id, load) in &old.instances {
                        adjust(sums, id, *load, InstanceLoad::default());
                    }
                }
                let mut whole = report;
                whole
                    .instances
                    .retain(|_, load| *load != InstanceLoad::default());
                whole.base = None;
                for (id, load) in &whole.instances {
                    adjust(sums, id, InstanceLoad::default(), *load);
                }
                self.latest.insert(key, (now, whole));
            }
        }
    }

    /// Forgets reports that aged out, taking them out of the sums.
    pub fn prune(&mut self, now: UnixMillis) {
        let old: Vec<(String, String)> = self
            .latest
            .iter()
            .filter(|(_, (at, _))| !is_live(*at, now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in old {
            if let Some((_, report)) = self.latest.remove(&key) {
                let sums = self.sums.entry(key.0).or_default();
                for (id, load) in &report.instances {
                    adjust(sums, id, *load, InstanceLoad::default());
                }
            }
        }
    }

    /// `instance`'s load summed over every report of `service` (saturating at u64::MAX).
    pub fn load(&self, service: &str, instance: &str) -> InstanceLoad {
        let sum = self.sums.get(service).and_then(|s| s.get(instance));
        as_load(sum.copied().unwrap_or_default())
    }

    /// Each version's traffic summed over the live reports of `service` (p99: the maximum).
    pub fn traffic(&self, service: &str, now: UnixMillis) -> TrafficByVersion {
        let mut traffic = TrafficByVersion::new();
        for r in self.live_of(service, now) {
            for (version, t) in &r.versions {
                // Saturating: the figures come from the network, and release builds do not
                // check overflow, so a plain `+=` would wrap a huge report round to a small sum.
                let sum = traffic.entry(version.clone()).or_default();
                sum.requests = sum.requests.saturating_add(t.requests);
                sum.responses_5xx = sum.responses_5xx.saturating_add(t.responses_5xx);
                sum.p99_ms = sum.p99_ms.max(t.p99_ms);
            }
        }
        traffic
    }

    /// This locator's own sums of `service` as one report from `proxy_id` (a replica's share,
    /// which the PostgreSQL store adds up with the other replicas').
    pub fn partial(&self, service: &str, proxy_id: &str, now: UnixMillis) -> SessionReport {
        let instances = self
            .sums
            .get(service)
            .map(|sums| {
                sums.iter()
                    .map(|(id, sum)| (id.clone(), as_load(*sum)))
                    .collect()
            })
            .unwrap_or_default();
        SessionReport {
            proxy_id: proxy_id.to_string(),
            service: service.to_string(),
            instances,
            versions: self.traffic(service, now),
            seq: 0,
            base: None,
        }
    }

    /// The services some report names.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.sums.keys().map(String::as_str)
    }
}

fn is_live(at: UnixMillis, now: UnixMillis) -> bool {
    at.saturating_add(SESSION_REPORT_TTL_MS) > now
}

/// An exact sum as the API's figures, saturating at u64::MAX.
fn as_load((sessions, in_flight): Sum) -> InstanceLoad {
    let clamp = |n: u128| u64::try_from(n).unwrap_or(u64::MAX);
    InstanceLoad {
        live_sessions: clamp(sessions),
        in_flight: clamp(in_flight),
    }
}

/// Moves one instance's sum from `old` to `new` figures; a zero sum is removed.
fn adjust(sums: &mut HashMap<String, Sum>, id: &str, old: InstanceLoad, new: InstanceLoad) {
    if old == new {
        return;
    }
    let sum = sums.entry(id.to_string()).or_default();
    // Exact: `old` was added before, so nothing goes below zero.
    sum.0 = sum.0 + u128::from(new.live_sessions) - u128::from(old.live_sessions);
    sum.1 = sum.1 + u128::from(new.in_flight) - u128::from(old.in_flight);
    if *sum == (0, 0) {
        sums.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(proxy: &str, instances: &[(&str, u64)], changes_only: bool) -> SessionReport {
        let seq = 0;
        SessionReport {
            proxy_id: proxy.into(),
            service: "svc".into(),
            instances: instances
                .iter()
                .map(|(id, n)| {
                    let load = InstanceLoad {
                        live_sessions: *n,
                        in_flight: 0,
                    };
                    (id.to_string(), load)
                })
                .collect(),
            versions: BTreeMap::new(),
            seq,
            base: changes_only.then_some(seq),
        }
    }

    fn sessions(r: &Reports, id: &str) -> u64 {
        r.load("svc", id).live_sessions
    }

    #[test]
    fn sums_follow_whole_reports_changes_and_age() {
        let mut r = Reports::default();
        r.record(report("p1", &[("a", 3), ("b", 1)], false), 0);
        r.record(report("p2", &[("a", 4)], false), 1_000);
        assert_eq!((sessions(&r, "a"), sessions(&r, "b")), (7, 1));
        // p1's changes: a moves, b empties; the rest of p1's report stands.
        r.record(report("p1", &[("a", 1), ("b", 0)], true), 2_000);
        assert_eq!((sessions(&r, "a"), sessions(&r, "b")), (5, 0));
        // A whole report replaces p2's previous one.
        r.record(report("p2", &[("b", 2)], false), 3_000);
        assert_eq!((sessions(&r, "a"), sessions(&r, "b")), (1, 2));
        // p1 (last heard at 2 000) ages out; p2 stays.
        r.prune(2_000 + SESSION_REPORT_TTL_MS);
        assert_eq!((sessions(&r, "a"), sessions(&r, "b")), (0, 2));
        assert!(r.live("svc", "p1", 7_000).is_none());
        assert!(r.live("svc", "p2", 7_000).is_some());
        assert_eq!(r.partial("svc", "replica", 7_000).instances.len(), 1);
    }

    #[test]
    fn sums_saturate_when_read_and_stay_exact_underneath() {
        let mut r = Reports::default();
        r.record(report("p1", &[("a", u64::MAX)], false), 0);
        r.record(report("p2", &[("a", 2)], false), 0);
        assert_eq!(sessions(&r, "a"), u64::MAX, "not wrapped round to 1");
        r.record(report("p1", &[("a", 0)], true), 0);
        assert_eq!(
            sessions(&r, "a"),
            2,
            "taking p1 out leaves p2's exact figure"
        );
    }
}
