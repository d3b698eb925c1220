//! The docker and health modules against the real Docker Engine, with locally built test images
//! (no registry). Every container, volume and network is removed by a drop guard.

mod support;

use futures_util::StreamExt;
use haddock::docker::Host;
use haddock::health::{self, NotHealthy, Probe};
use haddock::plan::ContainerPlan;
use haddock::spec::Spec;
use std::time::{Duration, Instant};
use support::*;

fn spec_for(dir: &std::path::Path, service: &str, opts: &SpecOpts) -> Spec {
    Spec::load(&write_spec(dir, service, opts)).unwrap()
}

/// `haddock release SERVICE no-such-tag --spec SPEC` against a locator address where none
/// runs (the tag check comes first, so it is never asked), with `extra` flags.
fn release_unknown_tag(
    service: &str,
    spec: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "release",
        service,
        "no-such-tag",
        "--spec",
        spec.to_str().unwrap(),
        "--locator",
        "http://127.0.0.1:9",
    ];
    args.extend_from_slice(extra);
    haddock(&args, None)
}

#[test]
fn an_unknown_tag_is_bad_input_and_changes_nothing() {
    test_images();
    let service = unique_service("unknown");
    let guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &service, &SpecOpts::default());
    // No locator is running at this address: the tag check comes before anything else.
    let out = release_unknown_tag(&service, &spec, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("image {IMAGE_REPO}:no-such-tag not found")),
        "{stderr}"
    );
    assert!(guard.containers().is_empty());

    let json = release_unknown_tag(&service, &spec, &["--json"]);
    assert_eq!(json.status.code(), Some(2));
    let v: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("one JSON object on stdout");
    assert_eq!(v["error"], "unknown_image");
    assert_eq!(v["exit_code"], 2);
}

#[tokio::test]
async fn a_good_container_starts_with_its_labels_and_turns_healthy_fast() {
    test_images();
    let service = unique_service("good");
    let mut guard = DockerGuard::new(&service);
    let net = format!("{service}-net");
    guard.networks.push(net.clone());
    guard.volume(&format!("{service}-cache"));
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(
        dir.path(),
        &service,
        &SpecOpts {
            network: Some(net.clone()),
            volume: Some(format!("{service}-cache")),
            ..Default::default()
        },
    );
    let host = Host::connect(&spec.targets[0], 0).await.unwrap();
    assert_eq!(
        host.image(&spec.image_ref("good-1")).await.unwrap(),
        Some(false)
    );
    assert_eq!(host.image(&spec.image_ref("nope")).await.unwrap(), None);
    host.ensure_network(&net).await.unwrap();
    host.ensure_network(&net).await.unwrap();

    let plan = ContainerPlan::new(&spec, "good-1", "rel-t1", 0, 0);
    let t = Instant::now();
    let id = host.create_and_start(&plan, false).await.unwrap();
    let started = t.elapsed();
    // Idempotent: a resumed run finds the same container.
    assert_eq!(host.create_and_start(&plan, false).await.unwrap(), id);
    let addr = host.address(&id, Some(&net), 8080).await.unwrap();
    let probe = Probe::new(addr, &spec.health);
    health::wait_healthy(&host, &id, &probe, &spec.health, Instant::now())
        .await
        .unwrap()
        .unwrap();
    let healthy = t.elapsed();
    eprintln!("create+start {started:?}, healthy after {healthy:?}");

    let inspect = host.inspect(&id).await.unwrap().unwrap();
    let labels = inspect.config.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels["org.haddock.managed-by"], "haddock");
    assert_eq!(labels["org.haddock.service"], service);
    assert_eq!(labels["org.haddock.version"], "good-1");
    assert_eq!(labels["org.haddock.release"], "rel-t1");
    let hc = inspect.host_config.unwrap();
    assert_eq!(hc.memory, Some(64 * 1024 * 1024));
    assert_eq!(hc.cpu_shares, Some(256));
    let mounts = inspect.mounts.unwrap();
    assert_eq!(
        mounts[0].name.as_deref(),
        Some(format!("{service}-cache").as_str())
    );
    assert_eq!(
        inspect.config.unwrap().cmd.unwrap(),
        ["--listen", "0.0.0.0:8080", "--id", plan.name.as_str()]
    );
    let found = host.find(&service, Some("rel-t1")).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].version.as_str(), found[0].running),
        ("good-1", true)
    );
    let version = reqwest::get(format!("http://{addr}/version"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(version.trim(), "good-1");

    // Events: a killed container is reported as `die`.
    let mut events = Box::pin(host.events(&service, Some("rel-t1")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::process::Command::new("docker")
        .args(["kill", &id])
        .output()
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.action, "die");
    assert_eq!(ev.instance, plan.name);

    host.stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
    host.stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap(); // gone already is fine
    assert!(host.find(&service, None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_never_ready_container_fails_at_the_deadline_with_its_logs() {
    test_images();
    let service = unique_service("never");
    let _guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(
        dir.path(),
        &service,
        &SpecOpts {
            start_deadline: "2s",
            ..Default::default()
        },
    );
    let host = Host::connect(&spec.targets[0], 0).await.unwrap();
    let plan = ContainerPlan::new(&spec, "never-ready", "rel-t2", 0, 0);
    let id = host.create_and_start(&plan, false).await.unwrap();
    let addr = host.address(&id, None, 8080).await.unwrap();
    let t = Instant::now();
    let r = health::wait_healthy(&host, &id, &Probe::new(addr, &spec.health), &spec.health, t)
        .await
        .unwrap();
    let NotHealthy(reason) = r.unwrap_err();
    assert!(
        t.elapsed() >= Duration::from_secs(2) && t.elapsed() < Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    assert!(
        reason.contains("start deadline") && reason.contains("503"),
        "{reason}"
    );
    let logs = host.logs_tail(&id, 10).await;
    assert!(logs.contains("refusing to become ready"), "{logs}");
    host.remove(&id).await.unwrap();
    assert!(host.find(&service, None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_container_that_crashes_is_dead_not_waited_for() {
    test_images();
    let service = unique_service("crash");
    let _guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(dir.path(), &service, &SpecOpts::default());
    let host = Host::connect(&spec.targets[0], 0).await.unwrap();
    let mut plan = ContainerPlan::new(&spec, "crash", "rel-t3", 0, 0);
    plan.env.push("SVC_CRASH_AFTER_MS=0".into());
    let id = host.create_and_start(&plan, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = health::wait_healthy(
        &host,
        &id,
        &Probe::new("127.0.0.1:9".parse().unwrap(), &spec.health),
        &spec.health,
        Instant::now(),
    )
    .await
    .unwrap();
    let NotHealthy(reason) = r.unwrap_err();
    assert!(reason.contains("exit code 3"), "{reason}");
    host.remove(&id).await.unwrap();
}

/// A second real engine (ci/testhosts.sh: its own dockerd in its own network namespace, TLS with
/// client certificates): haddock's `Host` connects to it over `tcp://` + TLS, starts a container
/// there with a published port, the container answers from the machine at the host's address,
/// and the machine's own engine has no such container.
/// Starts `plan` on test host 1 (`remote`) with the container's port 8080 published on `port`,
/// then checks it from the machine at the test host's address: haddock's own probe finds it
/// healthy, and it answers `/version` with `tag`. Returns the container id.
async fn run_on_test_host(
    remote: &Host,
    hosts: &TestHosts,
    spec: &Spec,
    plan: &mut ContainerPlan,
    port: u16,
    tag: &str,
) -> String {
    plan.publish = vec![(port, 8080)];
    let id = remote.create_and_start(plan, false).await.unwrap();
    let addr = std::net::SocketAddr::new(hosts.ip(1).into(), port);
    let probe = Probe::new(addr, &spec.health);
    health::wait_healthy(remote, &id, &probe, &spec.health, Instant::now())
        .await
        .unwrap()
        .unwrap();
    let version = reqwest::get(format!("http://{addr}/version"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(version.trim(), tag);
    id
}

#[tokio::test]
async fn a_container_started_on_a_test_host_over_tls_answers_at_its_address_and_only_there() {
    test_images();
    let image = format!("{IMAGE_REPO}:good-1");
    // Declared first, dropped last: `down` removes the engine with whatever is left on it.
    let hosts = TestHosts::up(1);
    hosts.load(&[&image]);

    let service = unique_service("testhost");
    let guard = DockerGuard::new(&service); // the machine's engine
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_for(
        dir.path(),
        &service,
        &SpecOpts {
            more_targets: hosts.target(1, 1),
            ..Default::default()
        },
    );
    assert_eq!(spec.targets[1].host, "tcp://10.213.1.2:2376");
    let machine = Host::connect(&spec.targets[0], 0).await.unwrap();
    let remote = Host::connect(&spec.targets[1], 1).await.unwrap();
    assert_eq!(remote.image(&image).await.unwrap(), Some(false), "loaded");

    let mut plan = ContainerPlan::new(&spec, "good-1", "rel-th", 1, 0);
    let t = Instant::now();
    let id = run_on_test_host(&remote, &hosts, &spec, &mut plan, 18080, "good-1").await;
    eprintln!("create+start+healthy+answered in {:?}", t.elapsed());
    let inspect = remote.inspect(&id).await.unwrap().unwrap();
    let labels = inspect.config.unwrap().labels.unwrap();
    assert_eq!(labels["org.haddock.test"], "1");
    assert_eq!(labels["org.haddock.service"], service);

    // Two engines: the test host has the container, the machine's engine does not.
    let there = remote.find(&service, None).await.unwrap();
    assert_eq!(there.len(), 1, "{there:?}");
    assert!(there[0].running);
    assert!(machine.find(&service, None).await.unwrap().is_empty());
    assert!(machine.inspect(&plan.name).await.unwrap().is_none());
    assert!(guard.containers().is_empty(), "the docker CLI agrees");

    remote
        .stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(remote.find(&service, None).await.unwrap().is_empty());
}

/// An image built for one test (on the machine's engine), removed with every tag on drop.
struct TestImage(String);

impl TestImage {
    /// `haddock-test/svc:good-1` plus a layer of `filler` random bytes, tagged `IMAGE_REPO:tag`:
    /// big enough that a copy which buffered the archive would show in its in-flight peak.
    fn build(tag: &str, filler: usize) -> TestImage {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0u8; filler];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        std::fs::write(dir.path().join("filler"), bytes).unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            format!("FROM {IMAGE_REPO}:good-1\nCOPY filler /filler\nLABEL org.haddock.test=1\n"),
        )
        .unwrap();
        let image = format!("{IMAGE_REPO}:{tag}");
        let out = std::process::Command::new("docker")
            .args(["build", "-q", "-t", &image])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "docker build: {}", text(&out));
        TestImage(image)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// A spec with `image_source = "copy"` whose only target is test host 1 (the machine's engine is
/// then no target, only the copy source of last resort), or the machine and test host 1.
fn copy_spec(
    dir: &std::path::Path,
    service: &str,
    hosts: &TestHosts,
    machine_too: bool,
) -> std::path::PathBuf {
    let path = write_spec(
        dir,
        service,
        &SpecOpts {
            more_targets: hosts.target(1, 1),
            ..Default::default()
        },
    );
    let mut text = std::fs::read_to_string(&path).unwrap().replacen(
        &format!("image = \"{IMAGE_REPO}\"\n"),
        &format!("image = \"{IMAGE_REPO}\"\nimage_source = \"copy\"\n"),
        1,
    );
    if !machine_too {
        text = text.replacen(
            "[[targets]]\nhost = \"unix:///var/run/docker.sock\"\ninstances = 1\n",
            "",
            1,
        );
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// `image_source = "copy"` against a second real engine (ci/testhosts.sh), which starts empty:
/// a tag no engine has is exit 2 with nothing created anywhere; an image only the machine's
/// engine holds is streamed to the test host (same image id), a container of it runs there and
/// answers, and the copy held at most one chunk of the archive at a time.
#[tokio::test]
async fn copy_mode_streams_an_image_only_the_machine_has_to_a_test_host_where_it_runs() {
    use haddock::image::Supply;
    use haddock::output::Output;
    test_images();
    let tag = format!("copy-{}", std::process::id());
    // 48 MiB of incompressible filler: the copy's in-flight peak must stay far below it.
    let filler = 48 << 20;
    let built = TestImage::build(&tag, filler);
    let hosts = TestHosts::up(1); // after the image: dropped (down) before it is removed
    let service = unique_service("copy");
    let guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();

    // A tag that no engine has: exit 2 before the locator (none at :9) is asked, nothing made.
    let both = copy_spec(dir.path(), &service, &hosts, true);
    let out = release_unknown_tag(&service, &both, &["--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["error"], "unknown_image");
    let reason = v["reason"].as_str().unwrap_or_default().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        format!("{reason}{stderr}")
            .contains("not found on any Docker host haddock can copy it from"),
        "{}",
        text(&out)
    );
    let spec = Spec::load(&copy_spec(dir.path(), &service, &hosts, false)).unwrap();
    assert_eq!(spec.targets.len(), 1);
    let remote = Host::connect(&spec.targets[0], 0).await.unwrap();
    assert!(guard.containers().is_empty());
    assert!(remote.find(&service, None).await.unwrap().is_empty());
    assert_eq!(
        remote
            .image_info(&spec.image_ref("no-such-tag"))
            .await
            .unwrap(),
        None
    );

    // The image is on the machine's engine only.
    let image = spec.image_ref(&tag);
    assert_eq!(image, built.0);
    let machine = Host::machine().await.unwrap();
    let source = machine
        .image_info(&image)
        .await
        .unwrap()
        .expect("built on the machine");
    assert_eq!(
        remote.image_info(&image).await.unwrap(),
        None,
        "the test host starts empty"
    );

    let supply = Supply::survey(&spec, std::slice::from_ref(&remote), &tag)
        .await
        .unwrap();
    assert_eq!(supply.missing(), [0]);
    assert_eq!(supply.source(), Some(machine.name.as_str()));
    let filled = supply
        .fill(std::slice::from_ref(&remote), &Output::quiet())
        .await
        .unwrap();
    assert_eq!(filled.copies.len(), 1);
    let copy = &filled.copies[0];
    eprintln!(
        "{} ({} chunks, peak in flight {} B, image size {} B)",
        copy.line(),
        copy.chunks,
        copy.peak_in_flight,
        source.size
    );
    let there = remote.image_info(&image).await.unwrap().expect("copied");
    assert_eq!(there.id, source.id, "same image id on both engines");
    assert_eq!(copy.id, source.id);
    // Streamed, not buffered: the archive (> the filler) went through in many chunks, and the
    // most bytes ever read from the source but not yet handed to the target (measured at both
    // ends of the pipe inside the copy) is a small fraction of it. A copy that collected the
    // export first would show the whole archive here.
    assert!(copy.bytes > filler as u64, "{copy:?}");
    assert!(copy.chunks > 16, "{copy:?}");
    assert!(copy.peak_in_flight <= copy.bytes / 16, "{copy:?}");

    // Idempotent: now present everywhere, nothing more is copied.
    let again = Supply::survey(&spec, std::slice::from_ref(&remote), &tag)
        .await
        .unwrap();
    assert!(again.missing().is_empty());
    let again = again
        .fill(std::slice::from_ref(&remote), &Output::quiet())
        .await
        .unwrap();
    assert!(again.copies.is_empty());
    assert_eq!(again.healthcheck, [false]);

    // A container of the copied image runs on the test host and answers from the machine.
    let mut plan = ContainerPlan::new(&spec, &tag, "rel-copy", 0, 0);
    let id = run_on_test_host(&remote, &hosts, &spec, &mut plan, 18081, &tag).await;
    remote
        .stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(remote.find(&service, None).await.unwrap().is_empty());
    assert!(
        guard.containers().is_empty(),
        "nothing on the machine's engine"
    );
}

/// Runs the haddock binary with a clean registry environment plus `env`.
fn haddock_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_haddock"));
    cmd.args(args)
        .current_dir(repo_root())
        .env_remove("HADDOCK_LOCATOR")
        .env_remove("HADDOCK_TOKEN")
        .env_remove("HADDOCK_REGISTRY_USER")
        .env_remove("HADDOCK_REGISTRY_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("haddock runs")
}

/// `image_source = "registry"` against Debian's docker-registry (Distribution 2.8, basic auth)
/// and a second real engine: the tag is pushed from the machine's engine, the test host pulls it
/// through the Engine API (same image id as on the machine), and a container of it runs there.
/// No credentials, wrong ones, or a tag the registry lacks: exit 2, nothing on the test host,
/// and the password never in the output.
#[tokio::test]
async fn registry_mode_pulls_the_tag_on_a_test_host_with_credentials_from_env_or_config() {
    use haddock::image::{Credentials, Supply};
    use haddock::output::Output;
    test_images();
    let hosts = TestHosts::up(1);
    let registry = Registry::start(&hosts, 1);
    let tag = format!("reg-{}", std::process::id());
    let source = format!("{IMAGE_REPO}:{tag}");
    let _built = TestImage::build(&tag, 1 << 20);
    registry.push(&source);

    let service = unique_service("registry");
    let guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let path = copy_spec(dir.path(), &service, &hosts, false);
    let repo = format!("{}/{IMAGE_REPO}", registry.remote);
    let spec_text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen(
            &format!("image = \"{IMAGE_REPO}\""),
            &format!("image = \"{repo}\""),
            1,
        )
        .replacen("image_source = \"copy\"", "image_source = \"registry\"", 1);
    std::fs::write(&path, spec_text).unwrap();
    let spec = Spec::load(&path).unwrap();
    let remote = Host::connect(&spec.targets[0], 0).await.unwrap();
    let image = spec.image_ref(&tag);
    let none = dir.path().join("no-docker-config");
    std::fs::create_dir_all(&none).unwrap();

    // Through the CLI (no locator at :9: these are refused before it is asked).
    let release = |tag: &str| {
        vec![
            "release".to_string(),
            service.clone(),
            tag.to_string(),
            "--spec".into(),
            path.display().to_string(),
            "--locator".into(),
            "http://127.0.0.1:9".into(),
            "--json".into(),
        ]
    };
    let run = |tag: &str, env: &[(&str, &std::ffi::OsStr)]| {
        let args = release(tag);
        haddock_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env)
    };
    // No credentials anywhere: the registry refuses, exit 2.
    let out = run(&tag, &[("DOCKER_CONFIG", none.as_os_str())]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("refused") && text(&out).contains("no credentials"),
        "{}",
        text(&out)
    );
    // Wrong password from the environment: exit 2, and the password is not printed.
    let wrong = "not-the-password-7731";
    let out = run(
        &tag,
        &[
            ("DOCKER_CONFIG", none.as_os_str()),
            ("HADDOCK_REGISTRY_USER", Registry::USER.as_ref()),
            ("HADDOCK_REGISTRY_PASSWORD", wrong.as_ref()),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("HADDOCK_REGISTRY_USER/HADDOCK_REGISTRY_PASSWORD"),
        "{}",
        text(&out)
    );
    assert!(
        !text(&out).contains(wrong),
        "the password was printed: {}",
        text(&out)
    );
    // Right credentials from a Docker config file, but a tag the registry lacks: exit 2.
    let config = registry.config_for_remote(Registry::USER, Registry::PASSWORD);
    let out = run("no-such-tag", &[("DOCKER_CONFIG", config.as_os_str())]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["error"], "unknown_image", "{}", text(&out));
    assert!(
        text(&out).contains(&format!("not found in registry {}", registry.remote)),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(Registry::PASSWORD));
    assert_eq!(
        remote.image_info(&image).await.unwrap(),
        None,
        "nothing pulled"
    );
    assert!(remote.find(&service, None).await.unwrap().is_empty());

    // The pull itself (library: the container below publishes a port to be reached).
    let creds = Credentials::new(Registry::USER, Registry::PASSWORD, &registry.remote, "test");
    let supply = Supply::survey_with(&spec, std::slice::from_ref(&remote), &tag, Some(creds))
        .await
        .unwrap();
    let filled = supply
        .fill(std::slice::from_ref(&remote), &Output::quiet())
        .await
        .unwrap();
    assert_eq!(filled.pulls.len(), 1);
    let pulled = &filled.pulls[0];
    eprintln!("{}", pulled.line());
    let machine = Host::machine().await.unwrap();
    let original = machine.image_info(&source).await.unwrap().unwrap();
    let there = remote.image_info(&image).await.unwrap().expect("pulled");
    assert_eq!(there.id, original.id, "the pushed and pulled image are one");
    assert_eq!(pulled.id, original.id);

    let mut plan = ContainerPlan::new(&spec, &tag, "rel-reg", 0, 0);
    let id = run_on_test_host(&remote, &hosts, &spec, &mut plan, 18082, &tag).await;
    remote
        .stop_and_remove(&id, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(remote.find(&service, None).await.unwrap().is_empty());
    assert!(guard.containers().is_empty());
}
