//! The scenario the demo runs and the end-to-end test asserts: release v1, put users on it,
//! release v2 with canary steps under that load, wait for the drain, and measure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::load::{self, LoadConfig, LoadControl, LoadReport};
use crate::stack::{Stack, StackOptions};

#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    pub stack: StackOptions,
    pub from: String,
    pub to: String,
    pub users: usize,
    /// Load on v1 alone before the release starts.
    pub warmup: Duration,
    /// New sessions started at each canary step to measure the split (0: none).
    pub probes_per_step: usize,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            stack: StackOptions::default(),
            from: "1.0.0".into(),
            to: "1.1.0".into(),
            users: 24,
            warmup: Duration::from_secs(3),
            probes_per_step: 4000,
        }
    }
}

/// What one run measured.
#[derive(Debug)]
pub struct Outcome {
    /// The version released under load.
    pub to: String,
    pub load: LoadReport,
    pub first_release: (Option<i32>, String),
    pub release: (Option<i32>, serde_json::Value, String),
    /// From the start of `haddock release <to>` until the locator had 100 % on it.
    pub tag_to_full: Option<Duration>,
    /// (elapsed since release start, weights) each time the weights changed.
    pub weight_timeline: Vec<(Duration, BTreeMap<String, u8>)>,
    /// Per canary weight of the new version: new sessions probed, by the version they got.
    pub probes: BTreeMap<u32, BTreeMap<String, usize>>,
    pub objects_checked: usize,
    pub objects_readable: usize,
    /// Containers of the old version still present when the release returned.
    pub old_containers_left: usize,
    /// What following the locator cost the proxy over the run.
    pub routing: RoutingWork,
    pub logs: String,
}

/// The proxy's routing work over a run (its counters): tables built and `routing.json` fsyncs,
/// and the events that changed only session sums, each of which was a table and an fsync
/// before session sums stopped counting as routing changes.
#[derive(Debug, Clone, Default)]
pub struct RoutingWork {
    pub seconds: f64,
    pub installs: f64,
    pub saves: f64,
    pub load_only: f64,
}

impl RoutingWork {
    async fn read(stack: &Stack) -> (f64, f64, f64) {
        (
            stack
                .proxy_counter("routing_table_installs")
                .await
                .unwrap_or(0.0),
            stack
                .proxy_counter("routing_state_saves")
                .await
                .unwrap_or(0.0),
            stack
                .proxy_counter("routing_load_only_events")
                .await
                .unwrap_or(0.0),
        )
    }

    /// Per second: (installs, fsyncs) now, and what the old rule would have done.
    pub fn rates(&self) -> ((f64, f64), (f64, f64)) {
        let s = self.seconds.max(1e-9);
        (
            (self.installs / s, self.saves / s),
            (
                (self.installs + self.load_only) / s,
                (self.saves + self.load_only) / s,
            ),
        )
    }
}

impl Outcome {
    /// The one-line JSON summary scripts read (the demo's last line).
    pub fn summary(&self) -> serde_json::Value {
        let split: serde_json::Map<String, serde_json::Value> = self
            .split()
            .into_iter()
            .map(|(w, (share, n))| (w.to_string(), json!({ "measured": share, "sessions": n })))
            .collect();
        json!({
            "requests": self.load.requests,
            "failed": self.load.failed,
            "p50_ms": self.load.percentile_ms(0.50),
            "p99_ms": self.load.percentile_ms(0.99),
            "sessions": self.load.sessions.len(),
            "sessions_switched": self.load.sessions_switched(),
            "tag_to_full_ms": self.tag_to_full.map(|d| d.as_millis() as u64),
            "objects_checked": self.objects_checked,
            "objects_readable": self.objects_readable,
            "canary_split": split,
            "release_exit": self.release.0,
            "old_containers_left": self.old_containers_left,
        })
    }
}

impl Outcome {
    /// Measured share of new sessions on the new version at each canary step, from the
    /// probes: `weight → (share, sessions)`. Failed probes count against the share.
    pub fn split(&self) -> BTreeMap<u32, (f64, usize)> {
        self.probes
            .iter()
            .map(|(w, counts)| {
                let n: usize = counts.values().sum();
                let hit = counts.get(&self.to).copied().unwrap_or(0);
                (*w, (hit as f64 / n.max(1) as f64, n))
            })
            .collect()
    }
}

/// Runs the whole scenario on a fresh stack named `name`.
pub async fn canary_under_load(name: &str, opts: ScenarioOptions) -> Outcome {
    let stack = Stack::start(name, opts.stack.clone()).await;
    run_on(&stack, &opts).await
}

pub async fn run_on(stack: &Stack, opts: &ScenarioOptions) -> Outcome {
    // v1: the first release of the service (no users yet).
    let (code, _, out) = {
        let s = stack;
        tokio::task::block_in_place(|| s.release(&opts.from))
    };
    let first_release = (code, out);

    let control = Arc::new(LoadControl::default());
    let cfg = LoadConfig {
        target: stack.proxy_url.clone(),
        users: opts.users,
        cookie: stack.cookie.clone(),
        requests_per_session: 12,
        object_size: 24 * 1024,
        think: Duration::from_millis(15),
        write_token: stack.write_token.clone(),
    };
    let routing_start = (Instant::now(), RoutingWork::read(stack).await);
    let load = tokio::spawn(load::run(cfg, control.clone()));
    tokio::time::sleep(opts.warmup).await;

    // v2, in a thread, while this task follows the weights for the split measurement.
    let started = Instant::now();
    let release = {
        let mut cmd = stack.release_command(&opts.to);
        tokio::task::spawn_blocking(move || cmd.output())
    };
    let mut timeline: Vec<(Duration, BTreeMap<String, u8>)> = Vec::new();
    let mut tag_to_full = None;
    let mut probes = BTreeMap::new();
    while !release.is_finished() {
        if let Some(w) = stack.weights().await {
            if timeline.last().map(|(_, last)| last) != Some(&w) {
                let share = w.get(&opts.to).copied().map(u32::from);
                control.set_step(share.filter(|s| *s > 0));
                if share == Some(100) && tag_to_full.is_none() {
                    tag_to_full = Some(started.elapsed());
                }
                timeline.push((started.elapsed(), w));
                // A canary step: measure the split on a burst of brand-new sessions.
                if let Some(s) = share.filter(|s| (1..100).contains(s)) {
                    if opts.probes_per_step > 0 && !probes.contains_key(&s) {
                        let counts =
                            load::probe_new_sessions(&stack.proxy_url, opts.probes_per_step, 16)
                                .await;
                        // A probe that outlasted its step measured two weights at once.
                        let after = stack.weights().await;
                        assert_eq!(
                            after.as_ref(),
                            timeline.last().map(|(_, w)| w),
                            "the weights changed during the {s} % probe: make the step pause \
                             longer than a probe of {} sessions",
                            opts.probes_per_step
                        );
                        probes.insert(s, counts);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = release
        .await
        .expect("release thread")
        .expect("haddock runs");
    let release = crate::stack::release_result(&out);
    let old_containers_left = stack.containers(Some(&opts.from)).len();

    control.stop();
    let load = load.await.expect("load task");
    let routing = {
        let (i, s, l) = RoutingWork::read(stack).await;
        let (t0, (i0, s0, l0)) = routing_start;
        RoutingWork {
            seconds: t0.elapsed().as_secs_f64(),
            installs: i - i0,
            saves: s - s0,
            load_only: l - l0,
        }
    };
    let from_v1: Vec<_> = load
        .objects
        .iter()
        .filter(|o| o.version == opts.from)
        .cloned()
        .collect();
    let objects_readable = load::verify_objects(&stack.proxy_url, &from_v1).await;
    Outcome {
        to: opts.to.clone(),
        probes,
        objects_checked: from_v1.len(),
        objects_readable,
        load,
        first_release,
        release,
        tag_to_full,
        weight_timeline: timeline,
        old_containers_left,
        routing,
        logs: stack.logs(),
    }
}
