//! The optimizer behind a public proxy (issue 18): credentials on mutations, pulls only from
//! configured peers, peers' manifests verified, forwarded bodies streamed, byte ranges that
//! cannot overflow, a bounded metrics label set. Real processes on real sockets.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    anonymous, cache_dir, client, error_code, eventually, noise, peak_rss, peer_routes, text,
    Canned, FakePeer, Instance, TOKEN,
};
use optimizer::chunker::encode;
use optimizer::manifest::{ChunkHash, ChunkRef, Manifest};

#[tokio::test(flavor = "multi_thread")]
async fn range_ends_past_any_size_are_clamped_over_the_wire() {
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &[]);
    a.wait_ready(None).await;
    let data = text(100_000, 1);
    a.put("obj", &data).await;
    let get = |range: String| {
        let url = format!("{}/v1/objects/obj", a.url);
        async move {
            anonymous()
                .get(url)
                .header("range", range)
                .send()
                .await
                .unwrap()
        }
    };
    let max = u64::MAX;
    // Used to answer 206 with `content-range: bytes 0-18446744073709551615/100000`.
    let whole = get(format!("bytes=0-{max}")).await;
    assert_eq!(whole.status(), 206);
    assert_eq!(whole.headers()["content-range"], "bytes 0-99999/100000");
    assert_eq!(whole.bytes().await.unwrap(), &data[..]);
    // Used to close the connection without an answer.
    let tail = get(format!("bytes=5-{max}")).await;
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.headers()["content-range"], "bytes 5-99999/100000");
    assert_eq!(tail.bytes().await.unwrap(), &data[5..]);
    let beyond = get("bytes=99990-99999999999999999999999999".into()).await;
    assert_eq!(beyond.bytes().await.unwrap(), &data[99_990..]);
    let (status, code, _) = error_code(get(format!("bytes={max}-")).await).await;
    assert_eq!((status, code.as_str()), (416, "range_not_satisfiable"));
}

#[tokio::test(flavor = "multi_thread")]
async fn invented_methods_are_counted_as_other() {
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &[]);
    a.wait_ready(None).await;
    for i in 0..5 {
        let method = reqwest::Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        let resp = anonymous()
            .request(method, format!("{}/v1/objects/x", a.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
    }
    let metrics = a.metrics().await;
    assert!(!metrics.contains("INVENTED"), "{metrics}");
    assert!(
        metrics.contains(
            "haddock_optimizer_http_requests_total{method=\"OTHER\",route=\"/v1/objects/{key}\",status=\"405\"} 5"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mutations_need_the_write_token_reads_do_not() {
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &[]);
    a.wait_ready(Some("writer")).await;
    let b = Instance::start(&cache, "b", &[]);
    b.wait_ready(Some("reader")).await;
    let anon = anonymous();
    let wrong = |req: reqwest::RequestBuilder| req.bearer_auth("not-the-token-0123456789");
    let object = |inst: &Instance| format!("{}/v1/objects/obj", inst.url);
    let data = text(50_000, 2);

    // Anonymous, wrong and forged-forwarded PUTs, on the writer and on a reader: 401, nothing.
    for (what, req) in [
        ("anonymous", anon.put(object(&a))),
        ("wrong token", wrong(anon.put(object(&a)))),
        (
            "forged forward",
            anon.put(object(&a)).header("x-optimizer-forwarded-by", "b"),
        ),
        ("anonymous via reader", anon.put(object(&b))),
        ("wrong token via reader", wrong(anon.put(object(&b)))),
    ] {
        let resp = req.body(data.clone()).send().await.unwrap();
        assert_eq!(
            resp.headers().get("www-authenticate").unwrap(),
            "Bearer",
            "{what}"
        );
        let (status, code, _) = error_code(resp).await;
        assert_eq!((status, code.as_str()), (401, "unauthorized"), "{what}");
    }
    assert_eq!(a.get("obj").await, None);

    // With the token, through the reader: the forward carries it (the writer checks it too).
    b.put("obj", &data).await;
    assert_eq!(a.get("obj").await, Some(data.clone()));

    let chunk = noise(10_000, 3);
    let hash = ChunkHash::of(&chunk);
    for (what, req) in [
        ("delete", anon.delete(object(&a))),
        ("delete via reader", anon.delete(object(&b))),
        (
            "chunk upload",
            anon.put(format!("{}/v1/chunks/{hash}", a.url))
                .body(encode(&chunk)),
        ),
        (
            "pull",
            anon.post(format!("{}/v1/objects/obj/pull", a.url))
                .query(&[("from", "http://127.0.0.1:1")]),
        ),
    ] {
        let (status, code, _) = error_code(req.send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (401, "unauthorized"), "{what}");
    }
    // Reads stay public: the object, its manifest, chunks, missing, probes.
    let got = anon.get(object(&b)).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap(), &data[..]);
    let manifest = anon
        .get(format!("{}/v1/objects/obj/manifest", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200);
    let missing = anon
        .post(format!("{}/v1/chunks/missing", a.url))
        .json(&serde_json::json!({ "hashes": [hash] }))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 200);
    assert_eq!(
        anon.get(format!("{}/v1/chunks/{hash}", a.url))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // The anonymous DELETE deleted nothing; the token's does.
    assert_eq!(a.get("obj").await, Some(data));
    assert_eq!(b.delete("obj").await, 200);
    assert_eq!(a.get("obj").await, None);
}

/// Runs `optimizer serve` with `env` (the token variable removed unless given) and returns
/// its exit status and stderr, or `None` if it was still serving after a few seconds.
fn serve_exit(extra: &[&str], env: &[(&str, &str)]) -> Option<(std::process::ExitStatus, String)> {
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_optimizer"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--instance-id", "t"])
        .arg("--cache")
        .arg(dir.path().join("cache"))
        .args(extra)
        .env_remove("OPTIMIZER_WRITE_TOKEN")
        .env_remove("OPTIMIZER_WRITE_TOKEN_FILE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status, std::fs::read_to_string(&err).unwrap()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn serve_refuses_to_start_without_a_usable_write_token() {
    let (status, stderr) = serve_exit(&[], &[]).expect("serve must refuse to start");
    assert!(!status.success());
    assert!(stderr.contains("OPTIMIZER_WRITE_TOKEN"), "{stderr}");
    let (status, stderr) =
        serve_exit(&[], &[("OPTIMIZER_WRITE_TOKEN", "short")]).expect("a weak token is refused");
    assert!(!status.success());
    assert!(stderr.contains("at least 16 bytes"), "{stderr}");
    let (status, stderr) = serve_exit(&["--peer", "ftp://x"], &[("OPTIMIZER_WRITE_TOKEN", TOKEN)])
        .expect("a bad peer is refused");
    assert!(!status.success());
    assert!(stderr.contains("--peer"), "{stderr}");
    // Explicitly open: it serves (still running after the wait).
    assert!(serve_exit(&["--allow-anonymous-writes"], &[]).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn allowing_anonymous_writes_does_not_override_a_token() {
    let (_dir, cache) = cache_dir();
    // The harness sets the token.
    let a = Instance::start(&cache, "open", &["--allow-anonymous-writes"]);
    a.wait_ready(None).await;
    // With a token configured the flag changes nothing: anonymous PUTs are still refused.
    let resp = anonymous()
        .put(format!("{}/v1/objects/x", a.url))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        a.logs().contains("--allow-anonymous-writes ignored"),
        "{}",
        a.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_fetch_only_configured_peers_follow_no_redirect_and_echo_nothing() {
    // `elsewhere` stands for anything on the instance's network a client would like fetched.
    let stolen = Manifest::new(Vec::new(), None);
    let elsewhere = FakePeer::start(peer_routes("redir", &stolen, &[])).await;
    let mut routes = HashMap::new();
    routes.insert(
        "/v1/objects/redir/manifest".to_owned(),
        Canned {
            status: 302,
            headers: vec![(
                "location".into(),
                format!("{}/v1/objects/redir/manifest", elsewhere.url),
            )],
            body: Vec::new(),
        },
    );
    routes.insert(
        "/v1/objects/boom/manifest".to_owned(),
        Canned {
            status: 500,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"SECRET-PEER-BODY".to_vec(),
        },
    );
    let peer = FakePeer::start(routes).await;
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &["--peer", &peer.url]);
    a.wait_ready(None).await;
    let pull = |key: &'static str, from: String| {
        let url = format!("{}/v1/objects/{key}/pull", a.url);
        async move {
            error_code(
                client()
                    .post(url)
                    .query(&[("from", from)])
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };

    // Not configured: refused as the client's mistake (4xx, not counted against a canary).
    for from in [
        elsewhere.url.clone(),
        "http://169.254.169.254/latest/meta-data".into(),
        format!("{}/admin", peer.url),
        "nonsense".into(),
    ] {
        let (status, code, _) = pull("redir", from.clone()).await;
        assert_eq!((status, code.as_str()), (400, "unknown_peer"), "{from}");
    }
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());

    // A configured peer's redirect is not followed.
    let (status, code, body) = pull("redir", peer.url.clone()).await;
    assert_eq!((status, code.as_str()), (502, "peer_error"), "{body}");
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
    assert_eq!(a.get("redir").await, None);

    // Its error body is not copied into the answer.
    let (status, code, body) = pull("boom", format!("{}/", peer.url)).await;
    assert_eq!((status, code.as_str()), (502, "peer_error"));
    assert!(!body.contains("SECRET-PEER-BODY"), "{body}");

    // An object the peer lacks is the client's mistake too.
    let (status, code, _) = pull("absent", peer.url.clone()).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn lying_peer_manifests_store_nothing_and_never_panic() {
    let held = noise(20_000, 7);
    let fresh = noise(30_000, 8);
    let (held_hash, fresh_hash) = (ChunkHash::of(&held), ChunkHash::of(&fresh));
    let manifest = |chunks: Vec<ChunkRef>| Manifest::new(chunks, None);
    let at = |hash, len| ChunkRef { hash, len };
    let cases = [
        ("honest", manifest(vec![at(held_hash, 20_000)])),
        ("held-longer", manifest(vec![at(held_hash, 20_100)])),
        ("held-shorter", manifest(vec![at(held_hash, 19_900)])),
        ("fresh-longer", manifest(vec![at(fresh_hash, 30_100)])),
        ("fresh-shorter", manifest(vec![at(fresh_hash, 29_900)])),
        (
            "zero-length",
            manifest(vec![at(held_hash, 20_000), at(ChunkHash::of(b""), 0)]),
        ),
        ("wrong-digest", {
            let mut m = manifest(vec![at(held_hash, 20_000)]);
            m.digest = "ab".repeat(32);
            m
        }),
    ];
    let mut routes = HashMap::new();
    let stored = [(held_hash, encode(&held)), (fresh_hash, encode(&fresh))];
    for (key, m) in &cases {
        routes.extend(peer_routes(key, m, &stored));
    }
    let peer = FakePeer::start(routes).await;
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &["--peer", &peer.url]);
    a.wait_ready(None).await;

    for (key, _) in &cases {
        let resp = client()
            .post(format!("{}/v1/objects/{key}/pull", a.url))
            .query(&[("from", &peer.url)])
            .send()
            .await
            .unwrap();
        let (status, code, body) = error_code(resp).await;
        assert!(!body.contains("panicked"), "{key}: {body}");
        if *key == "honest" {
            assert_eq!(status, 200, "{body}");
            assert_eq!(a.get(key).await, Some(held.clone()));
        } else {
            assert_eq!(
                (status, code.as_str()),
                (502, "peer_error"),
                "{key}: {body}"
            );
            // Nothing committed: GET is a clean 404 (it used to panic or serve a truncation).
            assert_eq!(a.get(key).await, None, "{key}");
        }
    }
    assert!(!a.logs().contains("panicked"), "{}", a.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_put_streams_through_the_reader_in_bounded_memory() {
    const SIZE: usize = 64 << 20;
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &[]);
    a.wait_ready(Some("writer")).await;
    // No background catch-up: the reader's own memory is only the forwarding's.
    let b = Instance::start(&cache, "b", &["--catch-up-interval", "1h"]);
    b.wait_ready(Some("reader")).await;
    b.put("warm-up", &text(100_000, 1)).await;
    let before = peak_rss(b.pid());

    let data = noise(SIZE, 9);
    let report = b.put("big", &data).await;
    assert_eq!(report["size"], SIZE);
    let after = peak_rss(b.pid());
    let growth = after.saturating_sub(before);
    eprintln!(
        "reader peak RSS {} MiB -> {} MiB (+{} MiB) for a {} MiB forwarded PUT",
        before >> 20,
        after >> 20,
        growth >> 20,
        SIZE >> 20
    );
    // Buffered, the reader's peak grew by at least the body (64 MiB, twice when copied).
    assert!(growth < 16 << 20, "reader grew by {} MiB", growth >> 20);
    let got = eventually(
        "the writer serves the object",
        Duration::from_secs(10),
        || async { a.get("big").await },
    )
    .await;
    assert!(got == data, "object differs");
}

/// The benchmark's knobs are checked before it writes anything: FastCDC's bounds, even sizes,
/// a dataset of at least 1 MiB.
#[test]
fn bench_refuses_bad_parameters_before_it_starts() {
    for (args, expect) in [
        (["--chunk-avg", "64"], "FastCDC's bounds"),
        (["--chunk-avg", "16390"], "must be even"),
        (["--size-mib", "0"], "--size-mib"),
        (["--chunk-avg", "lots"], "--chunk-avg"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_optimizer"))
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}
