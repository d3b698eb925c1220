//! The proxy at the edge, with real sockets, real TLS clients (reqwest on rustls, and
//! `openssl s_client`) and certificates issued by a test CA: SNI, reload, refusals, redirects,
//! HSTS, forwarded headers, a handshake flood, and the sticky/canary/drain/retry behaviour run
//! over HTTP/1.1, HTTPS and HTTP/2 alike.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::*;
use locator_wire::api::InstanceState::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Not a test: the body of the upstream processes the other tests start (see `common`).
#[test]
fn upstream_process() {
    if let Ok(id) = std::env::var("HADDOCK_TEST_UPSTREAM") {
        upstream_main(id);
    }
}

/// A proxy with a plain and an HTTPS listener, and its certificate directory.
struct Edge {
    proxy: Proxy,
    tls_port: u16,
    pki: Pki,
    certs: PathBuf,
    _own_certs: Option<tempfile::TempDir>,
    _state: tempfile::TempDir,
}

impl Edge {
    /// A proxy serving `app.test` and `*.apps.test` over HTTPS, certificates in a directory
    /// given by `--tls-certs`.
    async fn start(locator: &str, extra: &[&str]) -> Edge {
        Self::start_with(locator, true, extra).await
    }

    /// The same; without `certs_flag` the certificates are in the state dir's `certs`, where
    /// the proxy looks with no `--tls-certs`.
    async fn start_with(locator: &str, certs_flag: bool, extra: &[&str]) -> Edge {
        let pki = Pki::new();
        let state = tempfile::tempdir().unwrap();
        let own_certs = certs_flag.then(|| tempfile::tempdir().unwrap());
        let certs = own_certs
            .as_ref()
            .map_or_else(|| state.path().join("certs"), |d| d.path().to_path_buf());
        std::fs::create_dir_all(&certs).unwrap();
        pki.issue(&certs, "app", &["app.test"], -60, 3600);
        pki.issue(&certs, "apps", &["*.apps.test"], -60, 3600);
        let tls_port = free_port();
        let listen = format!("127.0.0.1:{tls_port}");
        let certs_arg = certs.to_str().unwrap().to_string();
        let mut args = vec!["--tls-listen", &listen];
        if certs_flag {
            args.extend(["--tls-certs", &certs_arg]);
        }
        args.extend_from_slice(extra);
        let proxy = Proxy::spawn(locator, state.path(), &args);
        proxy.wait_revision(1).await;
        eventually(
            "the HTTPS listener",
            Duration::from_secs(20),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
                    .await
                    .is_ok()
            },
        )
        .await;
        Edge {
            proxy,
            tls_port,
            pki,
            certs,
            _own_certs: own_certs,
            _state: state,
        }
    }

    fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tls_port))
    }

    /// An HTTPS client trusting the test CA, with the test hosts resolving to the proxy.
    fn https(&self, h2: bool) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(self.pki.root())
            .tls_info(true)
            .timeout(Duration::from_secs(10));
        for host in ["app.test", "x.apps.test", "unknown.test"] {
            b = b.resolve(host, self.tls_addr());
        }
        if !h2 {
            b = b.http1_only();
        }
        b.build().unwrap()
    }

    fn https_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.tls_port)
    }

    async fn metric(&self, prefix: &str) -> f64 {
        self.proxy.metric(prefix).await
    }
}

/// One upstream `a` serving version 1 of the test service, and the locator stub routing to it.
async fn one_instance() -> (Upstream, LocatorStub) {
    let a = Upstream::start("a");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready)],
    ))
    .await;
    (a, stub)
}

/// The DER of the certificate a handshake for `host` was answered with.
async fn served_certificate(http: &reqwest::Client, url: &str) -> Vec<u8> {
    let resp = http.get(url).send().await.unwrap();
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("a TLS answer carries the peer certificate")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_chosen_by_sni_reloaded_and_bad_ones_refused() {
    let (_a, stub) = one_instance().await;
    let edge = Edge::start(&stub.url, &[]).await;
    let http = edge.https(true);

    // Each name gets the certificate that covers it (the client checks the name).
    for host in ["app.test", "x.apps.test"] {
        let resp = http.get(edge.https_url(host, "/")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{host}");
        assert_eq!(resp.text().await.unwrap(), "a");
    }
    // A host no certificate covers, and a hello with no name (a client dialling the IP), fail
    // their handshake: no other host's certificate is handed out.
    let err = http
        .get(edge.https_url("unknown.test", "/"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    let by_ip = format!("https://127.0.0.1:{}/", edge.tls_port);
    assert!(http.get(&by_ip).send().await.unwrap_err().is_connect());
    let refused = "haddock_proxy_tls_handshakes_refused_total{reason=";
    assert_eq!(
        edge.metric(&format!("{refused}\"unknown_host\"}}")).await,
        1.0
    );
    assert_eq!(edge.metric(&format!("{refused}\"no_sni\"}}")).await, 1.0);

    // A renewed certificate is served from the next handshake on, without a restart.
    let url = edge.https_url("app.test", "/");
    let first = served_certificate(&edge.https(true), &url).await;
    let renewed = edge.pki.issue(&edge.certs, "app", &["app.test"], -60, 7200);
    assert_ne!(first, renewed);
    eventually(
        "the renewed certificate in service",
        Duration::from_secs(10),
        || async { served_certificate(&edge.https(true), &url).await == renewed },
    )
    .await;

    // An expired certificate written over it is refused (counted once) and the renewed one
    // stays in service.
    let refusals = "haddock_proxy_tls_certificates_refused_total ";
    assert_eq!(edge.metric(refusals).await, 0.0);
    edge.pki
        .issue(&edge.certs, "app", &["app.test"], -7200, -60);
    eventually(
        "the expired certificate refused",
        Duration::from_secs(10),
        || async { edge.metric(refusals).await == 1.0 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(edge.metric(refusals).await, 1.0, "refused once per change");
    assert_eq!(served_certificate(&edge.https(true), &url).await, renewed);
    assert_eq!(edge.metric("haddock_proxy_tls_certificates ").await, 2.0);
}

/// What `openssl s_client` reports for a hello without SNI to `port`, verifying the answer
/// against the test CA for the name `app.test`.
fn hello_without_a_name(port: u16, ca: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-noservername",
            "-verify_hostname",
            "app.test",
            "-CAfile",
        ])
        .arg(ca)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_host_answers_hellos_without_a_name() {
    let (_a, stub) = one_instance().await;
    let without = Edge::start(&stub.url, &[]).await;
    let with = Edge::start(&stub.url, &["--tls-default-host", "APP.test"]).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ca_dir.path().join("ca.pem");

    std::fs::write(&ca, without.pki.ca.pem()).unwrap();
    let refused = hello_without_a_name(without.tls_port, &ca);
    assert!(refused.contains("alert"), "{refused}");
    assert!(
        refused.contains("no peer certificate available"),
        "{refused}"
    );

    std::fs::write(&ca, with.pki.ca.pem()).unwrap();
    let answered = hello_without_a_name(with.tls_port, &ca);
    // The answer verifies against the test CA for the name app.test.
    assert!(!answered.contains("no peer certificate"), "{answered}");
    assert!(
        answered.contains("Verify return code: 0 (ok)"),
        "{answered}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_and_https_carries_hsts_secure_cookies_and_forwarded_headers() {
    let (_a, stub) = one_instance().await;
    let edge = Edge::start(&stub.url, &["--redirect-https", "--hsts-max-age", "600"]).await;

    // Plain HTTP: a 308 to the same URL over HTTPS, nothing reaches the instance.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = plain
        .get(edge.proxy.url("/headers?x=1"))
        .header("host", "app.test:80")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://app.test:{}/headers?x=1", edge.tls_port).as_str()
    );
    assert!(resp.headers().get("set-cookie").is_none());
    // A request with no host to send the client to is a 400 with a JSON error.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", edge.proxy.port))
        .await
        .unwrap();
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"bad_host""#), "{answer}");

    // HTTPS: HSTS, a Secure cookie, and the instance sees the client's address and scheme,
    // not what the client claimed.
    let resp = edge
        .https(true)
        .get(edge.https_url("app.test", "/headers"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "http")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.headers()["strict-transport-security"], "max-age=600");
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let body = resp.text().await.unwrap();
    assert!(
        body.starts_with("a xff=127.0.0.1 proto=https host=app.test"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_certs_the_certificates_are_the_state_dirs() {
    let (_a, stub) = one_instance().await;
    let edge = Edge::start_with(&stub.url, false, &[]).await;
    let resp = edge
        .https(false)
        .get(edge.https_url("app.test", "/headers"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp
        .text()
        .await
        .unwrap()
        .starts_with("a xff=127.0.0.1 proto=https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_brings_its_own_redirect_and_hsts() {
    // `svc` at app.test asks for both; `blog` at x.apps.test for HSTS only; the proxy itself
    // has neither flag.
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let mut strict = service(&[("1", 100)], "1", 60_000);
    strict.routes = locator_wire::api::Routes {
        hosts: vec!["app.test".into()],
        redirect_https: true,
        hsts_max_age_s: Some(120),
        ..Default::default()
    };
    let mut relaxed = service(&[("1", 100)], "1", 60_000);
    relaxed.name = "blog".into();
    relaxed.routes.hosts = vec!["x.apps.test".into()];
    relaxed.routes.hsts_max_age_s = Some(60);
    let mut blog_instance = b.instance("1", Ready);
    blog_instance.service = "blog".into();
    let stub = LocatorStub::start(locator_wire::api::Snapshot {
        revision: 1,
        services: vec![strict, relaxed],
        instances: vec![a.instance("1", Ready), blog_instance],
        ..Default::default()
    })
    .await;
    let edge = Edge::start(&stub.url, &["--service", &format!("{SERVICE},blog")]).await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let over_http = |host: &'static str| {
        plain
            .get(edge.proxy.url("/headers?x=1"))
            .header("host", host)
            .send()
    };

    let resp = over_http("app.test").await.unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://app.test:{}/headers?x=1", edge.tls_port).as_str()
    );
    let resp = over_http("x.apps.test").await.unwrap();
    assert_eq!(resp.status(), 200, "blog asked for no redirect");
    assert!(
        resp.headers().get("strict-transport-security").is_none(),
        "HSTS over plain HTTP"
    );
    assert!(resp.text().await.unwrap().starts_with("b "));

    let https = edge.https(false);
    let over_https = |host: &'static str| https.get(edge.https_url(host, "/headers")).send();
    let resp = over_https("app.test").await.unwrap();
    assert_eq!(resp.headers()["strict-transport-security"], "max-age=120");
    assert!(resp.text().await.unwrap().starts_with("a "));
    let resp = over_https("x.apps.test").await.unwrap();
    assert_eq!(resp.headers()["strict-transport-security"], "max-age=60");
    assert!(resp.text().await.unwrap().starts_with("b "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_balancer_its_forwarded_headers_are_believed() {
    let (_a, stub) = one_instance().await;
    let edge = Edge::start(&stub.url, &["--trust-forwarded", "--redirect-https"]).await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // The balancer terminated TLS: not redirected, a Secure cookie, the instance sees https
    // and the chain of addresses.
    let resp = plain
        .get(edge.proxy.url("/headers"))
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let body = resp.text().await.unwrap();
    assert!(
        body.starts_with("a xff=198.51.100.1, 127.0.0.1 proto=https"),
        "{body}"
    );
    // Plain HTTP at the balancer: redirected as any plain request.
    let resp = plain
        .get(edge.proxy.url("/headers"))
        .header("x-forwarded-proto", "http")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_sends_nothing_after_tls_is_cut_off() {
    let (_a, stub) = one_instance().await;
    let edge = Edge::start(&stub.url, &["--header-timeout-ms", "1000"]).await;
    // openssl negotiates h2 and then sends nothing (its stdin stays open, empty).
    let mut client = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", edge.tls_port),
        ])
        .args(["-servername", "app.test", "-alpn", "h2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let closed = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(10) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut out = String::new();
    if closed.is_none() {
        let _ = client.kill();
    }
    use std::io::Read;
    client
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    assert!(
        closed.is_some(),
        "the proxy kept a silent HTTP/2 connection open for 10 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_and_garbage_leave_real_clients_served() {
    let (_a, stub) = one_instance().await;
    let edge = Edge::start(&stub.url, &[]).await;
    let addr = edge.tls_addr();
    // 300 connections that never start a handshake, 100 that stop halfway through a client
    // hello, all held open.
    let mut held = Vec::new();
    for i in 0..400 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if i % 4 == 0 {
            // A handshake record header announcing 512 bytes, then 5 of them.
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])
                .await
                .unwrap();
        }
        held.push(s);
    }
    // Plain HTTP sent to the TLS port is refused and the connection closed.
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a plaintext request on the TLS port was not closed"
        );
        assert!(
            !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
            "plaintext was served on the TLS port"
        );
    }
    // Real clients, over both protocols, are served while all of that is held.
    for h2 in [true, false] {
        let http = edge.https(h2);
        for _ in 0..20 {
            let started = Instant::now();
            let resp = http
                .get(edge.https_url("app.test", "/"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "a real client waited {:?}",
                started.elapsed()
            );
        }
    }
    drop(held);
}

/// How a test's users reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Transport {
    Http1,
    Https1,
    Https2,
}

impl Transport {
    fn client(self, edge: &Edge) -> reqwest::Client {
        match self {
            Transport::Http1 => reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            Transport::Https1 => edge.https(false),
            Transport::Https2 => edge.https(true),
        }
    }

    fn url(self, edge: &Edge, path: &str) -> String {
        match self {
            Transport::Http1 => edge.proxy.url(path),
            Transport::Https1 | Transport::Https2 => edge.https_url("app.test", path),
        }
    }

    fn version(self) -> reqwest::Version {
        match self {
            Transport::Https2 => reqwest::Version::HTTP_2,
            Transport::Http1 | Transport::Https1 => reqwest::Version::HTTP_11,
        }
    }
}

/// The canary split, stickiness, a killed instance's retries and a drain, over `transport`.
async fn sticky_canary_drain_and_retries(transport: Transport) {
    let a = Upstream::start("a");
    let a2 = Upstream::start("a2");
    let mut a3 = Upstream::start("a3");
    let b = Upstream::start("b");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 70), ("2", 30)], "1", 60_000),
        vec![
            a.instance("1", Ready),
            a2.instance("1", Ready),
            a3.instance("1", Ready),
            b.instance("2", Ready),
        ],
    ))
    .await;
    let edge = Edge::start(&stub.url, &[]).await;
    let http = transport.client(&edge);
    let url = transport.url(&edge, "/");

    // The split of new users, and every user kept on its instance.
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.version(), transport.version(), "{transport:?}");
    let mut users = Vec::new();
    let mut on_b = 0;
    for _ in 0..400 {
        let mut u = User::new();
        let first = u.get(&http, &url).await.unwrap();
        assert_eq!(first.status, 200, "{transport:?}");
        on_b += usize::from(first.body == "b");
        users.push((u, first.body));
    }
    assert!(
        (80..=160).contains(&on_b),
        "{transport:?}: {on_b} of 400 on the canary"
    );
    for (u, first) in users.iter_mut() {
        assert_eq!(
            &u.get(&http, &url).await.unwrap().body,
            first,
            "{transport:?}"
        );
    }

    // a3 dies without the locator knowing: its users move to another 1.x instance, no request
    // fails.
    a3.kill();
    let mut moved = 0;
    for (u, first) in users.iter_mut() {
        let ans = u.get(&http, &url).await.unwrap();
        assert_eq!(ans.status, 200, "{transport:?}");
        if first == "a3" {
            assert!(
                ans.body == "a" || ans.body == "a2",
                "{transport:?}: {}",
                ans.body
            );
            *first = ans.body;
            moved += 1;
        }
    }
    assert!(moved > 0, "{transport:?}: nobody was on a3");

    // `a` drains: its users stay, new users never land on it.
    stub.set_instance(a3.instance("1", Gone));
    stub.set_instance(a.instance("1", Draining));
    edge.proxy.wait_revision(stub.revision()).await;
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..200 {
        *seen
            .entry(User::new().get(&http, &url).await.unwrap().body)
            .or_default() += 1;
    }
    assert!(!seen.contains_key("a"), "{transport:?}: {seen:?}");
    for (u, first) in users.iter_mut() {
        assert_eq!(
            &u.get(&http, &url).await.unwrap().body,
            first,
            "{transport:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_canary_drain_and_retries_over_http1() {
    sticky_canary_drain_and_retries(Transport::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_canary_drain_and_retries_over_https() {
    sticky_canary_drain_and_retries(Transport::Https1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_canary_drain_and_retries_over_http2() {
    sticky_canary_drain_and_retries(Transport::Https2).await;
}
