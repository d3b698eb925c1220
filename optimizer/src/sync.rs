//! WAN sync: pulling an object from a peer optimizer, transferring only the chunks we lack.

use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::manifest::{ChunkHash, Manifest};
use crate::store::{check_upload, IngestReport, Store};

/// Chunk downloads in flight per pull: enough to hide a WAN round trip behind transfers.
const PARALLEL_FETCHES: usize = 8;

/// The answer to `POST /v1/objects/{key}/pull`.
#[derive(Debug, Serialize)]
pub struct PullReport {
    #[serde(flatten)]
    pub ingest: IngestReport,
    pub peer: String,
    pub chunks_transferred: usize,
    /// Chunk bytes (stored form) that crossed the network, manifest excluded.
    pub bytes_transferred: u64,
    /// `bytes_transferred / size`: what the transfer cost relative to the object.
    pub transfer_ratio: f64,
}

/// Checks a `from=` peer URL and returns it without a trailing slash.
pub fn peer_base(peer: &str) -> Result<String> {
    let url = reqwest::Url::parse(peer)
        .map_err(|e| Error::BadRequest(format!("peer URL {peer:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(Error::BadRequest(format!(
            "peer URL {peer:?} must be http(s)://host[:port]"
        )));
    }
    Ok(peer.trim_end_matches('/').to_owned())
}

fn unreachable(peer: &str, e: &reqwest::Error) -> Error {
    // reqwest's Display hides the cause ("error sending request"); the chain says why.
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    Error::PeerUnreachable {
        peer: peer.to_owned(),
        reason,
    }
}

async fn peer_error(peer: &str, resp: reqwest::Response) -> Error {
    let status = resp.status().as_u16();
    let message = resp.text().await.unwrap_or_default();
    Error::PeerError {
        peer: peer.to_owned(),
        status,
        message,
    }
}

/// Fetches the manifest of `key` from `peer`.
pub async fn fetch_manifest(client: &reqwest::Client, peer: &str, key: &str) -> Result<Manifest> {
    let resp = client
        .get(format!("{peer}/v1/objects/{key}/manifest"))
        .send()
        .await
        .map_err(|e| unreachable(peer, &e))?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Err(Error::NotFound(format!("object {key} on peer {peer}")));
    }
    if !resp.status().is_success() {
        return Err(peer_error(peer, resp).await);
    }
    let manifest: Manifest = resp.json().await.map_err(|e| Error::PeerError {
        peer: peer.to_owned(),
        status: 200,
        message: format!("unreadable manifest: {e}"),
    })?;
    manifest.validate()?;
    Ok(manifest)
}

async fn fetch_chunk(
    client: &reqwest::Client,
    peer: &str,
    hash: ChunkHash,
) -> Result<(ChunkHash, Vec<u8>)> {
    let resp = client
        .get(format!("{peer}/v1/chunks/{hash}"))
        .send()
        .await
        .map_err(|e| unreachable(peer, &e))?;
    if !resp.status().is_success() {
        return Err(peer_error(peer, resp).await);
    }
    let stored = resp.bytes().await.map_err(|e| unreachable(peer, &e))?;
    // Never trust the wire: the chunk must decode and hash to what the manifest says.
    check_upload(&hash, &stored).map_err(|e| Error::PeerError {
        peer: peer.to_owned(),
        status: 200,
        message: format!("sent a chunk that fails verification: {e}"),
    })?;
    Ok((hash, stored.to_vec()))
}

/// Pulls `key` from `peer` into `store` (the writer): fetches the manifest, downloads the
/// chunks the store lacks, and commits the object like a PUT.
pub async fn pull(
    client: &reqwest::Client,
    store: &Arc<Store>,
    key: &str,
    peer: &str,
) -> Result<PullReport> {
    let manifest = fetch_manifest(client, peer, key).await?;
    let mut ingest = store.begin_ingest()?;
    let mut wanted = Vec::new();
    for c in &manifest.chunks {
        if ingest.reference(c.clone())? {
            wanted.push(c.hash);
        }
    }
    let mut fetches =
        futures_util::stream::iter(wanted.into_iter().map(|h| fetch_chunk(client, peer, h)))
            .buffer_unordered(PARALLEL_FETCHES);
    let (mut chunks_transferred, mut bytes_transferred) = (0, 0u64);
    while let Some((hash, stored)) = fetches.try_next().await? {
        chunks_transferred += 1;
        bytes_transferred += stored.len() as u64;
        ingest.supply(hash, stored)?;
    }
    drop(fetches);
    // The digest is derived here from the chunk list, like every ingest's; it equals the
    // peer's unless the peer stored the object with a version before 2026-11.
    let key_owned = key.to_owned();
    let report = tokio::task::spawn_blocking(move || ingest.commit(&key_owned))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let transfer_ratio = if report.size == 0 {
        0.0
    } else {
        bytes_transferred as f64 / report.size as f64
    };
    Ok(PullReport {
        ingest: report,
        peer: peer.to_owned(),
        chunks_transferred,
        bytes_transferred,
        transfer_ratio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls() {
        assert_eq!(peer_base("http://a:1/").unwrap(), "http://a:1");
        assert!(peer_base("ftp://a").is_err());
        assert!(peer_base("nonsense").is_err());
    }
}
