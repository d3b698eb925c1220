//! Operator controls and drivers, end to end: the haddock binary against a real locator
//! process and the real Docker Engine. Who may drive a release (one process, guaranteed), and
//! what `abort`, `pause`, `resume`, `promote`, `manual = true` and `auto_rollback = false` do
//! in each state of a release.

mod support;

use locator_wire::api::{
    InstanceState, NewRelease, Release, ReleaseState, ReleaseUpdate, ServiceSpec, SessionReport,
    SessionSettings, VersionTraffic,
};
use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `haddock VERB SERVICE [TAG] --spec SPEC` in the background, its output kept for the end.
fn spawn(args: &[&str], spec: &std::path::Path, l: &Locator) -> Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_haddock"))
        .args(args)
        .args(["--spec", spec.to_str().unwrap()])
        .env("HADDOCK_LOCATOR", &l.url)
        .env("HADDOCK_TOKEN", DEPLOY_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a background haddock (at most `timeout`, then kills it) and returns its output.
fn finish(child: Child, timeout: Duration) -> std::process::Output {
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    let watchdog = std::thread::spawn(move || {
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                return false;
            }
        }
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        true
    });
    let out = child.wait_with_output().unwrap();
    assert!(
        !watchdog.join().unwrap(),
        "haddock did not finish within {timeout:?}: {}",
        text(&out)
    );
    out
}

/// The active release of `service` once `check` holds for it.
fn active_when(
    l: &Locator,
    service: &str,
    what: &str,
    check: impl Fn(&Release) -> bool,
) -> Release {
    let client = l.client();
    let rt = rt();
    let mut found = None;
    eventually_blocking(what, Duration::from_secs(60), || {
        found = rt
            .block_on(client.active_release(service))
            .unwrap()
            .filter(|r| check(r));
        found.is_some()
    });
    found.unwrap()
}

/// Reports, as a proxy would, `live` sessions on `instance` (and `traffic` by version).
fn report_sessions(
    l: &Locator,
    service: &str,
    instance: Option<&str>,
    live: u64,
    traffic: &[(&str, u64, u64)],
) {
    let proxy = locator_wire::client::Client::new(&l.url, Some("test-proxy".into()));
    let report = SessionReport {
        proxy_id: "test-proxy-1".into(),
        service: service.into(),
        instances: instance
            .map(|id| {
                BTreeMap::from([(
                    id.to_string(),
                    locator_wire::api::InstanceLoad {
                        live_sessions: live,
                        in_flight: 0,
                    },
                )])
            })
            .unwrap_or_default(),
        versions: traffic
            .iter()
            .map(|(v, requests, errors)| {
                (
                    v.to_string(),
                    VersionTraffic {
                        requests: *requests,
                        responses_5xx: *errors,
                        p99_ms: 1.0,
                    },
                )
            })
            .collect(),
        seq: 0,
        base: None,
    };
    rt().block_on(proxy.report_sessions(&report)).unwrap();
}

/// Starts the release of good-2 while a proxy holds a live session on good-1's instance (so
/// the drain waits for it), and returns once the release is promoted and draining: the
/// running haddock and good-1's instance.
fn release_good_2_until_draining(
    l: &Locator,
    service: &str,
    spec: &std::path::Path,
) -> (Child, locator_wire::api::Instance) {
    let old = rt()
        .block_on(l.client().instances(service))
        .unwrap()
        .into_iter()
        .find(|i| i.state == InstanceState::Ready)
        .unwrap();
    report_sessions(l, service, Some(&old.id), 1, &[]);
    let release = spawn(&["release", service, "good-2"], spec, l);
    active_when(l, service, "the old version to drain", |r| {
        r.state == ReleaseState::Draining
    });
    (release, old)
}

/// After a rollback from the promoted good-2: every new session on good-1 again, its
/// instance `old_id` ready, the release recorded rolled back, good-1's container never
/// stopped and good-2's gone.
fn back_on_good_1(l: &Locator, service: &str, old_id: &str, guard: &DockerGuard) {
    let client = l.client();
    rt().block_on(async {
        let svc = client.service(service).await.unwrap();
        assert_eq!(svc.weights, BTreeMap::from([("good-1".to_string(), 100)]));
        assert_eq!(svc.primary_version.as_deref(), Some("good-1"));
        let back = client.instance(old_id).await.unwrap();
        assert_eq!(back.state, InstanceState::Ready, "the old instance is back");
        assert_eq!(
            client.history(Some(service)).await.unwrap()[0].state,
            ReleaseState::RolledBack
        );
    });
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].1, "good-1");
    assert!(containers[0].2, "the old container never stopped");
}

#[test]
fn two_haddocks_at_a_lapsed_lease_drive_the_release_once() {
    let scene = Scene::on_good_1(
        "race",
        r#"[{ weight = 50, pause = "30s" }, { weight = 100 }]"#,
    );
    let (l, service, guard, spec) = scene.parts();
    let client = l.client();
    for (round, tag) in ["good-2", "good-1", "good-2"].into_iter().enumerate() {
        // A driver killed mid-bake: its lease lapses after LEASE.
        let mut first = spawn(&["release", service, tag], spec, l);
        let rec = active_when(l, service, "the release to reach shifting", |r| {
            r.state == ReleaseState::Shifting
        });
        first.kill().unwrap();
        first.wait().unwrap();
        // Skip the 30 s bake for whoever drives next.
        let promote = haddock(&["promote", service], Some(l));
        assert_eq!(promote.status.code(), Some(0), "{}", text(&promote));
        std::thread::sleep(haddock::release::LEASE);

        // Two processes find the lease lapsed at the same moment.
        let a = spawn(&["resume", service], spec, l);
        let b = spawn(&["resume", service], spec, l);
        let outs = [
            finish(a, Duration::from_secs(60)),
            finish(b, Duration::from_secs(60)),
        ];
        let drove: Vec<&std::process::Output> = outs
            .iter()
            .filter(|o| String::from_utf8_lossy(&o.stdout).contains("→ done"))
            .collect();
        assert_eq!(
            drove.len(),
            1,
            "round {round}: exactly one process drives:\n{}\n---\n{}",
            text(&outs[0]),
            text(&outs[1])
        );
        assert_eq!(drove[0].status.code(), Some(0), "{}", text(drove[0]));
        let other = outs
            .iter()
            .find(|o| !String::from_utf8_lossy(&o.stdout).contains("→ done"))
            .unwrap();
        let said = text(other);
        // Either it lost the race for the lease (exit 2), or it saw the winner's fresh lease
        // before trying (exit 0, nothing to do): both say who drives, neither moved anything.
        assert!(said.contains("driven by"), "round {round}: {said}");
        assert!(
            !said.contains(" → "),
            "round {round}: it made no move: {said}"
        );
        let done = rt().block_on(client.release(&rec.id)).unwrap();
        assert_eq!(done.state, ReleaseState::Done, "round {round}");
        let containers = guard.containers();
        assert_eq!(containers.len(), 1, "round {round}: {containers:?}");
        assert_eq!(containers[0].1, tag, "round {round}");
    }
}

#[test]
fn abort_after_the_promotion_sends_users_back_to_the_old_version() {
    let scene = Scene::on_good_1_with(
        "late-abort",
        &SpecOpts {
            steps: r#"[{ weight = 50 }, { weight = 100 }]"#,
            max_drain: "60s",
            ..Default::default()
        },
    );
    let (l, service, guard, spec) = scene.parts();
    let (release, old) = release_good_2_until_draining(l, service, spec);
    let abort = haddock(&["abort", service], Some(l));
    assert_eq!(abort.status.code(), Some(0), "{}", text(&abort));
    let out = finish(release, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("aborted by an operator"),
        "{}",
        text(&out)
    );

    back_on_good_1(l, service, &old.id, guard);
}

#[test]
fn abort_while_the_new_version_starts_stops_at_once() {
    let scene = Scene::on_good_1_with(
        "early-abort",
        &SpecOpts {
            start_deadline: "120s",
            ..Default::default()
        },
    );
    let (l, service, guard, spec) = scene.parts();
    // `never-ready` never passes its probe: without the abort this waits 120 s.
    let release = spawn(&["release", service, "never-ready"], spec, l);
    active_when(l, service, "the new container to be waited on", |r| {
        r.state == ReleaseState::WaitingHealthy
    });
    let abort = haddock(&["abort", service], Some(l));
    assert_eq!(abort.status.code(), Some(0), "{}", text(&abort));
    let out = finish(release, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("aborted by an operator at waiting_healthy"),
        "{said}"
    );
    let client = l.client();
    let last = rt().block_on(client.history(Some(service))).unwrap()[0].clone();
    assert_eq!(last.state, ReleaseState::Failed);
    assert!(last.reason.unwrap_or_default().contains("aborted"));
    let containers = guard.containers();
    assert_eq!(
        containers.len(),
        1,
        "the new container is gone: {containers:?}"
    );
    assert_eq!(containers[0].1, "good-1");
}

#[test]
fn controls_that_mean_nothing_in_a_state_are_refused_with_the_reason() {
    // A release record walked by hand to `removing` (no containers needed: the locator and the
    // CLI decide), then finished.
    let l = Locator::start();
    let client = l.client();
    let service = unique_service("refused");
    let rt = rt();
    let id = rt.block_on(async {
        client
            .put_service(
                &service,
                &ServiceSpec {
                    sessions: SessionSettings {
                        cookie_name: "hd".into(),
                        idle_ttl_ms: 1000,
                        max_drain_ms: 1000,
                    },
                    routes: Default::default(),
                },
            )
            .await
            .unwrap();
        let r = client
            .create_release(&NewRelease {
                service: service.clone(),
                from_version: Some("1".into()),
                to_version: "2".into(),
                image: "img:2".into(),
                who: "test".into(),
            })
            .await
            .unwrap();
        use ReleaseState::*;
        for (from, to) in [
            (Validating, Starting),
            (Starting, WaitingHealthy),
            (WaitingHealthy, Registered),
            (Registered, Shifting),
            (Shifting, Promoted),
        ] {
            let step = ReleaseUpdate {
                expect_state: Some(from),
                state: Some(to),
                ..Default::default()
            };
            client.update_release(&r.id, &step).await.unwrap();
        }
        r.id
    });
    let move_to = |from, to| {
        let step = ReleaseUpdate {
            expect_state: Some(from),
            state: Some(to),
            ..Default::default()
        };
        rt.block_on(client.update_release(&id, &step)).unwrap();
    };
    // Promoted: no canary step left to pause or promote.
    for verb in ["pause", "promote"] {
        let out = haddock(&[verb, &service], Some(&l));
        assert_eq!(out.status.code(), Some(2), "{verb}: {}", text(&out));
        assert!(text(&out).contains("promoted"), "{verb}: {}", text(&out));
    }
    move_to(ReleaseState::Promoted, ReleaseState::Draining);
    move_to(ReleaseState::Draining, ReleaseState::Removing);
    let out = haddock(&["abort", &service], Some(&l));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("removing") && said.contains("nothing to go back to"),
        "{said}"
    );
    let rec = rt.block_on(client.release(&id)).unwrap();
    assert_eq!(rec.control, None, "nothing was recorded");
    move_to(ReleaseState::Removing, ReleaseState::Done);
    let out = haddock(&["abort", &id], Some(&l));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("done"), "{}", text(&out));
    // A second driver's stale move is refused, naming both states.
    let stale = ReleaseUpdate {
        expect_state: Some(ReleaseState::Shifting),
        state: Some(ReleaseState::Promoted),
        ..Default::default()
    };
    let e = rt.block_on(client.update_release(&id, &stale)).unwrap_err();
    assert_eq!(e.code(), Some("state_conflict"), "{e}");
    assert!(
        e.to_string().contains("done") && e.to_string().contains("shifting"),
        "{e}"
    );
}

#[test]
fn pause_freezes_the_bake_and_resume_continues_it() {
    let scene = Scene::on_good_1(
        "pause",
        r#"[{ weight = 50, pause = "3s" }, { weight = 100 }]"#,
    );
    let (l, service, _guard, spec) = scene.parts();
    let release = spawn(&["release", service, "good-2"], spec, l);
    let baking = active_when(l, service, "the bake to begin", |r| {
        r.state == ReleaseState::Shifting && r.status.bake.is_some()
    });
    let pause = haddock(&["pause", service], Some(l));
    assert_eq!(pause.status.code(), Some(0), "{}", text(&pause));
    // Twice the pause: an unfrozen timer would have promoted by now.
    std::thread::sleep(Duration::from_secs(6));
    let held = rt().block_on(l.client().release(&baking.id)).unwrap();
    assert_eq!(held.state, ReleaseState::Shifting, "paused: {held:?}");
    assert_eq!(held.step, 0);
    let bake = held.status.bake.clone().expect("the bake is shown");
    assert_eq!(bake.until_ms, None, "no end while paused: {bake:?}");
    assert!(
        bake.remaining_ms > 0 && bake.remaining_ms < 3000,
        "the rest of the pause is frozen: {bake:?}"
    );
    let resumed_at = Instant::now();
    let resume = haddock(&["resume", service], Some(l));
    assert_eq!(resume.status.code(), Some(0), "{}", text(&resume));
    let out = finish(release, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        resumed_at.elapsed() >= Duration::from_millis(bake.remaining_ms.saturating_sub(500)),
        "the bake went on for what was left of it"
    );
    let done = rt().block_on(l.client().release(&baking.id)).unwrap();
    assert_eq!(done.state, ReleaseState::Done);
}

#[test]
fn a_manual_rollout_waits_for_promote() {
    // The first release (good-1, no old version) goes through without a promote.
    let scene = Scene::on_good_1_with(
        "manual",
        &SpecOpts {
            steps: r#"[{ weight = 50 }, { weight = 100 }]"#,
            manual: true,
            ..Default::default()
        },
    );
    let (l, service, _guard, spec) = scene.parts();
    let release = spawn(&["release", service, "good-2"], spec, l);
    let waiting = active_when(l, service, "the rollout to wait for promote", |r| {
        r.status.waiting_for.as_deref() == Some("promote")
    });
    assert_eq!(waiting.state, ReleaseState::Shifting);
    let svc = rt().block_on(l.client().service(service)).unwrap();
    assert_eq!(
        svc.weights.get("good-2"),
        Some(&50),
        "held at the canary weight"
    );
    let promote = haddock(&["promote", service], Some(l));
    assert_eq!(promote.status.code(), Some(0), "{}", text(&promote));
    let out = finish(release, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let svc = rt().block_on(l.client().service(service)).unwrap();
    assert_eq!(svc.primary_version.as_deref(), Some("good-2"));
}

#[test]
fn without_auto_rollback_a_breach_pauses_until_an_operator_decides() {
    let scene = Scene::on_good_1_with(
        "breach",
        &SpecOpts {
            steps: r#"[{ weight = 50, pause = "2s" }, { weight = 100 }]"#,
            auto_rollback: false,
            ..Default::default()
        },
    );
    let (l, service, guard, spec) = scene.parts();
    let release = spawn(&["release", service, "good-2"], spec, l);
    let baking = active_when(l, service, "the bake to begin", |r| r.status.bake.is_some());
    // Half the new version's answers are 5xx (the spec allows 5 %).
    report_sessions(
        l,
        service,
        None,
        0,
        &[("good-2", 100, 50), ("good-1", 100, 0)],
    );
    active_when(l, service, "the breach to pause the bake", |r| {
        r.status.bake.as_ref().is_some_and(|b| b.until_ms.is_none())
    });
    // Well past the 2 s pause, still at the canary weight.
    std::thread::sleep(Duration::from_secs(3));
    let held = rt().block_on(l.client().release(&baking.id)).unwrap();
    assert_eq!(held.state, ReleaseState::Shifting, "{held:?}");
    let analysis = held.status.analysis.clone().unwrap_or_default();
    assert!(analysis.to_string().contains("5xx"), "{analysis}");
    let abort = haddock(&["abort", service], Some(l));
    assert_eq!(abort.status.code(), Some(0), "{}", text(&abort));
    let out = finish(release, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("analysis breach, paused"),
        "{}",
        text(&out)
    );
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].1, "good-1");
}

/// How long from a breach to every new session on the old version again: a 5xx burst reported
/// by a proxy, and the new container killed. Prints the figures (docs/haddock.md keeps them);
/// asserts only that each release rolled back.
#[test]
fn reaction_time_from_a_breach_to_users_back_on_the_old_version() {
    let scene = Scene::on_good_1(
        "reaction",
        r#"[{ weight = 50, pause = "60s" }, { weight = 100 }]"#,
    );
    let (l, service, guard, spec) = scene.parts();
    let client = l.client();
    let rt = rt();
    let mut figures = Vec::new();
    for (round, cause) in ["5xx", "5xx", "5xx", "kill", "kill"]
        .into_iter()
        .enumerate()
    {
        let release = spawn(&["release", service, "good-2"], spec, l);
        active_when(l, service, "the bake to begin", |r| r.status.bake.is_some());
        let t0 = Instant::now();
        match cause {
            "5xx" => {
                // Cumulative figures per proxy: each round reports more than the last.
                let n = 1000 * (round as u64 + 1);
                report_sessions(
                    l,
                    service,
                    None,
                    0,
                    &[("good-2", n, n / 2), ("good-1", n, 0)],
                );
            }
            _ => {
                let new = guard
                    .containers()
                    .into_iter()
                    .find(|c| c.1 == "good-2")
                    .expect("the new container");
                let killed = std::process::Command::new("docker")
                    .args(["kill", &new.0])
                    .output()
                    .unwrap();
                assert!(killed.status.success(), "{}", text(&killed));
            }
        }
        eventually_blocking("users back on good-1", Duration::from_secs(30), || {
            rt.block_on(client.service(service))
                .is_ok_and(|s| s.weights.get("good-1") == Some(&100))
        });
        let took = t0.elapsed();
        let out = finish(release, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        eprintln!("reaction to {cause}: {} ms", took.as_millis());
        figures.push((cause, took));
    }
    for cause in ["5xx", "kill"] {
        let mut ms: Vec<u128> = figures
            .iter()
            .filter(|f| f.0 == cause)
            .map(|f| f.1.as_millis())
            .collect();
        ms.sort();
        eprintln!(
            "reaction to {cause}: median {} ms of {ms:?}",
            ms[ms.len() / 2]
        );
    }
}

#[test]
fn a_breach_right_after_the_promotion_sends_users_back_to_the_old_version() {
    let scene = Scene::on_good_1_with(
        "late-breach",
        &SpecOpts {
            steps: r#"[{ weight = 50 }, { weight = 100 }]"#,
            max_drain: "60s",
            ..Default::default()
        },
    );
    let (l, service, guard, spec) = scene.parts();
    edit_spec(
        spec,
        "min_requests = 20",
        "min_requests = 20\npost_promotion = \"30s\"",
    );
    let client = l.client();
    let (release, old) = release_good_2_until_draining(l, service, spec);
    // As a proxy would report it: the promoted version now answers half its requests with
    // 5xx (cumulative counters, growing), while the old instance still holds a session.
    // A proxy reports every 100 ms, until the release ends (or 30 s pass).
    for n in 1..=300 {
        report_sessions(l, service, Some(&old.id), 1, &[("good-2", n * 40, n * 20)]);
        let state = rt().block_on(client.history(Some(service))).unwrap()[0].state;
        if state.is_terminal() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = finish(release, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("after the promotion: version good-2 answered 50.0 % 5xx"),
        "{}",
        text(&out)
    );
    back_on_good_1(l, service, &old.id, guard);
}
