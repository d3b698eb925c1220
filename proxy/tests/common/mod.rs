//! Test harness: real upstream processes, a tiny in-test locator, and the real proxy binary.
//!
//! Upstreams are this very test executable re-run with `HADDOCK_TEST_UPSTREAM` set (see
//! [`upstream_main`]), so that killing one is killing a process, as in production.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use locator_wire::api::*;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

pub const KEY: &str = "integration-test-cookie-key-0123";
pub const SERVICE: &str = "svc";

pub use locator_wire::testing::eventually;

pub mod pebble;
pub mod pki;

/// A free port on 127.0.0.1 (bound then released; the tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- upstream processes

/// Entry point of an upstream process: answers every request with its own id (and echoes a
/// request body after it), `/slow` waits 300 ms first, `/headers` answers its id and the
/// forwarding headers it received. Prints `LISTENING <port>` when ready.
pub fn upstream_main(id: String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap().port());
        let id: Arc<str> = id.into();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let id = id.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let id = id.clone();
                    async move {
                        if req.headers().contains_key(hyper::header::UPGRADE) {
                            return Ok(echo_upgraded(req, id));
                        }
                        if req.uri().path() == "/headers" {
                            let h = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("-")
                                    .to_string()
                            };
                            let out = format!(
                                "{id} xff={} proto={} host={}",
                                h("x-forwarded-for"),
                                h("x-forwarded-proto"),
                                h("host")
                            );
                            return Ok(Response::new(Full::new(Bytes::from(out))));
                        }
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let mut out = id.as_bytes().to_vec();
                        if let Ok(b) = body {
                            out.extend_from_slice(&b);
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(out))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
}

/// Answers an upgrade request with 101, then echoes every read on the upgraded connection
/// as `ID:data` (raw bytes: what matters is the tunnel, not websocket framing).
fn echo_upgraded(req: Request<Incoming>, id: Arc<str>) -> Response<Full<Bytes>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                return;
            }
            let mut out = format!("{id}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            if io.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(101)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, "websocket")
        .body(Full::default())
        .unwrap()
}

/// A running upstream process (killed on drop).
pub struct Upstream {
    pub id: String,
    pub port: u16,
    child: Child,
}

impl Upstream {
    pub fn start(id: &str) -> Upstream {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "upstream_process",
                "--exact",
                "--nocapture",
                "--include-ignored",
            ])
            .env("HADDOCK_TEST_UPSTREAM", id)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let line = lines.next().expect("upstream exited").unwrap();
            if let Some(p) = line.strip_prefix("LISTENING ") {
                break p.trim().parse().unwrap();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Upstream {
            id: id.to_string(),
            port,
            child,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn instance(&self, version: &str, state: InstanceState) -> Instance {
        Instance {
            id: self.id.clone(),
            service: SERVICE.into(),
            version: version.into(),
            address: format!("127.0.0.1:{}", self.port),
            docker_host: String::new(),
            container_id: String::new(),
            labels: BTreeMap::new(),
            state,
            registered_at: 0,
            last_heartbeat: 0,
            load: InstanceLoad::default(),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- locator stub

/// Just enough of the locator for the proxy: `/v1/watch` (NDJSON) and `POST /v1/sessions`.
#[derive(Clone)]
pub struct LocatorStub {
    pub url: String,
    pub port: u16,
    state: Arc<Mutex<Snapshot>>,
    events: broadcast::Sender<WatchEvent>,
    /// Every report received, whole: a report of changes is applied to the proxy's previous
    /// one, as the locator does.
    pub reports: Arc<Mutex<Vec<SessionReport>>>,
    /// Reports of changes refused with 409 `full_report_needed` (no previous report here).
    pub refused_changes: Arc<std::sync::atomic::AtomicUsize>,
    server: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

pub fn service(weights: &[(&str, u8)], primary: &str, ttl_ms: u64) -> Service {
    Service {
        name: SERVICE.into(),
        sessions: SessionSettings {
            cookie_name: "hsid".into(),
            idle_ttl_ms: ttl_ms,
            max_drain_ms: ttl_ms * 4,
        },
        weights: weights.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
        primary_version: Some(primary.into()),
        revision: 0,
        limit_changes: Vec::new(),
        lock: None,
        routes: Default::default(),
    }
}

impl LocatorStub {
    pub async fn start(initial: Snapshot) -> LocatorStub {
        Self::start_on(free_port(), initial).await
    }

    pub async fn start_on(port: u16, initial: Snapshot) -> LocatorStub {
        let (events, _) = broadcast::channel(1024);
        let stub = LocatorStub {
            url: format!("http://127.0.0.1:{port}"),
            port,
            state: Arc::new(Mutex::new(initial)),
            events,
            reports: Arc::new(Mutex::new(Vec::new())),
            refused_changes: Default::default(),
            server: Arc::new(Mutex::new(None)),
        };
        // A stub stopped on this port a moment ago may not have closed its listener yet.
        let listener = eventually(
            "the stub's port to be free",
            Duration::from_secs(10),
            || async { TcpListener::bind(("127.0.0.1", port)).await.ok() },
        )
        .await;
        let me = stub.clone();
        let handle = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let me = me.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(me.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        *stub.server.lock().unwrap() = Some(handle);
        stub
    }

    /// Stops answering and drops every open connection (the watch streams break).
    pub fn stop(&self) {
        if let Some(h) = self.server.lock().unwrap().take() {
            h.abort();
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
        let path = req.uri().path().to_string();
        if path == "/v1/sessions" {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let report: SessionReport = serde_json::from_slice(&body).unwrap();
            let mut reports = self.reports.lock().unwrap();
            let whole = if report.base.is_some() {
                let previous = reports
                    .iter()
                    .rev()
                    .find(|r| (&r.proxy_id, &r.service) == (&report.proxy_id, &report.service));
                let Some(previous) = previous else {
                    self.refused_changes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let body = r#"{"error":{"code":"full_report_needed","message":"send the whole report"}}"#;
                    let mut resp =
                        Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
                    *resp.status_mut() = hyper::StatusCode::CONFLICT;
                    return resp;
                };
                // Zeros are kept (the locator drops them): tests read what the proxy said.
                let mut whole = previous.clone();
                whole.instances.extend(report.instances);
                whole.versions = report.versions;
                whole
            } else {
                report
            };
            reports.push(whole);
            return Response::new(Full::new(Bytes::from_static(b"{}")).boxed());
        }
        if path == "/v1/watch" {
            // Subscribe before reading the state so no event falls between the two.
            let rx = self.events.subscribe();
            let snap = self.state.lock().unwrap().clone();
            let first = WatchEvent {
                revision: snap.revision,
                change: Change::Snapshot(snap),
            };
            let head = futures_util::stream::once(async move { Ok(line(&first)) });
            let tail = futures_util::stream::unfold(rx, |mut rx| async move {
                match rx.recv().await {
                    Ok(ev) => Some((Ok(line(&ev)), rx)),
                    Err(_) => None,
                }
            });
            let body = StreamBody::new(head.chain(tail));
            return Response::new(BodyExt::boxed(body));
        }
        let mut r = Response::new(Full::new(Bytes::from_static(b"{}")).boxed());
        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
        r
    }

    fn publish(&self, change: impl FnOnce(&mut Snapshot) -> Change) {
        let mut s = self.state.lock().unwrap();
        let revision = s.revision + 1;
        let ev = WatchEvent {
            revision,
            change: change(&mut s),
        };
        s.apply(&ev);
        let _ = self.events.send(ev);
    }

    pub fn set_service(&self, svc: Service) {
        self.publish(|_| Change::Service(svc));
    }

    pub fn set_instance(&self, inst: Instance) {
        self.publish(|_| Change::Instance(inst));
    }

    pub fn revision(&self) -> u64 {
        self.state.lock().unwrap().revision
    }

    pub fn last_report(&self) -> Option<SessionReport> {
        self.reports.lock().unwrap().last().cloned()
    }
}

fn line(ev: &WatchEvent) -> Frame<Bytes> {
    let mut v = serde_json::to_vec(ev).unwrap();
    v.push(b'\n');
    Frame::data(Bytes::from(v))
}

pub fn snapshot(svc: Service, instances: Vec<Instance>) -> Snapshot {
    Snapshot {
        revision: 1,
        services: vec![svc],
        instances,
        ..Snapshot::default()
    }
}

// ---------------------------------------------------------------- the proxy process

pub struct Proxy {
    pub port: u16,
    pub admin: u16,
    pub state_dir: PathBuf,
    child: Child,
}

impl Proxy {
    pub fn spawn(locator_url: &str, state_dir: &Path, extra: &[&str]) -> Proxy {
        Self::spawn_on(free_port(), free_port(), locator_url, state_dir, extra)
    }

    /// A proxy started without `--service`: it carries every service the locator knows.
    pub fn spawn_discovering(locator_url: &str, state_dir: &Path, extra: &[&str]) -> Proxy {
        Self::spawn_with(
            free_port(),
            free_port(),
            locator_url,
            state_dir,
            None,
            extra,
        )
    }

    pub fn spawn_on(
        port: u16,
        admin: u16,
        locator_url: &str,
        state_dir: &Path,
        extra: &[&str],
    ) -> Proxy {
        // The one test service, unless the test names the services itself.
        let service = (!extra.contains(&"--service")).then_some(SERVICE);
        Self::spawn_with(port, admin, locator_url, state_dir, service, extra)
    }

    fn spawn_with(
        port: u16,
        admin: u16,
        locator_url: &str,
        state_dir: &Path,
        service: Option<&str>,
        extra: &[&str],
    ) -> Proxy {
        let child = Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin",
                &format!("127.0.0.1:{admin}"),
                "--locator",
                locator_url,
                "--state-dir",
                state_dir.to_str().unwrap(),
                "--grace-period-s",
                "1",
            ])
            .args(service.map(|s| ["--service", s]).iter().flatten())
            .args(extra)
            .env("HADDOCK_COOKIE_KEY", KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Proxy {
            port,
            admin,
            state_dir: state_dir.to_path_buf(),
            child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn routing(&self) -> Option<serde_json::Value> {
        let r = reqwest::get(format!("http://127.0.0.1:{}/routing", self.admin))
            .await
            .ok()?;
        r.json().await.ok()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the metric line starting with `prefix` (name and labels, then a space).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let metrics = self.metrics().await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until the proxy serves a table at least as new as `revision`.
    pub async fn wait_revision(&self, revision: u64) {
        eventually(
            "the proxy's routing table",
            Duration::from_secs(20),
            || async {
                self.routing()
                    .await
                    .and_then(|v| v["table"]["revision"].as_u64())
                    .is_some_and(|r| r >= revision)
            },
        )
        .await;
        // The admin port answers before the user port listens (a test's first request was
        // refused now and then): wait for both.
        let port = self.port;
        eventually(
            "the proxy's listener",
            Duration::from_secs(20),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait(&mut self) {
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- a cookie-keeping user

/// One user: keeps the session cookie between requests like a browser would.
pub struct User {
    pub cookie: Option<String>,
}

pub struct Answer {
    pub status: u16,
    pub body: String,
    pub set_cookie: Option<String>,
}

impl User {
    pub fn new() -> User {
        User { cookie: None }
    }

    pub async fn get(&mut self, http: &reqwest::Client, url: &str) -> reqwest::Result<Answer> {
        let mut req = http.get(url);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("hsid={c}"));
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let set_cookie = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .and_then(|v| v.strip_prefix("hsid="))
            .map(str::to_string);
        if let Some(c) = &set_cookie {
            self.cookie = Some(c.clone());
        }
        let body = resp.text().await?;
        Ok(Answer {
            status,
            body,
            set_cookie,
        })
    }
}
