//! Shared set-up of haddock's Docker tests: test images built locally (no registry), a real
//! locator process, deploy specs, and drop guards that remove every container, volume and
//! network a test created, even when it fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Repository of the test images; tags are `good-1`, `good-2`, `never-ready`, `crash`, `5xx`.
pub const IMAGE_REPO: &str = "haddock-test/svc";
pub const DEPLOY_TOKEN: &str = "test-deploy-token";

/// `$CARGO_TARGET_DIR/release`, found from the running test binary (`…/release/deps/x`).
pub fn target_release_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the static test service and the test images once per test binary.
pub fn test_images() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = target_release_dir().join("haddock-testsvc");
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("testsvc");
        run(Command::new("rustc").args(["-O", "-C", "target-feature=+crt-static", "-C", "strip=symbols"]).arg(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/testsvc.rs"),
        )
        .arg("-o")
        .arg(&bin));
        for (tag, mode) in [("good-1", "good"), ("good-2", "good"), ("never-ready", "never-ready"), ("crash", "crash"), ("5xx", "5xx")] {
            let dockerfile = format!(
                "FROM scratch\nCOPY testsvc /testsvc\nENV SVC_MODE={mode}\nLABEL org.haddock.test=1\nENTRYPOINT [\"/testsvc\"]\n"
            );
            std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
            run(Command::new("docker").args(["build", "-q", "-t", &format!("{IMAGE_REPO}:{tag}")]).arg(&dir));
        }
    });
}

/// A service name unique to this test (a DNS label).
pub fn unique_service(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes every container of a service (by haddock's labels), and the volumes and networks
/// registered with it, when dropped.
pub struct DockerGuard {
    pub service: String,
    pub volumes: Vec<String>,
    pub networks: Vec<String>,
}

impl DockerGuard {
    pub fn new(service: &str) -> DockerGuard {
        DockerGuard {
            service: service.to_string(),
            volumes: Vec::new(),
            networks: Vec::new(),
        }
    }

    /// Our containers of the service: `(name, version label, running)`.
    pub fn containers(&self) -> Vec<(String, String, bool)> {
        let out = run(Command::new("docker").args([
            "ps",
            "-a",
            "--filter",
            &format!("label=org.haddock.service={}", self.service),
            "--format",
            "{{.Names}} {{.Label \"org.haddock.version\"}} {{.State}}",
        ]));
        out.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((
                    it.next()?.to_string(),
                    it.next()?.to_string(),
                    it.next()? == "running",
                ))
            })
            .collect()
    }

    /// A named volume labelled as a test volume, removed on drop.
    pub fn volume(&mut self, name: &str) {
        run(Command::new("docker").args([
            "volume",
            "create",
            "--label",
            "org.haddock.test=1",
            name,
        ]));
        self.volumes.push(name.to_string());
    }
}

impl Drop for DockerGuard {
    fn drop(&mut self) {
        let ids = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=org.haddock.service={}", self.service),
            ])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(&ids)
                .stdout(Stdio::null())
                .status();
        }
        for v in &self.volumes {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f", v])
                .stdout(Stdio::null())
                .status();
        }
        for n in &self.networks {
            let _ = Command::new("docker")
                .args(["network", "rm", n])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A real locator process on a free port with an embedded store in a temp dir; killed on drop.
pub struct Locator {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Locator {
    pub fn start() -> Locator {
        let bin = target_release_dir().join("locator");
        assert!(
            bin.is_file(),
            "{} is missing: build it first (cargo build --release -p locator)",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.toml");
        std::fs::write(
            &tokens,
            format!(
                "deploy = [\"{DEPLOY_TOKEN}\"]\nread = [\"test-read\"]\nproxy = [\"test-proxy\"]\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .arg("--tokens")
            .arg(&tokens)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let l = Locator {
            child,
            url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the locator did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        l
    }

    pub fn client(&self) -> locator_wire::client::Client {
        locator_wire::client::Client::new(&self.url, Some(DEPLOY_TOKEN.into()))
    }
}

impl Drop for Locator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Knobs of a test spec.
pub struct SpecOpts {
    pub steps: &'static str,
    pub start_deadline: &'static str,
    pub network: Option<String>,
    pub volume: Option<String>,
    pub instances: u32,
    pub min_requests: u64,
    pub auto_rollback: bool,
    /// `[rollout] manual`: the last step waits for `haddock promote`.
    pub manual: bool,
    /// `[sessions] max_drain`: how long the old version may keep live sessions.
    pub max_drain: &'static str,
    /// More `[[targets]]` tables, appended verbatim.
    pub more_targets: String,
    /// `[rollout] max_parallel_hosts`.
    pub max_parallel_hosts: u32,
    /// `address` of the machine's target (needed when `more_targets` have one).
    pub address: Option<String>,
}

impl Default for SpecOpts {
    fn default() -> Self {
        SpecOpts {
            steps: "[{ weight = 100 }]",
            start_deadline: "10s",
            network: None,
            volume: None,
            instances: 1,
            min_requests: 20,
            auto_rollback: true,
            manual: false,
            max_drain: "3s",
            more_targets: String::new(),
            max_parallel_hosts: 0,
            address: None,
        }
    }
}

/// Writes a deploy spec for `service` running the test images into `dir`.
pub fn write_spec(dir: &Path, service: &str, o: &SpecOpts) -> PathBuf {
    let network = o
        .network
        .as_ref()
        .map(|n| format!("network = \"{n}\"\n"))
        .unwrap_or_default();
    let volumes = o
        .volume
        .as_ref()
        .map(|v| format!("volumes = [{{ name = \"{v}\", mount = \"/cache\" }}]\n"))
        .unwrap_or_default();
    let text = format!(
        r#"[service]
name = "{service}"
image = "{IMAGE_REPO}"
port = 8080
args = ["--listen", "0.0.0.0:{{port}}", "--id", "{{instance}}"]
env = {{ RUST_LOG = "info" }}
labels = {{ "org.haddock.test" = "1" }}

[container]
memory = "64MiB"
cpu_shares = 256
restart = "no"
stop_grace = "1s"
{network}{volumes}
[health]
path = "/readyz"
interval = "200ms"
timeout = "500ms"
rise = 1
fall = 2
start_deadline = "{deadline}"

[rollout]
steps = {steps}
auto_rollback = {auto_rollback}
manual = {manual}
max_parallel_hosts = {max_parallel_hosts}

[rollout.analysis]
max_5xx_ratio = 0.05
max_p99 = "500ms"
min_requests = {min}

[sessions]
idle_ttl = "1s"
max_drain = "{max_drain}"

[[targets]]
host = "unix:///var/run/docker.sock"
instances = {instances}
{address}{more_targets}"#,
        deadline = o.start_deadline,
        steps = o.steps,
        min = o.min_requests,
        auto_rollback = o.auto_rollback,
        manual = o.manual,
        max_drain = o.max_drain,
        instances = o.instances,
        more_targets = o.more_targets,
        max_parallel_hosts = o.max_parallel_hosts,
        address = o
            .address
            .as_ref()
            .map(|a| format!("address = \"{a}\"\n"))
            .unwrap_or_default(),
    );
    let path = dir.join(format!("{service}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Rewrites a spec file: the first `from` becomes `to` (which must change it).
pub fn edit_spec(spec: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(spec).unwrap();
    let edited = text.replacen(from, to, 1);
    assert_ne!(text, edited, "{} has no {from:?}", spec.display());
    std::fs::write(spec, edited).unwrap();
}

/// Runs the haddock binary.
pub fn haddock(args: &[&str], locator: Option<&Locator>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_haddock"));
    cmd.args(args)
        .current_dir(repo_root())
        .env_remove("HADDOCK_LOCATOR")
        .env_remove("HADDOCK_TOKEN");
    if let Some(l) = locator {
        cmd.env("HADDOCK_LOCATOR", &l.url)
            .env("HADDOCK_TOKEN", DEPLOY_TOKEN);
    }
    cmd.output().expect("haddock runs")
}

/// `haddock release SERVICE TAG --spec SPEC --json` against the locator `l`.
pub fn release(spec: &Path, service: &str, tag: &str, l: &Locator) -> std::process::Output {
    haddock(
        &[
            "release",
            service,
            tag,
            "--spec",
            spec.to_str().unwrap(),
            "--json",
        ],
        Some(l),
    )
}

/// The one JSON object a `--json` verb prints on stdout.
pub fn report(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

pub fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A relay in front of the locator that plays "haddock died right here". It forwards every
/// call until the locator has recorded the release in `state`, then holds every later call
/// forever: haddock stops at its next locator call (its next step's or a background
/// heartbeat's), inside the work of `state`, and the test SIGKILLs it. So a kill lands in a
/// chosen state even when that state lasts a millisecond.
pub struct CrashRelay {
    pub url: String,
    relay: std::sync::Arc<Relay>,
    // Dropping the runtime stops the relay and its held calls.
    _rt: tokio::runtime::Runtime,
}

struct Relay {
    upstream: String,
    state: locator_wire::api::ReleaseState,
    tripped: std::sync::atomic::AtomicBool,
    held: AtomicU32,
    http: reqwest::Client,
}

type RelayResponse = hyper::Response<http_body_util::Full<bytes::Bytes>>;

impl CrashRelay {
    pub fn start(upstream: &str, state: locator_wire::api::ReleaseState) -> CrashRelay {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let relay = std::sync::Arc::new(Relay {
            upstream: upstream.to_string(),
            state,
            tripped: Default::default(),
            held: AtomicU32::new(0),
            http: reqwest::Client::new(),
        });
        let r = relay.clone();
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let r = r.clone();
                        async move { Ok::<_, std::convert::Infallible>(r.forward(req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        CrashRelay {
            url,
            relay,
            _rt: rt,
        }
    }

    /// The locator recorded the state and haddock has made its next call (now held).
    pub fn holding(&self) -> bool {
        self.relay.tripped.load(Ordering::SeqCst) && self.relay.held.load(Ordering::SeqCst) > 0
    }
}

impl Relay {
    async fn forward(&self, req: hyper::Request<hyper::body::Incoming>) -> RelayResponse {
        use http_body_util::BodyExt;
        if self.tripped.load(Ordering::SeqCst) {
            self.held.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut call = self
            .http
            .request(parts.method.clone(), format!("{}{path}", self.upstream))
            .body(body);
        for (name, value) in &parts.headers {
            if name != hyper::header::HOST {
                call = call.header(name, value);
            }
        }
        let Ok(answer) = call.send().await else {
            return hyper::Response::builder()
                .status(502)
                .body(Default::default())
                .unwrap();
        };
        let status = answer.status();
        let headers = answer.headers().clone();
        let bytes = answer.bytes().await.unwrap_or_default();
        // A create (POST /v1/releases) or update (PATCH /v1/releases/ID) answers the record.
        let records_release = matches!(parts.method, hyper::Method::POST | hyper::Method::PATCH)
            && parts.uri.path().starts_with("/v1/releases")
            && !parts.uri.path().ends_with("/control");
        if records_release && status.is_success() {
            let recorded = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["state"].as_str().map(String::from));
            if recorded.as_deref() == Some(self.state.to_string().as_str()) {
                self.tripped.store(true, Ordering::SeqCst);
            }
        }
        let mut response = hyper::Response::builder().status(status);
        for (name, value) in &headers {
            if name != hyper::header::CONTENT_LENGTH && name != hyper::header::TRANSFER_ENCODING {
                response = response.header(name, value);
            }
        }
        response.body(http_body_util::Full::new(bytes)).unwrap()
    }
}

pub use locator_wire::testing::eventually_blocking;

/// The local engine reached a second way: as a `tcp://` host behind TLS with client
/// certificates (stunnel terminates TLS; openssl makes a throwaway CA). A spec naming both it and
/// the unix socket exercises haddock's multi-host and TLS paths against the real engine.
pub struct TlsDockerHost {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl TlsDockerHost {
    pub fn start() -> TlsDockerHost {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(dir.path()));
        };
        let subject = |cn: &str| format!("/CN={cn}");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &subject("haddock-test-ca"),
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("client.ext"),
            "extendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for (name, cn) in [("server", "localhost"), ("client", "haddock")] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &subject(cn),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("stunnel.conf");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\n[docker]\naccept = 127.0.0.1:{port}\n\
                 connect = /var/run/docker.sock\ncert = server.pem\nkey = server.key\n\
                 CAfile = ca.pem\nrequireCert = yes\nverifyChain = yes\n"
            ),
        )
        .unwrap();
        let child = Command::new("stunnel")
            .arg(&config)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel runs (apt-get install stunnel4; ci/setup.sh does)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "stunnel did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsDockerHost { child, port, dir }
    }

    /// The `host` string of this target.
    pub fn host(&self) -> String {
        // An IP, not `localhost`: no resolver (or IPv6-first answer) in the way; the server
        // certificate names it as an IP SAN.
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// A `[[targets]]` table for this host.
    pub fn target(&self, instances: u32) -> String {
        let file = |f: &str| self.dir.path().join(f).display().to_string();
        format!(
            "\n[[targets]]\nhost = \"{}\"\ninstances = {instances}\ntls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
            self.host(),
            file("ca.pem"),
            file("client.pem"),
            file("client.key"),
        )
    }
}

impl Drop for TlsDockerHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What most release tests start from: the test images, a locator, a unique service with its
/// container guard, and its spec (written in `dir`, kept alive with it).
pub struct Scene {
    pub l: Locator,
    pub service: String,
    pub guard: DockerGuard,
    pub spec: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Scene {
    pub fn new(prefix: &str, opts: &SpecOpts) -> Scene {
        test_images();
        let l = Locator::start();
        let service = unique_service(prefix);
        let guard = DockerGuard::new(&service);
        let dir = tempfile::tempdir().unwrap();
        let spec = write_spec(dir.path(), &service, opts);
        Scene {
            l,
            service,
            guard,
            spec,
            dir,
        }
    }
}

impl Scene {
    /// A scene whose service already runs `good-1`, released with these rollout `steps`.
    pub fn on_good_1(prefix: &str, steps: &'static str) -> Scene {
        Scene::on_good_1_with(
            prefix,
            &SpecOpts {
                steps,
                ..Default::default()
            },
        )
    }

    /// [`Scene::on_good_1`] with a spec of these options.
    pub fn on_good_1_with(prefix: &str, opts: &SpecOpts) -> Scene {
        let scene = Scene::new(prefix, opts);
        let first = haddock(
            &[
                "release",
                &scene.service,
                "good-1",
                "--spec",
                scene.spec.to_str().unwrap(),
            ],
            Some(&scene.l),
        );
        assert_eq!(first.status.code(), Some(0), "{}", text(&first));
        scene
    }
}

impl Scene {
    /// The parts a test uses, borrowed (the scene keeps the spec's directory alive).
    pub fn parts(&self) -> (&Locator, &str, &DockerGuard, &Path) {
        (&self.l, &self.service, &self.guard, &self.spec)
    }
}

// The test hosts are shared with the end-to-end crate (tests/), which runs releases across them.
#[path = "../../../tests/src/testhosts.rs"]
mod testhosts;
pub use testhosts::TestHosts;

/// Debian's `docker-registry` (Distribution 2.8, `apt-get install docker-registry`) as plain
/// processes with basic auth, sharing one storage directory: one on 127.0.0.1, where the
/// machine's engine pushes (Docker allows plain HTTP to loopback registries, so the machine's
/// daemon needs no change), and one on 10.213.<i>.1, the machine side of test host i's veth,
/// where that host's engine pulls (ci/testhosts.sh starts test engines with
/// `--insecure-registry 10.213.0.0/16`). Both stop, and the storage goes, on drop.
pub struct Registry {
    pub port: u16,
    /// The address the test host pulls from: `10.213.<i>.1:port`.
    pub remote: String,
    /// A `docker --config` directory logged in to the loopback registry (the machine's pushes).
    pub docker_config: PathBuf,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Registry {
    pub const USER: &'static str = "haddock-ci";
    pub const PASSWORD: &'static str = "haddock-test-password";
    /// `USER:bcrypt(PASSWORD)` (Distribution's htpasswd takes bcrypt only; computed once with
    /// libxcrypt, so that the test needs no htpasswd tool).
    const HTPASSWD: &'static str =
        "haddock-ci:$2b$05$haddocktestsaltsaltsaew3QtTgYpzK/0FXlMxCWryt2K3xIeJDG\n";
    const BIN: &'static str = "/usr/bin/docker-registry";

    /// Starts the registry for test host `host` (which must be up: its veth carries the address).
    pub fn start(hosts: &TestHosts, host: u32) -> Registry {
        assert!(
            Path::new(Self::BIN).exists(),
            "{} not found: apt-get install docker-registry",
            Self::BIN
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("htpasswd"), Self::HTPASSWD).unwrap();
        // A free port on loopback; the veth address is fresh, so free there too.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let remote_ip = std::net::Ipv4Addr::new(10, 213, hosts.ip(host).octets()[2], 1);
        let mut children = Vec::new();
        for (name, ip) in [
            ("loopback", "127.0.0.1".to_string()),
            ("veth", remote_ip.to_string()),
        ] {
            let config = dir.path().join(format!("{name}.yml"));
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\nhttp:\n  addr: {ip}:{port}\n  secret: haddock-test-registry\nauth:\n  htpasswd:\n    realm: haddock-test\n    path: {htpasswd}\n",
                    data = dir.path().join("data").display(),
                    htpasswd = dir.path().join("htpasswd").display(),
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            children.push(
                Command::new(Self::BIN)
                    .arg("serve")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .expect("docker-registry starts"),
            );
        }
        let docker_config = dir.path().join("docker");
        std::fs::create_dir_all(&docker_config).unwrap();
        let registry = Registry {
            port,
            remote: format!("{remote_ip}:{port}"),
            docker_config,
            children,
            dir,
        };
        for addr in [format!("127.0.0.1:{port}"), registry.remote.clone()] {
            eventually_blocking(
                &format!("docker-registry on {addr}"),
                Duration::from_secs(10),
                || std::net::TcpStream::connect(&addr).is_ok(),
            );
        }
        let mut login = Command::new("docker")
            .arg("--config")
            .arg(&registry.docker_config)
            .args([
                "login",
                "-u",
                Self::USER,
                "--password-stdin",
                &registry.local(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = login.stdin.take().unwrap();
            stdin.write_all(Self::PASSWORD.as_bytes()).unwrap();
        }
        let out = login.wait_with_output().unwrap();
        assert!(out.status.success(), "docker login: {}", text(&out));
        registry
    }

    /// The loopback address: `127.0.0.1:port`.
    pub fn local(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `image` (`repo:tag` on the machine's engine) as `repo:tag` in this registry, and
    /// removes the push's own tag from the machine again.
    pub fn push(&self, image: &str) {
        let pushed = format!("{}/{image}", self.local());
        let docker = |args: &[&str]| {
            run(Command::new("docker")
                .arg("--config")
                .arg(&self.docker_config)
                .args(args))
        };
        docker(&["tag", image, &pushed]);
        docker(&["push", "-q", &pushed]);
        docker(&["rmi", &pushed]);
    }

    /// A Docker config file directory (for `DOCKER_CONFIG`) holding `user:password` for the
    /// address the test host pulls from.
    pub fn config_for_remote(&self, user: &str, password: &str) -> PathBuf {
        use base64::Engine;
        let dir = self.dir.path().join("remote-config");
        std::fs::create_dir_all(&dir).unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        std::fs::write(
            dir.join("config.json"),
            format!(
                "{{\"auths\": {{\"{}\": {{\"auth\": \"{auth}\"}}}}}}",
                self.remote
            ),
        )
        .unwrap();
        dir
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
