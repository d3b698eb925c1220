//! Releases over several Docker hosts with the real haddock binary: an unreachable target, and
//! the machine's engine plus a test host (`ci/testhosts.sh`) started host batch by host batch,
//! each instance registered at its host's address and published port.

mod support;

use locator_wire::api::{InstanceState, ReleaseState};
use support::*;

#[tokio::test]
async fn an_unreachable_target_fails_the_release_at_once_naming_it_and_changes_nothing() {
    test_images();
    let locator = Locator::start();
    let service = unique_service("unreach");
    let guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the engine of the second target is down.
    let spec = write_spec(
        dir.path(),
        &service,
        &SpecOpts {
            more_targets: "\n[[targets]]\nhost = \"tcp://127.0.0.1:1\"\n".into(),
            ..Default::default()
        },
    );
    let out = release(&spec, &service, "good-1", &locator);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let v = report(&out);
    assert_eq!(v["error"], "docker", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("tcp://127.0.0.1:1"),
        "the error names the host: {v}"
    );
    assert!(
        guard.containers().is_empty(),
        "nothing started on the machine"
    );
    let history = locator.client().history(Some(&service)).await.unwrap();
    assert!(history.is_empty(), "no release recorded: {history:?}");
}

#[tokio::test]
async fn hosts_start_batch_by_batch_at_their_address_and_a_failing_batch_fails_everywhere() {
    test_images();
    // Declared first, dropped last: `down` removes the engine with whatever is left on it.
    let hosts = TestHosts::up(1);
    let good1 = format!("{IMAGE_REPO}:good-1");
    let never = format!("{IMAGE_REPO}:never-ready");
    hosts.load(&[&good1, &never]);
    // On the test host `good-2` is an image that never turns ready: that host fails its gate.
    let tag = hosts.docker(
        1,
        &["tag".into(), never.clone(), format!("{IMAGE_REPO}:good-2")],
    );
    assert!(tag.status.success(), "{}", text(&tag));

    let locator = Locator::start();
    let service = unique_service("batches");
    let guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        &service,
        &SpecOpts {
            more_targets: format!("{}address = \"{}\"\n", hosts.target(1, 1), hosts.ip(1)),
            // The machine's side of host 1's link: where the test host reaches the machine.
            address: Some(hosts.machine_ip(1).to_string()),
            max_parallel_hosts: 1,
            start_deadline: "5s",
            ..Default::default()
        },
    );

    // good-1: the machine's batch is healthy before the test host's starts.
    let out = release(&spec, &service, "good-1", &locator);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("host batch 1/2 healthy (unix:///var/run/docker.sock)"),
        "{stderr}"
    );
    let client = locator.client();
    let instances = client.instances(&service).await.unwrap();
    let remote = instances
        .iter()
        .find(|i| i.docker_host == hosts.host(1))
        .unwrap_or_else(|| panic!("no instance on the test host: {instances:#?}"));
    // Registered at the host's address and the port Docker published: reachable from here.
    let prefix = format!("{}:", hosts.ip(1));
    assert!(remote.address.starts_with(&prefix), "{remote:?}");
    let body = reqwest::get(format!("http://{}/version", remote.address))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body.trim(), "good-1");
    let local = instances
        .iter()
        .find(|i| i.docker_host == "unix:///var/run/docker.sock")
        .expect("an instance on the machine");
    assert!(
        local
            .address
            .starts_with(&format!("{}:", hosts.machine_ip(1))),
        "the machine's instance at its target's address: {local:?}"
    );

    // good-2 never turns ready on the test host (the second batch): the release fails, and the
    // machine's good-2 container, healthy in the first batch, is removed too.
    let out = release(&spec, &service, "good-2", &locator);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(report(&out)["state"], "failed", "{}", text(&out));
    let history = client.history(Some(&service)).await.unwrap();
    assert_eq!(history[0].state, ReleaseState::Failed, "{history:?}");
    assert!(
        history[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&hosts.host(1))),
        "the reason names the host: {:?}",
        history[0].reason
    );
    let left: Vec<_> = guard
        .containers()
        .into_iter()
        .filter(|(_, v, _)| v == "good-2")
        .collect();
    assert!(left.is_empty(), "good-2 left on the machine: {left:?}");
    let remote_left = hosts.docker(
        1,
        &[
            "ps".into(),
            "-aq".into(),
            "--filter".into(),
            "label=org.haddock.version=good-2".into(),
        ],
    );
    assert!(
        String::from_utf8_lossy(&remote_left.stdout)
            .trim()
            .is_empty(),
        "good-2 left on the test host"
    );
    let weights = client.service(&service).await.unwrap().weights;
    assert_eq!(weights.get("good-1"), Some(&100), "{weights:?}");
    let ready = client
        .instances(&service)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state == InstanceState::Ready)
        .count();
    assert_eq!(ready, 2, "good-1 still serves on both hosts");
}
