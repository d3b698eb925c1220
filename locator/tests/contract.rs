//! The store contract: one suite of behaviour, run over HTTP against both stores.

use futures_util::StreamExt;
use locator::api::*;
use locator::client::{Client, ClientError};
use locator::store::Store;
use locator::testing::{self, eventually, TestLocator, PROXY_TOKEN};
use std::collections::BTreeMap;
use std::time::Duration;

const TTL: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(15);

fn spec(idle_ttl_ms: u64) -> ServiceSpec {
    ServiceSpec {
        sessions: SessionSettings {
            cookie_name: "haddock".into(),
            idle_ttl_ms,
            max_drain_ms: 60_000,
        },
        routes: Default::default(),
    }
}

fn instance(id: &str, version: &str, state: InstanceState) -> RegisterInstance {
    RegisterInstance {
        id: id.into(),
        service: "svc".into(),
        version: version.into(),
        address: "127.0.0.1:8080".into(),
        docker_host: "unix:///var/run/docker.sock".into(),
        container_id: format!("c-{id}"),
        labels: BTreeMap::from([("release".to_string(), "r1".to_string())]),
        state,
    }
}

fn weights(pairs: &[(&str, u8)]) -> WeightsUpdate {
    WeightsUpdate {
        weights: pairs.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
        primary_version: None,
    }
}

#[track_caller]
fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => (status.as_u16(), code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Sorts a snapshot's lists so that two views can be compared.
/// A snapshot in a canonical order, without heartbeat times: those are held in the locator's
/// memory, not sent as events (a watcher's view keeps the recorded ones).
fn normal(mut s: Snapshot) -> Snapshot {
    s.services.sort_by(|a, b| a.name.cmp(&b.name));
    s.instances.sort_by(|a, b| a.id.cmp(&b.id));
    for i in &mut s.instances {
        i.last_heartbeat = 0;
    }
    s.releases.sort_by(|a, b| a.id.cmp(&b.id));
    s
}

/// A watcher that applies every event to its own snapshot, as proxies do.
fn follow(client: Client) -> tokio::sync::watch::Receiver<Snapshot> {
    let (tx, rx) = tokio::sync::watch::channel(Snapshot::default());
    tokio::spawn(async move {
        let mut events = Box::pin(client.watch(None).await.expect("watch"));
        let mut view = Snapshot::default();
        while let Some(Ok(event)) = events.next().await {
            view.apply(&event);
            if tx.send(view.clone()).is_err() {
                return;
            }
        }
    });
    rx
}

async fn suite<S: Store>(loc: &TestLocator<S>) {
    let c = loc.deploy();
    let proxy = loc.client(PROXY_TOKEN);
    let watcher = follow(loc.client(testing::READ_TOKEN));

    // Services.
    let svc = c.put_service("svc", &spec(1000)).await.unwrap();
    assert_eq!(svc.name, "svc");
    assert!(svc.weights.is_empty());
    let same = c.put_service("svc", &spec(1000)).await.unwrap();
    assert_eq!(
        same.revision, svc.revision,
        "re-putting the same spec is a no-op"
    );
    assert_eq!(c.services().await.unwrap().len(), 1);
    assert_eq!(
        code(c.service("nope").await),
        (
            404,
            "unknown_service".into(),
            "unknown service `nope`".into()
        )
    );

    // Weights need ready versions; nothing changes on refusal.
    let (status, err, _) = code(c.set_weights("svc", &weights(&[("1", 100)]), None).await);
    assert_eq!((status, err.as_str()), (400, "invalid_weights"));
    assert_eq!(c.service("svc").await.unwrap().revision, svc.revision);

    // Instances.
    let a = c
        .register(&instance("a", "1", InstanceState::Ready))
        .await
        .unwrap();
    assert_eq!(a.state, InstanceState::Ready);
    assert_eq!(
        c.register(&instance("a", "1", InstanceState::Ready))
            .await
            .unwrap(),
        a,
        "retry"
    );
    let mut other = instance("a", "1", InstanceState::Ready);
    other.address = "127.0.0.1:9".into();
    assert_eq!(code(c.register(&other).await).1, "instance_exists");
    let mut bad = instance("x", "1", InstanceState::Ready);
    bad.address = "not an address".into();
    assert_eq!(code(c.register(&bad).await).1, "invalid_address");
    let mut orphan = instance("y", "1", InstanceState::Ready);
    orphan.service = "nope".into();
    assert_eq!(code(c.register(&orphan).await).1, "unknown_service");
    c.register(&instance("b", "2", InstanceState::Starting))
        .await
        .unwrap();
    assert_eq!(code(c.instance("zz").await).1, "unknown_instance");
    assert_eq!(code(c.instances("nope").await).1, "unknown_service");

    // Keep a and b alive while the suite runs; `c` is left silent later.
    let beat = {
        let c = c.clone();
        tokio::spawn(async move {
            loop {
                let _ = c.heartbeat("a").await;
                let _ = c.heartbeat("b").await;
                tokio::time::sleep(TTL / 6).await;
            }
        })
    };

    let svc = c
        .set_weights("svc", &weights(&[("1", 100)]), None)
        .await
        .unwrap();
    assert_eq!(svc.primary_version.as_deref(), Some("1"));
    let (_, err, _) = code(
        c.set_weights("svc", &weights(&[("1", 90), ("2", 10)]), None)
            .await,
    );
    assert_eq!(
        err, "invalid_weights",
        "version 2 has no ready instance yet"
    );
    let (_, err, _) = code(
        c.set_weights("svc", &weights(&[("1", 50), ("2", 40)]), None)
            .await,
    );
    assert_eq!(err, "invalid_weights");

    c.set_state("b", InstanceState::Ready).await.unwrap();
    let (status, err, msg) = code(
        c.set_weights(
            "svc",
            &weights(&[("1", 90), ("2", 10)]),
            Some(svc.revision + 100),
        )
        .await,
    );
    assert_eq!((status, err.as_str()), (412, "revision_mismatch"), "{msg}");
    let svc2 = c
        .set_weights("svc", &weights(&[("1", 90), ("2", 10)]), Some(svc.revision))
        .await
        .unwrap();
    assert_eq!(svc2.weights["2"], 10);
    assert!(svc2.revision > svc.revision);
    let (status, err, msg) = code(c.set_state("b", InstanceState::Starting).await);
    assert_eq!((status, err.as_str()), (409, "illegal_transition"));
    assert!(msg.contains("ready") && msg.contains("starting"), "{msg}");
    assert_eq!(
        c.set_state("b", InstanceState::Ready).await.unwrap().state,
        InstanceState::Ready,
        "same state: no-op"
    );
    assert_eq!(c.instances("svc").await.unwrap().len(), 2);

    // Heartbeat TTL: a silent ready instance becomes unhealthy, a heartbeat revives it.
    c.register(&instance("c", "1", InstanceState::Ready))
        .await
        .unwrap();
    eventually("c to become unhealthy", WAIT, || async {
        (c.instance("c").await.ok()?.state == InstanceState::Unhealthy).then_some(())
    })
    .await;
    assert_eq!(
        c.instance("a").await.unwrap().state,
        InstanceState::Ready,
        "heartbeats keep a ready"
    );
    assert_eq!(c.heartbeat("c").await.unwrap().state, InstanceState::Ready);
    c.set_state("c", InstanceState::Draining).await.unwrap();
    c.set_state("c", InstanceState::Gone).await.unwrap();
    assert_eq!(
        c.instances("svc").await.unwrap().len(),
        2,
        "gone instances are not listed"
    );
    assert_eq!(c.instance("c").await.unwrap().state, InstanceState::Gone);
    assert_eq!(
        c.set_state("c", InstanceState::Gone).await.unwrap().state,
        InstanceState::Gone,
        "retry"
    );

    // Sessions: summed over proxies.
    let report = |proxy: &str, sessions: u64| SessionReport {
        proxy_id: proxy.into(),
        service: "svc".into(),
        instances: BTreeMap::from([(
            "a".to_string(),
            InstanceLoad {
                live_sessions: sessions,
                in_flight: 1,
            },
        )]),
        versions: BTreeMap::from([(
            "1".to_string(),
            VersionTraffic {
                requests: 100,
                responses_5xx: 1,
                p99_ms: sessions as f64,
            },
        )]),
        seq: 0,
        base: None,
    };
    proxy.report_sessions(&report("p1", 3)).await.unwrap();
    proxy.report_sessions(&report("p2", 4)).await.unwrap();
    // The first report publishes at once; the second, within the publishing period
    // (`LOAD_PUBLISH_MS`), goes out with the next sweep.
    let want = InstanceLoad {
        live_sessions: 7,
        in_flight: 2,
    };
    eventually("both reports summed", Duration::from_secs(5), || async {
        let a = c.instance("a").await.ok()?;
        (a.load == want).then_some(())
    })
    .await;
    let t = c.snapshot().await.unwrap().traffic["svc"]["1"];
    assert_eq!((t.requests, t.responses_5xx, t.p99_ms), (200, 2, 4.0));
    let mut unknown = report("p1", 1);
    unknown.service = "nope".into();
    assert_eq!(
        code(proxy.report_sessions(&unknown).await).1,
        "unknown_service"
    );
    // Reports age out when proxies stop sending them.
    eventually("reports to age out", WAIT, || async {
        (c.instance("a").await.ok()?.load == InstanceLoad::default()).then_some(())
    })
    .await;

    // Releases.
    let new = NewRelease {
        service: "svc".into(),
        from_version: Some("1".into()),
        to_version: "2".into(),
        image: "optimizer:2".into(),
        who: "ci".into(),
    };
    let r = c.create_release(&new).await.unwrap();
    assert_eq!(r.state, ReleaseState::Validating);
    let (status, err, msg) = code(c.create_release(&new).await);
    assert_eq!((status, err.as_str()), (409, "release_active"));
    assert!(msg.contains(&r.id), "{msg}");
    assert_eq!(c.active_release("svc").await.unwrap().unwrap().id, r.id);
    let step = |state| ReleaseUpdate {
        state: Some(state),
        ..Default::default()
    };
    c.update_release(&r.id, &step(ReleaseState::Starting))
        .await
        .unwrap();
    let (status, err, msg) = code(c.update_release(&r.id, &step(ReleaseState::Done)).await);
    assert_eq!((status, err.as_str()), (409, "illegal_transition"));
    assert!(msg.contains("starting") && msg.contains("done"), "{msg}");
    assert!(c.control(&r.id, Control::Pause).await.unwrap().paused);
    assert!(!c.control(&r.id, Control::Resume).await.unwrap().paused);
    assert_eq!(
        c.control(&r.id, Control::Promote).await.unwrap().control,
        Some(Control::Promote)
    );
    let cleared = c
        .update_release(
            &r.id,
            &ReleaseUpdate {
                clear_control: true,
                containers: Some(vec!["c-b".into()]),
                step_ms: BTreeMap::from([("starting".to_string(), 12)]),
                status: Some(ReleaseStatus {
                    waiting_for: Some("promote".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(cleared.control, None);
    assert_eq!(cleared.containers, vec!["c-b".to_string()]);
    assert_eq!(cleared.status.waiting_for.as_deref(), Some("promote"));
    let failed = c
        .update_release(
            &r.id,
            &ReleaseUpdate {
                state: Some(ReleaseState::Failed),
                reason: Some("never healthy".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(failed.finished_at.is_some());
    assert_eq!(
        code(c.control(&r.id, Control::Abort).await).1,
        "release_finished"
    );
    assert_eq!(
        c.active_release("svc").await.unwrap(),
        None,
        "the lock is released"
    );
    let r2 = c.create_release(&new).await.unwrap();
    let history = c.history(Some("svc")).await.unwrap();
    assert_eq!(
        history.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        vec![r2.id.clone(), r.id.clone()]
    );
    assert_eq!(code(c.release("rel-0").await).1, "unknown_release");

    // One driver, guaranteed: two processes that both found the lease free race to take it,
    // many times; the store lets exactly one through each time.
    for round in 0..40 {
        let take = |who: String| {
            let c = c.clone();
            let id = r2.id.clone();
            async move {
                let claim = ReleaseUpdate {
                    lease: Some(who),
                    ..Default::default()
                };
                c.update_release(&id, &claim).await
            }
        };
        let (a, b) = tokio::join!(take(format!("{round}@a")), take(format!("{round}@b")));
        let (won, lost) = match (a, b) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            other => panic!("round {round}: exactly one must take the lease: {other:?}"),
        };
        let (status, err, msg) = code::<()>(Err(lost));
        assert_eq!((status, err.as_str()), (409, "lease_held"), "{msg}");
        let holder = won.status.driver.clone().unwrap().who;
        assert!(msg.contains(&holder), "the refusal names the holder: {msg}");
        let drop = ReleaseUpdate {
            lease: Some(holder),
            drop_lease: true,
            ..Default::default()
        };
        assert_eq!(
            c.update_release(&r2.id, &drop).await.unwrap().status.driver,
            None
        );
    }
    // A driver's update sent twice (its client resends it after a broken connection, not
    // knowing whether the first copy arrived): the second copy leaves what the first made,
    // only the lease renewed. (A state move sent twice: `state.rs`'s unit tests.)
    let twice = ReleaseUpdate {
        lease: Some("7@twice".into()),
        step: Some(3),
        reason: Some("sent twice".into()),
        containers: Some(vec!["svc-1.1.0-a".into()]),
        step_ms: [("validating".to_string(), 12)].into(),
        ..Default::default()
    };
    let once = c.update_release(&r2.id, &twice).await.unwrap();
    let again = c.update_release(&r2.id, &twice).await.unwrap();
    let made = |r: &Release| {
        (
            r.state,
            r.step,
            r.reason.clone(),
            r.containers.clone(),
            r.step_ms.clone(),
            r.status.driver.as_ref().map(|l| l.who.clone()),
        )
    };
    assert_eq!(made(&again), made(&once));
    assert_eq!(once.step, 3);
    let drop = ReleaseUpdate {
        lease: Some("7@twice".into()),
        drop_lease: true,
        ..Default::default()
    };
    c.update_release(&r2.id, &drop).await.unwrap();
    let dropped_again = c.update_release(&r2.id, &drop).await.unwrap();
    assert_eq!(dropped_again.status.driver, None);
    // Compare and set: two moves out of the same state, one wins, the other is told both states.
    let cas = |to| ReleaseUpdate {
        expect_state: Some(ReleaseState::Validating),
        state: Some(to),
        ..Default::default()
    };
    let (start, fail) = (cas(ReleaseState::Starting), cas(ReleaseState::Failed));
    let (a, b) = tokio::join!(
        c.update_release(&r2.id, &start),
        c.update_release(&r2.id, &fail)
    );
    let lost = match (a, b) {
        (Ok(_), Err(l)) | (Err(l), Ok(_)) => l,
        other => panic!("exactly one move from validating: {other:?}"),
    };
    let (status, err, msg) = code::<()>(Err(lost));
    assert_eq!((status, err.as_str()), (409, "state_conflict"), "{msg}");
    assert!(msg.contains("validating"), "{msg}");
    // When `failed` won, the rest of the suite goes on with a new active release.
    let r2 = match c.active_release("svc").await.unwrap() {
        Some(r) => r,
        None => c.create_release(&new).await.unwrap(),
    };

    // The watcher saw everything, in order: its view equals the locator's snapshot.
    beat.abort();
    let mut watcher = watcher;
    eventually("the watcher to catch up", WAIT, || {
        let view = normal(watcher.borrow_and_update().clone());
        let c = c.clone();
        async move { (view == normal(c.snapshot().await.ok()?)).then_some(()) }
    })
    .await;
    assert_eq!(c.snapshot().await.unwrap().releases.len(), 1);

    // Resuming from a revision gets exactly what came after it.
    let rev = c.snapshot().await.unwrap().revision;
    let mut from = Box::pin(c.watch(Some(rev)).await.unwrap());
    c.control(&r2.id, Control::Pause).await.unwrap();
    let mut expect = rev + 1;
    loop {
        let event = tokio::time::timeout(WAIT, from.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.revision, expect, "no gap, no repeat");
        expect += 1;
        if matches!(event.change, Change::Release(ref r) if r.paused) {
            break;
        }
    }
    // A revision from the future (a restored backup) gets a snapshot first.
    let mut future = Box::pin(c.watch(Some(expect + 1000)).await.unwrap());
    let first = tokio::time::timeout(WAIT, future.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first.change, Change::Snapshot(_)));
    assert!(first.revision >= expect - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_the_contract() {
    let loc = testing::embedded(TTL).await;
    suite(&loc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_passes_the_contract() {
    let pg = tokio::task::spawn_blocking(testing::Postgres::start)
        .await
        .unwrap();
    let loc = testing::postgres(&pg.url(), TTL).await;
    suite(&loc).await;
    drop(loc);
    drop(pg);
}

/// A ready instance `id` of `service` (version 1).
fn ready_in(service: &str, id: &str) -> RegisterInstance {
    RegisterInstance {
        id: id.into(),
        service: service.into(),
        version: "1".into(),
        address: "127.0.0.1:8080".into(),
        docker_host: String::new(),
        container_id: String::new(),
        labels: BTreeMap::new(),
        state: InstanceState::Ready,
    }
}

/// `GET /v1/watch?{query}` is refused with 400 `invalid_input`.
async fn watch_is_refused(loc_url: &str, query: &str) {
    let bad = reqwest::Client::new()
        .get(format!("{loc_url}/v1/watch?{query}"))
        .bearer_auth(testing::READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400, "{query}");
    assert!(bad.text().await.unwrap().contains("invalid_input"));
}

/// `watch?service=a` hears only of `a`: its part of the snapshot, then its events, none of
/// `b`'s — also when resuming from a revision — and a malformed filter is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_filtered_by_service_hears_only_of_that_service() {
    let loc = testing::embedded(Duration::from_secs(10)).await;
    let c = loc.deploy();
    let settings = SessionSettings {
        cookie_name: "c".into(),
        idle_ttl_ms: 1000,
        max_drain_ms: 1000,
    };
    for svc in ["a", "b"] {
        c.put_service(
            svc,
            &ServiceSpec {
                sessions: settings.clone(),
                routes: Default::default(),
            },
        )
        .await
        .unwrap();
        c.register(&ready_in(svc, &format!("{svc}-1")))
            .await
            .unwrap();
    }
    let only_a = ["a".to_string()];
    let mut a = Box::pin(c.watch_only(None, &only_a, false).await.unwrap());
    let first = a.next().await.unwrap().unwrap();
    let Change::Snapshot(snap) = &first.change else {
        panic!("a watch starts with a snapshot: {first:?}")
    };
    assert_eq!(
        (snap.services.len(), snap.instances.len()),
        (1, 1),
        "{snap:?}"
    );
    assert!(snap.services[0].name == "a" && snap.instances[0].id == "a-1");

    // b changes twice, then a once: the filtered watch gets a's change next.
    c.register(&ready_in("b", "b-2")).await.unwrap();
    c.register(&ready_in("b", "b-3")).await.unwrap();
    c.register(&ready_in("a", "a-2")).await.unwrap();
    let next = a.next().await.unwrap().unwrap();
    assert_eq!(next.change.service(), Some("a"), "{next:?}");
    assert!(matches!(&next.change, Change::Instance(i) if i.id == "a-2"));

    // Resuming from the snapshot's revision replays only a's event.
    let mut resumed = Box::pin(
        c.watch_only(Some(first.revision), &only_a, false)
            .await
            .unwrap(),
    );
    let replayed = resumed.next().await.unwrap().unwrap();
    assert_eq!(replayed.revision, next.revision, "{replayed:?}");

    watch_is_refused(&loc.url, "service=,").await;
}

/// `watch?routing=true` (what proxies use) hears of what routes — an instance's state, address
/// and version, a service's settings — and not of session sums, which move every second; a
/// full watch hears of both, and a malformed flag is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_watch_skips_session_sums_and_hears_state_changes() {
    let loc = testing::embedded(Duration::from_secs(10)).await;
    let c = loc.deploy();
    c.put_service("a", &spec(60_000)).await.unwrap();
    c.register(&ready_in("a", "a-1")).await.unwrap();
    let only_a = ["a".to_string()];
    let mut routing = Box::pin(c.watch_only(None, &only_a, true).await.unwrap());
    let mut full = Box::pin(c.watch_only(None, &only_a, false).await.unwrap());
    let first = routing.next().await.unwrap().unwrap();
    assert!(matches!(first.change, Change::Snapshot(_)), "{first:?}");
    full.next().await.unwrap().unwrap();

    let report = SessionReport {
        proxy_id: "p".into(),
        service: "a".into(),
        instances: BTreeMap::from([(
            "a-1".to_string(),
            InstanceLoad {
                live_sessions: 7,
                in_flight: 1,
            },
        )]),
        versions: BTreeMap::new(),
        seq: 0,
        base: None,
    };
    loc.client(PROXY_TOKEN)
        .report_sessions(&report)
        .await
        .unwrap();
    c.set_state("a-1", InstanceState::Draining).await.unwrap();

    let sums = full.next().await.unwrap().unwrap();
    assert!(
        matches!(&sums.change, Change::Instance(i) if i.load.live_sessions == 7),
        "the full watch hears the session sums first: {sums:?}"
    );
    let next = routing.next().await.unwrap().unwrap();
    assert!(
        matches!(&next.change, Change::Instance(i) if i.state == InstanceState::Draining),
        "the routing watch's next event is the state change: {next:?}"
    );
    assert!(next.revision > sums.revision);

    // Resuming from the snapshot replays the state change alone.
    let mut resumed = Box::pin(
        c.watch_only(Some(first.revision), &only_a, true)
            .await
            .unwrap(),
    );
    let replayed = resumed.next().await.unwrap().unwrap();
    assert_eq!(replayed.revision, next.revision, "{replayed:?}");

    watch_is_refused(&loc.url, "routing=yes").await;

    // The locator's per-service routing revision is what the routing watch reached.
    let metrics = reqwest::get(format!("{}/metrics", loc.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gauge = format!(
        "haddock_locator_routing_revision{{service=\"a\"}} {}",
        next.revision
    );
    assert!(metrics.contains(&gauge), "{gauge} in:\n{metrics}");

    // Until the next routing event, routing watchers share one snapshot: a release (not a
    // routing event) moves the revision, and a new routing watch still starts from the
    // snapshot the one before it got.
    let mut x = Box::pin(c.watch_only(None, &only_a, true).await.unwrap());
    let x_first = x.next().await.unwrap().unwrap();
    c.create_release(&NewRelease {
        service: "a".into(),
        from_version: Some("1".into()),
        to_version: "2".into(),
        image: "img:2".into(),
        who: "ci".into(),
    })
    .await
    .unwrap();
    let mut y = Box::pin(c.watch_only(None, &only_a, true).await.unwrap());
    let y_first = y.next().await.unwrap().unwrap();
    assert!(matches!(y_first.change, Change::Snapshot(_)), "{y_first:?}");
    assert_eq!(y_first.revision, x_first.revision);
    assert!(c.snapshot().await.unwrap().revision > y_first.revision);
}
