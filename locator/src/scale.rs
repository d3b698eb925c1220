//! `locator scale`: where one locator saturates, with P proxies and I instances.
//!
//! The locator runs as its own process (the `serve` of this very binary, embedded store or
//! PostgreSQL), so its CPU time and RSS are its own, read from `/proc`. This process simulates
//! the platform around it on real sockets: P proxies, each with a watch stream and a session
//! report a second (a few of its sessions move every second, as under load); I instances over
//! S services, heartbeated every second as haddock's host agents do (one agent per
//! [`INSTANCES_PER_HOST`] instances); and a release shifting weights, one service after
//! another. It measures how long a weight change takes to reach every proxy of its service
//! (from the moment the write is sent to the moment the proxy's stream delivered the line).
//!
//! Each configuration runs twice, in the same run: `before`, as the platform worked until the
//! scale issue (every proxy hears every service's events; one heartbeat request per instance),
//! and `after` (a proxy watches only its service's routing events, `?service=…&routing=true`,
//! and reports only the instances whose figures changed after its first whole report; an
//! agent heartbeats all its instances in one `POST /v1/heartbeats`), so the table shows the
//! ratio on one machine.

use crate::api::{
    InstanceLoad, InstanceState, RegisterInstance, ServiceSpec, SessionReport, SessionSettings,
    WeightsUpdate,
};
use crate::client::Client;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Instances one simulated host agent heartbeats.
pub const INSTANCES_PER_HOST: usize = 50;
const DEPLOY: &str = "scale-deploy-token";
const READ: &str = "scale-read-token";
const PROXY: &str = "scale-proxy-token";

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub proxies: Vec<usize>,
    pub instances: Vec<usize>,
    pub services: usize,
    /// How long the load runs before and while the weights move.
    pub window: Duration,
    /// Weight changes per run (one service after another).
    pub changes: usize,
    /// `postgres://…`: run the locator on PostgreSQL instead of the embedded store. Each run
    /// gets a scratch database of its own on that server, dropped afterwards.
    pub database_url: Option<String>,
    /// Locator replicas (PostgreSQL only): proxies, agents and watchers are spread over them,
    /// weight changes go through the first.
    pub replicas: usize,
    /// Run the `before` configuration (the baseline), the `after` one, or both.
    pub before: bool,
    pub after: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Before,
    After,
}

/// One row of the table.
#[derive(Debug, Clone)]
struct Row {
    mode: Mode,
    proxies: usize,
    instances: usize,
    propagation: crate::bench::Percentiles,
    /// Weight changes some proxy of the service never received within the wait (or that the
    /// locator did not acknowledge).
    missed: usize,
    cpu_per_s: f64,
    rss_mib: f64,
    bytes_per_watcher_s: f64,
    events_per_s: f64,
    /// PostgreSQL only: committed transactions and rows written per second in the database.
    db_per_s: Option<(f64, f64)>,
    requests_per_s: f64,
}

/// The locator under test, a child process killed on drop.
struct Locator {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Locator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Locator {
    async fn start(database_url: Option<&str>, mode: Mode) -> Locator {
        let dir = tempfile::tempdir().expect("a temp dir");
        let tokens = dir.path().join("tokens.toml");
        std::fs::write(
            &tokens,
            format!("deploy = [\"{DEPLOY}\"]\nread = [\"{READ}\"]\nproxy = [\"{PROXY}\"]\n"),
        )
        .expect("write the tokens");
        let port = crate::testing::free_port();
        let exe = std::env::current_exe().expect("this binary");
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--tokens")
            .arg(&tokens)
            .args(["--max-connections", "8192"])
            // The baseline publishes every report, as the locator did before.
            .args([
                "--load-publish-interval",
                if mode == Mode::Before { "0s" } else { "1s" },
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(url) = database_url {
            cmd.args(["--database-url", url]);
        }
        let child = cmd.spawn().expect("start the locator");
        let url = format!("http://127.0.0.1:{port}");
        let health = format!("{url}/healthz");
        crate::testing::eventually("the locator to answer", Duration::from_secs(30), || {
            let health = health.clone();
            async move {
                reqwest::get(&health)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await;
        Locator {
            child,
            url,
            _dir: dir,
        }
    }

    /// CPU seconds (user + system) the locator process has used.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the line, 11 and 12 after the name.
        (ticks(11) + ticks(12)) / 100.0
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

fn service_name(k: usize) -> String {
    format!("svc-{k}")
}

/// The revision of a `service` watch line (`{"kind":"service",…,"revision":N,…}`), if it is one.
fn service_event_revision(line: &[u8]) -> Option<u64> {
    if !line.starts_with(b"{\"kind\":\"service\"") {
        return None;
    }
    let at = memchr::memmem::find(line, b"\"revision\":")? + b"\"revision\":".len();
    let digits: Vec<u8> = line[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// What the simulated proxies saw.
#[derive(Default)]
struct Seen {
    bytes: AtomicU64,
    /// Watchers that received their first line (the snapshot).
    started: AtomicU64,
    /// (service index, revision, when) of every service event a proxy received.
    service_events: Mutex<Vec<(usize, u64, Instant)>>,
}

/// One run: a fresh locator, the platform set up, the load for `window`, `changes` weight
/// changes during it.
async fn run_one(opts: &ScaleOptions, mode: Mode, proxies: usize, instances: usize) -> Row {
    let scratch = match &opts.database_url {
        Some(url) => Some(Scratch::create(url).await),
        None => None,
    };
    let replicas = if scratch.is_some() {
        opts.replicas.max(1)
    } else {
        1
    };
    let mut locs = Vec::new();
    for _ in 0..replicas {
        locs.push(Locator::start(scratch.as_ref().map(|s| s.url.as_str()), mode).await);
    }
    let row = load(opts, mode, proxies, instances, &locs, scratch.as_ref()).await;
    drop(locs);
    if let Some(scratch) = scratch {
        scratch.drop_database().await;
    }
    row
}

/// A database of its own for one run, on the server `--database-url` names.
struct Scratch {
    admin: tokio_postgres::Client,
    name: String,
    url: String,
}

impl Scratch {
    async fn create(url: &str) -> Scratch {
        let (admin, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to --database-url");
        tokio::spawn(connection);
        let name = format!(
            "haddock_scale_{}_{:x}",
            std::process::id(),
            rand::random::<u32>()
        );
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a scratch database");
        Scratch {
            admin,
            url: with_database(url, &name),
            name,
        }
    }

    /// Committed transactions and rows written so far in the scratch database.
    async fn writes(&self) -> (i64, i64) {
        let row = self
            .admin
            .query_one(
                "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted
                 FROM pg_stat_database WHERE datname = $1",
                &[&self.name],
            )
            .await
            .expect("read pg_stat_database");
        (row.get(0), row.get(1))
    }

    async fn drop_database(self) {
        let dropped = self
            .admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await;
        if let Err(e) = dropped {
            eprintln!("could not drop the scratch database {}: {e}", self.name);
        }
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let host_at = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(host_at);
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{head}{authority}/{name}{query}")
}

/// The platform's load around `locs` (one, or several replicas of one database).
async fn load(
    opts: &ScaleOptions,
    mode: Mode,
    proxies: usize,
    instances: usize,
    locs: &[Locator],
    scratch: Option<&Scratch>,
) -> Row {
    let loc = &locs[0];
    let replica = |n: usize| &locs[n % locs.len()].url;
    let deploy = Client::new(&loc.url, Some(DEPLOY.into()));
    let services = opts.services.max(1);
    let settings = SessionSettings {
        cookie_name: "s".into(),
        idle_ttl_ms: 60_000,
        max_drain_ms: 60_000,
    };
    for k in 0..services {
        deploy
            .put_service(
                &service_name(k),
                &ServiceSpec {
                    sessions: settings.clone(),
                    routes: Default::default(),
                },
            )
            .await
            .expect("put a service");
    }
    // Versions 1 and 2 of every service, so that weights can move between them.
    let ids: Vec<String> = (0..instances).map(|n| format!("i-{n}")).collect();
    futures_util::stream::iter(ids.iter().enumerate())
        .for_each_concurrent(64, |(n, id)| {
            let deploy = deploy.clone();
            async move {
                let r = RegisterInstance {
                    id: id.clone(),
                    service: service_name(n % services),
                    version: if (n / services) % 2 == 0 { "1" } else { "2" }.into(),
                    address: format!(
                        "10.{}.{}.{}:8080",
                        (n >> 16) & 255,
                        (n >> 8) & 255,
                        (n & 255) + 1
                    ),
                    docker_host: String::new(),
                    container_id: String::new(),
                    labels: BTreeMap::new(),
                    state: InstanceState::Ready,
                };
                deploy.register(&r).await.expect("register an instance");
            }
        })
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let mut tasks = Vec::new();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .build()
        .expect("a client");
    // The proxies' watch streams.
    for p in 0..proxies {
        let svc = p % services;
        let url = match mode {
            Mode::Before => format!("{}/v1/watch", replica(p)),
            Mode::After => format!(
                "{}/v1/watch?service={}&routing=true",
                replica(p),
                service_name(svc)
            ),
        };
        let (http, seen, stop) = (http.clone(), seen.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(resp) = http.get(&url).bearer_auth(READ).send().await else {
                return;
            };
            let mut body = resp.bytes_stream();
            let mut carry: Vec<u8> = Vec::new();
            let mut started = false;
            while let Some(Ok(chunk)) = body.next().await {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let now = Instant::now();
                seen.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                carry.extend_from_slice(&chunk);
                let mut start = 0;
                while let Some(pos) = memchr::memchr(b'\n', &carry[start..]) {
                    let line = &carry[start..start + pos];
                    if !started {
                        started = true;
                        seen.started.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(rev) = service_event_revision(line) {
                        seen.service_events
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((svc, rev, now));
                    }
                    start += pos + 1;
                }
                carry.drain(..start);
            }
        }));
    }
    let requests = Arc::new(AtomicU64::new(0));
    // The proxies' session reports: once a second, two of its instances' counts move.
    for p in 0..proxies {
        let svc = p % services;
        let mine: Vec<String> = (0..instances)
            .filter(|n| n % services == svc)
            .map(|n| format!("i-{n}"))
            .collect();
        let client = Client::new(replica(p), Some(PROXY.into()));
        let (stop, requests) = (stop.clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let load = |n| InstanceLoad {
                live_sessions: n,
                in_flight: 0,
            };
            let mut whole = SessionReport {
                proxy_id: format!("proxy-{p}"),
                service: service_name(svc),
                instances: mine.iter().map(|id| (id.clone(), load(1))).collect(),
                versions: BTreeMap::new(),
                seq: 0,
                base: None,
            };
            // The two instances whose counts move at this proxy.
            let moving: Vec<&String> = mine
                .iter()
                .cycle()
                .skip(p)
                .take(mine.len().min(2))
                .collect();
            let mut accepted = false;
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                round += 1;
                whole.seq = round;
                let mut changes = SessionReport {
                    proxy_id: whole.proxy_id.clone(),
                    service: whole.service.clone(),
                    instances: BTreeMap::new(),
                    versions: BTreeMap::new(),
                    seq: round,
                    base: Some(round - 1),
                };
                for (j, id) in moving.iter().enumerate() {
                    let l = load((round + j as u64) % 3);
                    whole.instances.insert((*id).clone(), l);
                    changes.instances.insert((*id).clone(), l);
                }
                // What a proxy sends: the whole report first (and whenever the locator lacks
                // it), then the instances that changed (built here directly: the simulator
                // shares the cores with the locator and must not spend them on diffs).
                let sent = match mode {
                    Mode::After if accepted => match client.report_sessions(&changes).await {
                        Err(e) if e.code() == Some("full_report_needed") => {
                            client.report_sessions(&whole).await
                        }
                        other => other,
                    },
                    _ => client.report_sessions(&whole).await,
                };
                if sent.is_ok() {
                    requests.fetch_add(1, Ordering::Relaxed);
                    accepted = true;
                }
            }
        }));
    }
    // The host agents' heartbeats, every second.
    for (h, host) in ids.chunks(INSTANCES_PER_HOST).enumerate() {
        let host = host.to_vec();
        let client = Client::new(replica(h), Some(DEPLOY.into()));
        let (stop, requests) = (stop.clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                match mode {
                    Mode::Before => {
                        for id in &host {
                            if client.heartbeat(id).await.is_ok() {
                                requests.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Mode::After => {
                        if client.heartbeats(&host).await.is_ok() {
                            requests.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }

    // Every watcher has its snapshot (a thousand proxies connecting in the same second is a
    // restart's thundering herd, not the steady state measured here), the load settles, then
    // the window runs while the weights move.
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.started.load(Ordering::Relaxed) < proxies as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the first reports' sums (a burst of one event per instance) and a report TTL.
    tokio::time::sleep(Duration::from_millis(crate::state::SESSION_REPORT_TTL_MS)).await;
    let cpu_seconds = || locs.iter().map(Locator::cpu_seconds).sum::<f64>();
    let db0 = match scratch {
        Some(s) => Some(s.writes().await),
        None => None,
    };
    let (cpu0, bytes0, req0, rev0, t0) = (
        cpu_seconds(),
        seen.bytes.load(Ordering::Relaxed),
        requests.load(Ordering::Relaxed),
        deploy.snapshot().await.map(|s| s.revision).unwrap_or(0),
        Instant::now(),
    );
    let mut sent: Vec<(usize, u64, Instant)> = Vec::new();
    let pause = opts.window / opts.changes.max(1) as u32;
    for c in 0..opts.changes {
        let svc = c % services;
        let canary = if (c / services) % 2 == 0 { 10 } else { 20 };
        let update = WeightsUpdate {
            weights: BTreeMap::from([("1".to_string(), 100 - canary), ("2".to_string(), canary)]),
            primary_version: None,
        };
        let at = Instant::now();
        if let Ok(s) = deploy.set_weights(&service_name(svc), &update, None).await {
            sent.push((svc, s.revision, at));
        }
        tokio::time::sleep(pause).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let bytes = seen.bytes.load(Ordering::Relaxed) - bytes0;
    let reqs = requests.load(Ordering::Relaxed) - req0;
    let rev1 = deploy.snapshot().await.map(|s| s.revision).unwrap_or(rev0);
    let rss = locs.iter().map(Locator::rss_mib).sum();
    // Give the last change time to arrive (and PostgreSQL's statistics time to be flushed).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let db_per_s = match (scratch, db0) {
        (Some(s), Some((c0, w0))) => {
            let (c1, w1) = s.writes().await;
            // The statistics lag by up to a second; the wait above covers the window's end.
            let span = elapsed + 3.0;
            Some(((c1 - c0) as f64 / span, (w1 - w0) as f64 / span))
        }
        _ => None,
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let received = seen
        .service_events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let per_service = |svc: usize| (0..proxies).filter(|p| p % services == svc).count();
    // A change the locator did not even acknowledge counts as missed.
    let (mut latencies, mut missed) = (Vec::new(), opts.changes - sent.len());
    for (svc, rev, at) in &sent {
        let got: Vec<Duration> = received
            .iter()
            .filter(|(s, r, _)| s == svc && r == rev)
            .map(|(_, _, when)| when.saturating_duration_since(*at))
            .collect();
        if got.len() < per_service(*svc) {
            missed += 1;
        }
        latencies.extend(got);
    }
    Row {
        mode,
        proxies,
        instances,
        propagation: crate::bench::Percentiles::of(latencies),
        missed,
        cpu_per_s: cpu / elapsed,
        rss_mib: rss,
        bytes_per_watcher_s: bytes as f64 / proxies.max(1) as f64 / elapsed,
        events_per_s: rev1.saturating_sub(rev0) as f64 / elapsed,
        db_per_s,
        requests_per_s: reqs as f64 / elapsed,
    }
}

/// Runs every configuration, both modes, and returns the printed table.
pub async fn run(opts: ScaleOptions) -> String {
    let store = if opts.database_url.is_some() {
        format!("PostgreSQL ({} replicas)", opts.replicas.max(1))
    } else {
        "embedded".to_string()
    };
    let mut out = format!(
        "locator scale: {store} store, {} services, {}s window, {} weight changes per run, \
         {} instances per host agent, {} cores (the locator in its own process, the simulator in this one)\n\
         before = every proxy watches everything and sends whole reports, every report published, one heartbeat request per instance;\n\
         after  = a proxy watches its service's routing events (?service=…&routing=true) and reports changes, one heartbeat request per host\n\n",
        opts.services,
        opts.window.as_secs_f64(),
        opts.changes,
        INSTANCES_PER_HOST,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    out.push_str(
        "mode      P      I  | weight change → every proxy of its service        missed | locator CPU s/s  RSS MiB | B/s per watcher | events/s | requests/s | DB commits/s rows/s\n",
    );
    for &i in &opts.instances {
        for &p in &opts.proxies {
            let modes = [(Mode::Before, opts.before), (Mode::After, opts.after)];
            for mode in modes.into_iter().filter(|m| m.1).map(|m| m.0) {
                let r = run_one(&opts, mode, p, i).await;
                let line = format!(
                    "{:<6} {:>5} {:>6}  | {:<50} {:>5} | {:>15.2} {:>8.0} | {:>15.0} | {:>8.0} | {:>10.0} | {}\n",
                    match r.mode {
                        Mode::Before => "before",
                        Mode::After => "after",
                    },
                    r.proxies,
                    r.instances,
                    r.propagation.to_string(),
                    r.missed,
                    r.cpu_per_s,
                    r.rss_mib,
                    r.bytes_per_watcher_s,
                    r.events_per_s,
                    r.requests_per_s,
                    r.db_per_s
                        .map_or("-".to_string(), |(c, w)| format!("{c:>12.0} {w:>6.0}")),
                );
                eprint!("{line}");
                out.push_str(&line);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scratch_database_replaces_the_named_one() {
        assert_eq!(
            with_database("postgres://u@h:5/postgres?sslmode=disable", "x"),
            "postgres://u@h:5/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:5", "x"), "postgres://u@h:5/x");
    }

    #[test]
    fn service_lines_are_recognised() {
        assert_eq!(
            service_event_revision(br#"{"kind":"service","name":"a","revision":42,"weights":{}}"#),
            Some(42)
        );
        assert_eq!(
            service_event_revision(br#"{"kind":"instance","revision":42}"#),
            None
        );
        assert_eq!(service_event_revision(br#"{"kind":"service"}"#), None);
    }
}
