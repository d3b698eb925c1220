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
        } => runtime.block_on(locator::serve::run(locator::serve::ServeOptions {
            listen,
            data_dir,
            database_url,
            tokens,
            heartbeat_ttl,
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
    }
    Ok(())
}
