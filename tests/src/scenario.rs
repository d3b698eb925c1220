//! The scenario the demo runs and the end-to-end test asserts: release v1, put users on it,
//! release v2 with canary steps under that load, wait for the drain, and measure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::load::{self, FailedRequest, LoadConfig, LoadControl, LoadReport};
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
    /// Test host to take off the network at the first canary step (a host lost mid-release);
    /// it is put back once the release returned, and the release run again if it was left
    /// unfinished. Not host 1: its link carries the machine's own address (the machine's
    /// instances and the locator, as the other hosts reach them).
    pub cut_host: Option<u32>,
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
            cut_host: None,
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
    /// With [`ScenarioOptions::cut_host`]: what losing the host did.
    pub cut: Option<HostCut>,
    pub logs: String,
}

/// A test host taken off the network at the first canary step.
#[derive(Debug)]
pub struct HostCut {
    pub host: u32,
    /// Since `haddock release`.
    pub at: Duration,
    /// The same `haddock release` once the host was back, when the first run left the
    /// release unfinished (exit 3): (exit code, JSON line, output).
    pub rerun: Option<(Option<i32>, serde_json::Value, String)>,
    /// Containers of the new version left on any host at the end.
    pub new_containers_left: usize,
}

impl Outcome {
    /// Failed requests by where they were headed, for a run that lost test host `host`
    /// (instance names carry `-h<target index>-`, and test host i is target i):
    /// (the lost host's own: its instances' sessions or its objects; elsewhere; unknown).
    pub fn failures_by_host(&self, host: u32) -> (usize, usize, usize) {
        let (lost, elsewhere, unknown) = self.failures_split(host);
        (lost.len(), elsewhere.len(), unknown.len())
    }

    /// The failed requests themselves, split as [`Outcome::failures_by_host`] counts them.
    pub fn failures_split(
        &self,
        host: u32,
    ) -> (
        Vec<&FailedRequest>,
        Vec<&FailedRequest>,
        Vec<&FailedRequest>,
    ) {
        let mark = format!("-h{host}-");
        let on_lost = |i: &Option<String>| i.as_deref().is_some_and(|i| i.contains(&mark));
        let (mut lost, mut elsewhere, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
        for f in &self.load.failed_requests {
            if on_lost(&f.session_instance) || on_lost(&f.object_instance) {
                lost.push(f);
            } else if f.session_instance.is_none() {
                unknown.push(f);
            } else {
                elsewhere.push(f);
            }
        }
        (lost, elsewhere, unknown)
    }
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
        targets: stack.proxy_urls.clone(),
        host: stack.host.clone(),
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
    let mut cut_at = None;
    while !release.is_finished() {
        if let Some(w) = stack.weights().await {
            if timeline.last().map(|(_, last)| last) != Some(&w) {
                let share = w.get(&opts.to).copied().map(u32::from);
                if let (Some(host), None, Some(1..)) = (opts.cut_host, cut_at, share) {
                    assert!(host >= 2, "cut_host 1 would cut the machine too");
                    let hosts = stack.test_hosts.as_ref().expect("a stack with test hosts");
                    hosts.link(host, false);
                    cut_at = Some(started.elapsed());
                }
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
    let cut = match (opts.cut_host, cut_at) {
        (Some(host), Some(at)) => {
            let hosts = stack.test_hosts.as_ref().expect("a stack with test hosts");
            hosts.link(host, true);
            let rerun = (release.0 == Some(3)).then(|| {
                let cmd = stack.release_command(&opts.to);
                tokio::task::block_in_place(move || {
                    let mut cmd = cmd;
                    crate::stack::release_result(&cmd.output().expect("haddock runs"))
                })
            });
            // The optimizers ask the lost host's peers last for 10 s after they failed, and
            // their pooled connections to it may still be the dead ones: the objects whose only
            // copy is there are read once that has passed (docs/optimizer.md, "A lost host").
            tokio::time::sleep(Duration::from_secs(11)).await;
            Some(HostCut {
                host,
                at,
                rerun,
                new_containers_left: stack.containers_everywhere(Some(&opts.to)).len(),
            })
        }
        _ => None,
    };
    let old_containers_left = stack.containers_everywhere(Some(&opts.from)).len();

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
    // Through the last proxy, on fresh sessions: on a stack over several hosts most objects
    // are read on another host than the one that stored them.
    let last = stack.proxy_urls.last().unwrap_or(&stack.proxy_url);
    let objects_readable = load::verify_objects(last, &from_v1).await;
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
        cut,
        logs: stack.logs(),
    }
}
