//! Whole releases as CI runs them: the haddock binary against a real locator process and the
//! real Docker Engine, with locally built test images. Containers are removed by drop guards.

mod support;

use locator_wire::api::{InstanceState, ReleaseState};
use std::time::{Duration, Instant};
use support::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_release_replaces_the_old_version_and_removes_its_container() {
    let scene = Scene::new(
        "full",
        &SpecOpts {
            steps: r#"[{ weight = 10 }, { weight = 50 }, { weight = 100 }]"#,
            ..Default::default()
        },
    );
    let (l, service, guard, spec) = scene.parts();

    let first = release(spec, service, "good-1", l);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let r1 = report(&first);
    assert_eq!(r1["outcome"], "released");
    assert_eq!(r1["state"], "done");

    let second = release(spec, service, "good-2", l);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    let r2 = report(&second);
    assert_eq!(r2["from_version"], "good-1");
    assert_eq!(r2["to_version"], "good-2");
    for key in [
        "starting",
        "waiting_healthy",
        "registered",
        "shifting",
        "tag_to_full",
    ] {
        assert!(r2["step_ms"][key].is_u64(), "step_ms.{key} missing: {r2}");
    }
    eprintln!(
        "tag_to_full_ms = {}, steps = {}",
        r2["tag_to_full_ms"], r2["step_ms"]
    );

    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].1, "good-2");
    assert!(containers[0].2, "the new container runs");

    let client = l.client();
    rt().block_on(async {
        let svc = client.service(service).await.unwrap();
        assert_eq!(svc.primary_version.as_deref(), Some("good-2"));
        assert_eq!(svc.weights.get("good-2"), Some(&100));
        let instances = client.instances(service).await.unwrap();
        let live: Vec<_> = instances
            .iter()
            .filter(|i| i.state != InstanceState::Gone)
            .collect();
        assert_eq!(live.len(), 1, "{instances:?}");
        assert_eq!(live[0].state, InstanceState::Ready);
        let history = client.history(Some(service)).await.unwrap();
        assert!(
            history.iter().all(|r| r.state == ReleaseState::Done),
            "{history:?}"
        );
    });

    // Same tag again: nothing to do.
    let again = release(spec, service, "good-2", l);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(report(&again)["outcome"], "already_current");

    // Rollback: back to good-1 with the same steps.
    let back = haddock(
        &["rollback", service, "--spec", spec.to_str().unwrap()],
        Some(l),
    );
    assert_eq!(back.status.code(), Some(0), "{}", text(&back));
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].1, "good-1");
}

/// `Config.Image` and `Config.Env` of a container.
fn image_and_env(name: &str) -> (String, Vec<String>) {
    let out = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{json .Config}}", name])
        .output()
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let env = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    (
        config["Image"].as_str().unwrap_or_default().to_string(),
        env,
    )
}

#[test]
fn a_redeploy_releases_the_same_tag_as_a_new_version_with_the_spec_as_it_is_now() {
    let scene = Scene::on_good_1("redeploy", "[{ weight = 100 }]");
    let (l, service, guard, spec) = scene.parts();
    let spec_arg = spec.to_str().unwrap();
    let before = guard.containers();
    let redeploy = |tag: &str| {
        haddock(
            &[
                "release",
                service,
                tag,
                "--redeploy",
                "--spec",
                spec_arg,
                "--json",
            ],
            Some(l),
        )
    };

    // A tag with haddock's `+N` (or any character Docker refuses) is bad input: nothing moves.
    for bad in ["good-1+1", ".good", "good 1", ""] {
        let out = release(spec, service, bad, l);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out));
        assert_eq!(report(&out)["error"], "bad_input", "{bad:?}");
    }
    assert_eq!(guard.containers(), before);

    // The spec gains an env var: the same tag without --redeploy changes nothing.
    edit_spec(
        spec,
        r#"env = { RUST_LOG = "info" }"#,
        r#"env = { RUST_LOG = "info", MARK = "second" }"#,
    );
    let same = release(spec, service, "good-1", l);
    assert_eq!(
        report(&same)["outcome"],
        "already_current",
        "{}",
        text(&same)
    );
    assert_eq!(guard.containers(), before);

    // --redeploy: a new version good-1+1 from the same image, with the spec as it is now.
    let out = redeploy("good-1");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r = report(&out);
    assert_eq!(r["outcome"], "released");
    assert_eq!(r["from_version"], "good-1");
    assert_eq!(r["to_version"], "good-1+1");
    let containers = guard.containers();
    assert_eq!(
        containers.len(),
        1,
        "the old container is removed: {containers:?}"
    );
    assert_eq!(containers[0].1, "good-1+1");
    assert!(containers[0].2, "the redeployed container runs");
    let (image, env) = image_and_env(&containers[0].0);
    assert_eq!(image, format!("{IMAGE_REPO}:good-1"));
    assert!(env.contains(&"MARK=second".to_string()), "{env:?}");
    assert!(
        env.contains(&"HADDOCK_VERSION=good-1+1".to_string()),
        "{env:?}"
    );
    let client = l.client();
    rt().block_on(async {
        let svc = client.service(service).await.unwrap();
        assert_eq!(svc.primary_version.as_deref(), Some("good-1+1"));
        assert_eq!(svc.weights.get("good-1+1"), Some(&100));
        let history = client.history(Some(service)).await.unwrap();
        assert_eq!(history[0].image, format!("{IMAGE_REPO}:good-1"));
    });

    // Again: good-1+2. Rollback goes back to good-1+1 (made from today's spec, like any
    // rollback), and a redeploy of a tag the service does not run is an ordinary release.
    let out = redeploy("good-1");
    assert_eq!(report(&out)["to_version"], "good-1+2", "{}", text(&out));
    let back = haddock(
        &["rollback", service, "--spec", spec_arg, "--json"],
        Some(l),
    );
    assert_eq!(back.status.code(), Some(0), "{}", text(&back));
    assert_eq!(report(&back)["to_version"], "good-1+1");
    let other = redeploy("good-2");
    assert_eq!(other.status.code(), Some(0), "{}", text(&other));
    assert_eq!(report(&other)["to_version"], "good-2");
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].1, "good-2");

    // `rollback SERVICE VERSION`: any version the service ran, not only the one before.
    let never = haddock(
        &["rollback", service, "9.9.9", "--spec", spec_arg, "--json"],
        Some(l),
    );
    assert_eq!(never.status.code(), Some(2), "{}", text(&never));
    let reason = report(&never)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("newest first: good-2, good-1+1, good-1+2, good-1"),
        "{reason}"
    );
    assert_eq!(
        guard.containers(),
        containers,
        "a refused rollback changed something"
    );
    let back = haddock(
        &[
            "rollback", service, "good-1+2", "--spec", spec_arg, "--json",
        ],
        Some(l),
    );
    assert_eq!(back.status.code(), Some(0), "{}", text(&back));
    assert_eq!(report(&back)["from_version"], "good-2");
    assert_eq!(report(&back)["to_version"], "good-1+2");
}

#[test]
fn a_version_that_never_turns_healthy_fails_and_leaves_the_old_one_untouched() {
    let scene = Scene::new(
        "unhealthy",
        &SpecOpts {
            start_deadline: "2s",
            ..Default::default()
        },
    );
    let (l, service, guard, spec) = scene.parts();
    let first = release(spec, service, "good-1", l);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let client = l.client();
    let before = rt().block_on(client.service(service)).unwrap();

    let bad = haddock(
        &[
            "release",
            service,
            "never-ready",
            "--spec",
            spec.to_str().unwrap(),
        ],
        Some(l),
    );
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("did not become healthy"), "{stderr}");
    assert!(
        stderr.contains("refusing to become ready"),
        "the last log lines are in the error: {stderr}"
    );

    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].1, "good-1");
    rt().block_on(async {
        let after = client.service(service).await.unwrap();
        assert_eq!(after.weights, before.weights);
        assert_eq!(after.primary_version.as_deref(), Some("good-1"));
        let history = client.history(Some(service)).await.unwrap();
        assert_eq!(history[0].state, ReleaseState::Failed);
        assert!(
            client.active_release(service).await.unwrap().is_none(),
            "the lock is free again"
        );
    });
}

#[test]
fn a_new_container_dying_mid_canary_rolls_back() {
    let scene = Scene::on_good_1(
        "dies",
        r#"[{ weight = 50, pause = "6s" }, { weight = 100 }]"#,
    );
    let (l, service, guard, spec) = scene.parts();
    // The `crash` image is ready at once and exits 1.5 s after start: mid-bake.
    let out = release(spec, service, "crash", l);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let r = report(&out);
    assert_eq!(r["outcome"], "rolled_back");
    assert!(
        r["reason"].as_str().unwrap().contains("exited with code 3"),
        "{r}"
    );
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].1, "good-1");
    let client = l.client();
    rt().block_on(async {
        let svc = client.service(service).await.unwrap();
        assert_eq!(svc.weights.get("good-1"), Some(&100));
        assert_eq!(svc.weights.len(), 1);
        assert_eq!(
            client.history(Some(service)).await.unwrap()[0].state,
            ReleaseState::RolledBack
        );
    });
}

#[test]
fn a_killed_haddock_is_resumed_by_running_the_release_again() {
    let scene = Scene::on_good_1(
        "resume",
        r#"[{ weight = 50, pause = "30s" }, { weight = 100 }]"#,
    );
    let (l, service, guard, spec) = scene.parts();
    let client = l.client();

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_haddock"))
        .args([
            "release",
            service,
            "good-2",
            "--spec",
            spec.to_str().unwrap(),
        ])
        .env("HADDOCK_LOCATOR", &l.url)
        .env("HADDOCK_TOKEN", DEPLOY_TOKEN)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rt = rt();
    loop {
        let active = rt.block_on(client.active_release(service)).unwrap();
        if active.is_some_and(|r| r.state == ReleaseState::Shifting) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the release never reached shifting"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL mid-bake
    child.wait().unwrap();

    // Another tag is refused while the release is active (exit 2, names the release).
    let other = release(spec, service, "good-1", l);
    assert_eq!(other.status.code(), Some(2), "{}", text(&other));
    assert_eq!(report(&other)["error"], "release_active");

    // `haddock promote` is recorded for whoever drives the release next.
    let promote = haddock(&["promote", service], Some(l));
    assert_eq!(promote.status.code(), Some(0), "{}", text(&promote));

    // Running the same release again continues it from `shifting`.
    std::thread::sleep(haddock::release::LEASE);
    let t = Instant::now();
    let again = release(spec, service, "good-2", l);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "promote skipped the 30 s bake"
    );
    let containers = guard.containers();
    assert_eq!(
        containers.len(),
        1,
        "exactly one container, no orphans: {containers:?}"
    );
    assert_eq!(containers[0].1, "good-2");
    let svc = rt.block_on(client.service(service)).unwrap();
    assert_eq!(svc.primary_version.as_deref(), Some("good-2"));
}

/// Runs `haddock release SERVICE TAG` through `relay` and SIGKILLs it once the locator has
/// recorded `state` and haddock made its next call; returns the state the locator holds then.
fn kill_release_at(
    spec: &std::path::Path,
    service: &str,
    tag: &str,
    l: &Locator,
    state: ReleaseState,
) -> ReleaseState {
    let relay = CrashRelay::start(&l.url, state);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_haddock"))
        .args(["release", service, tag, "--spec", spec.to_str().unwrap()])
        .env("HADDOCK_LOCATOR", &relay.url)
        .env("HADDOCK_TOKEN", DEPLOY_TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually_blocking(
        &format!("haddock to record `{state}` and make its next call"),
        Duration::from_secs(60),
        || {
            let exited = child.try_wait().unwrap();
            assert!(
                exited.is_none(),
                "haddock exited before `{state}`: {exited:?}"
            );
            relay.holding()
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    rt().block_on(l.client().active_release(service))
        .unwrap()
        .unwrap_or_else(|| panic!("no active release after the kill at `{state}`"))
        .state
}

/// Exactly one container runs, of `version`, and the locator sends everybody to it.
fn assert_settled_on(guard: &DockerGuard, l: &Locator, service: &str, version: &str) {
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "no orphans: {containers:?}");
    assert_eq!(containers[0].1, version, "{containers:?}");
    assert!(containers[0].2, "the container runs: {containers:?}");
    let svc = rt().block_on(l.client().service(service)).unwrap();
    assert_eq!(svc.primary_version.as_deref(), Some(version));
    assert_eq!(svc.weights.get(version), Some(&100), "{:?}", svc.weights);
    assert!(
        rt().block_on(l.client().active_release(service))
            .unwrap()
            .is_none(),
        "the release ended"
    );
}

#[test]
fn haddock_killed_in_every_state_is_finished_by_the_next_run() {
    let scene = Scene::on_good_1("crash", r#"[{ weight = 50 }, { weight = 100 }]"#);
    let (l, service, guard, spec) = scene.parts();
    // Each state in turn, alternating the two good tags: crash there, run the release again.
    let mut current = "good-1";
    // Every state of the happy path but the last (`done` ends the run).
    let states = &ReleaseState::HAPPY_PATH[..ReleaseState::HAPPY_PATH.len() - 1];
    for &state in states {
        let next = if current == "good-1" {
            "good-2"
        } else {
            "good-1"
        };
        let recorded = kill_release_at(spec, service, next, l, state);
        assert_eq!(recorded, state, "killed while the locator held `{state}`");
        let again = release(spec, service, next, l);
        assert_eq!(
            again.status.code(),
            Some(0),
            "re-run after a kill at `{state}`: {}",
            text(&again)
        );
        assert_eq!(report(&again)["state"], "done", "after `{state}`");
        assert_settled_on(guard, l, service, next);
        current = next;
    }
}

#[test]
fn haddock_killed_while_rolling_back_rolls_back_on_the_next_run() {
    let scene = Scene::on_good_1(
        "crash-rb",
        r#"[{ weight = 50, pause = "60s" }, { weight = 100 }]"#,
    );
    let (l, service, guard, spec) = scene.parts();
    // An operator aborts mid-bake; haddock records `rolling_back` and dies right after.
    let client = l.client();
    let recorded = std::thread::scope(|s| {
        s.spawn(|| {
            eventually_blocking("the canary bake", Duration::from_secs(60), || {
                rt().block_on(client.active_release(service))
                    .unwrap()
                    .is_some_and(|r| r.state == ReleaseState::Shifting)
            });
            let abort = haddock(&["abort", service], Some(l));
            assert_eq!(abort.status.code(), Some(0), "{}", text(&abort));
        });
        kill_release_at(spec, service, "good-2", l, ReleaseState::RollingBack)
    });
    assert_eq!(recorded, ReleaseState::RollingBack);

    let again = release(spec, service, "good-2", l);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    let r = report(&again);
    assert_eq!(r["outcome"], "rolled_back", "{r}");
    assert_eq!(r["state"], "rolled_back", "{r}");
    assert_settled_on(guard, l, service, "good-1");
    let history = rt().block_on(client.history(Some(service))).unwrap();
    assert_eq!(history[0].state, ReleaseState::RolledBack, "{history:?}");
}

#[test]
fn a_release_spans_the_local_socket_and_a_tcp_host_with_tls() {
    let tls = TlsDockerHost::start();
    let scene = Scene::new(
        "tls",
        &SpecOpts {
            steps: r#"[{ weight = 50 }, { weight = 100 }]"#,
            more_targets: tls.target(1),
            ..Default::default()
        },
    );
    let (l, service, guard, spec) = scene.parts();
    for tag in ["good-1", "good-2"] {
        let out = release(spec, service, tag, l);
        assert_eq!(out.status.code(), Some(0), "{tag}: {}", text(&out));
        let containers = guard.containers();
        assert_eq!(containers.len(), 2, "one per target: {containers:?}");
        assert!(
            containers
                .iter()
                .all(|(_, v, running)| v == tag && *running),
            "{containers:?}"
        );
        // Each instance was created through its own target's connection.
        let instances = rt().block_on(l.client().instances(service)).unwrap();
        let mut hosts: Vec<_> = instances
            .iter()
            .filter(|i| i.state != InstanceState::Gone && i.version == tag)
            .map(|i| i.docker_host.clone())
            .collect();
        hosts.sort();
        assert_eq!(
            hosts,
            vec![tls.host(), "unix:///var/run/docker.sock".to_string()],
            "{instances:?}"
        );
    }
}

#[test]
fn a_deploy_lock_stops_releases_until_it_is_released() {
    let scene = Scene::on_good_1("lock", "[{ weight = 100 }]");
    let (l, service, guard, spec) = scene.parts();
    let before = guard.containers();
    let lock = |args: &[&str]| {
        let mut all = vec!["lock"];
        all.extend_from_slice(args);
        haddock(&all, Some(l))
    };
    let free = lock(&["status", service, "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&free.stdout).trim(),
        "null",
        "{}",
        text(&free)
    );

    let took = lock(&["acquire", service, "-m", "db migration until 14:00"]);
    assert_eq!(took.status.code(), Some(0), "{}", text(&took));
    let again = lock(&["acquire", service, "-m", "mine now"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(
        text(&again).contains("db migration until 14:00"),
        "{}",
        text(&again)
    );

    // A release is refused before anything changes, and says who holds the lock and why.
    let refused = release(spec, service, "good-2", l);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let r = report(&refused);
    assert_eq!(r["error"], "locked", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("db migration until 14:00"),
        "{r}"
    );
    assert_eq!(guard.containers(), before);
    let status = haddock(&["status", service], Some(l));
    assert!(text(&status).contains("LOCKED"), "{}", text(&status));
    rt().block_on(async {
        let history = l.client().history(Some(service)).await.unwrap();
        assert!(
            history.iter().all(|r| r.to_version != "good-2"),
            "{history:?}"
        );
    });

    let freed = lock(&["release", service]);
    assert_eq!(freed.status.code(), Some(0), "{}", text(&freed));
    let out = release(spec, service, "good-2", l);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(report(&out)["to_version"], "good-2");
}

#[test]
fn plan_shows_what_a_release_would_do_and_changes_nothing() {
    let scene = Scene::on_good_1(
        "plan",
        "[{ weight = 25, pause = \"3s\" }, { weight = 100 }]",
    );
    let (l, service, guard, spec) = scene.parts();
    let spec = spec.to_str().unwrap();
    let before = guard.containers();
    let client = l.client();
    let (revision, releases) = rt().block_on(async {
        (
            client.service(service).await.unwrap().revision,
            client.history(Some(service)).await.unwrap().len(),
        )
    });

    let out = haddock(
        &["plan", service, "good-2", "--spec", spec, "--json"],
        Some(l),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let p = report(&out);
    assert_eq!(p["action"], "release", "{p}");
    assert_eq!(p["from_version"], "good-1");
    assert_eq!(p["to_version"], "good-2");
    assert_eq!(p["images"][0]["detail"], "present", "{p}");
    let start = p["containers"][0]["what"].as_str().unwrap();
    assert!(
        start.starts_with(&format!("{service}-good-2-REL-h0-i0")),
        "{p}"
    );
    let steps: Vec<(u64, u64, u64)> = p["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["weight"].as_u64().unwrap(),
                s["weights"]["good-1"].as_u64().unwrap_or(0),
                s["weights"]["good-2"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(steps, [(25, 75, 25), (100, 0, 100)], "{p}");
    assert_eq!(p["steps"][0]["pause_ms"], 3000);
    assert_eq!(p["drain"][0]["what"], before[0].0.as_str(), "{p}");

    let human = haddock(&["plan", service, "good-2", "--spec", spec], Some(l));
    let human = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(
        human.contains("step   25 %: good-1 75 % / good-2 25 %, bake 3.00s"),
        "{human}"
    );

    // The same tag: nothing to do; an unknown tag: the release's own refusal (exit 2).
    let same = haddock(
        &["plan", service, "good-1", "--spec", spec, "--json"],
        Some(l),
    );
    assert_eq!(
        report(&same)["action"],
        "already_current",
        "{}",
        text(&same)
    );
    let nowhere = haddock(
        &["plan", service, "good-404", "--spec", spec, "--json"],
        Some(l),
    );
    assert_eq!(nowhere.status.code(), Some(2), "{}", text(&nowhere));
    assert_eq!(report(&nowhere)["error"], "unknown_image");
    let redeploy = haddock(
        &[
            "plan",
            service,
            "good-1",
            "--redeploy",
            "--spec",
            spec,
            "--json",
        ],
        Some(l),
    );
    assert_eq!(
        report(&redeploy)["to_version"],
        "good-1+1",
        "{}",
        text(&redeploy)
    );

    // Nothing changed anywhere.
    assert_eq!(guard.containers(), before);
    rt().block_on(async {
        assert_eq!(client.service(service).await.unwrap().revision, revision);
        assert_eq!(client.history(Some(service)).await.unwrap().len(), releases);
    });
}

#[test]
fn status_watch_redraws_until_interrupted_and_shows_what_changed() {
    use std::io::BufRead;
    let scene = Scene::on_good_1("watch", "[{ weight = 100 }]");
    let (l, service, _guard, _spec) = scene.parts();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_haddock"))
        .args(["status", service, "--watch"])
        .env("HADDOCK_LOCATOR", &l.url)
        .env("HADDOCK_TOKEN", DEPLOY_TOKEN)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut frames = 0;
    let mut locked_seen = false;
    while let Some(Ok(line)) = lines.next() {
        if line.contains("(every 1s; Ctrl-C to stop)") {
            frames += 1;
            if frames == 2 {
                // Changed between two frames: the next ones show it without a re-run.
                let took = haddock(&["lock", "acquire", service, "-m", "watch me"], Some(l));
                assert_eq!(took.status.code(), Some(0), "{}", text(&took));
            }
        }
        locked_seen |= line.contains("LOCKED") && line.contains("watch me");
        if locked_seen || frames > 10 {
            break;
        }
    }
    assert!(frames >= 2, "fewer than two frames");
    assert!(locked_seen, "the lock never showed in {frames} frames");
    assert!(
        child.try_wait().unwrap().is_none(),
        "--watch ended by itself"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_step_without_traffic_is_inconclusive_and_the_spec_says_what_follows() {
    // No proxy sends anything to the new version: every bake ends with 0 requests.
    let scene = Scene::on_good_1(
        "inconclusive",
        "[{ weight = 50, pause = \"1s\" }, { weight = 100 }]",
    );
    let (l, service, guard, spec) = scene.parts();
    edit_spec(
        spec,
        "min_requests = 20",
        "min_requests = 20\nextend_inconclusive = \"1s\"\non_inconclusive = \"fail\"",
    );
    let failed = release(spec, service, "good-2", l);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    let r = report(&failed);
    assert_eq!(r["outcome"], "rolled_back", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("step 50 % inconclusive: the new version served 0 of the 20 requests"),
        "{r}"
    );
    assert!(
        text(&failed).contains("too few to judge; baking up to 1.00s more"),
        "{}",
        text(&failed)
    );
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].1, "good-1", "users stay on good-1");

    edit_spec(
        spec,
        "on_inconclusive = \"fail\"",
        "on_inconclusive = \"pass\"",
    );
    let passed = release(spec, service, "good-2", l);
    assert_eq!(passed.status.code(), Some(0), "{}", text(&passed));
    assert!(
        text(&passed).contains("inconclusive: the new version served 0 of the 20 requests it needs to be judged; going on (on_inconclusive = pass)"),
        "{}",
        text(&passed)
    );
    assert_eq!(report(&passed)["to_version"], "good-2");
}

#[test]
fn hooks_gate_a_release_and_hear_about_each_step_and_the_end() {
    let scene = Scene::on_good_1("hooks", "[{ weight = 50 }, { weight = 100 }]");
    let (l, service, guard, spec) = scene.parts();
    let log = scene.dir.path().join("hooks.log");
    let text_now = std::fs::read_to_string(spec).unwrap();
    // Each hook appends what it was told; pre_release fails while the file `block` exists.
    let record = |hook: &str| {
        format!(
            "[\"sh\", \"-c\", \"echo {hook} $HADDOCK_FROM_VERSION $HADDOCK_TO_VERSION $HADDOCK_WEIGHT >> {}\"]",
            log.display()
        )
    };
    let block = scene.dir.path().join("block");
    let hooks = format!(
        "\n[hooks]\npre_release = [\"sh\", \"-c\", \"echo pre $HADDOCK_TO_VERSION >> {log}; test ! -e {block} || {{ echo migrations pending >&2; exit 3; }}\"]\npost_step = {}\npost_release = {}\ntimeout = \"10s\"\n",
        record("step"),
        record("done"),
        log = log.display(),
        block = block.display(),
    );
    std::fs::write(spec, text_now + &hooks).unwrap();

    std::fs::write(&block, "").unwrap();
    let before = guard.containers();
    let stopped = release(spec, service, "good-2", l);
    assert_eq!(stopped.status.code(), Some(2), "{}", text(&stopped));
    let r = report(&stopped);
    assert_eq!(r["error"], "hook_failed", "{r}");
    assert!(
        r["reason"].as_str().unwrap().contains("migrations pending"),
        "{r}"
    );
    assert_eq!(
        guard.containers(),
        before,
        "a failed pre_release changed something"
    );
    rt().block_on(async {
        let history = l.client().history(Some(service)).await.unwrap();
        assert!(
            history.iter().all(|r| r.to_version != "good-2"),
            "{history:?}"
        );
    });

    std::fs::remove_file(&block).unwrap();
    let out = release(spec, service, "good-2", l);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let heard = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        heard.lines().collect::<Vec<_>>(),
        [
            "pre good-2",
            "pre good-2",
            "step good-1 good-2 50",
            "step good-1 good-2 100",
            "done good-1 good-2",
        ],
        "{heard}"
    );
}
