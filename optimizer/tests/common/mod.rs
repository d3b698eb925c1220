//! Helpers for the integration tests: real `optimizer serve` processes on real sockets over
//! temporary cache directories, and an `eventually` poller instead of sleeps.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
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
