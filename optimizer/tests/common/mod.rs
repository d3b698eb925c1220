//! Helpers for the integration tests: real `optimizer serve` processes on real sockets over
//! temporary cache directories, and an `eventually` poller instead of sleeps.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
/// An error answer as `(status, error.code, whole body)`; the code is empty when the body is
/// not our JSON error (the body is there to show what came instead).
pub async fn error_code(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
    (status, code, text)
}

pub use locator_wire::testing::eventually;

/// The write token every test instance is started with (`OPTIMIZER_WRITE_TOKEN`); `client()`
/// sends it, `anonymous()` does not.
pub const TOKEN: &str = "test-write-token-0123456789";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One running `optimizer serve`.
pub struct Instance {
    pub child: Option<Child>,
    pub url: String,
    pub id: String,
    pub log: PathBuf,
}

impl Instance {
    /// Starts an instance on `cache` and waits until it listens (not until it is ready).
    pub fn start(cache: &Path, id: &str, extra: &[&str]) -> Instance {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let log = cache.parent().unwrap().join(format!("{id}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_optimizer"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--instance-id",
                id,
                "--advertise",
                &url,
            ])
            .arg("--cache")
            .arg(cache)
            .args(["--grace", "5s"])
            .args(extra)
            .env("RUST_LOG", "info,optimizer=debug")
            .env("OPTIMIZER_WRITE_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("optimizer listening on"),
            "unexpected first line {line:?}"
        );
        Instance {
            child: Some(child),
            url,
            id: id.to_owned(),
            log,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn kill9(&mut self) {
        kill(self.pid(), Signal::SIGKILL).unwrap();
        self.child.take().unwrap().wait().unwrap();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "instance did not exit after SIGTERM\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `HEAD /v1/objects/{key}`, checked to answer 200 with a body length of `len`; its headers.
    pub async fn head_ok(&self, key: &str, len: usize) -> reqwest::header::HeaderMap {
        let head = client()
            .head(format!("{}/v1/objects/{key}", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200, "HEAD {key}");
        assert_eq!(head.headers()["content-length"], len.to_string().as_str());
        head.headers().clone()
    }

    /// The instance's `/metrics` text (empty when it does not answer).
    pub async fn metrics(&self) -> String {
        match client().get(format!("{}/metrics", self.url)).send().await {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of the first metric line starting with `prefix` (name and labels), 0 if absent.
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    }

    /// `/readyz` answered 200 with this role (`writer`/`reader`), or any role if `None`.
    pub async fn ready_as(&self, role: Option<&str>) -> bool {
        let Ok(resp) = client().get(format!("{}/readyz", self.url)).send().await else {
            return false;
        };
        if !resp.status().is_success() {
            return false;
        }
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        role.is_none_or(|r| v["role"] == r)
    }

    pub async fn wait_ready(&self, role: Option<&str>) {
        let what = format!("{} ready as {role:?}", self.id);
        eventually(&what, Duration::from_secs(30), || async {
            self.ready_as(role).await.then_some(())
        })
        .await;
    }

    pub async fn put(&self, key: &str, data: &[u8]) -> serde_json::Value {
        let resp = client()
            .put(format!("{}/v1/objects/{key}", self.url))
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            status,
            200,
            "PUT {key} on {}: {body}\n{}",
            self.id,
            self.logs()
        );
        body
    }

    /// DELETE of an object; the status code.
    pub async fn delete(&self, key: &str) -> u16 {
        client()
            .delete(format!("{}/v1/objects/{key}", self.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The object's bytes, or `None` on 404.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let resp = client()
            .get(format!("{}/v1/objects/{key}", self.url))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            404 => None,
            200 => Some(resp.bytes().await.unwrap().to_vec()),
            s => panic!(
                "GET {key} on {}: {s} {}\n{}",
                self.id,
                resp.text().await.unwrap(),
                self.logs()
            ),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A client sending the write token with every request.
pub fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A client without credentials.
pub fn anonymous() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Peak resident memory of a process (VmHWM of /proc/<pid>/status), in bytes.
pub fn peak_rss(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/<pid>/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

/// One canned answer of a [`FakePeer`].
#[derive(Clone, Debug)]
pub struct Canned {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Canned {
    pub fn ok(body: impl Into<Vec<u8>>) -> Canned {
        Canned {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// An HTTP server answering fixed paths with canned answers (404 otherwise) and recording
/// every path it was asked for: a peer that lies, redirects or fails on demand.
pub struct FakePeer {
    pub url: String,
    pub seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePeer {
    pub async fn start(routes: HashMap<String, Canned>) -> FakePeer {
        use hyper::body::Incoming;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (routes, log) = (Arc::new(routes), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (routes, log) = (routes.clone(), log.clone());
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let path = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    log.lock().unwrap().push(path.clone());
                    let canned = routes.get(&path).cloned().unwrap_or(Canned {
                        status: 404,
                        headers: Vec::new(),
                        body: b"no such route".to_vec(),
                    });
                    async move {
                        let mut resp = hyper::Response::builder().status(canned.status);
                        for (k, v) in &canned.headers {
                            resp = resp.header(k, v);
                        }
                        Ok::<_, std::convert::Infallible>(
                            resp.body(http_body_util::Full::new(bytes::Bytes::from(canned.body)))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakePeer { url, seen, task }
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The routes of a peer serving `manifest` for `key` and every chunk in `chunks` (stored
/// form), as a real optimizer would.
pub fn peer_routes(
    key: &str,
    manifest: &optimizer::manifest::Manifest,
    chunks: &[(optimizer::manifest::ChunkHash, Vec<u8>)],
) -> HashMap<String, Canned> {
    let mut routes = HashMap::new();
    routes.insert(
        format!("/v1/objects/{key}/manifest"),
        Canned::ok(serde_json::to_vec(manifest).unwrap()),
    );
    for (hash, stored) in chunks {
        routes.insert(format!("/v1/chunks/{hash}"), Canned::ok(stored.clone()));
    }
    routes
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Half-compressible bytes (text-like), so that both lz4 and raw chunks occur.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    noise(len, seed)
        .iter()
        .map(|b| b"abcdefgh \n"[(*b % 10) as usize])
        .collect()
}

/// A temp dir holding `cache/` and the instance logs.
pub fn cache_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    (dir, cache)
}
