//! Custom checks of a canary step (`[[rollout.analysis.checks]]`), against a real Prometheus
//! (Debian's package) scraping the real proxy, and HTTP checks against the real new instances.

use std::time::Duration;

use e2e::prometheus::Prometheus;
use e2e::stack::{Stack, StackOptions};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Mean latency of the version being released, from the proxy's histogram.
const MEAN_LATENCY: &str = "sum(rate(haddock_proxy_http_request_duration_seconds_sum{version=\"{version}\"}[5s])) / sum(rate(haddock_proxy_http_request_duration_seconds_count{version=\"{version}\"}[5s]))";

/// A version whose every request sleeps 30 ms passes the proxy figures (max p99 500 ms, and
/// no relative limit is set) but not a Prometheus check on its mean latency (≤ 15 ms): it is
/// rolled back with 0 failed requests. The check is measured every 3 s: Prometheus scrapes
/// every second and its rate needs two samples of the new version's series. Then a good version passes the same check and an HTTP
/// check on each new instance, and is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prometheus_check_rolls_back_what_the_proxy_figures_pass_and_a_good_version_passes() {
    let _one = SERIAL.lock().await;
    let mut opts = StackOptions {
        step_pause: Duration::from_secs(6),
        session_ttl: Duration::from_secs(3),
        start_deadline: Duration::from_secs(15),
        ..StackOptions::default()
    };
    opts.env
        .push(("FAILPOINTS".into(), "http::request=sleep(30)".into()));
    let stack = Stack::start("checks", opts).await;
    let (code, _, out) = tokio::task::block_in_place(|| stack.release("1.0.0"));
    assert_eq!(code, Some(0), "1.0.0 failed: {out}\n{}", stack.logs());

    let admin = stack.proxy_admin.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::scraping(&[admin]).await;
    stack.edit_spec(
        "min_requests = 50",
        &format!(
            "min_requests = 50\nprometheus = \"{}\"\n\n\
             [[rollout.analysis.checks]]\nname = \"mean-latency\"\nprometheus = '{MEAN_LATENCY}'\n\
             max = 0.015\ninterval = \"3s\"\nfailure_limit = 2\n\n\
             [[rollout.analysis.checks]]\nname = \"version\"\nhttp = \"http://{{instance}}/version\"\n\
             interval = \"1s\"\n",
            prometheus.url
        ),
    );

    let (control, load) = stack.light_load();
    let (code, json, out) = tokio::task::block_in_place(|| stack.release("9.9.9-faulty"));
    let (_, _, good_out) = {
        // The good version next, under the same load.
        assert_eq!(code, Some(1), "the slow version was not rolled back: {out}");
        assert_eq!(json["outcome"], "rolled_back", "{json}");
        let reason = json["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("check \"mean-latency\"") && reason.contains("above the maximum 0.015"),
            "rolled back for another reason: {reason}\n{out}\n{}",
            prometheus.log()
        );
        assert_eq!(
            stack.weights().await.unwrap().get("1.0.0"),
            Some(&100),
            "users are not back on 1.0.0"
        );
        eprintln!("rolled back: {reason}");
        tokio::task::block_in_place(|| stack.release("1.1.0"))
    };
    control.stop();
    let users = load.await.unwrap();
    assert_eq!(users.failed, 0, "users saw errors: {:?}", users.failures);
    assert!(users.requests > 0);
    assert_eq!(
        stack.weights().await.unwrap().get("1.1.0"),
        Some(&100),
        "the good version was not released: {good_out}\n{}",
        prometheus.log()
    );
    for check in ["mean-latency", "version"] {
        assert!(
            good_out.contains(&format!("check \"{check}\" passed")),
            "check {check} was not seen passing: {good_out}"
        );
    }
    assert!(
        !good_out.contains("\" failed"),
        "a check failed on the good version: {good_out}"
    );
    eprintln!("{good_out}");
}

/// A check whose server is down, or whose URL answers 404, fails the step: a check nobody can
/// read proves nothing. Users are sent back to the old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_that_cannot_be_measured_fails_the_step() {
    let _one = SERIAL.lock().await;
    let stack = Stack::start(
        "checks-down",
        StackOptions {
            step_pause: Duration::from_secs(3),
            session_ttl: Duration::from_secs(2),
            start_deadline: Duration::from_secs(15),
            ..StackOptions::default()
        },
    )
    .await;
    let (code, _, out) = tokio::task::block_in_place(|| stack.release("1.0.0"));
    assert_eq!(code, Some(0), "1.0.0 failed: {out}");
    stack.edit_spec(
        "min_requests = 50",
        "min_requests = 50\n\n[[rollout.analysis.checks]]\nname = \"gone\"\n\
         http = \"http://{instance}/no-such-page\"\ninterval = \"500ms\"\n",
    );
    let (code, json, out) = tokio::task::block_in_place(|| stack.release("1.1.0"));
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(json["outcome"], "rolled_back", "{json}");
    let reason = json["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("check \"gone\"") && reason.contains("404"),
        "{reason}"
    );
    assert_eq!(stack.weights().await.unwrap().get("1.0.0"), Some(&100));
    assert!(stack.containers(Some("1.1.0")).is_empty());
}
