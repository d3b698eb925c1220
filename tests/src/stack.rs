//! A whole Haddock stack for one test or one demo run: a locator (embedded store), a proxy, a
//! private Docker network and cache volume, and a deploy spec pointing at them.
//!
//! The locator and the proxy run as host processes (the real release binaries); the optimizer
//! runs in containers that `haddock release` starts. Everything a stack creates carries the
//! label [`crate::TEST_LABEL`] or its own service name, and is removed when the stack drops —
//! also when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::eventually;

/// Knobs of a stack's deploy spec (derived from `deploy-specs/optimizer.toml`).
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Bake time of each canary step.
    pub step_pause: Duration,
    /// Session idle TTL (also the drain wait).
    pub session_ttl: Duration,
    /// Canary weights, ending at 100.
    pub steps: Vec<u32>,
    /// Extra environment for the optimizer containers (e.g. FAILPOINTS).
    pub env: Vec<(String, String)>,
    /// An instance not healthy by then has failed to start.
    pub start_deadline: Duration,
    /// Run the locator on this PostgreSQL database instead of the embedded store.
    pub database_url: Option<String>,
    /// Create the stack's network with a user-configured subnet (a free `10.X.Y.0/24` picked
    /// at random), so that a container can be given a fixed address on it (`docker run --ip`),
    /// as the proof benchmark's naive redeploy does.
    pub fixed_subnet: bool,
    /// Extra Docker engines (`ci/testhosts.sh`) the service also runs on, one instance each,
    /// beside the machine's engine. With any, every target publishes the service port on its
    /// address, the image is copied to the hosts by haddock (`image_source = "copy"`), and the
    /// optimizers find their peers on other hosts through the locator.
    pub test_hosts: u32,
    /// Proxies started (sharing one cookie key); the load sends each user's requests to each in
    /// turn.
    pub proxies: usize,
    /// Instances of each version on each host (`targets[].instances`): they share the host's
    /// cache volume, one writer among them.
    pub instances: u32,
    /// A DNS cache accessory `dns` (`haddock/dnsmasq:1`, `ci/build-images.sh --component
    /// dnsmasq`) at `.53` of the stack's network (made with a subnet), logging every query:
    /// the instances use it as their DNS server (`dns = ["accessory:dns"]`) and find the
    /// locator as `locator.haddock.internal`, a name only it knows (the locator then listens
    /// on every address). The test boots it (`haddock accessory boot`).
    pub dns_accessory: bool,
    /// Locator replicas on `database_url` (1 or 2). With 2, haddock, the proxies and the
    /// agent are given both URLs.
    pub locator_replicas: usize,
    /// A second service ([`Stack::second`]) on the same network and proxies, with its own
    /// spec, cache volume, cookie and host agent. Each service then declares a host
    /// (`<service>.test`, see [`Stack::host`]) and the proxies are started without
    /// `--service`: they carry whatever the locator knows.
    pub second_service: bool,
    /// The canary's p99 limit (`rollout.analysis.max_p99`) instead of the shipped spec's.
    pub max_p99: Option<Duration>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            step_pause: Duration::from_secs(5),
            session_ttl: Duration::from_secs(5),
            steps: vec![10, 50, 100],
            env: Vec::new(),
            start_deadline: Duration::from_secs(30),
            database_url: None,
            fixed_subnet: false,
            test_hosts: 0,
            proxies: 1,
            instances: 1,
            dns_accessory: false,
            locator_replicas: 1,
            second_service: false,
            max_p99: None,
        }
    }
}

/// A running stack; dropping it stops the processes and removes containers, network, volume.
#[derive(Debug)]
pub struct Stack {
    pub dir: tempfile::TempDir,
    /// Unique per stack, so that stacks of parallel tests never touch each other's containers.
    pub service: String,
    /// The first locator replica.
    pub locator_url: String,
    /// Every replica, comma-separated: what haddock, the proxies and the agent are given.
    pub locator_urls: String,
    pub deploy_token: String,
    pub read_token: String,
    /// The optimizer's write token (in the spec's env): the load's PUTs send it.
    pub write_token: String,
    /// The first proxy (every proxy's URL is in `proxy_urls`).
    pub proxy_url: String,
    pub proxy_admin: String,
    pub proxy_urls: Vec<String>,
    pub spec_path: PathBuf,
    pub network: String,
    pub volume: String,
    pub cookie: String,
    /// The DNS accessory's address (with [`StackOptions::dns_accessory`]).
    pub dns_ip: Option<String>,
    /// The host name users reach the service by, when the proxies route by host
    /// ([`StackOptions::second_service`]); `None`: every request is the service's.
    pub host: Option<String>,
    /// The second service ([`StackOptions::second_service`]).
    pub second: Option<StackService>,
    locator: Option<Child>,
    /// The second locator replica, when `locator_replicas` is 2.
    replica: Option<Child>,
    proxies: Vec<Child>,
    /// The host agents (`haddock heartbeat`), one per service.
    heartbeats: Vec<Child>,
    locator_port: u16,
    database_url: Option<String>,
    /// Dropped after the stack's own cleanup (`down` removes everything on those hosts).
    pub test_hosts: Option<crate::testhosts::TestHosts>,
}

/// Another service of a stack ([`StackOptions::second_service`]), reached through the same
/// proxies by its host name.
#[derive(Debug, Clone)]
pub struct StackService {
    pub service: String,
    pub spec_path: PathBuf,
    pub volume: String,
    pub cookie: String,
    pub host: String,
}

/// The directory holding the release binaries (next to the running test or demo binary).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    // Test binaries live in target/release/deps, the demo binary in target/release.
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --release --workspace`",
        p.display()
    );
    p
}

/// The repository root (for the shipped deploy spec).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub use locator::testing::free_port;

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs")
}

/// `docker network create --subnet 10.X.Y.0/24` on a subnet picked at random; Docker refuses
/// one that overlaps an existing network, so a few are tried.
fn create_network_with_subnet(network: &str) -> std::process::Output {
    let mut tries = 0;
    loop {
        let subnet = format!(
            "10.{}.{}.0/24",
            100 + rand::random::<u8>() % 100,
            rand::random::<u8>()
        );
        let out = docker(&[
            "network",
            "create",
            "--label",
            crate::TEST_LABEL,
            "--subnet",
            &subnet,
            network,
        ]);
        tries += 1;
        let overlaps = String::from_utf8_lossy(&out.stderr).contains("overlap");
        if out.status.success() || !overlaps || tries >= 32 {
            return out;
        }
    }
}

impl Stack {
    /// Starts locator and proxy and writes the spec; waits until both answer.
    pub async fn start(name: &str, opts: StackOptions) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let suffix: u32 = rand::random::<u32>() % 100_000;
        let service = format!("{name}-{suffix}");
        let network = format!("haddock-{service}");
        let volume = format!("cache-{service}");
        let (deploy_token, read_token, proxy_token) = (
            format!("deploy-{}", rand::random::<u64>()),
            format!("read-{}", rand::random::<u64>()),
            format!("proxy-{}", rand::random::<u64>()),
        );
        let tokens = dir.path().join("tokens.toml");
        std::fs::write(
            &tokens,
            format!("deploy = [\"{deploy_token}\"]\nread = [\"{read_token}\"]\nproxy = [\"{proxy_token}\"]\n"),
        )
        .unwrap();

        let out = if opts.fixed_subnet || opts.dns_accessory {
            create_network_with_subnet(&network)
        } else {
            docker(&["network", "create", "--label", crate::TEST_LABEL, &network])
        };
        assert!(
            out.status.success(),
            "docker network create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        create_volume(&volume);

        // Empty engines: haddock copies each release's image to them (`image_source = "copy"`).
        let test_hosts =
            (opts.test_hosts > 0).then(|| crate::testhosts::TestHosts::up(opts.test_hosts));
        let locator_port = free_port();
        let cookie = "haddock_session".to_string();
        let spec_path = dir.path().join(format!("{service}.toml"));
        let write_token = format!("write-{:032x}", rand::random::<u128>());
        let mut text = spec_text(&service, &network, &volume, &write_token, &opts);
        let host = opts.second_service.then(|| format!("{service}.test"));
        if let Some(host) = &host {
            text = with_host(&text, &service, host);
        }
        let second = opts.second_service.then(|| {
            let name = format!("{service}-b");
            let second = StackService {
                spec_path: dir.path().join(format!("{name}.toml")),
                volume: format!("cache-{name}"),
                cookie: "b_session".to_string(),
                host: format!("{name}.test"),
                service: name,
            };
            create_volume(&second.volume);
            let text = spec_text(
                &second.service,
                &network,
                &second.volume,
                &write_token,
                &opts,
            )
            .replacen(
                "cookie = \"haddock_session\"",
                &format!("cookie = \"{}\"", second.cookie),
                1,
            );
            std::fs::write(
                &second.spec_path,
                with_host(&text, &second.service, &second.host),
            )
            .unwrap();
            second
        });
        if let Some(hosts) = &test_hosts {
            text = across_hosts(&text, hosts, locator_port, &read_token);
        }
        let dns_ip = opts.dns_accessory.then(|| {
            let (spec, ip) = with_dns_accessory(&text, &network, locator_port, &read_token);
            text = spec;
            ip
        });
        std::fs::write(&spec_path, text).unwrap();

        let mut stack = Stack {
            locator_url: format!("http://127.0.0.1:{locator_port}"),
            locator_urls: format!("http://127.0.0.1:{locator_port}"),
            proxy_url: String::new(),
            proxy_admin: String::new(),
            proxy_urls: Vec::new(),
            deploy_token,
            read_token,
            write_token,
            spec_path,
            network,
            volume,
            cookie,
            dns_ip,
            host,
            second,
            locator: None,
            replica: None,
            proxies: Vec::new(),
            heartbeats: Vec::new(),
            locator_port,
            database_url: opts.database_url.clone(),
            test_hosts,
            service,
            dir,
        };
        stack.start_locator().await;
        if opts.locator_replicas > 1 {
            assert!(
                opts.database_url.is_some(),
                "a second locator replica needs database_url"
            );
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            stack.replica = Some(stack.spawn_locator(&listen, "locator2.log").await);
            let second = format!("http://{listen}");
            stack.locator_urls = format!("{},{second}", stack.locator_url);
        }

        let cookie_key = format!("demo-key-{}", rand::random::<u64>());
        for k in 0..opts.proxies.max(1) {
            let (port, admin) = (free_port(), free_port());
            stack.proxy_urls.push(format!("http://127.0.0.1:{port}"));
            if k == 0 {
                stack.proxy_url = format!("http://127.0.0.1:{port}");
                stack.proxy_admin = format!("http://127.0.0.1:{admin}");
            }
            let name = if k == 0 {
                "proxy".to_string()
            } else {
                format!("proxy{k}")
            };
            let log = std::fs::File::create(stack.dir.path().join(format!("{name}.log"))).unwrap();
            // With two services the proxy discovers them in the locator.
            let named = stack
                .second
                .is_none()
                .then_some(["--service", stack.service.as_str()]);
            let child = Command::new(bin("proxy"))
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin", &format!("127.0.0.1:{admin}")])
                .args(["--locator", &stack.locator_urls])
                .args(named.iter().flatten())
                .args(["--token", &proxy_token])
                .arg("--state-dir")
                .arg(stack.dir.path().join(&name))
                // One key for all proxies: a session cookie holds whichever proxy reads it.
                .env("HADDOCK_COOKIE_KEY", &cookie_key)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("proxy starts");
            stack.proxies.push(child);
        }
        // The host agents: keep the running instances' heartbeats going between releases
        // (the locator marks a silent instance unhealthy after its TTL).
        let agents = std::iter::once((stack.service.clone(), stack.spec_path.clone())).chain(
            stack
                .second
                .iter()
                .map(|s| (s.service.clone(), s.spec_path.clone())),
        );
        for (k, (service, spec)) in agents.enumerate() {
            let name = if k == 0 {
                "heartbeat.log".to_string()
            } else {
                format!("heartbeat-{service}.log")
            };
            let log = std::fs::File::create(stack.dir.path().join(name)).unwrap();
            let child = stack
                .haddock()
                .args(["heartbeat", &service, "--spec"])
                .arg(spec)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("haddock heartbeat starts");
            stack.heartbeats.push(child);
        }
        for url in &stack.proxy_urls[1..] {
            eventually("another proxy's port", Duration::from_secs(20), || async {
                reqwest::get(url).await.ok()
            })
            .await;
        }
        let metrics = format!("{}/metrics", stack.proxy_admin);
        eventually(
            "the proxy's admin port",
            Duration::from_secs(20),
            || async {
                reqwest::get(&metrics)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            },
        )
        .await;
        stack
    }

    /// (Re)starts the locator on its port and data dir, and waits until it answers.
    pub async fn start_locator(&mut self) {
        // With test hosts the optimizers there ask the locator for their peers: it listens on
        // every address (the hosts reach the machine at 10.213.<i>.1).
        let ip = if self.test_hosts.is_some() || self.dns_ip.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let listen = format!("{ip}:{}", self.locator_port);
        let child = self.spawn_locator(&listen, "locator.log").await;
        self.locator = Some(child);
    }

    /// Starts a locator on `listen` (on `database_url` when set, else the stack's data dir),
    /// logging to `log` in the stack's dir, and waits until it answers.
    async fn spawn_locator(&self, listen: &str, log: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(log))
            .unwrap();
        let mut cmd = Command::new(bin("locator"));
        cmd.args(["serve", "--listen", listen]);
        match &self.database_url {
            Some(url) => cmd.args(["--database-url", url]),
            None => cmd.arg("--data-dir").arg(self.dir.path().join("locator")),
        };
        let child = cmd
            .arg("--tokens")
            .arg(self.dir.path().join("tokens.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("locator starts");
        let port = listen.rsplit(':').next().unwrap_or_default();
        let health = format!("http://127.0.0.1:{port}/healthz");
        eventually(
            "the locator's /healthz",
            Duration::from_secs(20),
            || async {
                reqwest::get(&health)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            },
        )
        .await;
        child
    }

    /// `haddock ARGS… --spec SPEC` (a verb that takes the stack's spec): exit code, stdout,
    /// stderr. Blocks the calling worker thread (`block_in_place`).
    pub fn haddock_with_spec(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut cmd = self.haddock();
        cmd.args(args).arg("--spec").arg(&self.spec_path);
        let out = tokio::task::block_in_place(|| cmd.output().expect("haddock runs"));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Stops the host agent (`haddock heartbeat`): nothing then judges the instances from their
    /// containers' events; whoever keeps them registered must heartbeat them itself.
    pub fn stop_heartbeat_agent(&mut self) {
        for mut child in self.heartbeats.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Rewrites the stack's spec: the first `from` becomes `to` (which must change it). The
    /// next haddock verb reads the new spec.
    pub fn edit_spec(&self, from: &str, to: &str) {
        let spec = std::fs::read_to_string(&self.spec_path).unwrap();
        let edited = spec.replacen(from, to, 1);
        assert_ne!(spec, edited, "the stack's spec has no {from:?}");
        std::fs::write(&self.spec_path, edited).unwrap();
    }

    /// Eight users on the proxy until the returned control is stopped.
    pub fn light_load(
        &self,
    ) -> (
        std::sync::Arc<crate::load::LoadControl>,
        tokio::task::JoinHandle<crate::load::LoadReport>,
    ) {
        self.light_load_on(self.host.clone(), &self.cookie)
    }

    /// Eight users of the second service ([`StackOptions::second_service`]) on the proxy.
    pub fn light_load_of_second(
        &self,
    ) -> (
        std::sync::Arc<crate::load::LoadControl>,
        tokio::task::JoinHandle<crate::load::LoadReport>,
    ) {
        let second = self.second.as_ref().expect("a stack with a second service");
        self.light_load_on(Some(second.host.clone()), &second.cookie)
    }

    fn light_load_on(
        &self,
        host: Option<String>,
        cookie: &str,
    ) -> (
        std::sync::Arc<crate::load::LoadControl>,
        tokio::task::JoinHandle<crate::load::LoadReport>,
    ) {
        let control = std::sync::Arc::new(crate::load::LoadControl::default());
        let cfg = crate::load::LoadConfig {
            targets: vec![self.proxy_url.clone()],
            host,
            users: 8,
            cookie: cookie.to_string(),
            requests_per_session: 10,
            object_size: 8 * 1024,
            think: Duration::from_millis(20),
            write_token: self.write_token.clone(),
        };
        (
            control.clone(),
            tokio::spawn(crate::load::run(cfg, control)),
        )
    }

    /// `haddock` with the locator URL and deploy token in its environment.
    pub fn haddock(&self) -> Command {
        let mut c = Command::new(bin("haddock"));
        c.env("HADDOCK_LOCATOR", &self.locator_urls)
            .env("HADDOCK_TOKEN", &self.deploy_token);
        c
    }

    /// Runs `haddock release <service> <tag> --spec <spec> --json`, returning the exit code
    /// and the JSON result line.
    pub fn release(&self, tag: &str) -> (Option<i32>, serde_json::Value, String) {
        release_result(&self.release_command(tag).output().expect("haddock runs"))
    }

    /// The `haddock release <service> <tag> --json --spec <spec>` command, not yet started.
    pub fn release_command(&self, tag: &str) -> Command {
        self.release_command_of(&self.service, &self.spec_path, tag)
    }

    /// `haddock release <service> <tag> --json --spec <spec>` of any service, not yet started.
    pub fn release_command_of(&self, service: &str, spec: &Path, tag: &str) -> Command {
        let mut cmd = self.haddock();
        cmd.args(["release", service, tag, "--json", "--spec"])
            .arg(spec);
        cmd
    }

    /// Container ids of this stack's service on the machine's engine, optionally of one version.
    pub fn containers(&self, version: Option<&str>) -> Vec<String> {
        self.ids_on(None, version)
    }

    /// The `docker` CLI against the machine's engine (`None`) or test host `i`.
    fn docker_on(&self, host: Option<u32>, args: &[String]) -> std::process::Output {
        match (host, &self.test_hosts) {
            (Some(i), Some(hosts)) => hosts.docker(i, args),
            _ => docker(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        }
    }

    /// The machine's engine, then every test host.
    fn engines(&self) -> Vec<Option<u32>> {
        let n = self.test_hosts.as_ref().map_or(0, |h| h.n);
        std::iter::once(None).chain((1..=n).map(Some)).collect()
    }

    /// Container ids of this stack's service (optionally of one version) on `host`.
    fn ids_on(&self, host: Option<u32>, version: Option<&str>) -> Vec<String> {
        self.ids_of(host, &self.service, version)
    }

    /// Container ids of `service` (optionally of one version) on `host`.
    fn ids_of(&self, host: Option<u32>, service: &str, version: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "ps".to_string(),
            "-aq".into(),
            "--filter".into(),
            format!("label=org.haddock.service={service}"),
        ];
        if let Some(v) = version {
            args.push("--filter".into());
            args.push(format!("label=org.haddock.version={v}"));
        }
        String::from_utf8_lossy(&self.docker_on(host, &args).stdout)
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    /// [`Self::containers`] on the machine's engine and on every test host.
    pub fn containers_everywhere(&self, version: Option<&str>) -> Vec<String> {
        self.engines()
            .into_iter()
            .flat_map(|host| self.ids_on(host, version))
            .collect()
    }

    /// The last `lines` log lines of every container of the service, on the machine's engine
    /// and every test host, for failure messages.
    pub fn container_logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for host in self.engines() {
            for id in self.ids_on(host, None) {
                let args = [
                    "logs".into(),
                    "--tail".into(),
                    lines.to_string(),
                    id.clone(),
                ];
                let logs = self.docker_on(host, &args);
                out.push_str(&format!(
                    "--- container {id} on {}\n{}{}",
                    host.map_or("the machine".to_string(), |i| format!("test host {i}")),
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                ));
            }
        }
        out
    }

    /// The lines of the service's containers' whole logs, on every engine, that mention one
    /// of `needles` (an object's key, say): what a failure message needs when the tail of the
    /// logs no longer reaches it.
    pub fn container_lines_with(&self, needles: &[String]) -> String {
        let mut out = String::new();
        for host in self.engines() {
            for id in self.ids_on(host, None) {
                let logs = self.docker_on(host, &["logs".into(), id.clone()]);
                let text = String::from_utf8_lossy(&logs.stdout).into_owned()
                    + &String::from_utf8_lossy(&logs.stderr);
                for line in text.lines() {
                    if needles.iter().any(|n| line.contains(n.as_str())) {
                        out.push_str(&format!("[{id}] {line}\n"));
                    }
                }
            }
        }
        out
    }

    /// Current weights of the service, as the locator holds them.
    /// A counter of the proxy's `/metrics` (`haddock_proxy_<name>_total`), summed over labels.
    pub async fn proxy_counter(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.proxy_admin))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let metric = format!("haddock_proxy_{name}_total");
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(&metric))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    pub async fn weights(&self) -> Option<std::collections::BTreeMap<String, u8>> {
        let client =
            locator::client::Client::new(&self.locator_urls, Some(self.read_token.clone()));
        client.service(&self.service).await.ok().map(|s| s.weights)
    }

    /// Kills the locator process (as a crash would).
    pub fn kill_locator(&mut self) {
        if let Some(mut c) = self.locator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The logs of the host processes, for failure messages.
    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        let tail = |s: String| {
            s.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "--- locator.log\n{}\n--- proxy.log\n{}",
            tail(read("locator.log")),
            tail(read("proxy.log"))
        )
    }
}

/// A finished `haddock release --json` run as (exit code, its JSON result line, all output).
pub fn release_result(out: &std::process::Output) -> (Option<i32>, serde_json::Value, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code(), json, format!("{stdout}\n{stderr}"))
}

impl Drop for Stack {
    fn drop(&mut self) {
        let children = [self.locator.take(), self.replica.take()]
            .into_iter()
            .flatten()
            .chain(self.proxies.drain(..))
            .chain(self.heartbeats.drain(..));
        for child in children {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut ids = self.containers(None);
        if let Some(second) = &self.second {
            ids.extend(self.ids_of(None, &second.service, None));
        }
        let accessories = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=org.haddock.accessory-of={}", self.service),
        ]);
        ids.extend(
            String::from_utf8_lossy(&accessories.stdout)
                .split_whitespace()
                .map(String::from),
        );
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            docker(&args);
        }
        docker(&["network", "rm", &self.network]);
        docker(&["volume", "rm", "-f", &self.volume]);
        if let Some(second) = &self.second {
            docker(&["volume", "rm", "-f", &second.volume]);
        }
    }
}

/// Creates a Docker volume labelled as the tests' own.
fn create_volume(name: &str) {
    let out = docker(&["volume", "create", "--label", crate::TEST_LABEL, name]);
    assert!(
        out.status.success(),
        "docker volume create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A spec whose `[service]` declares `host`, so that proxies carrying several services route
/// its requests by their Host.
fn with_host(text: &str, service: &str, host: &str) -> String {
    let name = format!("name = \"{service}\"\n");
    assert!(text.contains(&name), "the spec names {service}");
    text.replacen(&name, &format!("{name}hosts = [\"{host}\"]\n"), 1)
}

/// The stack's spec with the DNS accessory of [`StackOptions::dns_accessory`], and its
/// address: `.53` of the network's subnet, which answers `locator.haddock.internal` with the
/// network's gateway (the machine, where the locator listens).
fn with_dns_accessory(
    text: &str,
    network: &str,
    locator_port: u16,
    read_token: &str,
) -> (String, String) {
    let out = docker(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}}",
        network,
    ]);
    let subnet = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let base = subnet
        .strip_suffix(".0/24")
        .unwrap_or_else(|| panic!("network {network} has no /24 subnet: {subnet:?}"));
    let (ip, gateway) = (format!("{base}.53"), format!("{base}.1"));
    let mut spec = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("env = {") {
            let locator = format!(
                ", OPTIMIZER_LOCATOR = \"http://locator.haddock.internal:{locator_port}\", OPTIMIZER_LOCATOR_TOKEN = \"{read_token}\" }}"
            );
            spec.push_str(&line.replacen(" }", &locator, 1));
        } else if t.starts_with("stop_grace =") {
            spec.push_str(line);
            spec.push_str("\ndns = [\"accessory:dns\"]");
        } else {
            spec.push_str(line);
        }
        spec.push('\n');
    }
    spec.push_str(&format!(
        "\n[[accessories]]\nname = \"dns\"\nimage = \"haddock/dnsmasq:1\"\n\
         args = [\"--cache-size=1000\", \"--log-queries\", \"--host-record=locator.haddock.internal,{gateway}\"]\n\
         memory = \"32MiB\"\nip = \"{ip}\"\n"
    ));
    (spec, ip)
}

/// A stack's spec over the machine's engine and the test hosts: each target publishes the
/// service port on its address (the machine's on host 1's link, which every host reaches), the
/// image is copied to the hosts, and the optimizers ask the locator for their peers.
fn across_hosts(
    text: &str,
    hosts: &crate::testhosts::TestHosts,
    locator_port: u16,
    read_token: &str,
) -> String {
    let machine = hosts.machine_ip(1);
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("image = ") {
            out.push_str(line);
            out.push_str("\nimage_source = \"copy\"\n");
        } else if t.starts_with("env = {") {
            let locator = format!(
                ", OPTIMIZER_LOCATOR = \"http://{machine}:{locator_port}\", OPTIMIZER_LOCATOR_TOKEN = \"{read_token}\" }}"
            );
            // Each read-through's steps are debug lines: a failure message shows why a read missed.
            let line = line.replacen(
                "RUST_LOG = \"info\"",
                "RUST_LOG = \"info,optimizer::server=debug\"",
                1,
            );
            out.push_str(&line.replacen(" }", &locator, 1));
            out.push('\n');
        } else if t.starts_with("instances = ") {
            out.push_str(&format!("{line}\naddress = \"{machine}\"\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    for i in 1..=hosts.n {
        out.push_str(&hosts.target(i, 1));
        out.push_str(&format!("address = \"{}\"\n", hosts.ip(i)));
    }
    out
}

/// The shipped spec with this stack's service name, network, volume, timings and env.
fn spec_text(
    service: &str,
    network: &str,
    volume: &str,
    write_token: &str,
    o: &StackOptions,
) -> String {
    let shipped = std::fs::read_to_string(repo_root().join("deploy-specs/optimizer.toml"))
        .expect("deploy-specs/optimizer.toml");
    let fmt = |d: Duration| format!("\"{}ms\"", d.as_millis());
    let steps = o
        .steps
        .iter()
        .map(|w| format!("  {{ weight = {w}, pause = {} }},\n", fmt(o.step_pause)))
        .collect::<String>();
    let mut env =
        format!("env = {{ RUST_LOG = \"info\", OPTIMIZER_VERSION = \"{{version}}\", OPTIMIZER_WRITE_TOKEN = \"{write_token}\"");
    for (k, v) in &o.env {
        env.push_str(&format!(", {k} = \"{v}\""));
    }
    env.push_str(" }");
    let mut out = String::new();
    let mut in_steps = false;
    for line in shipped.lines() {
        let t = line.trim_start();
        if in_steps {
            if t.starts_with(']') {
                in_steps = false;
                out.push_str(&steps);
                out.push_str("]\n");
            }
            continue;
        }
        let replaced = if t.starts_with("name = \"optimizer\"") {
            format!("name = \"{service}\"")
        } else if t.starts_with("network =") {
            format!("network = \"{network}\"")
        } else if t.starts_with("{ name = \"optimizer-cache\"") {
            format!("  {{ name = \"{volume}\", mount = \"/cache\" }},")
        } else if t.starts_with("env =") {
            env.clone()
        } else if t.starts_with("start_deadline =") {
            format!("start_deadline = {}", fmt(o.start_deadline))
        } else if t.starts_with("idle_ttl =") {
            format!("idle_ttl = {}", fmt(o.session_ttl))
        } else if t.starts_with("instances =") {
            format!("instances = {}", o.instances)
        } else if t.starts_with("max_drain =") {
            format!("max_drain = {}", fmt(o.session_ttl * 4))
        } else if let (true, Some(p99)) = (t.starts_with("max_p99 ="), o.max_p99) {
            format!("max_p99 = {}", fmt(p99))
        } else if t.starts_with("steps = [") {
            in_steps = true;
            "steps = [".to_string()
        } else {
            line.to_string()
        };
        out.push_str(&replaced);
        out.push('\n');
    }
    out
}
