//! A load generator acting as many users of the optimizer behind the proxy.
//!
//! Each user keeps its own cookie jar (one sticky-session cookie), stores objects with PUT,
//! reads back what it stored earlier (checking every byte against the digest it kept), and now
//! and then asks `/version` which version serves its session. Users leave and new ones arrive
//! all the time, so the canary split of *new sessions* can be measured at every step.
//! Every request that does not succeed with the right bytes counts as failed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// What the load looks like.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The proxy, e.g. `http://127.0.0.1:8480`.
    pub target: String,
    /// Concurrent users.
    pub users: usize,
    /// The sticky-session cookie's name (the service's `sessions.cookie`).
    pub cookie: String,
    /// A user leaves after this many requests and a new one (new session) takes its place.
    pub requests_per_session: u32,
    /// Size of each stored object.
    pub object_size: usize,
    /// Pause between two requests of one user (think time).
    pub think: Duration,
}

/// One user session as the load generator saw it.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Canary weight (percent) of the new version when the session started (`None` before the
    /// release or when unknown).
    pub step: Option<u32>,
    /// Versions this session was served by, in order of first sight.
    pub versions: Vec<String>,
}

/// An object some user stored, with the version that acknowledged it.
#[derive(Debug, Clone)]
pub struct StoredObject {
    pub key: String,
    pub digest: blake3::Hash,
    pub len: usize,
    pub version: String,
}

/// Everything measured during one run.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub failed: u64,
    /// The first few failures, for the report.
    pub failures: Vec<String>,
    pub latencies_us: Vec<u64>,
    pub sessions: Vec<SessionRecord>,
    pub objects: Vec<StoredObject>,
}

impl LoadReport {
    /// Latency percentile in milliseconds (`q` in 0..=1).
    pub fn percentile_ms(&self, q: f64) -> f64 {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        let idx = ((v.len() - 1) as f64 * q).round() as usize;
        v[idx] as f64 / 1000.0
    }

    /// Sessions served by more than one version (a sticky session that switched).
    pub fn sessions_switched(&self) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.versions.len() > 1)
            .count()
    }

    /// For every canary step (weight of the new version), the measured share of the new
    /// sessions started during it that landed on `new_version`, with the session count.
    pub fn canary_split(&self, new_version: &str) -> BTreeMap<u32, (f64, usize)> {
        let mut per: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
        for s in &self.sessions {
            let (Some(step), Some(first)) = (s.step, s.versions.first()) else {
                continue;
            };
            let e = per.entry(step).or_default();
            e.1 += 1;
            if first == new_version {
                e.0 += 1;
            }
        }
        per.into_iter()
            .map(|(w, (hit, n))| (w, (hit as f64 / n as f64, n)))
            .collect()
    }
}

/// The shared state a running load exposes: the current canary step for new sessions.
#[derive(Debug, Default)]
pub struct LoadControl {
    stop: AtomicBool,
    /// Weight of the new version, + 1 (0 = no release step known).
    step: AtomicU32,
}

impl LoadControl {
    /// Tags sessions started from now on with this canary weight.
    pub fn set_step(&self, weight: Option<u32>) {
        self.step
            .store(weight.map_or(0, |w| w + 1), Ordering::SeqCst);
    }

    fn step(&self) -> Option<u32> {
        self.step.load(Ordering::SeqCst).checked_sub(1)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Runs the load until [`LoadControl::stop`] is called; returns what it measured.
pub async fn run(cfg: LoadConfig, control: Arc<LoadControl>) -> LoadReport {
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.users)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client");
    let mut tasks = Vec::new();
    for user in 0..cfg.users {
        let (cfg, control, report, client) =
            (cfg.clone(), control.clone(), report.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            user_loop(user, cfg, control, report, client).await
        }));
    }
    for t in tasks {
        t.await.expect("user task panicked");
    }
    Arc::try_unwrap(report)
        .expect("all users finished")
        .into_inner()
        .unwrap()
}

struct Session {
    cookie: Option<String>,
    record: SessionRecord,
    requests: u32,
}

async fn user_loop(
    user: usize,
    cfg: LoadConfig,
    control: Arc<LoadControl>,
    report: Arc<Mutex<LoadReport>>,
    client: reqwest::Client,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(user as u64);
    let mut mine: Vec<StoredObject> = Vec::new();
    let mut n = 0u64;
    let mut session: Option<Session> = None;
    while !control.stop.load(Ordering::SeqCst) {
        let s = session.get_or_insert_with(|| Session {
            cookie: None,
            record: SessionRecord {
                step: control.step(),
                versions: Vec::new(),
            },
            requests: 0,
        });
        // First request of a session asks for the version (and gets the cookie).
        let op = if s.requests == 0 || s.requests % 4 == 3 {
            Op::Version
        } else if mine.is_empty() || rng.gen_bool(0.4) {
            n += 1;
            Op::Put(format!("u{user}-{n}"))
        } else {
            Op::Get(rng.gen_range(0..mine.len()))
        };
        let body = match &op {
            Op::Put(_) => Some(object_bytes(&mut rng, cfg.object_size)),
            _ => None,
        };
        let started = Instant::now();
        let outcome = request(&client, &cfg, s, &op, body.as_deref(), &mine).await;
        let elapsed = started.elapsed();
        s.requests += 1;
        {
            let mut r = report.lock().unwrap();
            r.requests += 1;
            r.latencies_us.push(elapsed.as_micros() as u64);
            match outcome {
                Ok(Some(version)) => {
                    if s.record.versions.last() != Some(&version) {
                        s.record.versions.push(version.clone());
                    }
                    if let (Op::Put(key), Some(b)) = (&op, &body) {
                        let obj = StoredObject {
                            key: key.clone(),
                            digest: blake3::hash(b),
                            len: b.len(),
                            version,
                        };
                        mine.push(obj.clone());
                        r.objects.push(obj);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    r.failed += 1;
                    if r.failures.len() < 20 {
                        r.failures.push(format!("user {user}: {e}"));
                    }
                }
            }
            if s.requests >= cfg.requests_per_session {
                let done = session.take().unwrap();
                if !done.record.versions.is_empty() {
                    r.sessions.push(done.record);
                }
            }
        }
        tokio::time::sleep(cfg.think).await;
    }
    if let Some(s) = session {
        if !s.record.versions.is_empty() {
            report.lock().unwrap().sessions.push(s.record);
        }
    }
}

enum Op {
    Version,
    Put(String),
    Get(usize),
}

/// Objects share most of their bytes (as real WAN traffic does), so deduplication matters.
fn object_bytes(rng: &mut impl Rng, size: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let n = (size / 16).max(1);
    let at = rng.gen_range(0..size.saturating_sub(n).max(1));
    rng.fill(&mut v[at..(at + n).min(size)]);
    v
}

/// Sends one request in the session; `Ok(Some(version))` when the answer names the version
/// that served it (the `/version` probe), or the version last seen for other successes.
async fn request(
    client: &reqwest::Client,
    cfg: &LoadConfig,
    s: &mut Session,
    op: &Op,
    body: Option<&[u8]>,
    mine: &[StoredObject],
) -> Result<Option<String>, String> {
    let url = match op {
        Op::Version => format!("{}/version", cfg.target),
        Op::Put(key) => format!("{}/v1/objects/{key}", cfg.target),
        Op::Get(i) => format!("{}/v1/objects/{}", cfg.target, mine[*i].key),
    };
    let mut req = match op {
        Op::Put(_) => client.put(&url).body(body.unwrap_or_default().to_vec()),
        _ => client.get(&url),
    };
    if let Some(c) = &s.cookie {
        req = req.header(reqwest::header::COOKIE, c);
    }
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
        if let Some(pair) = v.to_str().ok().and_then(|v| v.split(';').next()) {
            if pair.starts_with(&format!("{}=", cfg.cookie)) {
                s.cookie = Some(pair.to_string());
            }
        }
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("{url}: body: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "{url}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let last = s.record.versions.last().cloned();
    match op {
        Op::Version => {
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| format!("{url}: not JSON: {e}"))?;
            let version = v["version"]
                .as_str()
                .ok_or(format!("{url}: no version in {v}"))?;
            Ok(Some(version.to_string()))
        }
        Op::Get(i) => {
            let want = &mine[*i];
            if bytes.len() != want.len || blake3::hash(&bytes) != want.digest {
                return Err(format!("{url}: wrong content ({} bytes)", bytes.len()));
            }
            Ok(last)
        }
        Op::Put(_) => Ok(last.or_else(|| Some("unknown".into()))),
    }
}

/// Reads every object back through `target` (a fresh client, no session) and returns how many
/// came back byte for byte.
pub async fn verify_objects(target: &str, objects: &[StoredObject]) -> usize {
    let client = reqwest::Client::new();
    let mut ok = 0;
    for o in objects {
        let url = format!("{target}/v1/objects/{}", o.key);
        let Ok(resp) = client.get(&url).send().await else {
            continue;
        };
        if !resp.status().is_success() {
            continue;
        }
        if let Ok(b) = resp.bytes().await {
            if b.len() == o.len && blake3::hash(&b) == o.digest {
                ok += 1;
            }
        }
    }
    ok
}

/// Starts `n` new sessions (one `GET /version` each, no cookie) with `concurrency` at a time
/// and counts which version each landed on: the canary split of new users, measured.
/// Failed probes count under `"failed"`.
pub async fn probe_new_sessions(
    target: &str,
    n: usize,
    concurrency: usize,
) -> BTreeMap<String, usize> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, url) = (client.clone(), next.clone(), format!("{target}/version"));
        tasks.push(tokio::spawn(async move {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let version = match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["version"].as_str().map(String::from)),
                    _ => None,
                };
                *counts
                    .entry(version.unwrap_or_else(|| "failed".into()))
                    .or_default() += 1;
            }
            counts
        }));
    }
    let mut total = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.expect("probe task") {
            *total.entry(k).or_default() += v;
        }
    }
    total
}
