//! Several services through one proxy: chosen by host and path prefix, each with its own
//! cookie, canary and drain, released independently under load without either seeing an error
//! from the other's release. Real proxy binary, real upstream processes, the in-test locator.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;
use locator_wire::api::InstanceState::*;
use locator_wire::api::{Instance, Routes, Service, Snapshot};

/// Not a test: the body of the upstream processes the other tests start (see `common`).
#[test]
fn upstream_process() {
    if let Ok(id) = std::env::var("HADDOCK_TEST_UPSTREAM") {
        upstream_main(id);
    }
}

/// A service named `name` with its own cookie, routes and weights.
fn svc(name: &str, hosts: &[&str], prefix: Option<&str>, weights: &[(&str, u8)]) -> Service {
    let mut s = service(weights, "1", 60_000);
    s.name = name.into();
    s.sessions.cookie_name = format!("{name}_sid");
    s.routes = Routes {
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        path_prefix: prefix.map(str::to_string),
        ..Routes::default()
    };
    s
}

fn inst(
    up: &Upstream,
    service: &str,
    version: &str,
    state: locator_wire::api::InstanceState,
) -> Instance {
    let mut i = up.instance(version, state);
    i.service = service.into();
    i
}

/// A browser: keeps every cookie it is given, per name.
#[derive(Default)]
struct Visitor {
    cookies: BTreeMap<String, String>,
}

impl Visitor {
    async fn get(&mut self, http: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
        let mut req = http.get(url);
        if !self.cookies.is_empty() {
            let header: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header("cookie", header.join("; "));
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        for v in resp.headers().get_all("set-cookie") {
            let pair = v.to_str().unwrap().split(';').next().unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            self.cookies.insert(k.to_string(), v.to_string());
        }
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.map_err(|e| e.to_string())?))
    }
}

/// Waits until the proxy's table of `service` is at `revision` or later.
async fn wait_service(proxy: &Proxy, service: &str, revision: u64) {
    eventually(
        &format!("{service}'s table at revision {revision}"),
        Duration::from_secs(20),
        || async {
            proxy.routing().await.is_some_and(|v| {
                v["services"].as_array().unwrap().iter().any(|s| {
                    s["table"]["service"] == service
                        && s["table"]["revision"].as_u64().unwrap_or(0) >= revision
                })
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_are_released_independently_through_one_proxy_under_load() {
    let (s1, s2) = (Upstream::start("s1"), Upstream::start("s2"));
    let (b1, b2) = (Upstream::start("b1"), Upstream::start("b2"));
    let a1 = Upstream::start("a1");
    let stub = LocatorStub::start(Snapshot {
        revision: 1,
        services: vec![
            svc("shop", &["shop.test"], None, &[("1", 100)]),
            svc("api", &["shop.test"], Some("/api"), &[("1", 100)]),
            svc("blog", &["blog.test", "*.blog.test"], None, &[("1", 100)]),
        ],
        instances: vec![
            inst(&s1, "shop", "1", Ready),
            inst(&a1, "api", "1", Ready),
            inst(&b1, "blog", "1", Ready),
        ],
        ..Snapshot::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::spawn(&stub.url, dir.path(), &["--service", "shop,api,blog"]);
    proxy.wait_revision(1).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port));
    let http = reqwest::Client::builder()
        .resolve("shop.test", addr)
        .resolve("eu.blog.test", addr)
        .resolve("blog.test", addr)
        .resolve("unknown.test", addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = |host: &str, path: &str| format!("http://{host}:{}{path}", proxy.port);

    // Each host and prefix reaches its service, which sets its own cookie.
    for (host, path, body, cookie) in [
        ("shop.test", "/", "s1", "shop_sid"),
        ("shop.test", "/api/cart", "a1", "api_sid"),
        ("shop.test", "/apix", "s1", "shop_sid"),
        ("eu.blog.test", "/", "b1", "blog_sid"),
    ] {
        let mut v = Visitor::default();
        assert_eq!(
            v.get(&http, &url(host, path)).await.unwrap(),
            (200, body.to_string())
        );
        assert_eq!(
            v.cookies.keys().collect::<Vec<_>>(),
            [cookie],
            "{host}{path}"
        );
    }
    let resp = http.get(url("unknown.test", "/")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains(r#""code":"unknown_host""#));

    // Users of all three services keep coming while shop and blog are released, each on its
    // own schedule. A visitor is served by one instance for its whole visit.
    let until = Instant::now() + Duration::from_millis(4_500);
    let mut workers = Vec::new();
    for (i, (host, path)) in [
        ("shop.test", "/"),
        ("shop.test", "/"),
        ("blog.test", "/"),
        ("blog.test", "/"),
        ("shop.test", "/api/x"),
    ]
    .into_iter()
    .enumerate()
    {
        let (http, target) = (http.clone(), url(host, path));
        workers.push(tokio::spawn(async move {
            let (mut served, mut errors, mut switched) = (0u32, Vec::new(), Vec::new());
            let mut seen = HashMap::<String, u32>::new();
            while Instant::now() < until {
                let mut visitor = Visitor::default();
                let mut first: Option<String> = None;
                for _ in 0..10 {
                    match visitor.get(&http, &target).await {
                        Ok((200, body)) => {
                            served += 1;
                            *seen.entry(body.clone()).or_default() += 1;
                            match &first {
                                None => first = Some(body),
                                Some(f) if *f != body => switched.push(format!("{f}->{body}")),
                                Some(_) => {}
                            }
                        }
                        Ok((status, body)) => errors.push(format!("{status} {body}")),
                        Err(e) => errors.push(e),
                    }
                }
            }
            (i, served, errors, switched, seen)
        }));
    }
    // shop: 2 arrives, 50/50, then 100 % on 2 with 1 draining.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stub.set_instance(inst(&s2, "shop", "2", Ready));
    stub.set_service(svc("shop", &["shop.test"], None, &[("1", 50), ("2", 50)]));
    wait_service(&proxy, "shop", stub.revision()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // blog: straight to its new version while shop is mid-canary.
    stub.set_instance(inst(&b2, "blog", "2", Ready));
    stub.set_service(svc(
        "blog",
        &["blog.test", "*.blog.test"],
        None,
        &[("1", 20), ("2", 80)],
    ));
    wait_service(&proxy, "blog", stub.revision()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stub.set_service(svc("shop", &["shop.test"], None, &[("2", 100)]));
    stub.set_instance(inst(&s1, "shop", "1", Draining));
    wait_service(&proxy, "shop", stub.revision()).await;

    let mut by_service = HashMap::<&str, HashMap<String, u32>>::new();
    for w in workers {
        let (i, served, errors, switched, seen) = w.await.unwrap();
        assert!(errors.is_empty(), "worker {i}: {errors:?}");
        assert!(
            switched.is_empty(),
            "worker {i}: visitors switched {switched:?}"
        );
        assert!(served > 20, "worker {i} served only {served}");
        let name = ["shop", "shop", "blog", "blog", "api"][i];
        for (k, v) in seen {
            *by_service.entry(name).or_default().entry(k).or_default() += v;
        }
    }
    // Each service only ever answered from its own instances, and both releases were seen.
    let keys = |name: &str| {
        let mut k: Vec<String> = by_service[name].keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys("shop"), ["s1", "s2"]);
    assert_eq!(keys("blog"), ["b1", "b2"]);
    assert_eq!(keys("api"), ["a1"]);
    // New shop visitors now all go to 2; blog's split is its own.
    for _ in 0..20 {
        let (_, body) = Visitor::default()
            .get(&http, &url("shop.test", "/"))
            .await
            .unwrap();
        assert_eq!(body, "s2");
    }

    // One metrics document with every service's figures, and each service reported apart.
    let metrics = proxy.metrics().await;
    assert_eq!(metrics.matches("# EOF").count(), 1);
    assert_eq!(
        metrics
            .matches("# TYPE haddock_proxy_http_requests counter")
            .count(),
        1
    );
    for needle in [
        "haddock_proxy_http_requests_total{service=\"shop\",version=\"2\",instance_id=\"s2\",status=\"200\"}",
        "haddock_proxy_http_requests_total{service=\"blog\",version=\"2\",instance_id=\"b2\",status=\"200\"}",
        "haddock_proxy_http_requests_total{service=\"api\",version=\"1\",instance_id=\"a1\",status=\"200\"}",
        "haddock_proxy_unknown_host_requests_total 1",
    ] {
        assert!(metrics.contains(needle), "no {needle} in\n{metrics}");
    }
    eventually(
        "a report from each service",
        Duration::from_secs(5),
        || async {
            let reports = stub.reports.lock().unwrap();
            ["shop", "api", "blog"]
                .iter()
                .all(|s| reports.iter().any(|r| r.service == *s))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_service_carries_every_service_the_locator_knows_as_it_appears() {
    let (s1, b1) = (Upstream::start("s1"), Upstream::start("b1"));
    let stub = LocatorStub::start(Snapshot {
        revision: 1,
        services: vec![svc("shop", &["shop.test"], None, &[("1", 100)])],
        instances: vec![inst(&s1, "shop", "1", Ready)],
        ..Snapshot::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::spawn_discovering(&stub.url, dir.path(), &[]);
    wait_service(&proxy, "shop", 1).await;
    let http = |proxy: &Proxy| {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port));
        reqwest::Client::builder()
            .resolve("shop.test", addr)
            .resolve("blog.test", addr)
            .resolve("other.test", addr)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let url = |proxy: &Proxy, host: &str| format!("http://{host}:{}/", proxy.port);
    let client = http(&proxy);
    let mut v = Visitor::default();
    assert_eq!(
        v.get(&client, &url(&proxy, "shop.test")).await.unwrap(),
        (200, "s1".to_string())
    );
    // Not known yet, and no default: 404 `unknown_host`.
    let (status, body) = v.get(&client, &url(&proxy, "blog.test")).await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_host"), "{body}");

    // A service released after the proxy started is carried from its first event: routed by
    // its host, with its own cookie, table and reports.
    stub.set_service(svc("blog", &["blog.test"], None, &[("1", 100)]));
    stub.set_instance(inst(&b1, "blog", "1", Ready));
    wait_service(&proxy, "blog", stub.revision()).await;
    let mut reader = Visitor::default();
    assert_eq!(
        reader
            .get(&client, &url(&proxy, "blog.test"))
            .await
            .unwrap(),
        (200, "b1".to_string())
    );
    assert_eq!(reader.cookies.keys().collect::<Vec<_>>(), ["blog_sid"]);
    eventually(
        "a report of blog's session",
        Duration::from_secs(10),
        || async {
            let reports = stub.reports.lock().unwrap();
            reports.iter().any(|r| {
                r.service == "blog" && r.instances.get("b1").is_some_and(|l| l.live_sessions == 1)
            })
        },
    )
    .await;
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("haddock_proxy_sessions_created_total{service=\"blog\"} 1"),
        "{metrics}"
    );

    // Restarted with the locator down, it carries both again from its persisted snapshot;
    // now with blog as the default, which takes a host no route names.
    proxy.kill();
    proxy.wait();
    stub.stop();
    let proxy = Proxy::spawn_discovering(&stub.url, dir.path(), &["--default-service", "blog"]);
    let client = http(&proxy);
    for (host, body) in [
        ("shop.test", "s1"),
        ("blog.test", "b1"),
        ("other.test", "b1"),
    ] {
        let answer = eventually(
            &format!("{host} served after the restart"),
            Duration::from_secs(20),
            || async {
                let mut v = Visitor::default();
                v.get(&client, &url(&proxy, host))
                    .await
                    .ok()
                    .filter(|(s, _)| *s == 200)
            },
        )
        .await;
        assert_eq!(answer.1, body);
    }
}

#[test]
fn a_default_service_that_is_not_carried_stops_the_proxy() {
    for (services, default, expect) in [
        (Some("shop,blog"), "api", "not one of --service"),
        // Without --service the default may be any service, but it must be a name.
        (None, "../etc", "--default-service ../etc"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["serve", "--locator", "http://127.0.0.1:1"])
            .args(services.map(|s| ["--service", s]).iter().flatten())
            .args(["--default-service", default])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin", &format!("127.0.0.1:{}", free_port())])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{stderr}");
    }
}
