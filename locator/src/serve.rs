//! `locator serve`: wires tokens, a store, the sweeper and the HTTP server together.

use crate::auth::{Tokens, TokensError};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::server::{self, ServerConfig};
use crate::store::embedded::{self, EmbeddedStore};
use crate::store::postgres::{self, PostgresStore};
use crate::store::{spawn_sweeper, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The flags of `locator serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Embedded store directory (also where a generated deploy token is kept).
    pub data_dir: Option<PathBuf>,
    /// With a database URL the PostgreSQL store is used instead of the embedded one.
    pub database_url: Option<String>,
    pub tokens: Option<PathBuf>,
    pub heartbeat_ttl: Duration,
    /// How often a service's session sums are published on a report (see
    /// [`crate::state::LOAD_PUBLISH_MS`]).
    pub load_publish: Duration,
    /// See [`ServerConfig::header_read_timeout`] and the defaults in [`server`].
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Why the locator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("tokens: {0}")]
    Tokens(#[from] TokensError),
    #[error("store: {0}")]
    Store(#[from] Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// `$XDG_STATE_HOME/haddock-locator`, else `./locator-data`.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("haddock-locator"),
        _ => PathBuf::from("locator-data"),
    }
}

/// Runs until SIGINT or SIGTERM. Every acknowledged write is already durable, so stopping
/// needs no flush.
pub async fn run(options: ServeOptions) -> Result<(), StartError> {
    let data_dir = options.data_dir.clone().unwrap_or_else(default_data_dir);
    let (tokens, generated) = Tokens::load(
        options.tokens.as_deref(),
        |k| std::env::var(k).ok(),
        &data_dir,
    )?;
    if let Some(path) = generated {
        tracing::info!(path = %path.display(), "using the generated deploy token");
    }
    let metrics = Arc::new(Metrics::new());
    match &options.database_url {
        None => {
            let opts = embedded::Options {
                heartbeat_ttl: options.heartbeat_ttl,
                load_publish: options.load_publish,
                ..Default::default()
            };
            let store = EmbeddedStore::open(&data_dir, opts, metrics).await?;
            serve(Arc::new(store), tokens, &options).await
        }
        Some(url) => {
            let opts = postgres::Options {
                heartbeat_ttl: options.heartbeat_ttl,
                load_publish: options.load_publish,
                ..Default::default()
            };
            let store = PostgresStore::connect(url, opts, metrics).await?;
            serve(Arc::new(store), tokens, &options).await
        }
    }
}

async fn serve<S: Store>(
    store: Arc<S>,
    tokens: Tokens,
    options: &ServeOptions,
) -> Result<(), StartError> {
    // Sweep often enough that a silent instance is demoted within ~TTL + TTL/4.
    let every =
        (options.heartbeat_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let _sweeper = spawn_sweeper(&store, every);
    if let Some(limit) = crate::connections::open_files_limit() {
        // The store, the database connections and the runtime need descriptors too.
        if options.max_connections as u64 + 64 > limit {
            tracing::warn!(
                max_connections = options.max_connections,
                open_files_limit = limit,
                "--max-connections is near or above the open-files limit: a flood fails \
                 accepts before it is shed; raise `ulimit -n` or lower --max-connections"
            );
        }
    }
    let config = ServerConfig {
        header_read_timeout: options.header_read_timeout,
        body_read_timeout: options.body_read_timeout,
        idle_timeout: options.idle_timeout,
        max_connections: options.max_connections,
        ..ServerConfig::new(tokens)
    };
    let server = server::bind(options.listen, store, config)
        .await
        .map_err(|source| StartError::Bind {
            addr: options.listen,
            source,
        })?;
    tracing::info!(addr = %server.addr, "locator listening");
    shutdown_signal().await;
    tracing::info!("stopping");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
