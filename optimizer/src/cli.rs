//! Command line: `serve`, `health` (for Docker's HEALTHCHECK in an image with no shell),
//! `handover` (run by haddock inside an old container, see `Volume::hand_over`) and `bench`. `main.rs` only parses and calls `run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use crate::auth::{self, WriteToken};
use crate::bench::{self, BenchConfig};
use crate::chunker::ChunkParams;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::peers::{self, Discovery, Peers};
use crate::server::{self, App, ServerConfig};
use crate::store::StoreOptions;
use crate::volume::{Volume, VolumeConfig};

#[derive(Debug, Parser)]
#[command(
    name = "optimizer",
    version,
    about = "Haddock's WAN optimizer: a deduplicating object store over HTTP"
)]
pub struct Cli {
    /// Log format (logs go to stderr; RUST_LOG filters, default info).
    #[arg(long, global = true, value_enum, env = "OPTIMIZER_LOG_FORMAT", default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log events are written to stderr: the same flag and output as the Haddock programs
/// (`locator::logging`), repeated here because the optimizer depends on no Haddock crate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (for machines).
    Json,
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Pretty,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Pretty => logs.init(),
    }
}

// Parsed once per process: the size of the largest variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API from a cache directory (shareable with other instances).
    Serve(ServeArgs),
    /// Exit 0 when the local instance is ready, 1 otherwise.
    Health(HealthArgs),
    /// Ask the local instance to hand the cache volume's writer role over to other instances
    /// of the volume (what haddock runs in an old container once the new ones take all new
    /// sessions). Exit 0 when it answered (handed over, or it was not the writer), 1 otherwise.
    Handover(HandoverArgs),
    /// Print throughput, dedup and memory figures on synthetic data.
    Bench(BenchArgs),
}

fn duration(s: &str) -> std::result::Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, env = "OPTIMIZER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Cache directory (the shared volume).
    #[arg(long, env = "OPTIMIZER_CACHE", default_value = "/cache")]
    pub cache: PathBuf,
    /// Unique per running instance; default `<hostname>-<pid>`.
    #[arg(long, env = "OPTIMIZER_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// URL other instances reach this one at; default `http://<hostname>:<port>`.
    #[arg(long, env = "OPTIMIZER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Version answered at /version (the image bakes its tag in here).
    #[arg(long, env = "OPTIMIZER_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    pub version_label: String,
    /// Largest object a PUT (or a pull) may store. Bodies are streamed on the writer and on a
    /// forwarding reader alike, so this bounds disk use, not memory.
    #[arg(long, env = "OPTIMIZER_MAX_BODY_BYTES", default_value_t = 1 << 30)]
    pub max_body_bytes: u64,
    #[arg(long, env = "OPTIMIZER_CHUNK_MIN", default_value_t = 4096)]
    pub chunk_min: u32,
    #[arg(long, env = "OPTIMIZER_CHUNK_AVG", default_value_t = 16384)]
    pub chunk_avg: u32,
    #[arg(long, env = "OPTIMIZER_CHUNK_MAX", default_value_t = 65536)]
    pub chunk_max: u32,
    /// RocksDB block cache for manifests, reference counts, index and filter blocks (chunk
    /// data bypasses it; the OS page cache serves hot chunks).
    #[arg(long, env = "OPTIMIZER_BLOCK_CACHE_BYTES", default_value_t = 64 << 20)]
    pub block_cache_bytes: usize,
    /// Time given to in-flight requests after SIGTERM.
    #[arg(long, env = "OPTIMIZER_GRACE", default_value = "30s", value_parser = duration)]
    pub grace: Duration,
    /// Background catch-up period of a reader (misses always catch up at once).
    #[arg(long, env = "OPTIMIZER_CATCH_UP_INTERVAL", default_value = "100ms", value_parser = duration)]
    pub catch_up_interval: Duration,
    /// How often a reader tries to become the writer.
    #[arg(long, env = "OPTIMIZER_TAKEOVER_INTERVAL", default_value = "250ms", value_parser = duration)]
    pub takeover_interval: Duration,
    /// How long a chunk stays readable after the last object using it was overwritten or
    /// deleted: a GET that started before (on any instance) must finish within it.
    #[arg(long, env = "OPTIMIZER_RECLAIM_GRACE", default_value = "5m", value_parser = duration)]
    pub reclaim_grace: Duration,
    /// How long a reader retries forwarding a mutation while no writer answers.
    #[arg(long, env = "OPTIMIZER_FORWARD_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub forward_timeout: Duration,
    /// File holding the write token, the bearer credential of every mutation (object PUT and
    /// DELETE, chunk uploads, pulls); a trailing newline is ignored. Or set the token itself in
    /// OPTIMIZER_WRITE_TOKEN (never a flag: argv is readable by every local user). Without
    /// either, `serve` refuses to start unless --allow-anonymous-writes is given.
    #[arg(long, env = "OPTIMIZER_WRITE_TOKEN_FILE")]
    pub write_token_file: Option<PathBuf>,
    /// Accept mutations without a credential (logged loudly at startup). Only for an instance
    /// no untrusted client can reach.
    #[arg(long, env = "OPTIMIZER_ALLOW_ANONYMOUS_WRITES")]
    pub allow_anonymous_writes: bool,
    /// A peer optimizer pulls may fetch from, as its base URL (repeatable; comma-separated in
    /// the environment variable). A pull's `from=` must name one of them; none: pulls are off.
    #[arg(long = "peer", env = "OPTIMIZER_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// The locator to discover peers from: the ready or draining instances of --service on
    /// other Docker hosts than --docker-host, whose caches a local miss reads through. Its
    /// `read` token, if it wants one, is taken from OPTIMIZER_LOCATOR_TOKEN (never a flag).
    #[arg(long, env = "OPTIMIZER_LOCATOR")]
    pub locator: Option<String>,
    /// The service this instance belongs to in the locator (haddock sets HADDOCK_SERVICE in
    /// every container); needed with --locator.
    #[arg(long, env = "HADDOCK_SERVICE")]
    pub service: Option<String>,
    /// The Docker host this instance runs on, as the locator records it (haddock sets
    /// HADDOCK_HOST): its instances share our cache volume, so they are not peers.
    #[arg(long, env = "HADDOCK_HOST")]
    pub docker_host: Option<String>,
    /// How often the peers are listed from the locator.
    #[arg(long, env = "OPTIMIZER_PEER_REFRESH", default_value = "2s", value_parser = duration)]
    pub peer_refresh: Duration,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Full URL to probe; default `http://127.0.0.1:<port of --listen>/readyz`.
    #[arg(long, env = "OPTIMIZER_HEALTH_URL")]
    pub url: Option<String>,
    #[arg(long, env = "OPTIMIZER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "3s", value_parser = duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct HandoverArgs {
    /// Instance ids that may take the writer role, comma-separated (readers of the same volume).
    #[arg(long, value_delimiter = ',', required = true)]
    pub to: Vec<String>,
    /// The local instance's listen address; the request goes to `127.0.0.1:<its port>`.
    #[arg(long, env = "OPTIMIZER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The write token's file, as for `serve` (or OPTIMIZER_WRITE_TOKEN).
    #[arg(long, env = "OPTIMIZER_WRITE_TOKEN_FILE")]
    pub write_token_file: Option<PathBuf>,
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Size of the synthetic dataset (1 MiB to 64 GiB).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub size_mib: u64,
    /// Average chunk size to measure (min and max are a quarter and four times it).
    #[arg(long, default_value_t = ChunkParams::default().avg)]
    pub chunk_avg: u32,
    #[arg(long, default_value_t = 64 << 20)]
    pub block_cache_bytes: usize,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    init_logs(cli.log_format);
    match cli.command {
        Command::Serve(args) => {
            // Reads FAILPOINTS; a no-op unless built with the `failpoints` feature.
            let _scenario = fail::FailScenario::setup();
            tokio::runtime::Runtime::new()?.block_on(serve(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Health(args) => {
            let url = args
                .url
                .unwrap_or_else(|| format!("http://127.0.0.1:{}/readyz", args.listen.port()));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let ok = rt.block_on(async {
                let client = reqwest::Client::builder()
                    .timeout(args.timeout)
                    .build()
                    .ok()?;
                let resp = client.get(&url).send().await.ok()?;
                Some(resp.status().is_success())
            });
            if ok == Some(true) {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("not healthy: {url}");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Handover(args) => handover(args),
        Command::Bench(args) => {
            let params = ChunkParams {
                min: args.chunk_avg / 4,
                avg: args.chunk_avg,
                max: args.chunk_avg.saturating_mul(4),
            };
            params.validate()?;
            let report = bench::run(&BenchConfig {
                params,
                size_mib: args.size_mib as usize,
                block_cache_bytes: args.block_cache_bytes,
            })?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `optimizer handover`: POST /v1/volume/handover to the local instance; its answer on stdout.
fn handover(args: HandoverArgs) -> Result<ExitCode> {
    let token = WriteToken::from_file_or_env(args.write_token_file.as_deref())?;
    let url = format!("http://127.0.0.1:{}/v1/volume/handover", args.listen.port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = rt.block_on(async {
        let client = reqwest::Client::builder().timeout(args.timeout).build()?;
        let mut req = client
            .post(&url)
            .json(&serde_json::json!({ "to": args.to }));
        if let Some(t) = &token {
            req = req.header(http::header::AUTHORIZATION, t.bearer());
        }
        let resp = req.send().await?;
        let status = resp.status();
        Ok::<_, reqwest::Error>((status, resp.text().await?))
    });
    match answer {
        Ok((status, body)) if status.is_success() => {
            println!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        Ok((status, body)) => {
            eprintln!("hand-over refused by {url}: {status} {body}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("hand-over: {url}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Serves until SIGTERM or SIGINT, then drains, flushes and returns.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let chunk_params = ChunkParams {
        min: args.chunk_min,
        avg: args.chunk_avg,
        max: args.chunk_max,
    };
    chunk_params.validate()?;
    // Configuration problems stop the start, before anything listens.
    let write_token = WriteToken::from_file_or_env(args.write_token_file.as_deref())?.map(Arc::new);
    match (&write_token, args.allow_anonymous_writes) {
        (None, false) => {
            return Err(Error::Config(format!(
                "no write token: set {} or --write-token-file (or pass \
                 --allow-anonymous-writes on a network no untrusted client reaches)",
                auth::TOKEN_ENV
            )))
        }
        (None, true) => tracing::warn!(
            "ANONYMOUS WRITES ALLOWED: anyone who reaches this instance can store, overwrite \
             and delete objects (--allow-anonymous-writes)"
        ),
        (Some(_), true) => {
            tracing::info!("--allow-anonymous-writes ignored: a write token is configured")
        }
        (Some(_), false) => {}
    }
    let peers = Peers::new(&args.peers)?;
    let locator = match args.locator.as_deref() {
        None => None,
        Some(url) => {
            reqwest::Url::parse(url)
                .map_err(|e| Error::Config(format!("--locator {url:?}: {e}")))?;
            let service = args
                .service
                .clone()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    Error::Config(
                        "--locator needs --service (or HADDOCK_SERVICE): the service whose \
                         instances are the peers"
                            .into(),
                    )
                })?;
            if args.peer_refresh.is_zero() {
                return Err(Error::Config("--peer-refresh must be more than 0".into()));
            }
            if args.docker_host.as_deref().unwrap_or_default().is_empty() {
                tracing::warn!(
                    "--locator without --docker-host (HADDOCK_HOST): the instances of this \
                     host, which share our cache, are taken for peers too (useless round trips)"
                );
            }
            Some((url.to_owned(), service))
        }
    };
    // Before anything on the volume is touched: a volume a newer, incompatible version wrote
    // is refused here, whole, and haddock's health gate then fails the release.
    let format = crate::format::Marker::new(&args.cache).check()?;
    tracing::info!(volume = ?format, writes = crate::format::FORMAT, "cache volume format");
    std::fs::create_dir_all(&args.cache)?;
    let listener = crate::server::listen(args.listen)?;
    let local = listener.local_addr()?;
    let instance_id = args
        .instance_id
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    if instance_id.is_empty() || instance_id.contains(['/', '\\']) || instance_id.starts_with('.') {
        return Err(Error::BadRequest(format!(
            "instance id {instance_id:?} must be usable as a directory name"
        )));
    }
    let advertise = args
        .advertise
        .unwrap_or_else(|| format!("http://{}:{}", hostname(), local.port()));
    let volume = Volume::new(VolumeConfig {
        cache_dir: args.cache.clone(),
        instance_id: instance_id.clone(),
        advertise: advertise.clone(),
        store: StoreOptions {
            block_cache_bytes: args.block_cache_bytes,
            chunk_params,
            reclaim_grace: args.reclaim_grace,
        },
        catch_up_interval: args.catch_up_interval,
        takeover_interval: args.takeover_interval,
        forward_timeout: args.forward_timeout,
        write_token: write_token.clone(),
    });
    let discovery = locator.map(|(url, service)| Discovery {
        locator: locator_wire::client::Client::new(
            &url,
            std::env::var(peers::LOCATOR_TOKEN_ENV)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
        ),
        service,
        own_host: args.docker_host.clone().unwrap_or_default(),
        own_id: instance_id.clone(),
        every: args.peer_refresh,
    });
    let peers = match discovery {
        Some(d) => peers.discovering(d),
        None => peers,
    };
    let app = App::new(
        volume.clone(),
        Arc::new(Metrics::new()),
        ServerConfig {
            max_body_bytes: args.max_body_bytes,
            version: args.version_label.clone(),
            instance_id: instance_id.clone(),
            write_token,
            peers: peers.clone(),
        },
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    // Shares its list with the server's `peers` (a clone), stopped with the server.
    let discover = tokio::spawn(peers.discover(stop_rx.clone()));
    let maintain = tokio::spawn(volume.clone().maintain(stop_rx));
    // Machine-readable first line of stdout: tests and scripts read the bound address here.
    println!("optimizer listening on http://{local}");
    tracing::info!(%local, %advertise, instance = %instance_id, version = %args.version_label, cache = %args.cache.display(), "serving");
    server::run(listener, app, shutdown_signal(), args.grace).await;
    let _ = stop_tx.send(true);
    let _ = maintain.await;
    let _ = discover.await;
    tokio::task::spawn_blocking(move || volume.close())
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> std::result::Result<ServeArgs, clap::Error> {
        let argv = ["optimizer", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn peers_repeat_and_anonymous_writes_are_off_by_default() {
        let a = serve(&["--peer", "http://a:1", "--peer", "http://b:2"]).unwrap();
        assert_eq!(a.peers, ["http://a:1", "http://b:2"]);
        assert!(!a.allow_anonymous_writes);
        assert!(serve(&[]).unwrap().peers.is_empty());
        assert!(
            serve(&["--allow-anonymous-writes"])
                .unwrap()
                .allow_anonymous_writes
        );
    }

    #[test]
    fn locator_discovery_flags() {
        let d = serve(&[
            "--locator",
            "http://locator:7070",
            "--service",
            "optimizer",
            "--docker-host",
            "tcp://h1:2376",
        ])
        .unwrap();
        assert_eq!(d.locator.as_deref(), Some("http://locator:7070"));
        assert_eq!(d.service.as_deref(), Some("optimizer"));
        assert_eq!(d.docker_host.as_deref(), Some("tcp://h1:2376"));
        assert_eq!(d.peer_refresh, Duration::from_secs(2));
        let refresh = serve(&["--peer-refresh", "500ms"]).unwrap().peer_refresh;
        assert_eq!(refresh, Duration::from_millis(500));
    }

    #[tokio::test]
    async fn locator_without_service_stops_the_start() {
        let args = serve(&[
            "--allow-anonymous-writes",
            "--locator",
            "http://locator:7070",
        ]);
        // HADDOCK_SERVICE may be set where the tests run.
        let args = ServeArgs {
            service: None,
            ..args.unwrap()
        };
        let err = super::serve(args).await.unwrap_err();
        assert_eq!(err.code(), "config");
        assert!(err.to_string().contains("--service"), "{err}");
    }

    #[test]
    fn reclaim_grace_is_a_duration_and_defaults_to_five_minutes() {
        assert_eq!(serve(&[]).unwrap().reclaim_grace, Duration::from_secs(300));
        let grace = serve(&["--reclaim-grace", "90s"]).unwrap().reclaim_grace;
        assert_eq!(grace, Duration::from_secs(90));
        for bad in ["soon", "5 parsecs", ""] {
            let err = serve(&["--reclaim-grace", bad]).unwrap_err().to_string();
            assert!(err.contains("--reclaim-grace"), "{bad:?}: {err}");
        }
    }
}
