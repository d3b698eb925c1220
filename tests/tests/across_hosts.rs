//! Releases across several Docker hosts: the machine's engine plus two test hosts
//! (`ci/testhosts.sh`: real dockerds in their own network namespaces, reached over TLS), two
//! proxies sharing the cookie key, one cache volume per host. One test at a time on the whole
//! machine (the test hosts' lock), so these two run one after the other.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::scenario::ScenarioOptions;
use e2e::stack::{Stack, StackOptions};
use locator::api::InstanceState;

/// The optimizers' read-through counter (hits: objects a miss found on a peer), summed over
/// every instance the locator lists as ready.
async fn read_through_hits(stack: &Stack) -> f64 {
    let client = locator::client::Client::new(&stack.locator_url, Some(stack.read_token.clone()));
    let mut hits = 0.0;
    for i in client.instances(&stack.service).await.unwrap_or_default() {
        if i.state != InstanceState::Ready {
            continue;
        }
        let Ok(resp) = reqwest::get(format!("http://{}/metrics", i.address)).await else {
            continue;
        };
        let text = resp.text().await.unwrap_or_default();
        hits += text
            .lines()
            .filter(|l| {
                l.starts_with("haddock_optimizer_read_through_total")
                    && l.contains("outcome=\"hit\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_release_across_three_hosts_and_two_proxies_loses_nothing() {
    let opts = ScenarioOptions {
        stack: StackOptions {
            test_hosts: 2,
            proxies: 2,
            step_pause: Duration::from_secs(4),
            session_ttl: Duration::from_secs(3),
            start_deadline: Duration::from_secs(60),
            // Three engines, two proxies and twelve users on two cores: the canary's first
            // reads (each a read-through to another host) have gone past the shipped 500 ms
            // p99 and rolled the release back (2 runs of 8). This test is about what is lost
            // across hosts; judgement has its own tests (release.rs).
            max_p99: Some(Duration::from_secs(2)),
            ..StackOptions::default()
        },
        users: 12,
        warmup: Duration::from_secs(3),
        probes_per_step: 0,
        ..ScenarioOptions::default()
    };
    let stack = Stack::start("hosts", opts.stack.clone()).await;
    let outcome = e2e::scenario::run_on(&stack, &opts).await;
    let (code, json, out) = &outcome.release;
    assert_eq!(
        outcome.first_release.0,
        Some(0),
        "first release: {}\n{}",
        outcome.first_release.1,
        outcome.logs
    );
    assert_eq!(
        *code,
        Some(0),
        "release across hosts: {out}\n{}",
        outcome.logs
    );
    eprintln!("across hosts: {}", outcome.summary());
    eprintln!("release report: {json}");

    // The new version runs on every host, each reached at its own address.
    let client = locator::client::Client::new(&stack.locator_url, Some(stack.read_token.clone()));
    let instances = client.instances(&stack.service).await.unwrap();
    let hosts: BTreeSet<&str> = instances
        .iter()
        .filter(|i| i.version == outcome.to && i.state == InstanceState::Ready)
        .map(|i| i.docker_host.as_str())
        .collect();
    assert_eq!(hosts.len(), 3, "ready 1.1.0 instances: {instances:#?}");

    let load = &outcome.load;
    assert!(
        load.requests > 200,
        "too little load to judge: {}",
        load.requests
    );
    // The objects the failed requests were about, to find them in the whole logs (the tails
    // of 60 lines rarely reach back to them, and the old containers are gone by now).
    let keys: Vec<String> = load
        .failed_requests
        .iter()
        .filter_map(|f| {
            let rest = f.message.split("/v1/objects/").nth(1)?;
            Some(rest.split([':', '?', ' ']).next()?.to_string())
        })
        .collect();
    assert_eq!(
        load.failed,
        0,
        "failed requests: {:#?}\n--- log lines naming {keys:?}\n{}\n{}",
        load.failed_requests,
        stack.container_lines_with(&keys),
        stack.container_logs(60)
    );
    assert_eq!(load.sessions_switched(), 0, "sessions changed version");
    assert!(
        outcome.objects_checked > 0,
        "no object was stored before the release"
    );
    assert_eq!(
        outcome.objects_readable, outcome.objects_checked,
        "objects stored through one host must be readable through any other"
    );
    // Most were read on another host than the one that stored them: through its peers.
    assert!(
        read_through_hits(&stack).await > 0.0,
        "no object was read through a peer"
    );
    assert_eq!(
        outcome.old_containers_left, 0,
        "old containers left on some host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_cut_off_mid_canary_rolls_back_and_a_rerun_leaves_no_orphan() {
    let opts = ScenarioOptions {
        stack: StackOptions {
            test_hosts: 2,
            step_pause: Duration::from_secs(20),
            session_ttl: Duration::from_secs(2),
            start_deadline: Duration::from_secs(60),
            ..StackOptions::default()
        },
        users: 8,
        warmup: Duration::from_secs(3),
        probes_per_step: 0,
        cut_host: Some(2),
        ..ScenarioOptions::default()
    };
    let stack = Stack::start("hostcut", opts.stack.clone()).await;
    let o = e2e::scenario::run_on(&stack, &opts).await;
    assert_eq!(
        o.first_release.0,
        Some(0),
        "first release: {}",
        o.first_release.1
    );
    let cut = o
        .cut
        .as_ref()
        .expect("host 2 was cut at the first canary step");
    let (lost, elsewhere, unknown) = o.failures_by_host(2);
    eprintln!(
        "host 2 cut {:.1} s into the release: {} requests, failed {lost} on host 2's own \
         instances or objects, {elsewhere} elsewhere, {unknown} unattributed; first: {:?}",
        cut.at.as_secs_f64(),
        o.load.requests,
        o.load.failures.iter().take(5).collect::<Vec<_>>()
    );
    // A release that lost a host rolls back: exit 1, or 3 when the new container on the lost
    // host could not be removed (the release then stays rolling back until a rerun).
    let (code, _, out) = &o.release;
    assert!(matches!(code, Some(1) | Some(3)), "{out}\n{}", o.logs);
    let weights = stack.weights().await.unwrap();
    assert_eq!(weights.get("1.0.0"), Some(&100), "weights {weights:?}");
    if let Some((code, json, out)) = &cut.rerun {
        assert_eq!(*code, Some(1), "rerun after the host returned: {out}");
        assert_eq!(json["state"], "rolled_back", "{json}");
    }
    assert_eq!(
        cut.new_containers_left, 0,
        "1.1.0 containers left on some host"
    );
    assert_eq!(
        elsewhere,
        0,
        "users of the surviving hosts saw failures: {:#?}\n{}",
        o.failures_split(2).1,
        stack.container_logs(60)
    );
    assert_eq!(o.objects_readable, o.objects_checked, "objects lost");
}
