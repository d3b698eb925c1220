//! Two services through one proxy, for real: the proxy is started without `--service` and
//! carries whatever the locator knows, haddock releases both services' optimizers in Docker
//! (each with its own spec, host name, cookie and cache volume), and both canaries run at the
//! same time under load on both hosts.

use std::time::Duration;

use e2e::eventually;
use e2e::load::{verify_objects_at, LoadReport};
use e2e::stack::{release_result, Stack, StackOptions};

/// Every session of `report` was served by instances of `service` only, none switched version,
/// and both versions served some.
fn served_by_its_own_service(report: &LoadReport, service: &str, why: &str) {
    let own = |instance: &String| {
        instance
            .strip_prefix(service)
            .is_some_and(|rest| rest.starts_with("-1."))
    };
    let strays: Vec<&String> = report
        .sessions
        .iter()
        .flat_map(|s| &s.instances)
        .filter(|i| !own(i))
        .collect();
    assert!(
        strays.is_empty(),
        "{service}'s users reached {strays:?}\n{why}"
    );
    assert_eq!(
        report.failed, 0,
        "{service}: failed {:?}\n{why}",
        report.failures
    );
    assert_eq!(
        report.sessions_switched(),
        0,
        "{service}: a session switched"
    );
    let seen: std::collections::BTreeSet<&str> = report
        .sessions
        .iter()
        .flat_map(|s| s.versions.iter().map(String::as_str))
        .collect();
    assert!(
        seen.contains("1.0.0") && seen.contains("1.1.0"),
        "{service}'s sessions saw {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_services_release_at_once_through_one_proxy_and_neither_sees_the_other() {
    let stack = Stack::start(
        "two",
        StackOptions {
            second_service: true,
            // Each canary's window (two steps) is 20 s: room for the other release's
            // containers to start on a busy machine before both must be mid-canary.
            step_pause: Duration::from_secs(10),
            session_ttl: Duration::from_secs(3),
            start_deadline: Duration::from_secs(20),
            ..StackOptions::default()
        },
    )
    .await;
    let second = stack.second.clone().expect("a second service");
    let host = stack.host.clone().expect("the first service's host");

    // Neither service exists when the proxy starts: each is carried from its first release.
    for (service, spec) in [
        (&stack.service, &stack.spec_path),
        (&second.service, &second.spec_path),
    ] {
        let cmd = stack.release_command_of(service, spec, "1.0.0");
        let (code, _, out) = tokio::task::block_in_place(|| {
            let mut cmd = cmd;
            release_result(&cmd.output().expect("haddock runs"))
        });
        assert_eq!(code, Some(0), "{service} 1.0.0: {out}\n{}", stack.logs());
    }
    let http = reqwest::Client::new();
    let unknown = http
        .get(format!("{}/version", stack.proxy_url))
        .header("host", "nobody.test")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404, "a host no service declares");
    assert!(unknown.text().await.unwrap().contains("unknown_host"));

    let (control_a, load_a) = stack.light_load();
    let (control_b, load_b) = stack.light_load_of_second();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Both canaries at once, each with its own weights.
    let release = |service: &str, spec: &std::path::Path| {
        let mut cmd = stack.release_command_of(service, spec, "1.1.0");
        tokio::task::spawn_blocking(move || cmd.output())
    };
    let release_a = release(&stack.service, &stack.spec_path);
    let release_b = release(&second.service, &second.spec_path);
    let locator = locator::client::Client::new(&stack.locator_url, Some(stack.read_token.clone()));
    let canary = |w: &std::collections::BTreeMap<String, u8>| {
        w.get("1.1.0").is_some_and(|v| *v > 0 && *v < 100)
    };
    let both = eventually(
        "both services mid-canary at the same moment",
        Duration::from_secs(90),
        || async {
            let a = locator.service(&stack.service).await.ok()?.weights;
            let b = locator.service(&second.service).await.ok()?.weights;
            (canary(&a) && canary(&b)).then_some((a, b))
        },
    )
    .await;
    let (code_a, _, out_a) = release_result(&release_a.await.unwrap().unwrap());
    let (code_b, _, out_b) = release_result(&release_b.await.unwrap().unwrap());
    control_a.stop();
    control_b.stop();
    let (users_a, users_b) = (load_a.await.unwrap(), load_b.await.unwrap());
    let why = format!("{out_a}\n{out_b}\n{}", stack.logs());
    assert_eq!(code_a, Some(0), "{} 1.1.0: {why}", stack.service);
    assert_eq!(code_b, Some(0), "{} 1.1.0: {why}", second.service);

    served_by_its_own_service(&users_a, &stack.service, &why);
    served_by_its_own_service(&users_b, &second.service, &why);
    for (users, host) in [(&users_a, host.as_str()), (&users_b, second.host.as_str())] {
        assert!(users.requests > 200, "too little load on {host}");
        let readable = verify_objects_at(&stack.proxy_url, Some(host), &users.objects).await;
        assert_eq!(readable, users.objects.len(), "objects lost at {host}");
    }
    // Two cache volumes: what one service stores is not the other's. (The two loads' users
    // are seeded alike and store the same keys, so a key of their own is put here.)
    let key = format!("only-at-{}", stack.service);
    let object = |method: reqwest::Method, host: &str| {
        http.request(method, format!("{}/v1/objects/{key}", stack.proxy_url))
            .header("host", host)
            .bearer_auth(&stack.write_token)
    };
    let put = object(reqwest::Method::PUT, &host)
        .body(vec![7u8; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
    let at = |host: String| {
        let req = object(reqwest::Method::GET, &host);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(at(host.clone()).await, 200);
    assert_eq!(
        at(second.host.clone()).await,
        404,
        "{} serves what {} stored",
        second.service,
        stack.service
    );

    // One table, one cookie and one set of series per service on the proxy.
    let routing: serde_json::Value = http
        .get(format!("{}/routing", stack.proxy_admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut carried: Vec<&str> = routing["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["table"]["service"].as_str())
        .collect();
    carried.sort_unstable();
    assert_eq!(carried, [stack.service.as_str(), second.service.as_str()]);
    let metrics = http
        .get(format!("{}/metrics", stack.proxy_admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for service in [&stack.service, &second.service] {
        let series = format!("haddock_proxy_sessions_created_total{{service=\"{service}\"}}");
        assert!(metrics.contains(&series), "no {series} in\n{metrics}");
    }
    eprintln!(
        "two services through one proxy: both mid-canary at {:?} / {:?}; {} + {} requests, {} + {} failed, {} + {} sessions",
        both.0,
        both.1,
        users_a.requests,
        users_b.requests,
        users_a.failed,
        users_b.failed,
        users_a.sessions.len(),
        users_b.sessions.len()
    );
}
