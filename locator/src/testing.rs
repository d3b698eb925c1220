//! Test helpers shared by this crate's tests, the benchmark and the end-to-end tests:
//! a real PostgreSQL server in a temp dir, an in-process locator on a real socket, and an
//! `eventually` poller (tests wait for conditions, never for fixed times).

use crate::auth::{Role, Tokens};
use crate::client::Client;
use crate::metrics::Metrics;
use crate::server::{self, RunningServer, ServerConfig};
use crate::store::embedded::{self, EmbeddedStore};
use crate::store::postgres::{self, PostgresStore};
use crate::store::{spawn_sweeper, Store};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

pub const DEPLOY_TOKEN: &str = "test-deploy-token";
pub const READ_TOKEN: &str = "test-read-token";
pub const PROXY_TOKEN: &str = "test-proxy-token";

/// One token per role (the constants above).
pub fn tokens() -> Tokens {
    Tokens::new()
        .with(Role::Deploy, DEPLOY_TOKEN)
        .with(Role::Read, READ_TOKEN)
        .with(Role::Proxy, PROXY_TOKEN)
}

pub use locator_wire::testing::eventually;

/// A locator served in-process on 127.0.0.1 (a random port), with [`tokens`].
pub struct TestLocator<S: Store> {
    pub store: Arc<S>,
    pub server: RunningServer,
    pub url: String,
    /// The embedded store's directory (kept alive with the locator).
    pub dir: Option<tempfile::TempDir>,
    _sweeper: tokio::task::JoinHandle<()>,
}

impl<S: Store> TestLocator<S> {
    pub async fn serve(store: Arc<S>, dir: Option<tempfile::TempDir>) -> Self {
        Self::serve_with(store, dir, ServerConfig::new(tokens())).await
    }

    /// Like [`TestLocator::serve`] with the given HTTP settings (short timeouts, a low cap).
    pub async fn serve_with(
        store: Arc<S>,
        dir: Option<tempfile::TempDir>,
        config: ServerConfig,
    ) -> Self {
        let sweeper = spawn_sweeper(&store, Duration::from_millis(100));
        let addr = "127.0.0.1:0".parse().expect("an address");
        let server = server::bind(addr, store.clone(), config)
            .await
            .expect("bind 127.0.0.1:0");
        let url = format!("http://{}", server.addr);
        TestLocator {
            store,
            server,
            url,
            dir,
            _sweeper: sweeper,
        }
    }

    pub fn client(&self, token: &str) -> Client {
        Client::new(&self.url, Some(token.to_string()))
    }

    pub fn deploy(&self) -> Client {
        self.client(DEPLOY_TOKEN)
    }
}

impl<S: Store> Drop for TestLocator<S> {
    fn drop(&mut self) {
        self._sweeper.abort();
    }
}

/// An embedded-store locator in a fresh temp dir, with the given heartbeat TTL.
pub async fn embedded(heartbeat_ttl: Duration) -> TestLocator<EmbeddedStore> {
    embedded_with(heartbeat_ttl, |_| {}).await
}

/// [`embedded`] with HTTP settings changed by `configure` (from [`ServerConfig::new`]).
pub async fn embedded_with(
    heartbeat_ttl: Duration,
    configure: impl FnOnce(&mut ServerConfig),
) -> TestLocator<EmbeddedStore> {
    let mut config = ServerConfig::new(tokens());
    configure(&mut config);
    let dir = tempfile::tempdir().expect("a temp dir");
    let options = embedded::Options {
        heartbeat_ttl,
        ..Default::default()
    };
    let store = EmbeddedStore::open(dir.path(), options, Arc::new(Metrics::new()))
        .await
        .expect("open the embedded store");
    TestLocator::serve_with(Arc::new(store), Some(dir), config).await
}

/// A PostgreSQL-store locator (one replica) on `url`.
pub async fn postgres(url: &str, heartbeat_ttl: Duration) -> TestLocator<PostgresStore> {
    let options = postgres::Options {
        heartbeat_ttl,
        ..Default::default()
    };
    let store = PostgresStore::connect(url, options, Arc::new(Metrics::new()))
        .await
        .expect("connect the PostgreSQL store");
    TestLocator::serve(Arc::new(store), None).await
}

/// A throw-away PostgreSQL server: initdb in a temp dir, started on a free port, stopped on
/// drop. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user.
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Postgres {
    /// Starts a server with fsync off (tests).
    pub fn start() -> Postgres {
        Self::start_with(false)
    }

    /// Starts a server. Panics with instructions when PostgreSQL is not installed: tests that
    /// need it must fail, never skip.
    pub fn start_with(fsync: bool) -> Postgres {
        let bin = find_postgres_bin().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries not found (looked for /usr/lib/postgresql/*/bin/initdb \
                 and $LOCATOR_PG_BIN). Install them: `apt-get install -y postgresql`"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("locator-pg-")
            .tempdir()
            .expect("a temp dir");
        let as_postgres = is_root();
        if as_postgres {
            let (uid, gid) =
                postgres_user().expect("a `postgres` system user (from the postgresql package)");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the temp dir");
        }
        let data = dir.path().join("data");
        let port = free_port();
        let pg = Postgres {
            data: data.clone(),
            bin,
            port,
            as_postgres,
            _dir: dir,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let sock = pg.data.parent().map(path).unwrap_or("/tmp").to_string();
        let opts = format!(
            "-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=200",
            if fsync { "on" } else { "off" }
        );
        let log = pg
            .data
            .parent()
            .map(|d| d.join("postgres.log"))
            .unwrap_or_default();
        pg.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-l",
                path(&log),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        );
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast: every connection is cut) and starts it again with the same
    /// options, as an operator's restart would.
    pub fn restart(&self) {
        let log = self
            .data
            .parent()
            .map(|d| d.join("postgres.log"))
            .unwrap_or_default();
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&self.data),
                "-l",
                path(&log),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ],
        );
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(self.data.with_file_name("postgres.log"))
                .unwrap_or_default();
            panic!(
                "{tool} failed: {}\n{}\n{}\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", path(&self.data), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn find_postgres_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LOCATOR_PG_BIN") {
        let p = PathBuf::from(p);
        return p.join("initdb").exists().then_some(p);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
