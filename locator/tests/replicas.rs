//! Two locator replicas on one PostgreSQL database.

use futures_util::StreamExt;
use locator::api::*;
use locator::testing::{self, eventually, Postgres, READ_TOKEN};
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

fn spec() -> ServiceSpec {
    ServiceSpec {
        sessions: SessionSettings {
            cookie_name: "c".into(),
            idle_ttl_ms: 1000,
            max_drain_ms: 1000,
        },
        routes: Default::default(),
    }
}

/// A ready instance `i1` of `svc`.
fn i1() -> RegisterInstance {
    RegisterInstance {
        id: "i1".into(),
        service: "svc".into(),
        version: "1".into(),
        address: "127.0.0.1:80".into(),
        docker_host: String::new(),
        container_id: String::new(),
        labels: BTreeMap::new(),
        state: InstanceState::Ready,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_stream_every_change_and_share_the_rules() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let ttl = Duration::from_secs(30);
    let url = pg.url();
    let (a, b) = tokio::join!(testing::postgres(&url, ttl), testing::postgres(&url, ttl));
    let (ca, cb) = (a.deploy(), b.deploy());

    // A watcher on B sees writes made through A, in order.
    let mut watch_b = Box::pin(b.client(READ_TOKEN).watch(None).await.unwrap());
    let first = watch_b.next().await.unwrap().unwrap();
    assert!(matches!(first.change, Change::Snapshot(_)));
    let svc = ca.put_service("svc", &spec()).await.unwrap();
    let event = tokio::time::timeout(WAIT, watch_b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.revision, svc.revision);
    assert!(matches!(event.change, Change::Service(ref s) if s.name == "svc"));
    assert_eq!(cb.service("svc").await.unwrap(), svc, "B reads A's write");

    // Writes through B see A's state (B catches up inside its transaction).
    let inst = i1();
    cb.register(&inst).await.unwrap();
    let w = WeightsUpdate {
        weights: BTreeMap::from([("1".to_string(), 100)]),
        primary_version: None,
    };
    let s1 = ca.set_weights("svc", &w, None).await.unwrap();
    // If-Match and the release lock hold across replicas.
    let stale = cb
        .set_weights("svc", &w, Some(s1.revision - 1))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Some("revision_mismatch"));
    let new = NewRelease {
        service: "svc".into(),
        from_version: None,
        to_version: "2".into(),
        image: "i:2".into(),
        who: "t".into(),
    };
    let r = ca.create_release(&new).await.unwrap();
    let err = cb.create_release(&new).await.unwrap_err();
    assert_eq!(err.code(), Some("release_active"));
    assert!(err.to_string().contains(&r.id));

    // Concurrent writes through both replicas: revisions stay unique and contiguous.
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        let c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        let id = r.id.clone();
        tasks.push(tokio::spawn(async move {
            let u = ReleaseUpdate {
                step: Some(i),
                ..Default::default()
            };
            c.update_release(&id, &u).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Each replica has its own writes at once and the other's a few ms later (NOTIFY): once the
    // two views are equal, both hold all 20 writes.
    let agreed = eventually("both replicas to agree", WAIT, || async {
        let (sa, sb) = (ca.snapshot().await.ok()?, cb.snapshot().await.ok()?);
        (sa == sb).then_some(sa)
    })
    .await;
    assert_eq!(
        agreed.active_release("svc").map(|r| r.id.clone()),
        Some(r.id.clone())
    );
    let want = agreed.revision;
    let mut seen = vec![first.revision, event.revision];
    while *seen.last().unwrap() < want {
        let e = tokio::time::timeout(WAIT, watch_b.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(e.revision);
    }
    let contiguous: Vec<Revision> = (first.revision..=want).collect();
    assert_eq!(seen[1..], contiguous[1..], "every revision once, in order");
    drop((a, b));
    drop(pg);
}

/// PostgreSQL restarted under two replicas: writes refused during the outage are refused
/// (503, nothing half-done), both replicas reconnect by themselves, nothing acknowledged before
/// is lost, and a watcher on the other replica sees the writes made after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_two_replicas_loses_nothing_and_both_reconnect() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let ttl = Duration::from_secs(30);
    let url = pg.url();
    let (a, b) = tokio::join!(testing::postgres(&url, ttl), testing::postgres(&url, ttl));
    let (ca, cb) = (a.deploy(), b.deploy());
    let spec = |ttl_ms| ServiceSpec {
        sessions: SessionSettings {
            cookie_name: "c".into(),
            idle_ttl_ms: ttl_ms,
            max_drain_ms: 60_000,
        },
        routes: Default::default(),
    };
    let before = ca.put_service("before", &spec(1000)).await.unwrap();

    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();

    // A write through A goes through once A has its connection back.
    let after = eventually("a write through A after the restart", WAIT, || async {
        ca.put_service("after", &spec(2000)).await.ok()
    })
    .await;
    assert!(after.revision > before.revision);
    // B follows again (its LISTEN connection was cut too) and has both writes.
    eventually(
        "B to follow A's write made after the restart",
        WAIT,
        || async {
            let s = cb.service("after").await.ok()?;
            (s.sessions.idle_ttl_ms == 2000).then_some(())
        },
    )
    .await;
    assert_eq!(cb.service("before").await.unwrap(), before);
    // And B writes too; A sees it.
    let from_b = eventually("a write through B", WAIT, || async {
        cb.put_service("from-b", &spec(3000)).await.ok()
    })
    .await;
    eventually("A to follow B's write", WAIT, || async {
        (ca.service("from-b").await.ok()? == from_b).then_some(())
    })
    .await;
    drop(pg);
}

/// Heartbeats and session reports stay in the memory of the replica they reach; each replica's
/// sweep shares them through the database. An instance heartbeated only through A stays ready
/// whichever replica sweeps, silence demotes it, and reports made to A and to B are summed
/// on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_reports_reaching_one_replica_count_on_both() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    // 2 s: heartbeats every 200 ms, a replica shares each instance at most every TTL/4 and
    // sweeps every TTL/4, so what B reads is at most ~1.2 s old, well inside the TTL.
    let ttl = Duration::from_secs(2);
    let url = pg.url();
    let (a, b) = tokio::join!(testing::postgres(&url, ttl), testing::postgres(&url, ttl));
    let (ca, cb) = (a.deploy(), b.deploy());
    ca.put_service("svc", &spec()).await.unwrap();
    ca.register(&i1()).await.unwrap();
    let beating = {
        let ca = ca.clone();
        tokio::spawn(async move {
            loop {
                let _ = ca.heartbeats(&["i1".to_string()]).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // Four TTLs of heartbeats through A alone: B's sweeps never find i1 silent.
    let mut watch_b = Box::pin(b.client(READ_TOKEN).watch(None).await.unwrap());
    let quiet = tokio::time::timeout(4 * ttl, async {
        while let Some(Ok(e)) = watch_b.next().await {
            if matches!(&e.change, Change::Instance(i) if i.state == InstanceState::Unhealthy) {
                return e;
            }
        }
        panic!("the watch ended")
    })
    .await;
    assert!(quiet.is_err(), "i1 was demoted while beating: {quiet:?}");
    assert_eq!(cb.instance("i1").await.unwrap().state, InstanceState::Ready);

    // Reports to A and to B add up on both replicas.
    let report = |proxy: &str, n: u64| SessionReport {
        proxy_id: proxy.into(),
        service: "svc".into(),
        instances: BTreeMap::from([(
            "i1".to_string(),
            InstanceLoad {
                live_sessions: n,
                in_flight: 0,
            },
        )]),
        versions: BTreeMap::new(),
        seq: 0,
        base: None,
    };
    a.client(testing::PROXY_TOKEN)
        .report_sessions(&report("p1", 3))
        .await
        .unwrap();
    b.client(testing::PROXY_TOKEN)
        .report_sessions(&report("p2", 4))
        .await
        .unwrap();
    for c in [&ca, &cb] {
        eventually("both reports summed", WAIT, || async {
            (c.instance("i1").await.ok()?.load.live_sessions == 7).then_some(())
        })
        .await;
    }

    // Silence demotes it.
    beating.abort();
    eventually("i1 to be found silent", WAIT, || async {
        (cb.instance("i1").await.ok()?.state == InstanceState::Unhealthy).then_some(())
    })
    .await;
}
