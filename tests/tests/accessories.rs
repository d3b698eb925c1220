//! End to end: a DNS cache accessory (Debian's dnsmasq in `haddock/dnsmasq:1`) beside the
//! optimizer, managed by `haddock accessory`, while users go through the proxy.
//!
//! Needs the images `haddock/optimizer:{1.0.0,1.1.0}` and `haddock/dnsmasq:1` (`ci/test.sh`
//! builds them).

use std::process::Command;
use std::time::Duration;

use e2e::eventually;
use e2e::stack::{Stack, StackOptions};

/// `haddock accessory VERB SERVICE ARGS… --spec SPEC`: exit code, stdout, stderr.
fn accessory(stack: &Stack, verb: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["accessory", verb, &stack.service];
    all.extend_from_slice(args);
    stack.haddock_with_spec(&all)
}

/// `docker inspect -f FORMAT NAME`, trimmed.
fn inspect(name: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "-f", format, name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The accessory's log (dnsmasq logs every query with `--log-queries`).
fn log_of(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", container])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// dnsmasq's own count of queries it answered from its cache and local records, written to
/// its log on SIGUSR1 (`queries forwarded N, queries answered locally M`).
async fn answered_locally(container: &str) -> u64 {
    let before = log_of(container)
        .matches("queries answered locally")
        .count();
    let kill = Command::new("docker")
        .args(["kill", "-s", "USR1", container])
        .output()
        .unwrap();
    assert!(
        kill.status.success(),
        "{}",
        String::from_utf8_lossy(&kill.stderr)
    );
    let log = eventually("dnsmasq's statistics", Duration::from_secs(10), || async {
        let log = log_of(container);
        (log.matches("queries answered locally").count() > before).then_some(log)
    })
    .await;
    log.lines()
        .rev()
        .find_map(|l| l.split("queries answered locally ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .expect("a statistics line")
}

/// Waits until dnsmasq (in `accessory`) logs a lookup of the locator's name sent from the
/// address of `instance` (a container id): the instance's lookups go through it.
async fn lookup_logged(accessory: &str, instance: &str) {
    let ip = inspect(
        instance,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    let asked = format!("query[A] locator.haddock.internal from {ip}");
    eventually(&asked, Duration::from_secs(20), || async {
        log_of(accessory).contains(&asked).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dns_cache_accessory_serves_the_instances_outlives_a_release_and_reboots_under_load() {
    let opts = StackOptions {
        dns_accessory: true,
        step_pause: Duration::from_secs(4),
        session_ttl: Duration::from_secs(3),
        ..StackOptions::default()
    };
    let stack = Stack::start("dns", opts).await;
    let dns_ip = stack.dns_ip.clone().unwrap();
    let container = format!("{}-dns-h0", stack.service);

    // The instances need their DNS server: a release before it runs is refused, nothing starts.
    let (code, _, out) = tokio::task::block_in_place(|| stack.release("1.0.0"));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("haddock accessory boot"), "{out}");
    assert!(stack.containers(None).is_empty());

    // Bad input changes nothing.
    let (code, _, err) = accessory(&stack, "boot", &["cache"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("declares: dns"), "{err}");
    let (code, _, err) = accessory(&stack, "reboot", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        inspect(&container, "{{.Id}}").is_empty(),
        "nothing was made"
    );

    let (code, out, err) = accessory(&stack, "boot", &["dns", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["action"], "created", "{rows}");
    assert_eq!(rows[0]["state"], "running", "{rows}");
    assert_eq!(rows[0]["ip"], dns_ip.as_str(), "{rows}");
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");
    assert_eq!(
        inspect(&container, "{{.Config.User}}|{{.Config.Image}}"),
        "|haddock/dnsmasq:1"
    );
    let (code, out, _) = accessory(&stack, "boot", &["--json"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("\"action\":\"running\""),
        "boot again is a no-op: {out}"
    );

    let (code, _, out) = tokio::task::block_in_place(|| stack.release("1.0.0"));
    assert_eq!(code, Some(0), "1.0.0: {out}\n{}", stack.logs());
    let v1 = stack.containers(Some("1.0.0"));
    assert_eq!(
        inspect(&v1[0], "{{json .HostConfig.Dns}}"),
        format!("[\"{dns_ip}\"]")
    );
    // Its peer discovery looks the locator up by a name only the accessory knows.
    lookup_logged(&container, &v1[0]).await;
    let hits_before = answered_locally(&container).await;
    assert!(hits_before >= 1, "dnsmasq answered {hits_before}");

    let started = inspect(&container, "{{.Id}} {{.State.StartedAt}}");
    let (control, load) = stack.light_load();

    // A release of the service leaves the accessory alone, and the new instances resolve
    // through it too.
    let (code, _, out) = tokio::task::block_in_place(|| stack.release("1.1.0"));
    assert_eq!(code, Some(0), "1.1.0: {out}\n{}", stack.logs());
    assert_eq!(
        inspect(&container, "{{.Id}} {{.State.StartedAt}}"),
        started,
        "the release touched the accessory"
    );
    lookup_logged(&container, &stack.containers(Some("1.1.0"))[0]).await;
    let hits_after = answered_locally(&container).await;
    assert!(
        hits_after > hits_before,
        "dnsmasq's local answers did not rise: {hits_before} → {hits_after}"
    );

    // Removing it while the instances use it is refused.
    let (code, _, err) = accessory(&stack, "remove", &["dns"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");

    // Reboot: a new container at the same address, users served throughout.
    let (code, out, err) = accessory(&stack, "reboot", &["dns", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["action"], "replaced", "{rows}");
    assert_eq!(rows[0]["ip"], dns_ip.as_str(), "{rows}");
    assert_ne!(
        inspect(&container, "{{.Id}}"),
        started.split(' ').next().unwrap()
    );
    let (code, out, _) = accessory(&stack, "status", &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("running") && out.contains(&dns_ip), "{out}");

    tokio::time::sleep(Duration::from_secs(1)).await;
    control.stop();
    let users = load.await.unwrap();
    assert!(users.requests > 200, "too little load: {}", users.requests);
    assert_eq!(
        users.failed,
        0,
        "failed: {:?}\n{}",
        users.failures,
        stack.logs()
    );
    assert_eq!(users.sessions_switched(), 0);
    eprintln!(
        "dnsmasq answered locally: {hits_before} after 1.0.0, {hits_after} after 1.1.0; \
         users: {} requests, {} failed, across a release and a reboot of the accessory",
        users.requests, users.failed
    );
}
