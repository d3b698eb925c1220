//! The HTTP API of one instance (and two independent sites for pull), on real processes.

mod common;

use std::time::Duration;

use common::{cache_dir, client, error_code, eventually, noise, text, Instance};
use futures_util::StreamExt;
use optimizer::chunker::{chunks_of, ChunkParams};
use optimizer::manifest::{ChunkHash, ChunkRef, Manifest};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn objects_round_trip_with_ranges_etags_dedup_and_reclamation() {
    let (_dir, cache) = cache_dir();
    // Long enough to see chunks outlive their last reference, short enough to wait for.
    let a = Instance::start(&cache, "a", &["--reclaim-grace", "3s"]);
    a.wait_ready(Some("writer")).await;
    let c = client();
    let data = text(3 << 20, 1);

    let put = a.put("obj", &data).await;
    assert_eq!(put["size"], data.len());
    let chunks = put["chunks"].as_u64().unwrap();
    assert!(chunks > 20, "{put}");
    assert_eq!(put["new_chunks"], chunks);
    assert!(
        put["stored_bytes"].as_u64().unwrap() < data.len() as u64,
        "text compresses: {put}"
    );
    assert_eq!(a.get("obj").await.unwrap(), data);

    let head = a.head_ok("obj", data.len()).await;
    let etag = head["etag"].to_str().unwrap().to_owned();
    // The ETag is the digest of the object's chunk list, worked out here from the bytes alone.
    let chunk_list: Vec<ChunkRef> = chunks_of(&data, ChunkParams::default())
        .iter()
        .map(|c| ChunkRef {
            hash: ChunkHash::of(c),
            len: c.len() as u32,
        })
        .collect();
    assert_eq!(etag, format!("\"{}\"", Manifest::digest_of(&chunk_list)));

    let ranged = c
        .get(format!("{}/v1/objects/obj", a.url))
        .header("range", "bytes=100000-299999")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(
        ranged.headers()["content-range"],
        format!("bytes 100000-299999/{}", data.len()).as_str()
    );
    assert_eq!(ranged.bytes().await.unwrap(), &data[100_000..300_000]);
    let suffix = c
        .get(format!("{}/v1/objects/obj", a.url))
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(suffix.bytes().await.unwrap(), &data[data.len() - 10..]);
    let bad = c
        .get(format!("{}/v1/objects/obj", a.url))
        .header("range", "bytes=99999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(bad).await.0, 416);
    let cached = c
        .get(format!("{}/v1/objects/obj", a.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);

    // Same content under another key: nothing new stored.
    let again = a.put("copy", &data).await;
    assert_eq!(
        (again["new_chunks"].as_u64(), again["stored_bytes"].as_u64()),
        (Some(0), Some(0))
    );

    let manifest: Manifest = c
        .get(format!("{}/v1/objects/obj/manifest", a.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(manifest.size, data.len() as u64);
    let hashes: Vec<String> = manifest.chunks.iter().map(|c| c.hash.to_string()).collect();
    let missing = |hashes: Vec<String>| {
        let c = c.clone();
        let url = format!("{}/v1/chunks/missing", a.url);
        async move {
            let v: Value = c
                .post(url)
                .json(&serde_json::json!({ "hashes": hashes }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["missing"].as_array().unwrap().len()
        }
    };
    assert_eq!(missing(hashes.clone()).await, 0);

    // Deleting one of two references keeps the chunks; deleting the last reclaims them.
    assert_eq!(
        c.delete(format!("{}/v1/objects/obj", a.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(a.get("obj").await, None);
    assert_eq!(a.get("copy").await.unwrap(), data);
    assert_eq!(missing(hashes.clone()).await, 0);
    assert_eq!(
        c.delete(format!("{}/v1/objects/copy", a.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Kept for the reclaim grace (a GET that read the manifest before still finishes), then
    // reclaimed.
    assert_eq!(missing(hashes.clone()).await, 0);
    eventually(
        "chunks reclaimed after the grace",
        Duration::from_secs(15),
        || {
            let missing = missing(hashes.clone());
            async { (missing.await == hashes.len()).then_some(()) }
        },
    )
    .await;
    let (status, code, _) = error_code(
        c.delete(format!("{}/v1/objects/copy", a.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "not_found"));

    // Empty objects are objects too.
    a.put("empty", b"").await;
    assert_eq!(a.get("empty").await.unwrap(), b"");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_answered_with_json_errors() {
    let (_dir, cache) = cache_dir();
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let a = Instance::start(
        &cache,
        "a",
        &["--max-body-bytes", "1048576", "--peer", &dead],
    );
    a.wait_ready(None).await;
    let c = client();

    for key in ["bad$key", "a%20b", "semi;colon", &"k".repeat(300)] {
        let resp = c
            .put(format!("{}/v1/objects/{key}", a.url))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(resp).await.0, 400, "{key}");
    }
    let resp = c
        .put(format!("{}/v1/objects/big", a.url))
        .body(noise(1_500_000, 1))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (413, "body_too_large"));
    // Chunked upload without a length: the limit holds while streaming too.
    let frames =
        futures_util::stream::iter((0..30).map(|i| Ok::<_, std::io::Error>(noise(65536, i))));
    let resp = c
        .put(format!("{}/v1/objects/big", a.url))
        .body(reqwest::Body::wrap_stream(frames))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.0, 413);
    assert_eq!(a.get("big").await, None);

    // A chunk uploaded under the wrong hash: 400, nothing stored.
    let data = noise(20_000, 2);
    let stored = optimizer::chunker::encode(&data);
    let wrong = ChunkHash::of(b"something else");
    let resp = c
        .put(format!("{}/v1/chunks/{wrong}", a.url))
        .body(stored.clone())
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (400, "hash_mismatch"));
    let resp = c
        .get(format!("{}/v1/chunks/{wrong}", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = c
        .put(format!("{}/v1/chunks/not-a-hash", a.url))
        .body(stored.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.1, "invalid_hash");
    // The right hash is accepted and served back in stored form.
    let right = ChunkHash::of(&data);
    let resp = c
        .put(format!("{}/v1/chunks/{right}", a.url))
        .body(stored.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let back = c
        .get(format!("{}/v1/chunks/{right}", a.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(back, stored);

    // Unreachable (configured) peer: 502 naming it.
    let resp = c
        .post(format!("{}/v1/objects/x/pull", a.url))
        .query(&[("from", &dead)])
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (502, "peer_unreachable"));
    assert!(message.contains(&dead), "{message}");
    let resp = c
        .post(format!("{}/v1/objects/x/pull", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.0, 400);

    let resp = c
        .post(format!("{}/v1/chunks/missing", a.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.0, 400);
    let resp = c.get(format!("{}/nope", a.url)).send().await.unwrap();
    assert_eq!(error_code(resp).await.0, 404);
    let resp = c
        .post(format!("{}/v1/objects/x", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.0, 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_chunks_are_500_and_never_served() {
    let (_dir, cache) = cache_dir();
    let mut a = Instance::start(&cache, "a", &[]);
    a.wait_ready(None).await;
    let data = text(200_000, 3);
    a.put("obj", &data).await;
    let manifest: Manifest = client()
        .get(format!("{}/v1/objects/obj/manifest", a.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(a.terminate().success());

    // Flip the stored bytes of one chunk behind the service's back.
    let victim = manifest.chunks[1].hash;
    {
        let store =
            optimizer::store::Store::open_writer(&cache.join("db"), &Default::default()).unwrap();
        let mut stored = store.stored_chunk(&victim).unwrap().unwrap();
        let last = stored.len() - 1;
        stored[last] ^= 0x55;
        store.corrupt_chunk_for_tests(&victim, &stored).unwrap();
    }

    let a = Instance::start(&cache, "a2", &[]);
    a.wait_ready(None).await;
    let resp = client()
        .get(format!("{}/v1/objects/obj", a.url))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (500, "corrupt_chunk"));
    let resp = client()
        .get(format!("{}/v1/chunks/{victim}", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.1, "corrupt_chunk");
    // A range that avoids the bad chunk is still served.
    let first_len = manifest.chunks[0].len;
    let resp = client()
        .get(format!("{}/v1/objects/obj", a.url))
        .header("range", format!("bytes=0-{}", first_len - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap(), &data[..first_len as usize]);
    assert!(a.logs().contains("corrupt chunk"), "{}", a.logs());
    let metrics = a.metrics().await;
    assert!(
        metrics.contains("haddock_optimizer_corrupt_chunks_total 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_transfers_only_missing_chunks() {
    let (_d1, cache1) = cache_dir();
    let (_d2, cache2) = cache_dir();
    let site1 = Instance::start(&cache1, "site1", &[]);
    let site2 = Instance::start(&cache2, "site2", &["--peer", &site1.url]);
    site1.wait_ready(None).await;
    site2.wait_ready(None).await;
    let c = client();
    let v1 = text(2 << 20, 4);
    let mut v2 = v1.clone();
    v2.splice(1_000_000..1_000_000, b"a small insertion".iter().copied());
    site1.put("release", &v1).await;
    site1.put("release-2", &v2).await;

    let pull = |key: &'static str| {
        let c = c.clone();
        let (to, from) = (site2.url.clone(), site1.url.clone());
        async move {
            let resp = c
                .post(format!("{to}/v1/objects/{key}/pull"))
                .query(&[("from", from)])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let first = pull("release").await;
    assert_eq!(first["size"], v1.len());
    assert_eq!(first["chunks_transferred"], first["chunks"]);
    assert_eq!(site2.get("release").await.unwrap(), v1);

    let second = pull("release-2").await;
    let transferred = second["bytes_transferred"].as_u64().unwrap();
    assert!(
        transferred < v2.len() as u64 / 20,
        "only the changed chunks cross: {second}"
    );
    assert!(
        second["chunks_transferred"].as_u64().unwrap() <= 3,
        "{second}"
    );
    assert_eq!(site2.get("release-2").await.unwrap(), v2);

    let resp = c
        .post(format!("{}/v1/objects/nothing/pull", site2.url))
        .query(&[("from", &site1.url)])
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_version_metrics_and_graceful_stop() {
    let (_dir, cache) = cache_dir();
    let mut a = Instance::start(&cache, "a", &["--version-label", "9.9.9-test"]);
    let c = client();
    let health = c.get(format!("{}/healthz", a.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    a.wait_ready(Some("writer")).await;
    let v: Value = c
        .get(format!("{}/version", a.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["version"], "9.9.9-test");
    a.put("x", &text(100_000, 5)).await;
    a.put("y", &text(100_000, 5)).await;
    let metrics = a.metrics().await;
    for needle in [
        "haddock_optimizer_http_requests_total{method=\"PUT\",route=\"/v1/objects/{key}\",status=",
        "haddock_optimizer_dedup_ratio",
        "haddock_optimizer_chunk_store_bytes",
        "haddock_optimizer_http_request_duration_seconds_bucket",
        "haddock_optimizer_http_request_bytes_total",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }

    // `optimizer health` is the image's HEALTHCHECK.
    let port = a.url.rsplit(':').next().unwrap().to_owned();
    let health = std::process::Command::new(env!("CARGO_BIN_EXE_optimizer"))
        .args(["health", "--listen", &format!("0.0.0.0:{port}")])
        .status()
        .unwrap();
    assert!(health.success());

    // SIGTERM with a slow upload in flight: the upload completes, then the process exits 0.
    let url = format!("{}/v1/objects/slow", a.url);
    let slow = tokio::spawn(async move {
        let frames = futures_util::stream::iter(0..10u64).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, std::io::Error>(noise(50_000, i))
        });
        client()
            .put(url)
            .body(reqwest::Body::wrap_stream(frames))
            .send()
            .await
            .unwrap()
            .status()
    });
    eventually("upload in flight", Duration::from_secs(5), || async {
        let m = client()
            .get(format!("{}/metrics", a.url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let line = m
            .lines()
            .find(|l| l.starts_with("haddock_optimizer_http_request_bytes_total"))?;
        (line.split_whitespace().nth(1)?.parse::<u64>().ok()? > 400_000).then_some(())
    })
    .await;
    let status = tokio::task::spawn_blocking(move || {
        let s = a.terminate();
        (s, a)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{}", status.1.logs());
    assert_eq!(slow.await.unwrap(), 200);
    let down = std::process::Command::new(env!("CARGO_BIN_EXE_optimizer"))
        .args([
            "health",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--timeout",
            "1s",
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!down.success());
}
