//! The docker and health modules against the real Docker Engine, with locally built test images
//! (no registry). Every container, volume and network is removed by a drop guard.

mod support;

use futures_util::StreamExt;
use haddock::docker::{ContainerPlan, Host};
use haddock::health::{self, NotHealthy, Probe};
use haddock::spec::Spec;
use std::time::{Duration, Instant};
use support::*;

fn spec_for(dir: &std::path::Path, service: &str, opts: &SpecOpts) -> Spec {
    Spec::load(&write_spec(dir, service, opts)).unwrap()
}

#[test]
fn an_unknown_tag_is_bad_input_and_changes_nothing() {
    test_images();
    let service = unique_service("unknown");
    let guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &service, &SpecOpts::default());
    // No locator is running at this address: the tag check comes before anything else.
    let out = haddock(
        &[
            "release",
            &service,
            "no-such-tag",
            "--spec",
            spec.to_str().unwrap(),
            "--locator",
            "http://127.0.0.1:9",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("image {IMAGE_REPO}:no-such-tag not found")),
        "{stderr}"
    );
    assert!(guard.containers().is_empty());

    let json = haddock(
        &[
            "release",
            &service,
            "no-such-tag",
            "--spec",
            spec.to_str().unwrap(),
            "--locator",
            "http://127.0.0.1:9",
            "--json",
        ],
        None,
    );
    assert_eq!(json.status.code(), Some(2));
    let v: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("one JSON object on stdout");
    assert_eq!(v["error"], "unknown_image");
    assert_eq!(v["exit_code"], 2);
}

#[tokio::test]
async fn a_good_container_starts_with_its_labels_and_turns_healthy_fast() {
    test_images();
    let service = unique_service("good");
    let mut guard = DockerGuard::new(&service);
    let net = format!("{service}-net");
    guard.networks.push(net.clone());
    guard.volume(&format!("{service}-cache"));
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(
        dir.path(),
        &service,
        &SpecOpts {
            network: Some(net.clone()),
            volume: Some(format!("{service}-cache")),
            ..Default::default()
        },
    );
    let host = Host::connect(&spec.targets[0], 0).await.unwrap();
    assert_eq!(
        host.image(&spec.image_ref("good-1")).await.unwrap(),
        Some(false)
    );
    assert_eq!(host.image(&spec.image_ref("nope")).await.unwrap(), None);
    host.ensure_network(&net).await.unwrap();
    host.ensure_network(&net).await.unwrap();

    let plan = ContainerPlan::new(&spec, "good-1", "rel-t1", 0, 0);
    let t = Instant::now();
    let id = host.create_and_start(&plan, false).await.unwrap();
    let started = t.elapsed();
    // Idempotent: a resumed run finds the same container.
    assert_eq!(host.create_and_start(&plan, false).await.unwrap(), id);
    let addr = host.address(&id, Some(&net), 8080).await.unwrap();
    let probe = Probe::new(addr, &spec.health);
    health::wait_healthy(&host, &id, &probe, &spec.health, Instant::now())
        .await
        .unwrap()
        .unwrap();
    let healthy = t.elapsed();
    eprintln!("create+start {started:?}, healthy after {healthy:?}");

    let inspect = host.inspect(&id).await.unwrap().unwrap();
    let labels = inspect.config.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels["org.haddock.managed-by"], "haddock");
    assert_eq!(labels["org.haddock.service"], service);
    assert_eq!(labels["org.haddock.version"], "good-1");
    assert_eq!(labels["org.haddock.release"], "rel-t1");
    let hc = inspect.host_config.unwrap();
    assert_eq!(hc.memory, Some(64 * 1024 * 1024));
    assert_eq!(hc.cpu_shares, Some(256));
    let mounts = inspect.mounts.unwrap();
    assert_eq!(
        mounts[0].name.as_deref(),
        Some(format!("{service}-cache").as_str())
    );
    assert_eq!(
        inspect.config.unwrap().cmd.unwrap(),
        ["--listen", "0.0.0.0:8080", "--id", plan.name.as_str()]
    );
    let found = host.find(&service, Some("rel-t1")).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].version.as_str(), found[0].running),
        ("good-1", true)
    );
    let version = reqwest::get(format!("http://{addr}/version"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(version.trim(), "good-1");

    // Events: a killed container is reported as `die`.
    let mut events = Box::pin(host.events(&service, "rel-t1"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::process::Command::new("docker")
        .args(["kill", &id])
        .output()
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.action, "die");
    assert_eq!(ev.instance, plan.name);

    host.stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
    host.stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap(); // gone already is fine
    assert!(host.find(&service, None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_never_ready_container_fails_at_the_deadline_with_its_logs() {
    test_images();
    let service = unique_service("never");
    let _guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(
        dir.path(),
        &service,
        &SpecOpts {
            start_deadline: "2s",
            ..Default::default()
        },
    );
    let host = Host::connect(&spec.targets[0], 0).await.unwrap();
    let plan = ContainerPlan::new(&spec, "never-ready", "rel-t2", 0, 0);
    let id = host.create_and_start(&plan, false).await.unwrap();
    let addr = host.address(&id, None, 8080).await.unwrap();
    let t = Instant::now();
    let r = health::wait_healthy(&host, &id, &Probe::new(addr, &spec.health), &spec.health, t)
        .await
        .unwrap();
    let NotHealthy(reason) = r.unwrap_err();
    assert!(
        t.elapsed() >= Duration::from_secs(2) && t.elapsed() < Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    assert!(
        reason.contains("start deadline") && reason.contains("503"),
        "{reason}"
    );
    let logs = host.logs_tail(&id, 10).await;
    assert!(logs.contains("refusing to become ready"), "{logs}");
    host.remove(&id).await.unwrap();
    assert!(host.find(&service, None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_container_that_crashes_is_dead_not_waited_for() {
    test_images();
    let service = unique_service("crash");
    let _guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(dir.path(), &service, &SpecOpts::default());
    let host = Host::connect(&spec.targets[0], 0).await.unwrap();
    let mut plan = ContainerPlan::new(&spec, "crash", "rel-t3", 0, 0);
    plan.env.push("SVC_CRASH_AFTER_MS=0".into());
    let id = host.create_and_start(&plan, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = health::wait_healthy(
        &host,
        &id,
        &Probe::new("127.0.0.1:9".parse().unwrap(), &spec.health),
        &spec.health,
        Instant::now(),
    )
    .await
    .unwrap();
    let NotHealthy(reason) = r.unwrap_err();
    assert!(reason.contains("exit code 3"), "{reason}");
    host.remove(&id).await.unwrap();
}

/// A second real engine (ci/testhosts.sh: its own dockerd in its own network namespace, TLS with
/// client certificates): haddock's `Host` connects to it over `tcp://` + TLS, starts a container
/// there with a published port, the container answers from the machine at the host's address,
/// and the machine's own engine has no such container.
#[tokio::test]
async fn a_container_started_on_a_test_host_over_tls_answers_at_its_address_and_only_there() {
    test_images();
    let image = format!("{IMAGE_REPO}:good-1");
    // Declared first, dropped last: `down` removes the engine with whatever is left on it.
    let hosts = TestHosts::up(1);
    hosts.load(&[&image]);

    let service = unique_service("testhost");
    let guard = DockerGuard::new(&service); // the machine's engine
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(
        dir.path(),
        &service,
        &SpecOpts {
            more_targets: hosts.target(1, 1),
            ..Default::default()
        },
    );
    assert_eq!(spec.targets[1].host, "tcp://10.213.1.2:2376");
    let machine = Host::connect(&spec.targets[0], 0).await.unwrap();
    let remote = Host::connect(&spec.targets[1], 1).await.unwrap();
    assert_eq!(remote.image(&image).await.unwrap(), Some(false), "loaded");

    let mut plan = ContainerPlan::new(&spec, "good-1", "rel-th", 1, 0);
    let port = 18080;
    plan.publish = vec![(port, 8080)];
    let t = Instant::now();
    let id = remote.create_and_start(&plan, false).await.unwrap();
    let inspect = remote.inspect(&id).await.unwrap().unwrap();
    let labels = inspect.config.unwrap().labels.unwrap();
    assert_eq!(labels["org.haddock.test"], "1");
    assert_eq!(labels["org.haddock.service"], service);

    // Reached from the machine at the test host's address, through haddock's own probe.
    let addr = std::net::SocketAddr::new(hosts.ip(1).into(), port);
    let probe = Probe::new(addr, &spec.health);
    health::wait_healthy(&remote, &id, &probe, &spec.health, Instant::now())
        .await
        .unwrap()
        .unwrap();
    eprintln!("create+start+healthy at {addr} in {:?}", t.elapsed());
    let version = reqwest::get(format!("http://{addr}/version"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(version.trim(), "good-1");

    // Two engines: the test host has the container, the machine's engine does not.
    let there = remote.find(&service, None).await.unwrap();
    assert_eq!(there.len(), 1, "{there:?}");
    assert!(there[0].running);
    assert!(machine.find(&service, None).await.unwrap().is_empty());
    assert!(machine.inspect(&plan.name).await.unwrap().is_none());
    assert!(guard.containers().is_empty(), "the docker CLI agrees");

    remote
        .stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(remote.find(&service, None).await.unwrap().is_empty());
}
