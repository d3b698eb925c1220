//! Read-through across hosts: an object stored through one host's optimizer is readable through
//! another's, which fetches it from its peers on a local miss and keeps it. Each "host" is its
//! own cache directory; real processes, real sockets.

mod common;

use std::collections::HashMap;

use common::{cache_dir, client, text, FakePeer, Instance};

#[tokio::test(flavor = "multi_thread")]
async fn a_miss_reads_through_the_peers_and_keeps_the_object() {
    let (_d1, cache1) = cache_dir();
    let (_d2, cache2) = cache_dir();
    // A second peer that has nothing and records what it is asked.
    let empty = FakePeer::start(HashMap::new()).await;
    let mut a = Instance::start(&cache1, "a", &[]);
    a.wait_ready(Some("writer")).await;
    let peers: [&str; 4] = ["--peer", &a.url, "--peer", &empty.url];
    let b = Instance::start(&cache2, "b", &peers);
    b.wait_ready(Some("writer")).await;
    // Shares b's volume: reads through by asking b, the writer, to pull.
    let b2 = Instance::start(&cache2, "b2", &peers);
    b2.wait_ready(Some("reader")).await;

    let shared = text(2 << 20, 11);
    let via_reader = text(300_000, 12);
    let headed = text(100_000, 13);
    a.put("shared", &shared).await;
    a.put("via-reader", &via_reader).await;
    a.put("headed", &headed).await;

    assert_eq!(b.get("shared").await.as_deref(), Some(&shared[..]));
    assert_eq!(b2.get("via-reader").await.as_deref(), Some(&via_reader[..]));
    // HEAD reads through like GET.
    b.head_ok("headed", headed.len()).await;

    // Nobody has it: 404, after asking both peers.
    assert_eq!(b.get("absent").await, None);
    assert!(
        empty
            .seen()
            .contains(&"/v1/objects/absent/manifest".to_owned()),
        "{:?}",
        empty.seen()
    );
    // The manifest route answers from the local store only: it is what peers ask, and reading
    // through there would bounce a miss between hosts.
    let resp = client()
        .get(format!("{}/v1/objects/nowhere/manifest", b.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(
        !empty.seen().iter().any(|p| p.contains("nowhere")),
        "{:?}",
        empty.seen()
    );

    assert!(
        b.metric("haddock_optimizer_read_through_total{outcome=\"hit\"}")
            .await
            >= 2.0
    );
    assert!(
        b.metric("haddock_optimizer_read_through_total{outcome=\"miss\"}")
            .await
            >= 1.0
    );
    assert!(
        b2.metric("haddock_optimizer_read_through_total{outcome=\"hit\"}")
            .await
            >= 1.0
    );
    // The writer pulled for the reader: the chunk bytes crossed into b.
    assert!(
        b.metric("haddock_optimizer_pull_transferred_bytes_total")
            .await
            > 0.0
    );

    // Kept on b's volume: served with the peer gone, through either instance.
    assert!(a.terminate().success(), "{}", a.logs());
    assert_eq!(b.get("shared").await.as_deref(), Some(&shared[..]));
    assert_eq!(b.get("headed").await.as_deref(), Some(&headed[..]));
    assert_eq!(b2.get("shared").await.as_deref(), Some(&shared[..]));
    assert_eq!(b.get("via-reader").await.as_deref(), Some(&via_reader[..]));
    // A peer that is down is skipped: still a clean 404.
    assert_eq!(b.get("never-stored").await, None);
    assert_eq!(b2.get("never-stored").await, None);
    for inst in [&b, &b2] {
        assert!(!inst.logs().contains("panicked"), "{}", inst.logs());
    }
}

/// A reader that misses asks its writer to pull, then reads again: under eight concurrent
/// users, every object stored on the other host is read back whole at the first GET (the
/// path of the across-hosts 404 seen at stop 23, docs/optimizer.md; it did not show here).
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_sees_every_object_its_writer_pulled_for_it_under_concurrency() {
    let (_d1, cache1) = cache_dir();
    let (_d2, cache2) = cache_dir();
    let a = Instance::start(&cache1, "a", &[]);
    a.wait_ready(Some("writer")).await;
    let peers: [&str; 2] = ["--peer", &a.url];
    let b = Instance::start(&cache2, "b", &peers);
    b.wait_ready(Some("writer")).await;
    let b2 = Instance::start(&cache2, "b2", &peers);
    b2.wait_ready(Some("reader")).await;
    let a = std::sync::Arc::new(a);
    let b2 = std::sync::Arc::new(b2);
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (a, b2) = (a.clone(), b2.clone());
        tasks.push(tokio::spawn(async move {
            let mut misses = Vec::new();
            for i in 0..150u64 {
                let key = format!("k{t}-{i}");
                let data = text(24 * 1024, t * 1000 + i);
                a.put(&key, &data).await;
                if b2.get(&key).await.as_deref() != Some(&data[..]) {
                    misses.push(key);
                }
            }
            misses
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert!(
        all.is_empty(),
        "{} misses: {:?}\n{}",
        all.len(),
        &all[..all.len().min(10)],
        b2.logs()
    );
    drop(b);
}
