//! `locator`: see the library documentation; this file only parses flags.

use clap::{Parser, Subcommand};
use locator::logging::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "locator", version, about = "Haddock's service locator")]
struct Cli {
    /// Log format (logs go to stderr; RUST_LOG filters, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the API.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// Embedded store directory [default: $XDG_STATE_HOME/haddock-locator or ./locator-data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Use PostgreSQL (postgres://…) instead of the embedded store.
        #[arg(long, env = "LOCATOR_DATABASE_URL")]
        database_url: Option<String>,
        /// TOML file: deploy = ["…"], read = ["…"], proxy = ["…"].
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// An instance not heard from for this long becomes unhealthy.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        heartbeat_ttl: Duration,
        /// A service's session sums are published on a proxy's report at most this often (the
        /// sweep publishes the ones in between within a second); 0: on every report.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        load_publish_interval: Duration,
        /// A request head must arrive within this of the accept (or of its first byte after an
        /// idle period), else the connection is closed.
        #[arg(long, default_value = "10s", value_parser = positive_duration)]
        header_read_timeout: Duration,
        /// A request body must arrive within this of its head, else 408.
        #[arg(long, default_value = "30s", value_parser = positive_duration)]
        body_read_timeout: Duration,
        /// A keep-alive connection with no request for this long is closed (watch streams are
        /// never idle).
        #[arg(long, default_value = "60s", value_parser = positive_duration)]
        idle_timeout: Duration,
        /// Connections beyond this many get a 503 and are closed at once (at most 1 000 000:
        /// far beyond any descriptor limit, and within what a semaphore can count).
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        max_connections: u64,
    },
    /// Measure watch latency (embedded and PostgreSQL) and snapshot reads/s; prints figures.
    Bench {
        #[arg(long, default_value_t = 10)]
        watchers: usize,
        #[arg(long, default_value_t = 500)]
        changes: usize,
        /// Pause between two changes.
        #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value_t = 4)]
        readers: usize,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        read_time: Duration,
        /// Skip the PostgreSQL part (needs the PostgreSQL server binaries).
        #[arg(long)]
        no_postgres: bool,
    },
    /// Simulate P proxies and I instances around a locator process; print where it saturates
    /// (before/after per-service watches and batched heartbeats, in one run).
    Scale {
        /// Proxies (comma-separated list: one run each).
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        proxies: Vec<usize>,
        /// Instances (comma-separated list: one run each).
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        instances: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        services: usize,
        #[arg(long, default_value = "5s", value_parser = positive_duration)]
        window: Duration,
        #[arg(long, default_value_t = 10)]
        changes: usize,
        /// Run the locator on PostgreSQL instead of the embedded store: a scratch database
        /// per run is created on this server (the URL's user must be allowed to) and dropped.
        #[arg(long)]
        database_url: Option<String>,
        /// Locator replicas on that database (proxies, agents and watchers spread over them).
        #[arg(long, default_value_t = 1, requires = "database_url")]
        replicas: usize,
        /// Only the `after` configuration (the `before` one saturates at large P and I).
        #[arg(long, conflicts_with = "only_before")]
        only_after: bool,
        /// Only the `before` configuration (the baseline).
        #[arg(long)]
        only_before: bool,
    },
}

/// A duration above zero: a zero timeout would close every connection at once.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    locator::logging::init(cli.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Cmd::Serve {
            listen,
            data_dir,
            database_url,
            tokens,
            heartbeat_ttl,
            load_publish_interval,
            header_read_timeout,
            body_read_timeout,
            idle_timeout,
            max_connections,
        } => runtime.block_on(locator::serve::run(locator::serve::ServeOptions {
            listen,
            data_dir,
            database_url,
            tokens,
            heartbeat_ttl,
            load_publish: load_publish_interval,
            header_read_timeout,
            body_read_timeout,
            idle_timeout,
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        }))?,
        Cmd::Bench {
            watchers,
            changes,
            interval,
            readers,
            read_time,
            no_postgres,
        } => {
            let report = runtime.block_on(locator::bench::run(locator::bench::BenchOptions {
                watchers,
                changes,
                interval,
                readers,
                read_time,
                postgres: !no_postgres,
            }));
            print!("{report}");
        }
        Cmd::Scale {
            proxies,
            instances,
            services,
            window,
            changes,
            database_url,
            replicas,
            only_after,
            only_before,
        } => {
            let report = runtime.block_on(locator::scale::run(locator::scale::ScaleOptions {
                proxies,
                instances,
                services,
                window,
                changes,
                database_url,
                replicas,
                before: !only_after,
                after: !only_before,
            }));
            print!("{report}");
        }
    }
    Ok(())
}
