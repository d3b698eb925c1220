//! The HTTP layer: auth on every route, bad input, error bodies, limits.

use locator::api::ErrorBody;
use locator::auth::Role;
use locator::server::{Access, ROUTES};
use locator::testing::{self, DEPLOY_TOKEN, PROXY_TOKEN, READ_TOKEN};
use reqwest::Method;
use std::time::Duration;

async fn call(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> (u16, String) {
    let http = reqwest::Client::new();
    let mut req = http.request(
        Method::from_bytes(method.as_bytes()).unwrap(),
        format!("{url}{path}"),
    );
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_vec());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    // A watch stream never ends: only look at its status.
    if path.starts_with("/v1/watch") && status == 200 {
        return (status, String::new());
    }
    (status, resp.text().await.unwrap())
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .error
        .code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_its_role() {
    let loc = testing::embedded(Duration::from_secs(10)).await;
    for (method, template, access, _) in ROUTES {
        let path = template.replace("{name}", "svc").replace("{id}", "x");
        let Access::Needs(role) = access else {
            let (status, _) = call(&loc.url, method, &path, None, None).await;
            assert_eq!(status, 200, "{method} {path} is open");
            continue;
        };
        for token in [None, Some("wrong-token")] {
            let (status, body) = call(&loc.url, method, &path, token, Some(b"{}")).await;
            assert_eq!(
                (status, error_code(&body).as_str()),
                (401, "unauthorized"),
                "{method} {path} {token:?}"
            );
        }
        let wrong: &[&str] = match role {
            Role::Read => &[],
            Role::Deploy => &[READ_TOKEN, PROXY_TOKEN],
            Role::Proxy => &[READ_TOKEN, DEPLOY_TOKEN],
        };
        for token in wrong {
            let (status, body) = call(&loc.url, method, &path, Some(token), Some(b"{}")).await;
            assert_eq!(
                (status, error_code(&body).as_str()),
                (403, "forbidden"),
                "{method} {path} {token}"
            );
        }
        let right = match role {
            Role::Read => [READ_TOKEN, DEPLOY_TOKEN, PROXY_TOKEN].as_slice(),
            Role::Deploy => &[DEPLOY_TOKEN],
            Role::Proxy => &[PROXY_TOKEN],
        };
        for token in right {
            let (status, _) = call(&loc.url, method, &path, Some(token), Some(b"{}")).await;
            assert!(
                status != 401 && status != 403,
                "{method} {path} with {token}: {status}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let loc = testing::embedded(Duration::from_secs(10)).await;
    let url = &loc.url;
    let t = Some(DEPLOY_TOKEN);
    let spec = br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1000,"max_drain_ms":1000},"routes":{"hosts":["Shop.example.com"],"path_prefix":"/api","redirect_https":true,"hsts_max_age_s":600}}"#;
    assert_eq!(
        call(url, "PUT", "/v1/services/svc", t, Some(spec)).await.0,
        200
    );
    let snapshot = loc.deploy().snapshot().await.unwrap();
    let routes = &snapshot.service("svc").unwrap().routes;
    assert_eq!(routes.hosts, ["shop.example.com"]);
    assert!(routes.redirect_https);
    assert_eq!(routes.hsts_max_age_s, Some(600));
    let before = snapshot.revision;

    let cases: &[(&str, &str, &[u8], u16, &str)] = &[
        ("PUT", "/v1/services/svc2", b"{not json", 400, "invalid_json"),
        ("PUT", "/v1/services/svc2", br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1,"max_drain_ms":1},"extra":1}"#, 400, "invalid_json"),
        ("PUT", "/v1/services/bad%20name", spec, 400, "invalid_input"),
        ("PUT", "/v1/services/svc2", br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":0,"max_drain_ms":1}}"#, 400, "invalid_input"),
        ("PUT", "/v1/services/svc2", br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1,"max_drain_ms":1},"routes":{"hosts":["shop.EXAMPLE.com"],"path_prefix":"/api"}}"#, 409, "route_taken"),
        ("PUT", "/v1/services/svc2", br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1,"max_drain_ms":1},"routes":{"hosts":["bad host"]}}"#, 400, "invalid_input"),
        ("PUT", "/v1/services/svc2", br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1,"max_drain_ms":1},"routes":{"hosts":["a.b"],"path_prefix":"api/"}}"#, 400, "invalid_input"),
        ("PUT", "/v1/services/svc2", br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1,"max_drain_ms":1},"routes":{"hosts":["a.b"],"prefix":"/x"}}"#, 400, "invalid_json"),
        ("PUT", "/v1/services/svc2", br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1,"max_drain_ms":1},"routes":{"hosts":["a.b"],"hsts_max_age_s":63115201}}"#, 400, "invalid_input"),
        ("PUT", "/v1/services/svc2", br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1,"max_drain_ms":1},"routes":{"redirect_https":"yes"}}"#, 400, "invalid_json"),
        ("POST", "/v1/instances", br#"{"id":"a","service":"svc","version":"1","address":"nowhere"}"#, 400, "invalid_address"),
        ("POST", "/v1/instances", br#"{"id":"a","service":"svc","version":"1","address":"10.0.0.1:0"}"#, 400, "invalid_address"),
        ("POST", "/v1/instances", br#"{"id":"a","service":"nope","version":"1","address":"10.0.0.1:80"}"#, 404, "unknown_service"),
        ("POST", "/v1/instances", br#"{"id":"a","service":"svc","version":"1","address":"10.0.0.1:80","state":"draining"}"#, 400, "invalid_input"),
        ("PUT", "/v1/instances/nope/state", br#"{"state":"ready"}"#, 404, "unknown_instance"),
        ("PUT", "/v1/instances/nope/state", br#"{"state":"sideways"}"#, 400, "invalid_json"),
        ("POST", "/v1/instances/nope/heartbeat", b"", 404, "unknown_instance"),
        ("POST", "/v1/heartbeats", br#"{"ids":"a"}"#, 400, "invalid_json"),
        ("POST", "/v1/heartbeats", br#"{"ids":[],"extra":1}"#, 400, "invalid_json"),
        ("PUT", "/v1/services/svc/weights", br#"{"weights":{"1":100}}"#, 400, "invalid_weights"),
        ("PUT", "/v1/services/svc/weights", br#"{"weights":{"1":300}}"#, 400, "invalid_json"),
        ("PUT", "/v1/services/nope/weights", br#"{"weights":{"1":100}}"#, 404, "unknown_service"),
        ("POST", "/v1/services/svc/limits", br#"{"who":"me","instances":[{"id":"nope","memory_to":536870912}]}"#, 404, "unknown_instance"),
        ("POST", "/v1/services/nope/limits", br#"{"who":"me","instances":[{"id":"a","memory_to":536870912}]}"#, 404, "unknown_service"),
        ("POST", "/v1/services/svc/limits", br#"{"who":"me","instances":[]}"#, 400, "invalid_input"),
        ("POST", "/v1/services/svc/limits", br#"{"who":"me","instances":[{"id":"a","memory_to":-1}]}"#, 400, "invalid_json"),
        ("POST", "/v1/services/svc/limits", br#"{"who":"me","instances":[{"id":"a","memory_to":536870912}],"swap":2}"#, 400, "invalid_json"),
        ("PUT", "/v1/services/svc/lock", br#"{"who":"me"}"#, 400, "invalid_json"),
        ("PUT", "/v1/services/svc/lock", br#"{"who":"me","message":"m","until":1}"#, 400, "invalid_json"),
        ("PUT", "/v1/services/svc/lock", br#"{"who":"me","message":""}"#, 400, "invalid_input"),
        ("PUT", "/v1/services/nope/lock", br#"{"who":"me","message":"m"}"#, 404, "unknown_service"),
        ("DELETE", "/v1/services/nope/lock", b"", 404, "unknown_service"),
        ("POST", "/v1/releases", br#"{"service":"nope","from_version":null,"to_version":"2","image":"i:2","who":"me"}"#, 404, "unknown_service"),
        ("POST", "/v1/releases", br#"{"service":"svc","to_version":"2","who":"me"}"#, 400, "invalid_json"),
        ("PATCH", "/v1/releases/rel-1", br#"{"state":"starting"}"#, 404, "unknown_release"),
        ("POST", "/v1/releases/rel-1/control", br#"{"control":"explode"}"#, 400, "invalid_json"),
        ("GET", "/v1/nothing", b"", 404, "not_found"),
        ("DELETE", "/v1/services/svc", b"", 405, "method_not_allowed"),
        ("GET", "/v1/watch?since=yesterday", b"", 400, "invalid_input"),
        ("GET", "/v1/releases?active=maybe", b"", 400, "invalid_input"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, text) = call(url, method, path, t, Some(body)).await;
        assert_eq!(
            (got, error_code(&text).as_str()),
            (*status, *code),
            "{method} {path}: {text}"
        );
    }

    // If-Match that is not a revision.
    let resp = reqwest::Client::new()
        .put(format!("{url}/v1/services/svc/weights"))
        .bearer_auth(DEPLOY_TOKEN)
        .header("If-Match", "banana")
        .body(r#"{"weights":{"1":100}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Body limit: 413, with or without a declared length. Raw sockets, because the server
    // answers without reading the rest and an ordinary client fails on the broken pipe first.
    let addr = loc.server.addr;
    let declared = format!(
        "PUT /v1/services/svc2 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DEPLOY_TOKEN}\r\ncontent-length: {}\r\n\r\n   ",
        2 * 1024 * 1024
    );
    assert!(raw(addr, declared.into_bytes(), 0)
        .await
        .starts_with("HTTP/1.1 413"));
    let chunked = format!(
        "PUT /v1/services/svc2 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DEPLOY_TOKEN}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    assert!(raw(addr, chunked.into_bytes(), 24)
        .await
        .starts_with("HTTP/1.1 413"));

    assert_eq!(
        loc.deploy().snapshot().await.unwrap().revision,
        before,
        "nothing changed"
    );

    // The same host under another path prefix is another service's; routes come back
    // normalised (lower case).
    let web = br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1,"max_drain_ms":1},"routes":{"hosts":["shop.example.com"],"path_prefix":"/web"}}"#;
    let (got, text) = call(url, "PUT", "/v1/services/svc2", t, Some(web)).await;
    assert_eq!(got, 200, "{text}");
    let snap = loc.deploy().snapshot().await.unwrap();
    let svc = snap.services.iter().find(|s| s.name == "svc").unwrap();
    assert_eq!(svc.routes.hosts, ["shop.example.com"]);
    assert_eq!(svc.routes.path_prefix.as_deref(), Some("/api"));

    // The driver's fields of a release update, on a release that exists.
    let new = br#"{"service":"svc","from_version":null,"to_version":"2","image":"i:2","who":"me"}"#;
    let (got, text) = call(url, "POST", "/v1/releases", t, Some(new)).await;
    assert_eq!(got, 200, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = loc.deploy().release(&id).await.unwrap();
    let path = format!("/v1/releases/{id}");
    let cases: &[(&[u8], u16, &str)] = &[
        (
            br#"{"status":{"bake":{"weight":10,"pause_ms":1},"bogus":1}}"#,
            400,
            "invalid_json",
        ),
        (
            br#"{"status":{"driver":{"who":"me","at_ms":1}},"extra":true}"#,
            400,
            "invalid_json",
        ),
        (
            br#"{"expect_state":"sideways","state":"starting"}"#,
            400,
            "invalid_json",
        ),
        (br#"{"lease":""}"#, 400, "invalid_input"),
        (br#"{"lease":"  "}"#, 400, "invalid_input"),
        (br#"{"drop_lease":true}"#, 400, "invalid_input"),
        (
            br#"{"expect_state":"shifting","state":"starting"}"#,
            409,
            "state_conflict",
        ),
    ];
    for (body, status, code) in cases {
        let (got, text) = call(url, "PATCH", &path, t, Some(body)).await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(
            (got, error_code(&text).as_str()),
            (*status, *code),
            "{shown}: {text}"
        );
    }
    assert_eq!(
        loc.deploy().release(&id).await.unwrap(),
        before,
        "the release is as it was"
    );
}

/// Mutations are recorded under the name of the token that made them, whatever the body
/// claims; a token scoped to one service changes nothing of another (403 `out_of_scope`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_recorded_under_the_token_name_and_scopes_hold() {
    let loc = testing::embedded_with(Duration::from_secs(10), |c| {
        c.tokens
            .add_named(Role::Deploy, "ci-secret", "ci", Some(vec!["svc".into()]))
            .unwrap();
        c.tokens
            .add_named(Role::Deploy, "alice-secret", "alice", None)
            .unwrap();
    })
    .await;
    let url = &loc.url;
    let spec = br#"{"sessions":{"cookie_name":"c","idle_ttl_ms":1000,"max_drain_ms":1000}}"#;
    for svc in ["svc", "other"] {
        let path = format!("/v1/services/{svc}");
        assert_eq!(
            call(url, "PUT", &path, Some("alice-secret"), Some(spec))
                .await
                .0,
            200
        );
    }
    let before = loc.deploy().snapshot().await.unwrap().revision;
    let claims_bob = br#"{"who":"bob","message":"freeze"}"#;
    for (path, body) in [
        ("/v1/services/other/lock", &claims_bob[..]),
        ("/v1/services/other", &spec[..]),
        (
            "/v1/releases",
            &br#"{"service":"other","from_version":null,"to_version":"2","image":"i:2","who":"bob"}"#[..],
        ),
    ] {
        let method = if path == "/v1/releases" { "POST" } else { "PUT" };
        let (status, body) = call(url, method, path, Some("ci-secret"), Some(body)).await;
        assert_eq!((status, error_code(&body).as_str()), (403, "out_of_scope"), "{path}: {body}");
        assert!(body.contains("`ci`") && body.contains("`other`"), "{body}");
    }
    assert_eq!(
        loc.deploy().snapshot().await.unwrap().revision,
        before,
        "an out-of-scope write changed something"
    );
    // In scope: recorded as `ci`, not as the `bob` the body claims.
    let (status, body) = call(
        url,
        "PUT",
        "/v1/services/svc/lock",
        Some("ci-secret"),
        Some(claims_bob),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let svc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(svc["lock"]["who"], "ci", "{svc}");
    call(
        url,
        "DELETE",
        "/v1/services/svc/lock",
        Some("ci-secret"),
        None,
    )
    .await;
    let new =
        br#"{"service":"svc","from_version":null,"to_version":"2","image":"i:2","who":"bob"}"#;
    let (status, body) = call(url, "POST", "/v1/releases", Some("ci-secret"), Some(new)).await;
    assert_eq!(status, 200, "{body}");
    let rel: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rel["who"], "ci", "{rel}");
    // An operator's control, by another token, is kept under that token's name; one by the
    // scoped token on a release of its own service is allowed.
    let control = format!("/v1/releases/{}/control", rel["id"].as_str().unwrap());
    let (status, body) = call(
        url,
        "POST",
        &control,
        Some("alice-secret"),
        Some(br#"{"control":"pause"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        url,
        "POST",
        &control,
        Some("ci-secret"),
        Some(br#"{"control":"resume"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let rel: serde_json::Value = serde_json::from_str(&body).unwrap();
    let actions: Vec<(&str, &str)> = rel["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["control"].as_str().unwrap(), a["who"].as_str().unwrap()))
        .collect();
    assert_eq!(actions, [("pause", "alice"), ("resume", "ci")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_openapi_are_served() {
    let loc = testing::embedded(Duration::from_secs(10)).await;
    let (_, _) = call(&loc.url, "GET", "/v1/services", Some(READ_TOKEN), None).await;
    let (status, text) = call(&loc.url, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("haddock_locator_http_requests_total"),
        "{text}"
    );
    let (status, text) = call(&loc.url, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
}

/// Sends `head` then `chunks` chunks of 64 KiB (chunked encoding) and returns what the server
/// answered, ignoring write errors once it stopped reading.
async fn raw(addr: std::net::SocketAddr, head: Vec<u8>, chunks: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&head).await?;
        let chunk = [
            format!("{:x}\r\n", 64 * 1024).into_bytes(),
            vec![b' '; 64 * 1024],
            b"\r\n".to_vec(),
        ]
        .concat();
        for _ in 0..chunks {
            wr.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), rd.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    writer.abort();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}
