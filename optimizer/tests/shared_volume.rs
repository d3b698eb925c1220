//! Several instances on one cache directory, as during a release: sharing reads and writes,
//! failover on SIGTERM and kill -9, and crashes mid-ingest. Real processes, real sockets.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cache_dir, client, error_code, eventually, text, Instance, TOKEN};
use futures_util::StreamExt;

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_reads_and_writes_without_staleness() {
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &[]);
    a.wait_ready(Some("writer")).await;
    let mut stored = Vec::new();
    for i in 0..5 {
        let data = text(300_000 + i * 1000, i as u64);
        a.put(&format!("before-{i}"), &data).await;
        stored.push((format!("before-{i}"), data));
    }

    // A new instance on the filled volume serves everything on its first request.
    let b = Instance::start(&cache, "b", &[]);
    b.wait_ready(Some("reader")).await;
    for (key, data) in &stored {
        assert_eq!(b.get(key).await.as_ref(), Some(data), "{key}");
    }

    // Each sees what the other acknowledged, immediately (no sleep, no retry).
    for i in 0..20u64 {
        let data = text(50_000 + i as usize, 100 + i);
        let (writer, reader) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let key = format!("live-{i}");
        writer.put(&key, &data).await;
        assert_eq!(
            reader.get(&key).await,
            Some(data.clone()),
            "{key} written via {}",
            writer.id
        );
        assert_eq!(writer.get(&key).await, Some(data), "{key}");
    }

    // Overwrites and deletes reach the reader within the background catch-up interval.
    let fresh = text(10_000, 999);
    b.put("before-0", &fresh).await;
    assert_eq!(b.delete("before-1").await, 200);
    assert_eq!(a.get("before-0").await, Some(fresh.clone()));
    assert_eq!(a.get("before-1").await, None);
    eventually(
        "reader sees the overwrite",
        Duration::from_secs(2),
        || async { (b.get("before-0").await == Some(fresh.clone())).then_some(()) },
    )
    .await;
    eventually("reader sees the delete", Duration::from_secs(2), || async {
        b.get("before-1").await.is_none().then_some(())
    })
    .await;
    assert!(
        !a.logs().contains("ERROR") && !b.logs().contains("ERROR"),
        "{}\n{}",
        a.logs(),
        b.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn survivor_takes_over_after_kill_9_and_sigterm() {
    let (_dir, cache) = cache_dir();
    let mut a = Instance::start(&cache, "a", &[]);
    a.wait_ready(Some("writer")).await;
    let b = Instance::start(&cache, "b", &[]);
    b.wait_ready(Some("reader")).await;
    let mut acked = Vec::new();
    for i in 0..6u64 {
        let data = text(200_000, 10 + i);
        let via = if i % 2 == 0 { &a } else { &b };
        via.put(&format!("k{i}"), &data).await;
        acked.push((format!("k{i}"), data));
    }

    // kill -9 the writer; a write sent to the reader meanwhile waits for the failover.
    a.kill9();
    let late = text(100_000, 77);
    b.put("during-failover", &late).await;
    acked.push(("during-failover".into(), late));
    b.wait_ready(Some("writer")).await;
    for (key, data) in &acked {
        assert_eq!(
            b.get(key).await.as_ref(),
            Some(data),
            "{key} lost after kill -9\n{}",
            b.logs()
        );
    }

    // Later instances see everything; then the writer leaves by SIGTERM and c takes over.
    let c = Instance::start(&cache, "c", &[]);
    c.wait_ready(Some("reader")).await;
    for (key, data) in &acked {
        assert_eq!(c.get(key).await.as_ref(), Some(data), "{key}");
    }
    let mut b = b;
    assert!(b.terminate().success(), "{}", b.logs());
    c.wait_ready(Some("writer")).await;
    let after = text(1000, 5);
    c.put("after", &after).await;
    acked.push(("after".into(), after));

    // And back: a restarted instance reads everything, with no lock errors anywhere.
    let d = Instance::start(&cache, "a", &[]);
    d.wait_ready(Some("reader")).await;
    for (key, data) in &acked {
        assert_eq!(d.get(key).await.as_ref(), Some(data), "{key}");
    }
    for inst in [&c, &d] {
        let logs = inst.logs();
        assert!(
            !logs.contains("ERROR") && !logs.to_lowercase().contains("database is locked"),
            "{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_ingest_never_loses_or_half_writes() {
    let (_dir, cache) = cache_dir();
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..6u64 {
        let mut inst = Instance::start(&cache, &format!("r{round}"), &[]);
        inst.wait_ready(Some("writer")).await;
        for (key, data) in &acked {
            assert_eq!(
                inst.get(key).await.as_ref(),
                Some(data),
                "round {round}: {key}\n{}",
                inst.logs()
            );
        }
        // Earlier interrupted uploads are either absent or complete.
        for r in 0..round {
            if let Some(got) = inst.get(&format!("inflight-{r}")).await {
                assert_eq!(got, text(4 << 20, 1000 + r), "half-written object visible");
            }
        }
        let data = text(150_000, round);
        inst.put(&format!("acked-{round}"), &data).await;
        acked.push((format!("acked-{round}"), data));

        // A slow 4 MiB upload, killed at a different point each round.
        let url = format!("{}/v1/objects/inflight-{round}", inst.url);
        let body = text(4 << 20, 1000 + round);
        let upload = tokio::spawn(async move {
            let frames = futures_util::stream::iter(
                body.chunks(256 << 10)
                    .map(|c| c.to_vec())
                    .collect::<Vec<_>>(),
            )
            .then(|c| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, std::io::Error>(c)
            });
            client()
                .put(url)
                .body(reqwest::Body::wrap_stream(frames))
                .send()
                .await
                .map(|r| r.status())
        });
        tokio::time::sleep(Duration::from_millis(40 + 60 * round)).await;
        inst.kill9();
        if let Ok(Ok(status)) = upload.await {
            // Acknowledged before the kill: it must survive like any other.
            if status == 200 {
                acked.push((format!("inflight-{round}"), text(4 << 20, 1000 + round)));
            }
        }
    }
    let last = Instance::start(&cache, "last", &[]);
    eventually("final instance ready", SETTLE, || async {
        last.ready_as(Some("writer")).await.then_some(())
    })
    .await;
    for (key, data) in &acked {
        assert_eq!(last.get(key).await.as_ref(), Some(data), "{key}");
    }
}

/// A GET that started before an overwrite or a delete streams the version it started with to
/// the end, on the writer and on a reader alike: the old chunks outlive their last reference
/// for the reclaim grace. (Before, the reader caught up on a miss, found the chunk reclaimed
/// and failed half-way with `missing_chunk`.)
#[tokio::test(flavor = "multi_thread")]
async fn reads_in_flight_survive_overwrite_and_delete() {
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &[]);
    a.wait_ready(Some("writer")).await;
    let b = Instance::start(&cache, "b", &[]);
    b.wait_ready(Some("reader")).await;
    // Larger than what socket buffers and the server's read-ahead hold, so that most of each
    // response is read from the store after the mutation.
    let (old, new) = (text(32 << 20, 31), text(1 << 20, 32));
    a.put("overwritten", &old).await;
    a.put("deleted", &old).await;

    let mut streams = Vec::new();
    for inst in [&a, &b] {
        for key in ["overwritten", "deleted"] {
            let mut resp = client()
                .get(format!("{}/v1/objects/{key}", inst.url))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{key} on {}", inst.id);
            let first = resp.chunk().await.unwrap().unwrap();
            streams.push((format!("{key} on {}", inst.id), first, resp));
        }
    }
    b.put("overwritten", &new).await;
    assert_eq!(b.delete("deleted").await, 200);
    // Both instances now answer with the new state...
    for inst in [&a, &b] {
        eventually(
            "the new state is visible",
            Duration::from_secs(2),
            || async {
                (inst.get("overwritten").await == Some(new.clone())
                    && inst.get("deleted").await.is_none())
                .then_some(())
            },
        )
        .await;
    }
    // ...while every response begun before still delivers the old version, whole.
    for (what, first, resp) in streams {
        let mut got = first.to_vec();
        got.extend_from_slice(&resp.bytes().await.unwrap_or_else(|e| panic!("{what}: {e}")));
        assert!(
            got == old,
            "{what}: {} bytes, differing from the old version",
            got.len()
        );
    }
    for inst in [&a, &b] {
        assert!(!inst.logs().contains("ERROR"), "{}", inst.logs());
    }
}

/// Runs `optimizer handover --to <to>` against `from`, as haddock does inside a container: the
/// exit status and stdout (the answer) or stderr (why not).
fn handover_cli(from: &str, to: &str, token: Option<&str>) -> (bool, String) {
    let port = from.rsplit(':').next().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_optimizer"));
    cmd.args([
        "handover",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--to",
        to,
    ])
    .env_remove("OPTIMIZER_WRITE_TOKEN");
    if let Some(t) = token {
        cmd.env("OPTIMIZER_WRITE_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).to_string()
    } else {
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    (out.status.success(), text)
}

/// A planned hand-over (what haddock runs in the old instance after a promotion) under steady
/// writes through every instance: the writer hands the volume to the reader it names, that one
/// takes it and no other, no write fails, and every acknowledged object reads back everywhere.
/// A hand-over to an instance that is not a reader of the volume, without the token or with a
/// malformed body is refused and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_planned_handover_moves_the_writer_to_the_named_reader_under_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &[]);
    a.wait_ready(Some("writer")).await;
    let b = Instance::start(&cache, "b", &[]);
    let c = Instance::start(&cache, "c", &[]);
    b.wait_ready(Some("reader")).await;
    c.wait_ready(Some("reader")).await;

    // Refused, nothing changes.
    let (ok, said) = handover_cli(&a.url, "nobody", Some(TOKEN));
    assert!(
        !ok && said.contains("none of [\\\"nobody\\\"] is a reader of this cache volume"),
        "{said}"
    );
    let (ok, said) = handover_cli(&a.url, "b", None);
    assert!(!ok && said.contains("401"), "{said}");
    for body in ["", "{", r#"{"to": []}"#, r#"{"to": ["b"], "extra": 1}"#] {
        let resp = client()
            .post(format!("{}/v1/volume/handover", a.url))
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, code, text) = error_code(resp).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "bad_request"),
            "{body:?}: {text}"
        );
    }
    assert!(a.ready_as(Some("writer")).await, "{}", a.logs());
    assert!(!cache.join("handover.json").exists());

    // Writers through each instance while the role moves.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, url) in [&a, &b, &c, &b].iter().map(|i| i.url.clone()).enumerate() {
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed, mut slowest) = (Vec::new(), Vec::new(), Duration::ZERO);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let (key, data) = (format!("w{w}-{n}"), text(40_000, w as u64 * 1000 + n));
                let t = Instant::now();
                let resp = client()
                    .put(format!("{url}/v1/objects/{key}"))
                    .body(data.clone())
                    .send()
                    .await;
                slowest = slowest.max(t.elapsed());
                match resp {
                    Ok(r) if r.status() == 200 => acked.push((key, data)),
                    Ok(r) => failed.push(format!("{key}: {}", r.status())),
                    Err(e) => failed.push(format!("{key}: {e}")),
                }
            }
            (acked, failed, slowest)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a_url = a.url.clone();
    let (ok, said) = tokio::task::spawn_blocking(move || handover_cli(&a_url, "b", Some(TOKEN)))
        .await
        .unwrap();
    assert!(ok, "{said}\n{}", a.logs());
    let report: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    assert_eq!(report["handed_over"], true, "{report}");
    assert_eq!(report["taken_by"], "b", "{report}\n{}", b.logs());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    let mut slowest = Duration::ZERO;
    for w in writers {
        let (ok, failed, slow) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "writes failed: {failed:?}\n{}\n{}",
            a.logs(),
            b.logs()
        );
        acked.extend(ok);
        slowest = slowest.max(slow);
    }
    println!(
        "hand-over: {report}; {} writes acknowledged, the slowest took {slowest:?}",
        acked.len()
    );
    assert!(b.ready_as(Some("writer")).await, "{}", b.logs());
    assert!(a.ready_as(Some("reader")).await, "{}", a.logs());
    assert!(c.ready_as(Some("reader")).await, "{}", c.logs());
    assert!(
        !cache.join("handover.json").exists(),
        "the successor removes handover.json"
    );
    for (key, data) in &acked {
        for inst in [&a, &b, &c] {
            assert_eq!(
                inst.get(key).await.as_ref(),
                Some(data),
                "{key} on {}",
                inst.id
            );
        }
    }
    // The old writer, a reader now, still forwards its writes.
    let late = text(10_000, 99);
    a.put("after-handover", &late).await;
    assert_eq!(b.get("after-handover").await, Some(late));
    // A reader asked to hand over has nothing to hand.
    let (ok, said) = handover_cli(&c.url, "a", Some(TOKEN));
    assert!(ok && said.contains("\"handed_over\":false"), "{said}");
    assert!(b.logs().contains("(handed over)"), "{}", b.logs());
    for inst in [&a, &b, &c] {
        assert!(!inst.logs().contains("ERROR"), "{}", inst.logs());
    }
}
