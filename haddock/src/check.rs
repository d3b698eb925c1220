//! Custom checks of a canary step (`[[rollout.analysis.checks]]`): an HTTP URL that must answer
//! 2xx, optionally with a JSON number within bounds, or a Prometheus query whose values must lie
//! within bounds — what Argo Rollouts' analysis templates and Flagger's metric checks do.
//!
//! The proxies' figures say how users fare; a check says what only the service or the
//! monitoring knows (a queue's depth, a cache's hit ratio, an error rate the service counts
//! itself). A [`Checks`] belongs to one bake: it measures each check every `interval`, rolls
//! the release back after `failure_limit` failures in a row, and at the end of the bake lets
//! the step pass only if every check's latest measurement passed. A check that cannot be
//! measured (unreachable, no data, not a number) has failed: a check nobody can read proves
//! nothing, and a query with a typo must not pass every release.

use crate::output::Output;
use crate::spec::{Analysis, Check};
use serde::Serialize;
use std::time::{Duration, Instant};

/// The longest one measurement may take.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the placeholders of a check's URL or query stand for during one bake.
#[derive(Debug, Clone)]
pub struct Facts {
    pub service: String,
    /// The version being released.
    pub version: String,
    /// The version users are moved from (empty on a first release).
    pub old_version: String,
    pub weight: u32,
}

/// Replaces `{service}`, `{version}`, `{old_version}`, `{weight}` and `{instance}`.
pub fn fill(template: &str, facts: &Facts, instance: &str) -> String {
    template
        .replace("{service}", &facts.service)
        .replace("{old_version}", &facts.old_version)
        .replace("{version}", &facts.version)
        .replace("{weight}", &facts.weight.to_string())
        .replace("{instance}", instance)
}

/// One measurement of one check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    pub check: String,
    pub passed: bool,
    /// The number compared with the bounds (the worst one, for several series or instances).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// What was measured and, on a failure, why it failed.
    pub detail: String,
}

/// One check during a bake.
struct Tracked {
    check: Check,
    due: Instant,
    failures_in_row: u32,
    last: Option<Measurement>,
}

/// The custom checks of one bake.
pub struct Checks {
    http: reqwest::Client,
    prometheus: Option<String>,
    facts: Facts,
    /// host:port of each new instance, for checks with `{instance}`.
    instances: Vec<String>,
    tracked: Vec<Tracked>,
    /// Where a check's first outcome, and each change of it, is said.
    out: Output,
}

impl Checks {
    /// The checks of `analysis` for a bake with these facts; each is first measured one
    /// `interval` after the start (the new weight needs time to show in any figure).
    pub fn new(analysis: &Analysis, facts: Facts, instances: Vec<String>, out: &Output) -> Checks {
        let now = Instant::now();
        Checks {
            http: reqwest::Client::builder()
                .timeout(MEASURE_TIMEOUT)
                .connect_timeout(MEASURE_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .expect("a client without TLS always builds"),
            prometheus: analysis.prometheus.clone(),
            facts,
            instances,
            tracked: analysis
                .checks
                .iter()
                .map(|c| Tracked {
                    check: c.clone(),
                    due: now + c.interval,
                    failures_in_row: 0,
                    last: None,
                })
                .collect(),
            out: out.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }

    /// When the next measurement is due, if there are checks.
    pub fn next_due(&self) -> Option<Instant> {
        self.tracked.iter().map(|t| t.due).min()
    }

    /// The latest measurement of each check measured so far.
    pub fn latest(&self) -> Vec<Measurement> {
        self.tracked.iter().filter_map(|t| t.last.clone()).collect()
    }

    /// Measures every check that is due (all at once). `Some(reason)` when one has now failed
    /// `failure_limit` times in a row.
    pub async fn measure_due(&mut self) -> Option<String> {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.tracked.len())
            .filter(|&i| self.tracked[i].due <= now)
            .collect();
        self.measure(&due).await;
        due.into_iter().find_map(|i| {
            let t = &self.tracked[i];
            (t.failures_in_row >= t.check.failure_limit).then(|| {
                format!(
                    "check {:?} failed {} times in a row: {}",
                    t.check.name,
                    t.failures_in_row,
                    t.last.as_ref().map(|m| m.detail.as_str()).unwrap_or("")
                )
            })
        })
    }

    /// At the end of the bake: measures the checks not measured yet, and once more those whose
    /// latest measurement failed (a figure may not have existed yet when it was taken: the new
    /// weight needs a scrape or two to show); `Some(reason)` when any check's latest
    /// measurement still fails (the step must not pass on a failing check).
    pub async fn verdict_at_end(&mut self) -> Option<String> {
        let again: Vec<usize> = (0..self.tracked.len())
            .filter(|&i| self.tracked[i].last.as_ref().is_none_or(|m| !m.passed))
            .collect();
        self.measure(&again).await;
        self.tracked.iter().find_map(|t| {
            let last = t.last.as_ref()?;
            (!last.passed).then(|| {
                format!(
                    "check {:?} had not passed by the end of the step: {}",
                    t.check.name, last.detail
                )
            })
        })
    }

    async fn measure(&mut self, which: &[usize]) {
        let results = futures_util::future::join_all(which.iter().map(|&i| {
            measure(
                &self.http,
                self.prometheus.as_deref(),
                &self.tracked[i].check,
                &self.facts,
                &self.instances,
            )
        }))
        .await;
        for (&i, m) in which.iter().zip(results) {
            let t = &mut self.tracked[i];
            t.due = Instant::now() + t.check.interval;
            t.failures_in_row = if m.passed { 0 } else { t.failures_in_row + 1 };
            tracing::debug!(check = %m.check, passed = m.passed, detail = %m.detail, "measured");
            if t.last.as_ref().is_none_or(|l| l.passed != m.passed) {
                let verb = if m.passed { "passed" } else { "failed" };
                self.out.step(
                    &format!(
                        "step {} %: check {:?} {verb}: {}",
                        self.facts.weight, m.check, m.detail
                    ),
                    None,
                );
            }
            t.last = Some(m);
        }
    }
}

/// Measures `check` once.
async fn measure(
    http: &reqwest::Client,
    prometheus: Option<&str>,
    check: &Check,
    facts: &Facts,
    instances: &[String],
) -> Measurement {
    let outcome = match (&check.http, &check.prometheus) {
        (Some(url), _) if url.contains("{instance}") => {
            // Every new instance must pass; the first that does not decides.
            let mut last = Err("no new instance to measure".to_string());
            for instance in instances {
                last = measure_http(http, &fill(url, facts, instance), check).await;
                if last.is_err() {
                    break;
                }
            }
            last
        }
        (Some(url), _) => measure_http(http, &fill(url, facts, ""), check).await,
        (None, Some(query)) => match prometheus {
            Some(base) => measure_prometheus(http, base, &fill(query, facts, ""), check).await,
            None => Err("no Prometheus server configured".into()),
        },
        (None, None) => Err("neither `http` nor `prometheus` is set".into()),
    };
    let (passed, value, detail) = match outcome {
        Ok((value, detail)) => (true, value, detail),
        Err(detail) => (false, None, detail),
    };
    Measurement {
        check: check.name.clone(),
        passed,
        value,
        detail,
    }
}

/// GET `url`: 2xx, and the JSON field within bounds when the check names one.
async fn measure_http(
    http: &reqwest::Client,
    url: &str,
    check: &Check,
) -> Result<(Option<f64>, String), String> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url} failed: {}", crate::health::root_cause(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("GET {url} answered {status}"));
    }
    let Some(pointer) = &check.json_pointer else {
        return Ok((None, format!("GET {url} answered {status}")));
    };
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("GET {url}: the answer is not JSON: {e}"))?;
    let value = body
        .pointer(pointer)
        .ok_or_else(|| format!("GET {url}: no field {pointer}"))?;
    let n = value
        .as_f64()
        .ok_or_else(|| format!("GET {url}: {pointer} is {value}, not a number"))?;
    within(n, check.min, check.max)
        .map(|()| (Some(n), format!("GET {url}: {pointer} = {n}")))
        .map_err(|why| format!("GET {url}: {pointer} = {n}, {why}"))
}

/// An instant query: every value within bounds.
async fn measure_prometheus(
    http: &reqwest::Client,
    base: &str,
    query: &str,
    check: &Check,
) -> Result<(Option<f64>, String), String> {
    let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
    let resp = http
        .get(&url)
        .query(&[("query", query)])
        .send()
        .await
        .map_err(|e| {
            format!(
                "Prometheus at {base} failed: {}",
                crate::health::root_cause(&e)
            )
        })?;
    let status = resp.status();
    // Prometheus answers 400/422 with a JSON error for a bad query: show its words.
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("Prometheus answered {status} without JSON: {e}"))?;
    let values = values_of(&body).map_err(|e| format!("query {query:?}: {e}"))?;
    if values.is_empty() {
        return Err(format!("query {query:?} returned no data"));
    }
    let mut worst: Option<(f64, String)> = None;
    for (series, v) in values {
        let shown = if series.is_empty() {
            format!("{v}")
        } else {
            format!("{series} = {v}")
        };
        if let Err(why) = within(v, check.min, check.max) {
            return Err(format!("query {query:?}: {shown}, {why}"));
        }
        // Report the value nearest a bound.
        let margin = |x: f64| {
            let lo = check.min.map_or(f64::INFINITY, |m| x - m);
            let hi = check.max.map_or(f64::INFINITY, |m| m - x);
            lo.min(hi)
        };
        if worst.as_ref().is_none_or(|(w, _)| margin(v) < margin(*w)) {
            worst = Some((v, shown));
        }
    }
    let (v, shown) = worst.expect("at least one value");
    Ok((Some(v), format!("query {query:?}: {shown}")))
}

/// The values of an instant query's answer, each with its series' labels.
fn values_of(body: &serde_json::Value) -> Result<Vec<(String, f64)>, String> {
    if body["status"] != "success" {
        return Err(format!(
            "Prometheus said {}: {}",
            body["errorType"].as_str().unwrap_or("error"),
            body["error"].as_str().unwrap_or("(no message)")
        ));
    }
    let sample = |pair: &serde_json::Value| -> Result<f64, String> {
        pair[1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| format!("{pair} is not a sample"))
    };
    let data = &body["data"];
    match data["resultType"].as_str() {
        Some("scalar") => Ok(vec![(String::new(), sample(&data["result"])?)]),
        Some("vector") => data["result"]
            .as_array()
            .ok_or("a vector without results")?
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        let inner: Vec<String> = m
                            .iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect();
                        if inner.is_empty() {
                            String::new()
                        } else {
                            format!("{{{}}}", inner.join(","))
                        }
                    })
                    .unwrap_or_default();
                Ok((labels, sample(&r["value"])?))
            })
            .collect(),
        other => Err(format!(
            "a {} result; a check needs an instant vector or a scalar",
            other.unwrap_or("missing")
        )),
    }
}

/// Whether `v` lies within the bounds (NaN never does).
fn within(v: f64, min: Option<f64>, max: Option<f64>) -> Result<(), String> {
    if v.is_nan() {
        return Err("not a number (a ratio over no traffic?)".into());
    }
    if let Some(m) = min.filter(|m| v < *m) {
        return Err(format!("below the minimum {m}"));
    }
    if let Some(m) = max.filter(|m| v > *m) {
        return Err(format!("above the maximum {m}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn placeholders_are_filled() {
        let f = Facts {
            service: "opt".into(),
            version: "1.1.0".into(),
            old_version: "1.0.0".into(),
            weight: 25,
        };
        assert_eq!(
            fill(
                "x{service}/{version}/{old_version}/{weight}/{instance}",
                &f,
                "10.0.0.2:8080"
            ),
            "xopt/1.1.0/1.0.0/25/10.0.0.2:8080"
        );
    }

    #[test]
    fn bounds() {
        assert!(within(0.5, Some(0.1), Some(1.0)).is_ok());
        assert!(within(1.0, None, Some(1.0)).is_ok());
        assert!(within(1.01, None, Some(1.0))
            .unwrap_err()
            .contains("above the maximum 1"));
        assert!(within(0.0, Some(0.1), None)
            .unwrap_err()
            .contains("below the minimum 0.1"));
        assert!(within(f64::NAN, None, None).is_err());
    }

    #[test]
    fn prometheus_answers_are_read() {
        let vector = json!({"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"version":"1.1.0"},"value":[1.0,"0.25"]},
            {"metric":{},"value":[1.0,"+Inf"]}]}});
        let v = values_of(&vector).unwrap();
        assert_eq!(v[0], ("{version=1.1.0}".to_string(), 0.25));
        assert_eq!(v[1].1, f64::INFINITY);
        let scalar = json!({"status":"success","data":{"resultType":"scalar","result":[1.0,"3"]}});
        assert_eq!(values_of(&scalar).unwrap(), vec![(String::new(), 3.0)]);
        let nan = json!({"status":"success","data":{"resultType":"vector","result":[
            {"metric":{},"value":[1.0,"NaN"]}]}});
        assert!(values_of(&nan).unwrap()[0].1.is_nan());
        let bad = json!({"status":"error","errorType":"bad_data","error":"parse error at char 5"});
        assert!(values_of(&bad)
            .unwrap_err()
            .contains("bad_data: parse error"));
        let matrix = json!({"status":"success","data":{"resultType":"matrix","result":[]}});
        assert!(values_of(&matrix).unwrap_err().contains("instant vector"));
        let junk = json!({"status":"success","data":{"resultType":"vector","result":[
            {"metric":{},"value":[1.0, 7]}]}});
        assert!(values_of(&junk).is_err());
    }
}
