//! A load generator acting as many users of the optimizer behind the proxy.
//!
//! Each user keeps its own cookie jar (one sticky-session cookie), stores objects with PUT,
//! reads back what it stored earlier (checking every byte against the digest it kept), and now
//! and then asks `/version` which version serves its session. Users leave and new ones arrive
//! all the time, so the canary split of *new sessions* can be measured at every step.
//! Every request that does not succeed with the right bytes counts as failed.
//!
//! [`run`] is the demo's load (think time between requests); [`run_rate`] sends the same kind
//! of users' requests at a fixed rate, or closed-loop, for the proof benchmark
//! (`haddock-proof`), and measures the longest time without a successful response.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// What the load looks like.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The proxies, e.g. `http://127.0.0.1:8480`: a user's requests go to each in turn, so
    /// that its session must hold whichever proxy a request enters.
    pub targets: Vec<String>,
    /// The `Host` every request names (a proxy carrying several services routes by it);
    /// `None`: the target's own.
    pub host: Option<String>,
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
    /// The optimizer's write token, sent with every request (PUTs need it).
    pub write_token: String,
}

/// One user session as the load generator saw it.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Canary weight (percent) of the new version when the session started (`None` before the
    /// release or when unknown).
    pub step: Option<u32>,
    /// Versions this session was served by, in order of first sight.
    pub versions: Vec<String>,
    /// Instances that answered its `/version` probes, in order of first sight.
    pub instances: Vec<String>,
}

/// An object some user stored, with the version that acknowledged it.
#[derive(Debug, Clone)]
pub struct StoredObject {
    pub key: String,
    pub digest: blake3::Hash,
    pub len: usize,
    pub version: String,
    /// The instance the storing session was on (its last `/version` answer), if known.
    pub instance: Option<String>,
}

/// Where a failed request was headed: the instance its session was on, and for a read, the
/// instance that stored the object (both as last seen by the session's `/version` probes).
#[derive(Debug, Clone, Default)]
pub struct FailedRequest {
    pub session_instance: Option<String>,
    pub object_instance: Option<String>,
    pub message: String,
}

/// Everything measured during one run.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub failed: u64,
    /// The first few failures, for the report.
    pub failures: Vec<String>,
    /// Every failure, by where it was headed (to tell a lost host's own failures apart).
    pub failed_requests: Vec<FailedRequest>,
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
    let mut headers = bearer(&cfg.write_token);
    if let Some(host) = &cfg.host {
        let host = reqwest::header::HeaderValue::from_str(host).expect("a host name");
        headers.insert(reqwest::header::HOST, host);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.users)
        .timeout(Duration::from_secs(20))
        .default_headers(headers)
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
    /// The instance that answered the session's last `/version`.
    instance: Option<String>,
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
            instance: None,
            record: SessionRecord {
                step: control.step(),
                versions: Vec::new(),
                instances: Vec::new(),
            },
            requests: 0,
        });
        // First request of a session asks for the version (and gets the cookie).
        let op = if s.requests == 0 || s.requests % 4 == 3 {
            Op::Version
        } else if mine.is_empty() || rng.gen_bool(0.4) {
            n += 1;
            Op::Put(
                format!("u{user}-{n}"),
                object_bytes(&mut rng, cfg.object_size),
            )
        } else {
            Op::Get(rng.gen_range(0..mine.len()))
        };
        let started = Instant::now();
        let target = &cfg.targets[(user + s.requests as usize) % cfg.targets.len()];
        let outcome = request(&client, target, &cfg.cookie, s, &op, &mine).await;
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
                    if let Some(obj) = op.stored(version, s.instance.clone()) {
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
                    r.failed_requests.push(FailedRequest {
                        message: e.clone(),
                        session_instance: s.instance.clone(),
                        object_instance: match &op {
                            Op::Get(i) => mine[*i].instance.clone(),
                            _ => None,
                        },
                    });
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
    /// Key and body.
    Put(String, Vec<u8>),
    Get(usize),
}

impl Op {
    /// What a successful PUT stored, served by `version`.
    fn stored(&self, version: String, instance: Option<String>) -> Option<StoredObject> {
        match self {
            Op::Put(key, body) => Some(StoredObject {
                key: key.clone(),
                digest: blake3::hash(body),
                len: body.len(),
                version,
                instance,
            }),
            _ => None,
        }
    }
}

/// Objects share most of their bytes (as real WAN traffic does), so deduplication matters.
/// The `Authorization` header of the optimizer's write token, sent as a user's credential.
fn bearer(token: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .expect("the write token is visible ASCII");
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    headers
}

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
    target: &str,
    cookie: &str,
    s: &mut Session,
    op: &Op,
    mine: &[StoredObject],
) -> Result<Option<String>, String> {
    let url = match op {
        Op::Version => format!("{target}/version"),
        Op::Put(key, _) => format!("{target}/v1/objects/{key}"),
        Op::Get(i) => format!("{target}/v1/objects/{}", mine[*i].key),
    };
    let mut req = match op {
        Op::Put(_, body) => client.put(&url).body(body.clone()),
        _ => client.get(&url),
    };
    if let Some(c) = &s.cookie {
        req = req.header(reqwest::header::COOKIE, c);
    }
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
        if let Some(pair) = v.to_str().ok().and_then(|v| v.split(';').next()) {
            if pair
                .strip_prefix(cookie)
                .is_some_and(|rest| rest.starts_with('='))
            {
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
            s.instance = v["instance_id"].as_str().map(str::to_owned);
            if let Some(i) = &s.instance {
                if !s.record.instances.contains(i) {
                    s.record.instances.push(i.clone());
                }
            }
            Ok(Some(version.to_string()))
        }
        Op::Get(i) => {
            let want = &mine[*i];
            if bytes.len() != want.len || blake3::hash(&bytes) != want.digest {
                return Err(format!("{url}: wrong content ({} bytes)", bytes.len()));
            }
            Ok(last)
        }
        Op::Put(..) => Ok(last.or_else(|| Some("unknown".into()))),
    }
}

/// Reads every object back through `target` (a fresh client, no session) and returns how many
/// came back byte for byte.
pub async fn verify_objects(target: &str, objects: &[StoredObject]) -> usize {
    verify_objects_at(target, None, objects).await
}

/// [`verify_objects`] with requests naming `host` (a proxy carrying several services).
pub async fn verify_objects_at(
    target: &str,
    host: Option<&str>,
    objects: &[StoredObject],
) -> usize {
    let client = reqwest::Client::new();
    let mut ok = 0;
    for o in objects {
        let url = format!("{target}/v1/objects/{}", o.key);
        let mut req = client.get(&url);
        if let Some(host) = host {
            req = req.header(reqwest::header::HOST, host);
        }
        let Ok(resp) = req.send().await else {
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

// The fixed-rate load of the proof benchmark (`haddock-proof`).

/// A load at a fixed request rate (open loop), or as fast as the stack answers (closed loop,
/// to find the saturating rate). Users are the same as [`run`]'s: each keeps its own session
/// cookie, stores objects (PUT) and reads its own objects back (GET, checked byte for byte),
/// asks `/version` at the start of each session and every [`VERSION_EVERY`] requests, and
/// leaves after `requests_per_session` (a new session takes its place).
#[derive(Debug, Clone)]
pub struct RateConfig {
    /// The proxies, e.g. `http://127.0.0.1:8480`: a user's requests go to each in turn, so
    /// that its session must hold whichever proxy a request enters.
    pub targets: Vec<String>,
    /// The sticky-session cookie's name.
    pub cookie: String,
    /// Users; each sends its requests one after the other, so this bounds the requests in flight.
    pub users: usize,
    /// Requests per second of all users together, each request at its scheduled time
    /// (`i / rate` after the start), whoever is free sends it. `None`: closed loop.
    pub rate: Option<f64>,
    pub requests_per_session: u32,
    pub object_size: usize,
    /// Share of the requests that are not `/version` probes and store an object.
    pub put_share: f64,
    /// Prefix of the stored keys, so that runs on one volume never overwrite each other.
    pub key_prefix: String,
    /// The optimizer's write token, sent with every request (PUTs need it).
    pub write_token: String,
}

/// Every this many requests of a session (and on its first), the user asks `/version`.
pub const VERSION_EVERY: u32 = 5;
/// Objects a user keeps to read back; a newer one replaces a random older one.
const REMEMBERED: usize = 256;
/// A request answered (or failed) this late counts as slow in a [`RateReport`].
pub const SLOW: Duration = Duration::from_secs(1);

/// The shared state of a running [`run_rate`]: stop, live counters, and the clock every
/// reported time is measured on (starting when the control is created).
#[derive(Debug)]
pub struct RateControl {
    origin: Instant,
    stop: AtomicBool,
    stopped_at_us: AtomicU64,
    tickets: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    /// Completion time of the latest successful response.
    last_ok_us: AtomicU64,
    /// (longest time without a successful response, when it ended), in µs since `origin`.
    gap: Mutex<(u64, u64)>,
}

impl RateControl {
    pub fn new() -> Arc<RateControl> {
        Arc::new(RateControl {
            origin: Instant::now(),
            stop: AtomicBool::new(false),
            stopped_at_us: AtomicU64::new(0),
            tickets: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_ok_us: AtomicU64::new(0),
            gap: Mutex::new((0, 0)),
        })
    }

    /// Time since the control was created (the load's clock).
    pub fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Requests failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Users send nothing more; [`run_rate`] returns once the requests in flight are answered.
    pub fn stop(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            self.stopped_at_us
                .store(self.us(Instant::now()), Ordering::SeqCst);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// A successful response completed at `t`: the time since the previous one is a gap.
    fn succeeded_at(&self, t: u64) {
        let prev = self.last_ok_us.fetch_max(t, Ordering::SeqCst);
        if t > prev {
            let mut g = self.gap.lock().unwrap();
            if t - prev > g.0 {
                *g = (t - prev, t);
            }
        }
    }
}

/// What [`run_rate`] measured. Times are since the [`RateControl`] was created.
#[derive(Debug, Default)]
pub struct RateReport {
    pub requests: u64,
    pub failed: u64,
    /// The first and the last failures (at most 10 each), oldest first, with when they
    /// completed.
    pub failures: Vec<(Duration, String)>,
    /// Sorted. Open loop: from the request's scheduled time (so a stall of the load generator
    /// or of the stack counts in full); closed loop: from the moment it was sent.
    pub latencies_us: Vec<u64>,
    /// (completion time since the start, latency) of every request, in µs, unsorted: the
    /// latency of one window of the run (a release) against the rest.
    pub timed_us: Vec<(u64, u64)>,
    /// From the start until [`RateControl::stop`].
    pub elapsed: Duration,
    /// The longest time in which no request succeeded: the largest interval between two
    /// consecutive successful responses (by completion time), counting from the start of the
    /// load to the first one and from the last one to the stop.
    pub longest_gap: Duration,
    /// When that gap ended.
    pub longest_gap_end: Duration,
    /// Completion times of the first and the last failed request.
    pub failure_window: Option<(Duration, Duration)>,
    /// Completion time of every failed request (the first 100 000), sorted.
    pub failure_times: Vec<Duration>,
    /// Requests (successful or not) with a latency of at least [`SLOW`].
    pub slow: u64,
    /// Completion times of the first and the last slow request.
    pub slow_window: Option<(Duration, Duration)>,
    /// Slow requests by kind (`PUT`, `GET`, `version`) and the version their session was on
    /// when they were sent (`new` before its first `/version` answer): where a stall was.
    pub slow_kinds: BTreeMap<String, u64>,
    /// `/version` answers by version.
    pub versions: BTreeMap<String, u64>,
    pub sessions: u64,
    /// Sessions whose `/version` answers named more than one version.
    pub sessions_switched: u64,
    pub objects_stored: u64,
}

impl RateReport {
    /// Latency percentile in milliseconds (`q` in 0..=1).
    pub fn percentile_ms(&self, q: f64) -> f64 {
        let v = &self.latencies_us;
        if v.is_empty() {
            return 0.0;
        }
        v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
    }

    /// Requests sent per second over the run.
    pub fn achieved_rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile in milliseconds (`q` in 0..=1) of the requests whose completion
    /// time (since the start of the load) `keep` accepts, and how many those were.
    pub fn percentile_ms_where(&self, q: f64, keep: impl Fn(Duration) -> bool) -> (f64, usize) {
        let mut v: Vec<u64> = self
            .timed_us
            .iter()
            .filter(|(t, _)| keep(Duration::from_micros(*t)))
            .map(|(_, l)| *l)
            .collect();
        if v.is_empty() {
            return (0.0, 0);
        }
        v.sort_unstable();
        let at = ((v.len() - 1) as f64 * q).round() as usize;
        (v[at] as f64 / 1000.0, v.len())
    }

    /// Successful requests per second over the run.
    pub fn ok_rps(&self) -> f64 {
        (self.requests - self.failed) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One user's share of a [`RateReport`].
#[derive(Default)]
struct Tally {
    requests: u64,
    failed: u64,
    /// The first 10 failures.
    failures: Vec<(u64, String)>,
    /// The last 10 failures (a ring).
    last_failures: Vec<(u64, String)>,
    failure_window: Option<(u64, u64)>,
    failure_times: Vec<u64>,
    slow: u64,
    slow_window: Option<(u64, u64)>,
    slow_kinds: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
    timed_us: Vec<(u64, u64)>,
    versions: BTreeMap<String, u64>,
    sessions: u64,
    switched: u64,
    stored: u64,
}

/// Runs the load until [`RateControl::stop`] is called; returns what it measured.
pub async fn run_rate(cfg: RateConfig, control: Arc<RateControl>) -> RateReport {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.users)
        .timeout(Duration::from_secs(20))
        .default_headers(bearer(&cfg.write_token))
        .build()
        .expect("http client");
    let cfg = Arc::new(cfg);
    let tasks: Vec<_> = (0..cfg.users)
        .map(|user| {
            let (cfg, control, client) = (cfg.clone(), control.clone(), client.clone());
            tokio::spawn(rate_user(user, cfg, control, client))
        })
        .collect();
    let mut r = RateReport::default();
    let mut failures = Vec::new();
    let (mut failure_window, mut slow_window) = (None, None);
    for t in tasks {
        let t = t.await.expect("user task panicked");
        r.requests += t.requests;
        r.failed += t.failed;
        failures.extend(t.failures);
        failures.extend(t.last_failures);
        r.latencies_us.extend(t.latencies_us);
        r.timed_us.extend(t.timed_us);
        for (v, n) in t.versions {
            *r.versions.entry(v).or_default() += n;
        }
        r.sessions += t.sessions;
        r.sessions_switched += t.switched;
        r.objects_stored += t.stored;
        r.slow += t.slow;
        for (k, n) in t.slow_kinds {
            *r.slow_kinds.entry(k).or_default() += n;
        }
        r.failure_times
            .extend(t.failure_times.into_iter().map(Duration::from_micros));
        failure_window = merge(failure_window, t.failure_window);
        slow_window = merge(slow_window, t.slow_window);
    }
    let us = |w: Option<(u64, u64)>| {
        w.map(|(a, b)| (Duration::from_micros(a), Duration::from_micros(b)))
    };
    r.failure_window = us(failure_window);
    r.slow_window = us(slow_window);
    r.latencies_us.sort_unstable();
    r.failure_times.sort_unstable();
    r.failure_times.truncate(100_000);
    failures.sort();
    failures.dedup();
    if failures.len() > 20 {
        failures.drain(10..failures.len() - 10);
    }
    r.failures = failures
        .into_iter()
        .map(|(t, f)| (Duration::from_micros(t), f))
        .collect();
    let end = control.stopped_at_us.load(Ordering::SeqCst);
    control.succeeded_at(end.max(control.last_ok_us.load(Ordering::SeqCst)));
    let (gap, gap_end) = *control.gap.lock().unwrap();
    r.elapsed = Duration::from_micros(end);
    r.longest_gap = Duration::from_micros(gap);
    r.longest_gap_end = Duration::from_micros(gap_end);
    r
}

/// The smallest window holding both.
fn merge(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<(u64, u64)> {
    match (a, b) {
        (Some((a0, a1)), Some((b0, b1))) => Some((a0.min(b0), a1.max(b1))),
        (x, None) | (None, x) => x,
    }
}

async fn rate_user(
    user: usize,
    cfg: Arc<RateConfig>,
    control: Arc<RateControl>,
    client: reqwest::Client,
) -> Tally {
    let mut rng = rand::rngs::StdRng::seed_from_u64(user as u64);
    let mut t = Tally::default();
    let mut mine: Vec<StoredObject> = Vec::new();
    let mut n = 0u64;
    let mut session: Option<Session> = None;
    // Users start part-way through their first session, so that sessions end (and new ones
    // start) spread over time rather than all at once.
    let mut first = rng.gen_range(0..cfg.requests_per_session.max(1));
    while !control.stopped() {
        let scheduled = match cfg.rate {
            Some(rate) => {
                let i = control.tickets.fetch_add(1, Ordering::Relaxed);
                let at = control.origin + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                if control.stopped() {
                    break;
                }
                at
            }
            None => Instant::now(),
        };
        control.sent.fetch_add(1, Ordering::Relaxed);
        let s = session.get_or_insert_with(|| Session {
            cookie: None,
            instance: None,
            record: SessionRecord {
                step: None,
                versions: Vec::new(),
                instances: Vec::new(),
            },
            requests: std::mem::take(&mut first),
        });
        let op = if s.record.versions.is_empty() || s.requests % VERSION_EVERY == 0 {
            Op::Version
        } else if mine.is_empty() || rng.gen_bool(cfg.put_share) {
            n += 1;
            Op::Put(
                format!("{}-u{user}-{n}", cfg.key_prefix),
                object_bytes(&mut rng, cfg.object_size),
            )
        } else {
            Op::Get(rng.gen_range(0..mine.len()))
        };
        let target = &cfg.targets[(user + s.requests as usize) % cfg.targets.len()];
        let outcome = request(&client, target, &cfg.cookie, s, &op, &mine).await;
        let done = Instant::now();
        let done_us = control.us(done);
        t.requests += 1;
        let latency = done.saturating_duration_since(scheduled);
        t.latencies_us.push(latency.as_micros() as u64);
        t.timed_us.push((done_us, latency.as_micros() as u64));
        if latency >= SLOW {
            let kind = match &op {
                Op::Version => "version",
                Op::Put(..) => "PUT",
                Op::Get(_) => "GET",
            };
            let on = s.record.versions.last().map_or("new", String::as_str);
            *t.slow_kinds.entry(format!("{kind} on {on}")).or_default() += 1;
            t.slow += 1;
            t.slow_window = merge(t.slow_window, Some((done_us, done_us)));
        }
        s.requests += 1;
        match outcome {
            Ok(version) => {
                control.succeeded_at(done_us);
                match (&op, version) {
                    // Only `/version` answers say which version served the session.
                    (Op::Version, Some(v)) => {
                        if s.record.versions.last() != Some(&v) {
                            s.record.versions.push(v.clone());
                        }
                        *t.versions.entry(v).or_default() += 1;
                    }
                    (Op::Put(..), v) => {
                        let obj = op
                            .stored(v.unwrap_or_default(), s.instance.clone())
                            .expect("a PUT");
                        t.stored += 1;
                        if mine.len() < REMEMBERED {
                            mine.push(obj);
                        } else {
                            let i = rng.gen_range(0..REMEMBERED);
                            mine[i] = obj;
                        }
                    }
                    _ => {}
                }
            }
            Err(e) => {
                control.failed.fetch_add(1, Ordering::Relaxed);
                t.failed += 1;
                t.failure_window = merge(t.failure_window, Some((done_us, done_us)));
                if t.failure_times.len() < 100_000 {
                    t.failure_times.push(done_us);
                }
                let f = (done_us, format!("user {user}: {e}"));
                if t.failures.len() < 10 {
                    t.failures.push(f);
                } else if t.last_failures.len() < 10 {
                    t.last_failures.push(f);
                } else {
                    t.last_failures[(t.failed % 10) as usize] = f;
                }
            }
        }
        if s.requests >= cfg.requests_per_session {
            let done = session.take().unwrap();
            t.sessions += 1;
            t.switched += u64::from(done.record.versions.len() > 1);
        }
    }
    if let Some(s) = session {
        t.sessions += 1;
        t.switched += u64::from(s.record.versions.len() > 1);
    }
    t
}
