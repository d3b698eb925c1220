//! `haddock-proof`: the proof benchmark of issue 7, printed in one run. The same load — users
//! with their own sticky-session cookies, a GET/PUT mix against the optimizer through the
//! proxy, at half the proxy's saturating rate measured first on the same stack — goes through
//!
//! (a) a naive redeploy: the old container (1.0.0) stopped (SIGTERM, the spec's grace) and
//!     removed, then the new one (1.1.0) created and started on the *same address* the proxy
//!     routes to (same IP on the stack's network, same port); the proxy's routing is left as
//!     it is, as a load balancer with a static upstream would be;
//! (b) `haddock release <service> 1.1.0` with canary steps.
//!
//! For each: requests, failed requests, the longest gap (the longest time in which no request
//! succeeded), latency percentiles. `--long` runs (b) until at least `--requests` (1 000 000)
//! requests were sent, with the release in the middle. The last line is one JSON object.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use bollard::models::{EndpointIpamConfig, EndpointSettings, NetworkingConfig};
use bollard::query_parameters::{CreateContainerOptions, StartContainerOptions};
use clap::Parser;
use e2e::load::{run_rate, RateConfig, RateControl, RateReport, SLOW, VERSION_EVERY};
use e2e::stack::{Stack, StackOptions};
use haddock::docker::Host;
use haddock::plan::ContainerPlan;
use haddock::spec::Spec;
use locator::api::InstanceState;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "The same load through a naive stop-start redeploy and `haddock release`")]
struct Args {
    /// Run (b) until --requests requests were sent, the release in the middle of the load.
    #[arg(long)]
    long: bool,
    /// Requests (b) sends in --long mode.
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// Target rate in requests/s instead of half the measured saturating rate.
    #[arg(long)]
    rate: Option<f64>,
    /// Users of the fixed-rate load (each sends one request at a time, so this bounds the
    /// requests in flight when the stack stalls).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Users of the closed-loop load that measures the saturating rate.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long the saturating rate is measured (after 1 s of warm-up).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    saturate: Duration,
    /// Load before the redeploy starts (short mode).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Load after the redeploy is over (short mode; (a): after 1.1.0 first answered).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    tail: Duration,
    /// Bake time of each canary step of (b).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    step_pause: Duration,
    /// Session idle TTL (the drain of (b) waits for it).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    session_ttl: Duration,
    /// A user leaves after this many requests; a new session takes its place.
    #[arg(long, default_value_t = 10)]
    requests_per_session: u32,
    /// Bytes of each stored object.
    #[arg(long, default_value_t = 8192)]
    object_size: usize,
    /// Share of the requests (other than the `/version` probes) that store an object.
    #[arg(long, default_value_t = 0.2)]
    put_share: f64,
    #[arg(long, default_value = "1.0.0")]
    from: String,
    #[arg(long, default_value = "1.1.0")]
    to: String,
}

impl Args {
    fn stack(&self) -> StackOptions {
        StackOptions {
            step_pause: self.step_pause,
            session_ttl: self.session_ttl,
            ..StackOptions::default()
        }
    }

    fn load(&self, stack: &Stack, rate: Option<f64>, users: usize, prefix: &str) -> RateConfig {
        RateConfig {
            targets: vec![stack.proxy_url.clone()],
            cookie: stack.cookie.clone(),
            users,
            rate,
            requests_per_session: self.requests_per_session,
            object_size: self.object_size,
            put_share: self.put_share,
            key_prefix: format!("{prefix}-{}", rand::random::<u32>()),
            write_token: stack.write_token.clone(),
        }
    }
}

/// One redeploy under load: what the load measured and when things happened.
struct Phase {
    report: RateReport,
    /// The redeploy's start on the load's clock; every other time is printed relative to it.
    start: Duration,
    /// (JSON key, what happened, when on the load's clock).
    events: Vec<(String, String, Duration)>,
    /// CPU seconds this process (the load generator) used during the phase.
    cpu: f64,
    /// The proxy's logged upstream errors by kind (`ConnectRefused`, `ConnectTimedout`, …).
    proxy_errors: std::collections::BTreeMap<String, u64>,
}

impl Phase {
    fn rel(&self, t: Duration) -> f64 {
        t.as_secs_f64() - self.start.as_secs_f64()
    }

    fn print(&self, label: &str) {
        let r = &self.report;
        println!("{label}:");
        for (_, what, t) in &self.events {
            println!("    {:>+8.3} s  {what}", self.rel(*t));
        }
        println!(
            "    requests {}  in {:.1} s = {:.0} req/s  failed {}  longest gap {:.3} s (ended at {:+.3} s)",
            r.requests,
            r.elapsed.as_secs_f64(),
            r.achieved_rps(),
            r.failed,
            r.longest_gap.as_secs_f64(),
            self.rel(r.longest_gap_end)
        );
        if let Some((a, b)) = r.failure_window {
            println!(
                "    failed requests completed between {:+.3} s and {:+.3} s",
                self.rel(a),
                self.rel(b)
            );
            // Failures per 100 ms, where there were any.
            let mut buckets: std::collections::BTreeMap<i64, u64> = Default::default();
            for t in &r.failure_times {
                *buckets
                    .entry((self.rel(*t) * 10.0).floor() as i64)
                    .or_default() += 1;
            }
            let shown: Vec<String> = buckets
                .iter()
                .take(40)
                .map(|(b, n)| format!("{:+.1}: {n}", *b as f64 / 10.0))
                .collect();
            println!("    failed per 0.1 s (from s): {}", shown.join(", "));
        }
        if !self.proxy_errors.is_empty() {
            println!("    the proxy's reasons (its log): {:?}", self.proxy_errors);
        }
        if let Some((a, b)) = r.slow_window {
            println!(
                "    {} requests took ≥ {} s; they completed between {:+.3} s and {:+.3} s ({:?})",
                r.slow,
                SLOW.as_secs_f64(),
                self.rel(a),
                self.rel(b),
                r.slow_kinds
            );
        }
        println!(
            "    latency p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            r.percentile_ms(0.5),
            r.percentile_ms(0.99),
            r.percentile_ms(0.999),
            r.percentile_ms(1.0)
        );
        // p99.9 per second around the redeploy: where in it latency rose.
        let mut seconds: std::collections::BTreeMap<i64, Vec<u64>> = Default::default();
        for (t, l) in &r.timed_us {
            let at = self.rel(Duration::from_micros(*t)).floor() as i64;
            seconds.entry(at).or_default().push(*l);
        }
        let line: Vec<String> = seconds
            .iter_mut()
            .filter(|(s, _)| **s >= -2)
            .map(|(s, v)| {
                v.sort_unstable();
                let p = v[((v.len() - 1) as f64 * 0.999).round() as usize];
                format!("{s:+}: {:.0}", p as f64 / 1000.0)
            })
            .collect();
        println!("    p99.9 ms per second (from s): {}", line.join(", "));
        if let Some(w) = self.window() {
            println!(
                "    p99.9 of the {} requests completed while the redeploy ran ({:+.3} s to {:+.3} s): {:.2} ms \
                 (max {:.2} ms); of the {} before and after it (steady state, the load's first {} s left out: \
                 its p99.9 {:.2} ms): {:.2} ms; ratio {:.2}",
                w.inside_n,
                self.rel(w.from),
                self.rel(w.to),
                w.inside_p999,
                w.inside_max,
                w.outside_n,
                RAMP_UP.as_secs(),
                w.ramp_up_p999,
                w.outside_p999,
                w.ratio()
            );
            let met = r.slow == 0 && w.ratio() <= 2.0;
            println!(
                "    users do not feel it (no request ≥ {} s, window p99.9 ≤ 2× steady): {}",
                SLOW.as_secs_f64(),
                if met { "yes" } else { "no" }
            );
        }
        println!(
            "    sessions {}  served by two versions {}  /version answers {:?}",
            r.sessions, r.sessions_switched, r.versions
        );
        println!(
            "    load generator CPU {:.1} s = {:.0} % of one core ({:.0} µs per request)",
            self.cpu,
            100.0 * self.cpu / r.elapsed.as_secs_f64().max(1e-9),
            1e6 * self.cpu / r.requests.max(1) as f64
        );
        let f = &r.failures;
        let shown: Vec<_> = if f.len() <= 6 {
            f.iter().collect()
        } else {
            f[..3].iter().chain(&f[f.len() - 3..]).collect()
        };
        for (i, (t, f)) in shown.into_iter().enumerate() {
            if i == 3 && r.failures.len() > 6 {
                println!("    …");
            }
            println!("    failure at {:+.3} s: {f}", self.rel(*t));
        }
    }

    /// The latency of the redeploy's window (from its start to the last event: haddock
    /// returned, or the new version answered) against the steady state around it.
    fn window(&self) -> Option<Window> {
        let to = self.events.iter().map(|e| e.2).max()?.max(self.start);
        let r = &self.report;
        let inside = |t: Duration| (self.start..to).contains(&t);
        let (inside_p999, inside_n) = r.percentile_ms_where(0.999, inside);
        let (inside_max, _) = r.percentile_ms_where(1.0, inside);
        // The load's first second (a thousand users connecting and opening sessions at once)
        // is no steady state: it would flatter the ratio.
        let (outside_p999, outside_n) =
            r.percentile_ms_where(0.999, |t| t >= RAMP_UP && !inside(t));
        let (ramp_up_p999, _) = r.percentile_ms_where(0.999, |t| t < RAMP_UP);
        Some(Window {
            from: self.start,
            to,
            inside_p999,
            inside_max,
            inside_n,
            outside_p999,
            outside_n,
            ramp_up_p999,
        })
    }

    fn json(&self) -> serde_json::Value {
        let r = &self.report;
        let window = self.window().map(|w| {
            json!({
                "from_s": self.rel(w.from), "to_s": self.rel(w.to),
                "p999_ms": w.inside_p999, "max_ms": w.inside_max, "requests": w.inside_n,
                "steady_p999_ms": w.outside_p999, "steady_requests": w.outside_n,
                "ramp_up_p999_ms": w.ramp_up_p999,
                "ratio": (w.ratio() * 100.0).round() / 100.0,
            })
        });
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let events: serde_json::Map<String, serde_json::Value> = self
            .events
            .iter()
            .map(|(k, _, t)| (k.clone(), json!((self.rel(*t) * 1e3).round() / 1e3)))
            .collect();
        json!({
            "requests": r.requests,
            "failed": r.failed,
            "achieved_rps": r.achieved_rps().round(),
            "longest_gap_ms": ms(r.longest_gap),
            "p50_ms": r.percentile_ms(0.5),
            "p99_ms": r.percentile_ms(0.99),
            "p999_ms": r.percentile_ms(0.999),
            "max_ms": r.percentile_ms(1.0),
            "slow": r.slow,
            "sessions": r.sessions,
            "sessions_switched": r.sessions_switched,
            "loadgen_cpu_s": (self.cpu * 10.0).round() / 10.0,
            "proxy_errors": self.proxy_errors,
            "events_s": events,
            "window": window,
        })
    }
}

/// Latency while a redeploy ran against the steady state before and after it.
struct Window {
    from: Duration,
    to: Duration,
    inside_p999: f64,
    inside_max: f64,
    inside_n: usize,
    outside_p999: f64,
    outside_n: usize,
    /// p99.9 of the load's first second, left out of the steady state.
    ramp_up_p999: f64,
}

/// The start of the load left out of the steady state.
const RAMP_UP: Duration = Duration::from_secs(1);

impl Window {
    fn ratio(&self) -> f64 {
        self.inside_p999 / self.outside_p999.max(1e-9)
    }
}

/// CPU time (user + system) this process used so far, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with the last ')'): utime and stime are the
    // 12th and 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `haddock release <from>` on a fresh stack (the first release: no users yet).
async fn stack_on(name: &str, opts: StackOptions, from: &str) -> Result<Stack, String> {
    let stack = Stack::start(name, opts).await;
    let (code, _, out) = tokio::task::block_in_place(|| stack.release(from));
    if code != Some(0) {
        return Err(format!(
            "haddock release {from} → exit {code:?}\n{out}\n{}",
            stack.logs()
        ));
    }
    Ok(stack)
}

/// Polls `/version` through the proxy (a new session each time) until `version` answers.
async fn first_answer_of(stack: &Stack, version: &str, within: Duration) -> bool {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let url = format!("{}/version", stack.proxy_url);
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(&url).send().await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                if v["version"] == version {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The closed loop that finds the saturating rate (successful requests/s), after 1 s warm-up.
async fn saturating_rate(a: &Args, stack: &Stack) -> RateReport {
    let closed_loop = |time: Duration, prefix: &str| {
        let control = RateControl::new();
        let load = tokio::spawn(run_rate(
            a.load(stack, None, a.connections, prefix),
            control.clone(),
        ));
        async move {
            tokio::time::sleep(time).await;
            control.stop();
            load.await.expect("load task")
        }
    };
    closed_loop(Duration::from_secs(1), "warm").await;
    closed_loop(a.saturate, "sat").await
}

/// (a): stop + remove the old container, create + start the new version on the same address.
async fn naive(a: &Args, rate: f64) -> Result<Phase, String> {
    let mut stack = stack_on(
        "proof-naive",
        StackOptions {
            fixed_subnet: true,
            ..a.stack()
        },
        &a.from,
    )
    .await?;
    let spec = Spec::load(&stack.spec_path).map_err(|e| format!("spec: {e}"))?;
    let host = Host::connect(&spec.targets[0], 0)
        .await
        .map_err(|e| format!("docker: {e}"))?;
    let docker = bollard::Docker::connect_with_local_defaults()
        .map_err(|e| format!("docker: {e}"))?
        .negotiate_version()
        .await
        .map_err(|e| format!("docker: {e}"))?;
    let client = locator::client::Client::new(&stack.locator_url, Some(stack.deploy_token.clone()));
    let old = client
        .instances(&stack.service)
        .await
        .map_err(|e| format!("locator: {e}"))?
        .into_iter()
        .find(|i| i.state == InstanceState::Ready)
        .ok_or("no ready instance after the first release")?;
    let address: SocketAddr = old
        .address
        .parse()
        .map_err(|e| format!("address {}: {e}", old.address))?;
    let image_has_healthcheck = host
        .image(&spec.image_ref(&a.to))
        .await
        .map_err(|e| e.to_string())?
        .ok_or(format!("image {} is not built", spec.image_ref(&a.to)))?;
    // The proxy keeps routing to the registered address whatever runs behind it, as a static
    // upstream would: the host agent, which would judge the old instance unhealthy when its
    // container dies (for good: heartbeats do not revive a judged instance), is stopped, and we
    // heartbeat the instance ourselves (the agent follows container ids, and the new one differs).
    stack.stop_heartbeat_agent();
    let _heartbeat = {
        let (client, id) = (client.clone(), old.id.clone());
        AbortOnDrop(tokio::spawn(async move {
            loop {
                let _ = client.heartbeat(&id).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }))
    };

    let cpu = cpu_seconds();
    let control = RateControl::new();
    let load = tokio::spawn(run_rate(
        a.load(&stack, Some(rate), a.users, "naive"),
        control.clone(),
    ));
    tokio::time::sleep(a.warmup).await;

    let start = control.elapsed();
    let mut events = vec![(
        "stop".to_string(),
        format!(
            "stop {} (SIGTERM, up to {} grace), then remove it",
            a.from,
            humantime::format_duration(spec.container.stop_grace)
        ),
        start,
    )];
    host.stop_and_remove(&old.container_id, spec.container.stop_grace)
        .await
        .map_err(|e| e.to_string())?;
    events.push((
        "removed".into(),
        "old container removed".into(),
        control.elapsed(),
    ));
    let created =
        create_and_start_at(&docker, &spec, &a.to, address.ip(), image_has_healthcheck).await;
    events.push((
        "started".into(),
        format!("{} created and started at the same address {address}", a.to),
        control.elapsed(),
    ));
    let answered = match created {
        Ok(()) => first_answer_of(&stack, &a.to, Duration::from_secs(60)).await,
        Err(e) => {
            println!("naive redeploy: {e}");
            false
        }
    };
    if !answered {
        control.stop();
        return Err(format!(
            "{} never answered at {address}\n{}",
            a.to,
            stack.logs()
        ));
    }
    events.push((
        "first_answer".into(),
        format!("first answer of {} through the proxy (a new session)", a.to),
        control.elapsed(),
    ));
    tokio::time::sleep(a.tail).await;
    control.stop();
    let report = load.await.expect("load task");
    let cpu = cpu_seconds() - cpu;
    let proxy_errors = proxy_errors(&stack);
    drop(stack);
    Ok(Phase {
        report,
        start,
        events,
        cpu,
        proxy_errors,
    })
}

/// The new version's container, as haddock would create it from the spec, but with a fixed
/// address on the spec's network.
async fn create_and_start_at(
    docker: &bollard::Docker,
    spec: &Spec,
    tag: &str,
    ip: IpAddr,
    image_has_healthcheck: bool,
) -> Result<(), String> {
    let plan = ContainerPlan::new(spec, tag, "naive", 0, 0);
    let mut body = plan.create_body(image_has_healthcheck);
    body.labels
        .get_or_insert_with(HashMap::new)
        .insert(e2e::TEST_LABEL.to_string(), "proof".to_string());
    let network = plan
        .network
        .clone()
        .ok_or("the stack's spec names no network")?;
    body.networking_config = Some(NetworkingConfig {
        endpoints_config: Some(HashMap::from([(
            network,
            EndpointSettings {
                ipam_config: Some(EndpointIpamConfig {
                    ipv4_address: Some(ip.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )])),
    });
    let opts = CreateContainerOptions {
        name: Some(plan.name.clone()),
        ..Default::default()
    };
    docker
        .create_container(Some(opts), body)
        .await
        .map_err(|e| format!("create {}: {e}", plan.name))?;
    docker
        .start_container(&plan.name, None::<StartContainerOptions>)
        .await
        .map_err(|e| format!("start {}: {e}", plan.name))
}

/// Aborts a background task when dropped (also on an early return).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Kills a child process (by pid, with `kill`) unless it finished: a `haddock release` left
/// running by ctrl-c.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// (b): `haddock release <to>` under the same load.
async fn with_haddock(
    a: &Args,
    stack: &Stack,
    rate: f64,
) -> Result<(Phase, (Option<i32>, serde_json::Value, String)), String> {
    let cpu = cpu_seconds();
    let control = RateControl::new();
    let load = tokio::spawn(run_rate(
        a.load(stack, Some(rate), a.users, "haddock"),
        control.clone(),
    ));
    let progress = |control: &RateControl| {
        println!(
            "    {:>6.0} s: {} requests sent, {} failed",
            control.elapsed().as_secs_f64(),
            control.sent(),
            control.failed()
        );
    };
    if a.long {
        let mut next = Duration::from_secs(30);
        while control.sent() < a.requests / 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if control.elapsed() >= next {
                progress(&control);
                next += Duration::from_secs(30);
            }
        }
    } else {
        tokio::time::sleep(a.warmup).await;
    }

    let start = control.elapsed();
    let wall_start = SystemTime::now();
    let mut events = vec![(
        "release".to_string(),
        format!("haddock release {} starts", a.to),
        start,
    )];
    let child = stack
        .release_command(&a.to)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("haddock: {e}"))?;
    let mut guard = KillOnDrop(Some(child.id()));
    let release = tokio::task::spawn_blocking(move || child.wait_with_output());
    let mut last = None;
    while !release.is_finished() {
        if let Some(w) = stack.weights().await {
            if last.as_ref() != Some(&w) {
                let share = w.get(&a.to).copied().unwrap_or(0);
                if share > 0 {
                    events.push((
                        format!("weight_{share}"),
                        format!("weights: {share} % of new sessions on {}", a.to),
                        control.elapsed(),
                    ));
                }
                last = Some(w);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = release
        .await
        .expect("release thread")
        .map_err(|e| format!("haddock: {e}"))?;
    guard.0 = None;
    let result = e2e::stack::release_result(&out);
    events.push((
        "returned".into(),
        format!(
            "haddock release returned: exit {}, {} drained and removed",
            result.0.map_or("none".into(), |c| c.to_string()),
            a.from
        ),
        control.elapsed(),
    ));

    if a.long {
        let mut next = control.elapsed() + Duration::from_secs(30);
        while control.sent() < a.requests {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if control.elapsed() >= next {
                progress(&control);
                next += Duration::from_secs(30);
            }
        }
    } else {
        tokio::time::sleep(a.tail).await;
    }
    control.stop();
    let report = load.await.expect("load task");
    // When the new version took the cache volume's writer role over (the old writer's exit).
    for id in stack.containers(Some(&a.to)) {
        if let Some((at, line)) = logged_at(&id, "became the writer") {
            if let Ok(after) = at.duration_since(wall_start) {
                // Its own timings: the RocksDB open, and since the old writer closed.
                let timings: Vec<&str> = line
                    .split_whitespace()
                    .filter(|w| w.contains("_ms="))
                    .collect();
                events.push((
                    "writer".into(),
                    format!(
                        "{} became the cache volume's writer (its log: {})",
                        a.to,
                        timings.join(" ")
                    ),
                    start + after,
                ));
            }
        }
    }
    // What Docker did to the service's containers meanwhile (created, started, stopped,
    // removed), and the hand-over haddock reported: what a latency bump lines up with.
    for (t, what) in docker_events(&stack.service, wall_start) {
        events.push(("docker".into(), what, start + t));
    }
    // haddock's progress line starts with the time since it started: "[  11.41s] hand-over in …".
    for line in result.2.lines().filter(|l| l.contains("hand-over in")) {
        let at = line
            .trim()
            .strip_prefix('[')
            .and_then(|l| l.split_once("s]"))
            .and_then(|(t, _)| t.trim().parse::<f64>().ok());
        if let Some(at) = at {
            let what = line.split_once("s]").map_or(line, |(_, w)| w).trim();
            events.push((
                "handover".into(),
                format!("haddock: {what}"),
                start + Duration::from_secs_f64(at),
            ));
        }
    }
    events.sort_by_key(|e| e.2);
    Ok((
        Phase {
            report,
            start,
            events,
            cpu: cpu_seconds() - cpu,
            proxy_errors: proxy_errors(stack),
        },
        result,
    ))
}

/// The proxy's `Fail to proxy: <kind> …` log lines, counted by kind.
fn proxy_errors(stack: &Stack) -> std::collections::BTreeMap<String, u64> {
    let log = std::fs::read_to_string(stack.dir.path().join("proxy.log")).unwrap_or_default();
    let mut kinds = std::collections::BTreeMap::new();
    for l in log.lines() {
        if let Some(rest) = l.split_once("Fail to proxy: ").map(|(_, r)| r) {
            let kind = rest
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            *kinds.entry(kind).or_default() += 1;
        }
    }
    kinds
}

/// When a container first logged a line containing `needle` (Docker's timestamp), and the line.
fn logged_at(id: &str, needle: &str) -> Option<(SystemTime, String)> {
    let out = std::process::Command::new("docker")
        .args(["logs", "--timestamps", id])
        .output()
        .ok()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let at = humantime::parse_rfc3339(l.split_whitespace().next()?).ok()?;
            Some((at, l.to_owned()))
        })
        .min_by_key(|(at, _)| *at)
}

/// Docker's events about the service's containers since `since` (create, start, kill, die,
/// destroy), as (time since `since`, description).
fn docker_events(service: &str, since: SystemTime) -> Vec<(Duration, String)> {
    let from = since
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let out = std::process::Command::new("docker")
        .args([
            "events",
            "--since",
            &format!("{from:.3}"),
            "--until",
            &format!(
                "{:.3}",
                SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64())
            ),
            "--filter",
            &format!("label=org.haddock.service={service}"),
            "--filter",
            "type=container",
            "--format",
            "{{.TimeNano}} {{.Action}} {{.Actor.Attributes.name}}",
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.splitn(3, ' ');
            let nanos: u128 = w.next()?.parse().ok()?;
            let (action, name) = (w.next()?, w.next().unwrap_or(""));
            if !["create", "start", "kill", "die", "destroy"].contains(&action) {
                return None;
            }
            let at = std::time::UNIX_EPOCH + Duration::from_nanos(nanos as u64);
            Some((
                at.duration_since(since).ok()?,
                format!("docker: {action} {name}"),
            ))
        })
        .collect()
}

/// What the proxy and the optimizer containers logged, for a failed request in (b).
fn diagnose(stack: &Stack) {
    let proxy = std::fs::read_to_string(stack.dir.path().join("proxy.log")).unwrap_or_default();
    let errors: Vec<&str> = proxy.lines().filter(|l| l.contains("rror")).collect();
    println!(
        "--- proxy.log, lines naming an error (last 20 of {})",
        errors.len()
    );
    for l in &errors[errors.len().saturating_sub(20)..] {
        println!("{l}");
    }
    for id in stack.containers(None) {
        let out = std::process::Command::new("docker")
            .args(["logs", "--timestamps", "--tail", "40", &id])
            .output();
        if let Ok(out) = out {
            println!("--- docker logs {id}");
            print!("{}", String::from_utf8_lossy(&out.stdout));
            print!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

async fn run(a: Args) -> Result<bool, String> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_start = loadavg();
    println!(
        "haddock-proof ({} mode): {cores} cores, load average {load_start} at start",
        if a.long { "long" } else { "short" }
    );
    println!(
        "load: users with their own session cookie; per session GET /version first and every \
         {VERSION_EVERY} requests, else PUT of a {} B object ({} %) or GET of one of the user's \
         objects, checked byte for byte; {} requests per session",
        a.object_size,
        (a.put_share * 100.0).round(),
        a.requests_per_session
    );

    let stack = stack_on("proof", a.stack(), &a.from).await?;
    let cpu = cpu_seconds();
    let sat = saturating_rate(&a, &stack).await;
    let sat_cpu = (cpu_seconds() - cpu) / (sat.elapsed.as_secs_f64() + 1.0);
    let sat_rps = sat.ok_rps();
    let rate = a.rate.unwrap_or(sat_rps / 2.0);
    println!(
        "saturating rate of the proxy (closed loop, {} users, {:.1} s, optimizer {}): {:.0} req/s \
         (p50 {:.2} ms, p99 {:.2} ms, {} failed; the load generator used {:.0} % of one core)",
        a.connections,
        sat.elapsed.as_secs_f64(),
        a.from,
        sat_rps,
        sat.percentile_ms(0.5),
        sat.percentile_ms(0.99),
        sat.failed,
        sat_cpu * 100.0
    );
    println!(
        "target rate: {rate:.0} req/s ({}), open loop, {} users",
        if a.rate.is_some() {
            "--rate"
        } else {
            "half the saturating rate"
        },
        a.users
    );

    let a_phase = naive(&a, rate).await?;
    a_phase.print(&format!(
        "(a) naive redeploy {} → {} on the same address",
        a.from, a.to
    ));

    println!(
        "(b) haddock release {} (steps {:?}, {} bake, session TTL {}){}",
        a.to,
        a.stack().steps,
        humantime::format_duration(a.step_pause),
        humantime::format_duration(a.session_ttl),
        if a.long {
            format!(", until {} requests were sent", a.requests)
        } else {
            String::new()
        }
    );
    let (b_phase, release) = with_haddock(&a, &stack, rate).await?;
    b_phase.print(&format!("(b) haddock release {} → {}", a.from, a.to));
    if release.0 != Some(0) {
        println!("--- haddock output\n{}\n{}", release.2, stack.logs());
    }
    if b_phase.report.failed > 0 {
        diagnose(&stack);
    }
    drop(stack);

    let load_end = loadavg();
    let (ra, rb) = (&a_phase.report, &b_phase.report);
    println!();
    println!(
        "| {:<22} | {:>9} | {:>7} | {:>11} | {:>8} | {:>8} | {:>8} |",
        "", "requests", "failed", "longest gap", "req/s", "p50 ms", "p99 ms"
    );
    for (name, r) in [("(a) naive redeploy", ra), ("(b) haddock release", rb)] {
        println!(
            "| {name:<22} | {:>9} | {:>7} | {:>9.3} s | {:>8.0} | {:>8.2} | {:>8.2} |",
            r.requests,
            r.failed,
            r.longest_gap.as_secs_f64(),
            r.achieved_rps(),
            r.percentile_ms(0.5),
            r.percentile_ms(0.99)
        );
    }
    println!("load average {load_start} at start, {load_end} at the end");
    let ok = rb.failed == 0
        && release.0 == Some(0)
        && (!a.long || rb.requests >= a.requests)
        && rb.achieved_rps() >= 0.95 * rate;
    let mode = if a.long { "long" } else { "short" };
    let mut haddock = b_phase.json();
    haddock["release_exit"] = json!(release.0);
    println!(
        "{}",
        json!({
            "mode": mode,
            "saturating_rps": sat_rps.round(),
            "target_rps": rate.round(),
            "naive": a_phase.json(),
            "haddock": haddock,
            "cores": cores,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "ok": ok,
        })
    );
    Ok(ok)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Args::parse();
    let code = tokio::select! {
        r = run(a) => match r {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("haddock-proof: {e}");
                2
            }
        },
        // Dropping `run` drops its stacks: processes killed, containers, network, volume removed.
        _ = tokio::signal::ctrl_c() => {
            eprintln!("haddock-proof: interrupted; stacks removed");
            130
        }
    };
    // Do not wait for a blocking thread still following a killed `haddock release`.
    std::process::exit(code)
}
