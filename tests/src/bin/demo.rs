//! `haddock-demo`: the README's main job. Starts a locator and a proxy, releases optimizer
//! v1, puts many users on it, releases v2 with canary steps under that load, waits for the old
//! version to drain on session expiry, prints a report and, last, one JSON line.
//!
//! `--test-hosts 2 --proxies 2` runs the same across the machine's engine and two test hosts
//! (`ci/testhosts.sh`, needs root), `--cut-host 2` takes host 2 off the network at the first
//! canary step: the multi-host proof of docs/operations.md.

use clap::Parser;
use e2e::scenario::{canary_under_load, ScenarioOptions};
use e2e::stack::StackOptions;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(about = "A zero-downtime canary release of the optimizer under load")]
struct Args {
    /// Concurrent users.
    #[arg(long, default_value_t = 24)]
    users: usize,
    /// Bake time of each canary step.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    step_pause: Duration,
    /// Session idle TTL: the old version is removed once its sessions expired.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    session_ttl: Duration,
    /// Load on v1 before the release starts.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// New sessions started at each canary step to measure the split.
    #[arg(long, default_value_t = 4000)]
    probes: usize,
    #[arg(long, default_value = "1.0.0")]
    from: String,
    #[arg(long, default_value = "1.1.0")]
    to: String,
    /// Also run on this many test hosts (extra dockerds in network namespaces, 0..=8).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=8))]
    test_hosts: u32,
    /// Proxies sharing the cookie key; each user's requests go to each in turn.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    proxies: u64,
    /// Take this test host off the network at the first canary step.
    #[arg(long)]
    cut_host: Option<u32>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> std::process::ExitCode {
    let a = Args::parse();
    if let Some(h) = a.cut_host.filter(|h| !(2..=a.test_hosts).contains(h)) {
        // Host 1's link also carries the machine's own address (10.213.1.1), where the other
        // hosts reach the machine's instances and the locator: cutting it cuts the machine.
        eprintln!(
            "error: --cut-host {h}: give a test host from 2 to --test-hosts ({}); host 1's link carries the machine's address",
            a.test_hosts
        );
        return std::process::ExitCode::from(2);
    }
    let opts = ScenarioOptions {
        stack: StackOptions {
            step_pause: a.step_pause,
            session_ttl: a.session_ttl,
            test_hosts: a.test_hosts,
            proxies: a.proxies as usize,
            ..StackOptions::default()
        },
        cut_host: a.cut_host,
        from: a.from.clone(),
        to: a.to.clone(),
        users: a.users,
        warmup: a.warmup,
        probes_per_step: a.probes,
    };
    println!(
        "demo: {} users, canary steps {:?} with {} bake, session TTL {}, {} host(s), {} prox{}",
        a.users,
        opts.stack.steps,
        humantime::format_duration(a.step_pause),
        humantime::format_duration(a.session_ttl),
        1 + a.test_hosts,
        a.proxies,
        if a.proxies == 1 { "y" } else { "ies" }
    );
    let o = canary_under_load("demo", opts).await;
    println!("release {} → exit {:?}", a.from, o.first_release.0);
    println!("release {} → exit {:?}", a.to, o.release.0);
    // The image's way to every host: haddock's own lines (copy per host, with its time).
    for line in o
        .release
        .2
        .lines()
        .filter(|l| l.contains("copied") || l.contains("pulled"))
    {
        println!("  {}", line.trim());
    }
    if let Some(cut) = &o.cut {
        let (lost, elsewhere, unknown) = o.failures_by_host(cut.host);
        println!(
            "test host {} cut off {:.1} s into the release; failed requests: {lost} on its own instances or objects, {elsewhere} elsewhere, {unknown} before their session knew its instance",
            cut.host,
            cut.at.as_secs_f64()
        );
        let (_, elsewhere, unknown) = o.failures_split(cut.host);
        for f in elsewhere.iter().chain(&unknown).take(10) {
            println!("  not the lost host's own: {f:?}");
        }
        println!(
            "--- haddock output of the release that lost the host\n{}",
            o.release.2
        );
        if let Some((code, _, out)) = &cut.rerun {
            println!("the same release run again once the host was back → exit {code:?}");
            println!("--- its output\n{out}");
        }
        println!(
            "{} container(s) of {} left on any host",
            cut.new_containers_left, a.to
        );
    } else if o.release.0 != Some(0) || o.first_release.0 != Some(0) {
        println!("--- haddock output\n{}\n{}", o.first_release.1, o.release.2);
        println!("{}", o.logs);
    }
    println!("weights over time (since `haddock release {}`):", a.to);
    for (t, w) in &o.weight_timeline {
        println!("  {:>7.1}s  {:?}", t.as_secs_f64(), w);
    }
    println!(
        "requests {}  failed {}  p50 {:.2} ms  p99 {:.2} ms",
        o.load.requests,
        o.load.failed,
        o.load.percentile_ms(0.5),
        o.load.percentile_ms(0.99)
    );
    for f in &o.load.failures {
        println!("  failure: {f}");
    }
    println!(
        "new sessions on {} per canary step (a burst of new sessions at each step):",
        a.to
    );
    for (w, (share, n)) in o.split() {
        println!(
            "  step {w:>3} %: measured {:>5.1} % of {n} new sessions",
            share * 100.0
        );
    }
    println!("the demo's users' own sessions, by the step they started in:");
    for (w, (share, n)) in o.load.canary_split(&a.to) {
        println!(
            "  step {w:>3} %: {:>5.1} % of {n} sessions on {}",
            share * 100.0,
            a.to
        );
    }
    println!(
        "sessions {}  switched version {}  objects stored via {} read back via {}: {}/{}",
        o.load.sessions.len(),
        o.load.sessions_switched(),
        a.from,
        a.to,
        o.objects_readable,
        o.objects_checked
    );
    let ((installs, saves), (before_installs, before_saves)) = o.routing.rates();
    println!(
        "proxy routing work over {:.0} s: {:.2} table builds/s, {:.2} routing.json fsyncs/s \
         ({} events that changed only session sums skipped; counted as routing changes they \
         would be {:.2} builds/s and {:.2} fsyncs/s)",
        o.routing.seconds, installs, saves, o.routing.load_only, before_installs, before_saves
    );
    let summary = o.summary();
    println!("{summary}");
    let ok = match &o.cut {
        // Losing a host: back on the old version everywhere, nothing of the new one left, and
        // no failure outside the lost host's own.
        Some(cut) => {
            cut.new_containers_left == 0
                && o.failures_by_host(cut.host).1 == 0
                && o.objects_readable == o.objects_checked
        }
        None => {
            o.release.0 == Some(0)
                && o.load.failed == 0
                && o.load.sessions_switched() == 0
                && o.objects_readable == o.objects_checked
                && o.old_containers_left == 0
        }
    };
    std::process::ExitCode::from(if ok { 0 } else { 1 })
}
