//! `locator bench`: how fast a committed change reaches watchers, and how many routing-table
//! reads per second one locator answers. Everything runs in this process on real sockets.
//!
//! Latency is measured per event and per watcher from the instant the writing locator
//! published the commit (its in-process feed, so the writer's own HTTP round trip is not
//! counted) to the instant the watcher's HTTP client decoded the line. With PostgreSQL the
//! watchers are on the *other* replica, so the figure includes NOTIFY and the catch-up read.

use crate::api::{
    InstanceState, RegisterInstance, Revision, ServiceSpec, SessionSettings, WeightsUpdate,
};
use crate::store::{Feed, Store};
use crate::testing::{self, TestLocator, READ_TOKEN};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub watchers: usize,
    pub changes: usize,
    /// Pause between two changes (latency, not throughput, is measured).
    pub interval: Duration,
    pub readers: usize,
    pub read_time: Duration,
    pub postgres: bool,
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub(crate) fn of(mut v: Vec<Duration>) -> Percentiles {
        v.sort();
        let at = |q: f64| {
            v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(f64::NAN)
        };
        Percentiles {
            n: v.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:6.2} ms  p99 {:6.2} ms  max {:6.2} ms  (n={})",
            self.p50, self.p99, self.max, self.n
        )
    }
}

/// Figures of one store.
#[derive(Debug, Clone)]
pub struct WatchFigures {
    pub commit_to_watcher: Percentiles,
    pub write_ack: Percentiles,
}

fn bench_spec() -> ServiceSpec {
    ServiceSpec {
        sessions: SessionSettings {
            cookie_name: "haddock".into(),
            idle_ttl_ms: 60_000,
            max_drain_ms: 60_000,
        },
        routes: Default::default(),
    }
}

/// Writes `changes` weight changes through `writer` while `watchers` clients watch `watched`.
pub async fn watch_latency<A: Store, B: Store>(
    writer: &TestLocator<A>,
    watched: &TestLocator<B>,
    opts: &BenchOptions,
) -> WatchFigures {
    let c = writer.deploy();
    c.put_service("bench", &bench_spec())
        .await
        .expect("put service");
    for (id, version) in [("bench-1", "1"), ("bench-2", "2")] {
        let r = RegisterInstance {
            id: id.into(),
            service: "bench".into(),
            version: version.into(),
            address: "127.0.0.1:9".into(),
            docker_host: String::new(),
            container_id: String::new(),
            labels: BTreeMap::new(),
            state: InstanceState::Ready,
        };
        c.register(&r).await.expect("register");
    }
    let start_rev = writer.store.committed().revision();
    testing::eventually(
        "the watched replica to catch up",
        Duration::from_secs(10),
        || async { (watched.store.committed().revision() >= start_rev).then_some(()) },
    )
    .await;

    // Commit instants, from the writer's own feed.
    let commits: Arc<Mutex<HashMap<Revision, Instant>>> = Arc::default();
    let mut feed = writer.store.committed().subscribe(crate::store::Scope::All);
    let commit_log = commits.clone();
    let recorder = tokio::spawn(async move {
        while let Ok(msg) = feed.recv().await {
            if let Feed::Event { revision, .. } = msg {
                commit_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(revision, Instant::now());
            }
        }
    });

    let received: Arc<Mutex<Vec<(Revision, Instant)>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..opts.watchers {
        let client = watched.client(READ_TOKEN);
        let mut events = Box::pin(client.watch(Some(start_rev)).await.expect("watch"));
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(e)) = events.next().await {
                let now = Instant::now();
                received
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((e.revision, now));
            }
        }));
    }

    let mut acks = Vec::with_capacity(opts.changes);
    let mut last = start_rev;
    for i in 0..opts.changes {
        let canary = if i % 2 == 0 { 10 } else { 20 };
        let update = WeightsUpdate {
            weights: BTreeMap::from([("1".to_string(), 100 - canary), ("2".to_string(), canary)]),
            primary_version: None,
        };
        let sent = Instant::now();
        let s = c
            .set_weights("bench", &update, None)
            .await
            .expect("set weights");
        acks.push(sent.elapsed());
        last = last.max(s.revision);
        tokio::time::sleep(opts.interval).await;
    }
    let expected = opts.watchers;
    testing::eventually(
        "every watcher to receive the last change",
        Duration::from_secs(30),
        || {
            let received = received.clone();
            async move {
                let r = received.lock().unwrap_or_else(|p| p.into_inner());
                (r.iter().filter(|(rev, _)| *rev == last).count() >= expected).then_some(())
            }
        },
    )
    .await;
    for t in tasks {
        t.abort();
    }
    recorder.abort();
    let commits = commits.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let received = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let latencies = received
        .iter()
        .filter(|(rev, _)| *rev > start_rev)
        .filter_map(|(rev, at)| commits.get(rev).map(|c| at.saturating_duration_since(*c)))
        .collect();
    WatchFigures {
        commit_to_watcher: Percentiles::of(latencies),
        write_ack: Percentiles::of(acks),
    }
}

/// `GET /v1/snapshot` from `readers` keep-alive clients for `time`: reads per second.
pub async fn snapshot_reads<S: Store>(
    loc: &TestLocator<S>,
    readers: usize,
    time: Duration,
) -> (f64, usize) {
    let url = format!("{}/v1/snapshot", loc.url);
    let size = reqwest::Client::new()
        .get(&url)
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("a snapshot")
        .bytes()
        .await
        .map(|b| b.len())
        .unwrap_or(0);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..readers {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while started.elapsed() < time {
                let ok = match http.get(&url).bearer_auth(READ_TOKEN).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                if ok {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    (total as f64 / started.elapsed().as_secs_f64(), size)
}

/// Runs everything and returns the printed report.
pub async fn run(opts: BenchOptions) -> String {
    let ttl = Duration::from_secs(3600);
    let mut out = String::new();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    out.push_str(&format!(
        "locator bench: {} watchers, {} changes one every {:?}, {} cores (load generator in the same process)\n",
        opts.watchers, opts.changes, opts.interval, cores
    ));
    let emb = testing::embedded(ttl).await;
    let f = watch_latency(&emb, &emb, &opts).await;
    out.push_str(&format!(
        "embedded    commit → watcher  {}\n",
        f.commit_to_watcher
    ));
    out.push_str(&format!("embedded    write ack (fsync) {}\n", f.write_ack));
    let (rps, size) = snapshot_reads(&emb, opts.readers, opts.read_time).await;
    out.push_str(&format!(
        "embedded    GET /v1/snapshot  {rps:8.0} reads/s ({} clients, {size} bytes)\n",
        opts.readers
    ));
    drop(emb);
    if opts.postgres {
        let pg = tokio::task::spawn_blocking(|| testing::Postgres::start_with(true))
            .await
            .expect("start PostgreSQL");
        let a = testing::postgres(&pg.url(), ttl).await;
        let b = testing::postgres(&pg.url(), ttl).await;
        let f = watch_latency(&a, &b, &opts).await;
        out.push_str(&format!(
            "postgres    commit on A → watcher on B  {}\n",
            f.commit_to_watcher
        ));
        out.push_str(&format!(
            "postgres    write ack on A (commit)     {}\n",
            f.write_ack
        ));
        let (rps, size) = snapshot_reads(&b, opts.readers, opts.read_time).await;
        out.push_str(&format!(
            "postgres    GET /v1/snapshot on B  {rps:8.0} reads/s ({} clients, {size} bytes)\n",
            opts.readers
        ));
        drop((a, b));
        drop(pg);
    }
    out
}
