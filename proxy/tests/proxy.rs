//! End-to-end tests of the proxy binary with real sockets and real upstream processes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use locator_wire::api::InstanceState::*;

/// Not a test: the body of the upstream processes the other tests start (see `common`).
#[test]
fn upstream_process() {
    if let Ok(id) = std::env::var("HADDOCK_TEST_UPSTREAM") {
        upstream_main(id);
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_and_stickiness_across_weight_changes() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 90), ("2", 10)], "1", 60_000),
        vec![a.instance("1", Ready), b.instance("2", Ready)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;
    let http = http();

    // 1 000 new users: about 10 % land on the canary.
    let mut users = Vec::new();
    let mut on_b = 0;
    for _ in 0..1_000 {
        let mut u = User::new();
        let ans = u.get(&http, &proxy.url("/")).await.unwrap();
        assert_eq!(ans.status, 200);
        assert!(ans.set_cookie.is_some(), "a new session gets its cookie");
        if ans.body == "b" {
            on_b += 1;
        }
        users.push((u, ans.body));
    }
    assert!((70..=130).contains(&on_b), "{on_b} of 1000 on the canary");

    // Move the canary to 50 %: existing users keep their instance, new ones split evenly.
    stub.set_service(service(&[("1", 50), ("2", 50)], "1", 60_000));
    proxy.wait_revision(stub.revision()).await;
    for (u, first) in users.iter_mut().take(300) {
        let ans = u.get(&http, &proxy.url("/")).await.unwrap();
        assert_eq!(&ans.body, first, "a session stays on its instance");
    }
    let mut on_b = 0;
    for _ in 0..600 {
        if User::new().get(&http, &proxy.url("/")).await.unwrap().body == "b" {
            on_b += 1;
        }
    }
    assert!(
        (240..=360).contains(&on_b),
        "{on_b} of 600 on the canary at 50 %"
    );
    let metrics = proxy.metrics().await;
    assert!(metrics
        .contains("haddock_proxy_http_requests_total{service=\"svc\",version=\"2\",instance_id=\"b\",status=\"200\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_traffic_costs_no_request() {
    let mut a = Upstream::start("a");
    let b = Upstream::start("b");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready), b.instance("1", Ready)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;

    let url = proxy.url("/slow");
    let fast = proxy.url("/");
    let mut workers = Vec::new();
    for i in 0..16 {
        let (url, fast) = (url.clone(), fast.clone());
        workers.push(tokio::spawn(async move {
            let http = http();
            let mut u = User::new();
            let mut seen = HashMap::<String, u32>::new();
            let mut errors = Vec::new();
            let until = std::time::Instant::now() + Duration::from_millis(2_500);
            while std::time::Instant::now() < until {
                // Half the users sit in slow requests when the kill lands (reset mid-request).
                let target = if i % 2 == 0 { &url } else { &fast };
                match u.get(&http, target).await {
                    Ok(ans) if ans.status == 200 => *seen.entry(ans.body).or_default() += 1,
                    Ok(ans) => errors.push(format!("status {}", ans.status)),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (seen, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The locator is not told: the proxy finds out by failing to reach it.
    a.kill();
    let mut total = 0;
    for w in workers {
        let (seen, errors) = w.await.unwrap();
        assert!(errors.is_empty(), "client errors: {errors:?}");
        total += seen.values().sum::<u32>();
    }
    assert!(total > 50, "only {total} requests");
    let metrics = proxy.metrics().await;
    let retries: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("haddock_proxy_retries_total{service=\"svc\"} "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(retries >= 1.0, "{metrics}");
    // Sessions that lived on `a` now carry a cookie for `b`.
    let mut u = User::new();
    for _ in 0..20 {
        assert_eq!(u.get(&http(), &proxy.url("/")).await.unwrap().body, "b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ready_instance_is_a_503_with_a_json_body() {
    let a = Upstream::start("a");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Starting)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;
    let resp = http().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_ready_instance");

    // Becoming ready is picked up from the watch stream.
    stub.set_instance(a.instance("1", Ready));
    proxy.wait_revision(stub.revision()).await;
    assert_eq!(
        http()
            .get(proxy.url("/"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_foreign_cookies_start_a_new_session() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready), b.instance("1", Ready)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;
    let http = http();
    let mut u = User::new();
    let first = u.get(&http, &proxy.url("/")).await.unwrap();
    let cookie = u.cookie.clone().unwrap();
    // Sealed: the cookie does not name its instance or version (the unit tests check that
    // against realistic ids; these upstreams are called `a` and `b`).
    assert!(cookie.starts_with("v2."), "{cookie}");
    // Tampered anywhere (here: a byte of the nonce, of the sealed fields, of the tag), cut or
    // extended, foreign or garbage: refused, and the request starts a new session.
    let flip = |i: usize| {
        let mut b = cookie.clone().into_bytes();
        b[i] = if b[i] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    for bad in [
        flip(5),
        flip(cookie.len() / 2),
        flip(cookie.len() - 1),
        "garbage".to_string(),
        format!("{cookie}00"),
        cookie[..cookie.len() - 2].to_string(),
    ] {
        assert_ne!(bad, cookie);
        let mut attacker = User {
            cookie: Some(bad.clone()),
        };
        let ans = attacker.get(&http, &proxy.url("/")).await.unwrap();
        assert_eq!(ans.status, 200);
        let new = ans.set_cookie.expect("a new session is issued");
        assert_ne!(new, bad);
    }
    // The header works like the cookie for clients without a cookie jar.
    let resp = http
        .get(proxy.url("/"))
        .header("x-haddock-session", &cookie)
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("set-cookie").is_none());
    assert_eq!(resp.text().await.unwrap(), first.body);
    assert!(proxy
        .metrics()
        .await
        .contains("haddock_proxy_rejected_tokens_total{service=\"svc\",reason=\"bad_signature\"}"));
}

/// A token in the signed-only format proxies issued before cookies were sealed (as the
/// session module's `encode_v1` test helper writes it).
fn legacy_token(instance: &str, version: &str, now_ms: u64) -> String {
    use hmac::Mac;
    let body = format!(
        "v1.00112233445566778899aabbccddeeff.{}.{}.{now_ms}.{now_ms}",
        hex::encode(instance),
        hex::encode(version)
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(SERVICE.as_bytes());
    mac.update(b"\n");
    mac.update(body.as_bytes());
    format!("{body}.{}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_signed_cookie_keeps_its_instance_and_comes_back_sealed() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready), b.instance("1", Ready)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;
    let now = proxy::session::now_ms();
    let http = http();
    for instance in ["a", "b"] {
        let mut u = User {
            cookie: Some(legacy_token(instance, "1", now)),
        };
        let ans = u.get(&http, &proxy.url("/")).await.unwrap();
        assert_eq!(ans.body, instance, "the session keeps its instance");
        let sealed = ans.set_cookie.expect("re-issued on first use");
        assert!(sealed.starts_with("v2."), "{sealed}");
        assert_eq!(u.get(&http, &proxy.url("/")).await.unwrap().body, instance);
    }
}

/// Reads everything the proxy sends until it closes the connection (a reset counts as a close).
async fn read_until_closed(s: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A proxy in front of upstream `a` with a 1 s header timeout (and what keeps it running).
async fn head_scene() -> (Proxy, Upstream, LocatorStub, tempfile::TempDir) {
    let a = Upstream::start("a");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &["--header-timeout-ms", "1000"]);
    proxy.wait_revision(1).await;
    (proxy, a, stub, dir)
}

/// A head that starts with `burst` (sent at once), then `drip` and `z`s one byte every 100 ms,
/// never finishing: the proxy (`--header-timeout-ms 1000`) must answer 408 and close after 1 s.
async fn expect_cut_off_after_1_s(proxy: &Proxy, burst: &'static [u8], drip: &'static [u8]) {
    use tokio::io::AsyncWriteExt;
    let conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (mut rd, mut wr) = conn.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        if wr.write_all(burst).await.is_ok() {
            for i in 0..80 {
                let byte = drip.get(i).copied().unwrap_or(b'z');
                if wr.write_all(&[byte]).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Keep the connection open: only the proxy may end it.
        (sent, wr)
    });
    let answer = tokio::time::timeout(Duration::from_secs(6), read_until_closed(&mut rd))
        .await
        .expect("the proxy ends the connection within 6 s");
    let elapsed = started.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "answered {answer:?} after {elapsed:?}"
    );
    assert!(
        answer.contains(r#""code":"request_header_timeout""#),
        "{answer}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2_500),
        "cut off after {elapsed:?}, the timeout being 1 s"
    );
    let (sent, _wr) = writer.await.unwrap();
    assert!(sent < 40, "the client kept sending {sent} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dribbling_its_request_head_is_cut_off_at_the_header_timeout() {
    let (proxy, _a, _stub, _dir) = head_scene().await;
    // Requests sent at a normal pace are served, on fresh and kept-alive connections alike.
    let http = http();
    let mut u = User::new();
    for _ in 0..3 {
        assert_eq!(u.get(&http, &proxy.url("/")).await.unwrap().body, "a");
    }

    // One header byte every 100 ms, never finishing (each byte arrives well within pingora's
    // per-read timeout, so only a total bound stops it).
    expect_cut_off_after_1_s(&proxy, b"", b"GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: ").await;
    assert!(proxy
        .metrics()
        .await
        .contains("haddock_proxy_request_header_timeouts_total 1"));
    // The proxy still serves, bodies included: the bytes read with the head (often the whole
    // body of a small request) and those after it reach the instance intact.
    assert_eq!(u.get(&http, &proxy.url("/")).await.unwrap().body, "a");
    for len in [10, 200_000] {
        let payload: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let echoed = http
            .put(proxy.url("/"))
            .body(payload.clone())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(echoed.len(), 1 + len);
        assert!(
            echoed == format!("a{payload}"),
            "a body of {len} bytes arrived changed"
        );
    }
}

// Pingora percent-escapes a request line httparse refuses (a space in the path) and parses
// again; were the head handed over before its end, pingora would read the rest itself, bound
// by its 60 s per-read timeout only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dribbled_head_with_an_illegal_request_line_is_cut_off_at_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let (proxy, _a, _stub, _dir) = head_scene().await;
    expect_cut_off_after_1_s(&proxy, b"GET /a b HTTP/1.1\r\nX: ", b"").await;
    // The same line in a whole head is pingora's: escaped and served.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    conn.write_all(b"GET /a b HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (mut rd, _wr) = conn.into_split();
    let answer = tokio::time::timeout(Duration::from_secs(6), read_until_closed(&mut rd))
        .await
        .expect("an answer within 6 s");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_head_over_64_kib_in_one_write_is_a_431() {
    use tokio::io::AsyncWriteExt;
    let (proxy, _a, _stub, _dir) = head_scene().await;
    // About 100 KiB in 100 headers (pingora takes up to 256 and 1 MiB), sent in one write.
    // (`Connection: close`: were it served, the answer would end too.)
    let mut head = b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n".to_vec();
    for i in 0..100 {
        head.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "p".repeat(1_000)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    assert!(head.len() > 100_000);
    let conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let (mut rd, mut wr) = conn.into_split();
    // The proxy may close before reading it all: a failed write is fine, the answer counts.
    let _ = wr.write_all(&head).await;
    let answer = tokio::time::timeout(Duration::from_secs(6), read_until_closed(&mut rd))
        .await
        .expect("an answer within 6 s");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(
        answer.contains(r#""code":"request_header_too_large""#),
        "{answer}"
    );
    assert!(proxy
        .metrics()
        .await
        .contains("haddock_proxy_request_headers_too_large_total 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_does_not_count_as_a_5xx_of_its_version() {
    use tokio::io::AsyncWriteExt;
    let a = Upstream::start("a");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;
    assert_eq!(
        User::new()
            .get(&http(), &proxy.url("/"))
            .await
            .unwrap()
            .status,
        200
    );

    // Ask for the slow answer (300 ms) and hang up at once.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    conn.write_all(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await
        .unwrap();
    drop(conn);
    eventually("the abandoned request in the metrics", Duration::from_secs(5),
        || async {
            let m = proxy.metrics().await;
            // 502 was how it was counted before (as if the instance had failed it).
            ["0", "502"].iter().any(|status| {
                m.contains(&format!(
                    "haddock_proxy_http_requests_total{{service=\"svc\",version=\"1\",instance_id=\"a\",status=\"{status}\"}} 1"
                ))
            })
        },
    )
    .await;
    // Two reports later, the report is certainly built after the abandoned request was recorded.
    let seen = stub.reports.lock().unwrap().len();
    eventually("two more reports", Duration::from_secs(5), || async {
        stub.reports.lock().unwrap().len() >= seen + 2
    })
    .await;
    let traffic = stub.last_report().unwrap().versions["1"];
    assert_eq!(
        (traffic.requests, traffic.responses_5xx),
        (1, 0),
        "only the answered request counts, and no 5xx"
    );
}

/// The drain tests' start: upstream `a` serving alone (ready, version 1) behind a fresh proxy
/// with session TTL `ttl_ms`, and upstream `b` running but not registered yet.
struct DrainScene {
    a: Upstream,
    b: Upstream,
    stub: LocatorStub,
    proxy: Proxy,
    _dir: tempfile::TempDir,
}

impl DrainScene {
    async fn start(ttl_ms: u64) -> DrainScene {
        let a = Upstream::start("a");
        let b = Upstream::start("b");
        let stub = LocatorStub::start(snapshot(
            service(&[("1", 100)], "1", ttl_ms),
            vec![a.instance("1", Ready)],
        ))
        .await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
        proxy.wait_revision(1).await;
        DrainScene {
            a,
            b,
            stub,
            proxy,
            _dir: dir,
        }
    }

    /// `b` becomes ready and `a` draining; returns once the proxy routes by that.
    async fn drain_a(&self) {
        self.stub.set_instance(self.b.instance("1", Ready));
        self.stub.set_instance(self.a.instance("1", Draining));
        self.proxy.wait_revision(self.stub.revision()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_sessions_until_idle_then_reports_zero() {
    let scene = DrainScene::start(1_500).await;
    let DrainScene { stub, proxy, .. } = &scene;
    let http = http();
    let mut old = User::new();
    assert_eq!(old.get(&http, &proxy.url("/")).await.unwrap().body, "a");

    // A new instance arrives and `a` starts draining.
    scene.drain_a().await;
    for _ in 0..50 {
        assert_eq!(
            User::new().get(&http, &proxy.url("/")).await.unwrap().body,
            "b"
        );
    }
    // The old session keeps its instance while it stays active …
    for _ in 0..5 {
        assert_eq!(old.get(&http, &proxy.url("/")).await.unwrap().body, "a");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eventually(
        "a report with a's session",
        Duration::from_secs(5),
        || async {
            stub.last_report()
                .is_some_and(|r| r.instances.get("a").is_some_and(|l| l.live_sessions == 1))
        },
    )
    .await;
    // … and once idle past the TTL, the proxy reports `a` empty: haddock may remove it.
    eventually(
        "a drained in the reports",
        Duration::from_secs(10),
        || async {
            stub.last_report().is_some_and(|r| {
                r.instances
                    .get("a")
                    .is_some_and(|l| l.live_sessions == 0 && l.in_flight == 0)
            })
        },
    )
    .await;
    // The expired cookie starts a new session, which goes to the ready instance.
    let ans = old.get(&http, &proxy.url("/")).await.unwrap();
    assert_eq!(ans.body, "b");
    assert!(ans.set_cookie.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locator_down_keeps_serving_and_a_restart_uses_the_persisted_table() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let port = free_port();
    let stub = LocatorStub::start_on(
        port,
        snapshot(
            service(&[("1", 100)], "1", 60_000),
            vec![a.instance("1", Ready)],
        ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;
    let http = http();
    let mut u = User::new();
    assert_eq!(u.get(&http, &proxy.url("/")).await.unwrap().body, "a");

    stub.stop();
    for _ in 0..20 {
        assert_eq!(u.get(&http, &proxy.url("/")).await.unwrap().body, "a");
    }
    // Restart the proxy while the locator is still down: the persisted table serves.
    let (p, admin) = (proxy.port, proxy.admin);
    proxy.kill();
    let proxy = Proxy::spawn_on(p, admin, &stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;
    assert_eq!(u.get(&http, &proxy.url("/")).await.unwrap().body, "a");

    // The locator comes back with a new instance and weights: the proxy reconnects.
    let mut snap = snapshot(
        service(&[("2", 100)], "2", 60_000),
        vec![a.instance("1", Draining), b.instance("2", Ready)],
    );
    snap.revision = 5;
    let _stub = LocatorStub::start_on(port, snap).await;
    proxy.wait_revision(5).await;
    assert_eq!(
        User::new().get(&http, &proxy.url("/")).await.unwrap().body,
        "b"
    );
    assert_eq!(
        u.get(&http, &proxy.url("/")).await.unwrap().body,
        "a",
        "draining keeps it"
    );
}

/// After its first whole report a proxy sends only what changed. A locator that restarted
/// holds no previous report and refuses changes (409 `full_report_needed`): the proxy sends
/// the whole report at once, and what it says (a live session on `a`) is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_carry_changes_and_a_restarted_locator_gets_the_whole_report() {
    let a = Upstream::start("a");
    let port = free_port();
    let snap = snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready)],
    );
    let stub = LocatorStub::start_on(port, snap.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &[]);
    proxy.wait_revision(1).await;
    let mut u = User::new();
    assert_eq!(u.get(&http(), &proxy.url("/")).await.unwrap().body, "a");
    let has_session = |r: &locator_wire::api::SessionReport| {
        r.instances.get("a").is_some_and(|l| l.live_sessions == 1)
    };
    eventually(
        "a report with a's session",
        Duration::from_secs(5),
        || async { stub.last_report().is_some_and(|r| has_session(&r)) },
    )
    .await;

    stub.stop();
    let stub = LocatorStub::start_on(port, snap).await;
    eventually(
        "a refused report of changes, then the whole report",
        Duration::from_secs(10),
        || async {
            stub.refused_changes
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
                && stub.last_report().is_some_and(|r| has_session(&r))
        },
    )
    .await;
}

/// The inodes of the listening TCP sockets on `port` (`/proc/net/tcp`: local address, state
/// `0A` is LISTEN, the inode is the tenth field).
fn listening_sockets(port: u16) -> std::collections::BTreeSet<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local == port && f.get(3) == Some(&"0A")).then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// The listening sockets of a proxy of two threads on `port`, once both shards listen (the
/// second may bind a moment after the proxy first answers).
async fn both_shards_listening(port: u16) -> std::collections::BTreeSet<u64> {
    eventually(
        "a listening socket per thread",
        Duration::from_secs(10),
        || async move { Some(listening_sockets(port)).filter(|s| s.len() == 2) },
    )
    .await
}

// The old process answers `Connection: close` from the moment it hands its sockets over, so
// clients leave its keep-alive connections before it drops the idle ones (server.rs). Each of
// its two threads has a listening socket of its own (SO_REUSEPORT), and the new process takes
// both over: the same sockets serve on, none is closed under a connecting client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_upgraded_under_load_without_failed_requests() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready), b.instance("1", Ready)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut old = Proxy::spawn(&stub.url, dir.path(), &["--threads", "2"]);
    old.wait_revision(1).await;
    let sockets = both_shards_listening(old.port).await;

    let url = old.url("/");
    let mut workers = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let http = http();
            let mut u = User::new();
            let mut first = None;
            let (mut ok, mut errors, mut moved) = (0u32, Vec::new(), 0u32);
            let until = std::time::Instant::now() + Duration::from_secs(9);
            while std::time::Instant::now() < until {
                match u.get(&http, &url).await {
                    Ok(ans) if ans.status == 200 => {
                        ok += 1;
                        if *first.get_or_insert(ans.body.clone()) != ans.body {
                            moved += 1;
                        }
                    }
                    Ok(ans) => errors.push(format!("status {}", ans.status)),
                    Err(e) => errors.push(format!("{e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, errors, moved)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = Proxy::spawn_on(
        old.port,
        old.admin,
        &stub.url,
        dir.path(),
        &["--upgrade", "--threads", "2"],
    );
    let sock = dir.path().join("upgrade.sock");
    eventually(
        "the new proxy's upgrade socket",
        Duration::from_secs(10),
        || {
            let exists = sock.exists();
            async move { exists }
        },
    )
    .await;
    old.signal("QUIT");
    for w in workers {
        let (ok, errors, moved) = w.await.unwrap();
        assert!(errors.is_empty(), "client errors: {errors:?}");
        assert!(ok > 50, "{ok} requests");
        assert_eq!(
            moved, 0,
            "sessions survive the restart (the cookie carries them)"
        );
    }
    old.wait();
    assert_eq!(
        listening_sockets(old.port),
        sockets,
        "the new process serves on the very sockets the old one handed over"
    );
    // The new process serves alone now.
    assert_eq!(
        User::new()
            .get(&http(), &new.url("/"))
            .await
            .unwrap()
            .status,
        200
    );
}

/// Opens an upgraded (websocket-style) connection through the proxy and returns it.
async fn open_tunnel(proxy: &Proxy) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut ws = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            ws.read(&mut byte).await.unwrap(),
            1,
            "proxy closed the tunnel"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws
}

async fn echo(ws: &mut tokio::net::TcpStream, msg: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ws.write_all(msg.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), ws.read(&mut buf))
        .await
        .expect("an echo within 5 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_stays_open_through_drain_and_holds_the_instance() {
    let ttl = 1_000;
    let scene = DrainScene::start(ttl).await;
    let DrainScene { stub, proxy, .. } = &scene;
    let mut ws = open_tunnel(proxy).await;
    assert_eq!(echo(&mut ws, "hello").await, "a:hello");

    // `a` drains: new sessions go to `b`, the tunnel stays where it is.
    scene.drain_a().await;
    let http = http();
    for _ in 0..20 {
        assert_eq!(
            User::new().get(&http, &proxy.url("/")).await.unwrap().body,
            "b"
        );
    }
    // Quiet for longer than the session TTL: an open tunnel is in flight, not idle, so the
    // reports keep `a` busy and haddock leaves it alone until the drain deadline.
    tokio::time::sleep(Duration::from_millis(2 * ttl)).await;
    assert_eq!(echo(&mut ws, "still there").await, "a:still there");
    eventually(
        "a report showing the tunnel in flight on a",
        Duration::from_secs(5),
        || async {
            stub.last_report()
                .is_some_and(|r| r.instances.get("a").is_some_and(|l| l.in_flight == 1))
        },
    )
    .await;
    drop(ws);
    eventually(
        "a drained once the tunnel closed",
        Duration::from_secs(10),
        || async {
            stub.last_report().is_some_and(|r| {
                r.instances
                    .get("a")
                    .is_some_and(|l| l.in_flight == 0 && l.live_sessions == 0)
            })
        },
    )
    .await;
}

// The shards bind with SO_REUSEPORT, which the kernel lets a second process of the same user
// join: a proxy started by mistake on a running one's address must fail, not quietly take a
// share of its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_a_running_ones_address_is_refused() {
    let a = Upstream::start("a");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready)],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let first = Proxy::spawn(&stub.url, dir.path(), &[]);
    first.wait_revision(1).await;
    let sockets = both_shards_listening(first.port).await;
    let other = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let (port, url, dir) = (first.port, stub.url.clone(), other.path().to_path_buf());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin", &format!("127.0.0.1:{}", free_port())])
                .args(["--locator", &url, "--service", SERVICE])
                .arg("--state-dir")
                .arg(dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another process listens there"), "{stderr}");
    assert_eq!(
        listening_sockets(first.port),
        sockets,
        "the first proxy's sockets alone"
    );
    assert_eq!(
        User::new()
            .get(&http(), &first.url("/"))
            .await
            .unwrap()
            .status,
        200
    );
}
