//! WAN sync: pulling an object from a peer optimizer (one of `peers`), transferring only the
//! chunks we lack.

use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};

use serde::Serialize;

use crate::chunker;
use crate::error::{task_failed, Error, Result};
use crate::manifest::{ChunkHash, ChunkRef, Manifest};
use crate::store::{check_upload, IngestReport, Store};

/// Largest stored chunk accepted from a peer: lz4's worst case of the largest chunk FastCDC
/// makes, plus the header (the limit of a chunk upload too).
pub const MAX_STORED_CHUNK: usize = chunker::MAX_CHUNK + chunker::MAX_CHUNK / 255 + 64;

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

/// Largest manifest accepted from a peer: about 180 000 chunk references, the chunk list of a
/// 1 GiB object at 4 KiB minimum chunks with room to spare, and nothing a 256 MiB container
/// cannot hold while it parses one.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

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

/// A peer's unexpected answer. Its body is not read, let alone copied: it would reach our
/// client, making the pull a way to read whatever the peer answers.
fn peer_error(peer: &str, status: reqwest::StatusCode, message: &str) -> Error {
    Error::PeerError {
        peer: peer.to_owned(),
        status: status.as_u16(),
        message: message.to_owned(),
    }
}

/// Reads a peer's answer, at most `limit` bytes.
async fn read_limited(peer: &str, mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>> {
    let status = resp.status();
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(peer_error(
            peer,
            status,
            &format!("answer larger than {limit} bytes"),
        ));
    }
    let mut out = Vec::new();
    while let Some(piece) = resp.chunk().await.map_err(|e| unreachable(peer, &e))? {
        if out.len() + piece.len() > limit {
            return Err(peer_error(
                peer,
                status,
                &format!("answer larger than {limit} bytes"),
            ));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// Fetches the manifest of `key` from `peer` and checks it (see [`Manifest::validate`]).
pub async fn fetch_manifest(
    client: &reqwest::Client,
    peer: &str,
    key: &str,
    max_size: u64,
) -> Result<Manifest> {
    let resp = client
        .get(format!("{peer}/v1/objects/{key}/manifest"))
        .send()
        .await
        .map_err(|e| unreachable(peer, &e))?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(Error::NotFound(format!("object {key} on peer {peer}")));
    }
    if !status.is_success() {
        // Redirects included: the client follows none (a peer could point it anywhere).
        return Err(peer_error(peer, status, "unexpected status for a manifest"));
    }
    let body = read_limited(peer, resp, MAX_MANIFEST_BYTES).await?;
    let manifest: Manifest = serde_json::from_slice(&body)
        .map_err(|e| peer_error(peer, status, &format!("unreadable manifest: {e}")))?;
    manifest
        .validate(chunker::MAX_CHUNK as u32, max_size)
        .map_err(|e| match e {
            Error::BadRequest(why) => peer_error(peer, status, &why),
            other => other,
        })?;
    Ok(manifest)
}

async fn fetch_chunk(
    client: &reqwest::Client,
    peer: &str,
    chunk: ChunkRef,
) -> Result<(ChunkHash, Vec<u8>)> {
    let hash = chunk.hash;
    let resp = client
        .get(format!("{peer}/v1/chunks/{hash}"))
        .send()
        .await
        .map_err(|e| unreachable(peer, &e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(peer_error(
            peer,
            status,
            &format!("unexpected status for chunk {hash}"),
        ));
    }
    let stored = read_limited(peer, resp, MAX_STORED_CHUNK).await?;
    // Never trust the wire: the chunk must decode, hash to what the manifest says, and be as
    // long as the manifest says.
    let data = check_upload(&hash, &stored).map_err(|e| {
        peer_error(
            peer,
            status,
            &format!("sent a chunk that fails verification: {e}"),
        )
    })?;
    if data.len() != chunk.len as usize {
        return Err(peer_error(
            peer,
            status,
            &format!(
                "chunk {hash} has {} bytes where its manifest says {}",
                data.len(),
                chunk.len
            ),
        ));
    }
    Ok((hash, stored))
}

/// Pulls `key` from `peer` into `store` (the writer): fetches the manifest, downloads the
/// chunks the store lacks, checks the lengths of those it has, and commits the object like a
/// PUT. `max_size` is the limit of a PUT. Nothing is visible before every check passed.
pub async fn pull(
    client: &reqwest::Client,
    store: &Arc<Store>,
    key: &str,
    peer: &str,
    max_size: u64,
) -> Result<PullReport> {
    let manifest = fetch_manifest(client, peer, key, max_size).await?;
    // Kept as the peer stored it, if it is one we would have stored ourselves.
    let content_type =
        crate::manifest::content_type(manifest.content_type.as_deref().map(str::as_bytes))
            .map_err(|e| Error::PeerError {
                peer: peer.to_owned(),
                status: 200,
                message: format!("manifest of {key}: {e}"),
            })?;
    let mut ingest = store.begin_ingest()?;
    let mut wanted = Vec::new();
    let mut held = Vec::new();
    for c in &manifest.chunks {
        if ingest.reference(c.clone())? {
            wanted.push(c.clone());
        } else {
            held.push(c.clone());
        }
    }
    // A chunk we hold has the length its hash fixed when it was stored; the manifest must
    // agree (one length per hash is checked by `validate`, so the first sight is enough).
    let (s, peer_owned) = (store.clone(), peer.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut checked = std::collections::HashSet::new();
        for c in held {
            if !checked.insert(c.hash) {
                continue;
            }
            match s.chunk_len(&c.hash)? {
                Some(len) if len != c.len as usize => {
                    return Err(Error::PeerError {
                        peer: peer_owned,
                        status: 200,
                        message: format!(
                            "manifest says chunk {} has {} bytes, it has {len}",
                            c.hash, c.len
                        ),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    })
    .await
    .map_err(task_failed)??;
    let mut fetches =
        futures_util::stream::iter(wanted.into_iter().map(|c| fetch_chunk(client, peer, c)))
            .buffer_unordered(PARALLEL_FETCHES);
    let (mut chunks_transferred, mut bytes_transferred) = (0, 0u64);
    while let Some((hash, stored)) = fetches.try_next().await? {
        chunks_transferred += 1;
        bytes_transferred += stored.len() as u64;
        ingest.supply(hash, stored)?;
    }
    drop(fetches);
    // The digest was checked against the chunk list (`validate`), and every chunk against its
    // hash and length: the committed object is exactly the one the peer listed.
    let key_owned = key.to_owned();
    let report = tokio::task::spawn_blocking(move || ingest.commit(&key_owned, content_type))
        .await
        .map_err(task_failed)??;
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
