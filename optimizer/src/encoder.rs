//! The encoder: the CPU-heavy part of an ingest (BLAKE3 of each chunk, the store's existence
//! lookup, lz4 of the chunks the store lacks) on every core, while the caller goes on chunking.
//!
//! An ingest hands its chunks over in order; they are cut into groups of about
//! [`GROUP_BYTES`], each group is encoded by one task of the CPU pool (rayon), and the encoded
//! chunks come back in the order they were pushed, so the ingest references, pins and writes
//! them exactly as it did inline. At most [`MAX_PENDING`] groups are on their way at a time:
//! a PUT's memory stays bounded (a few MiB) whatever its size.
//!
//! Measured against the inline ingest in docs/optimizer.md ("Benchmarks").

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;

use bytes::Bytes;

use crate::chunker;
use crate::error::{Error, Result};
use crate::manifest::ChunkHash;
use crate::store::Store;

/// Bytes of chunks per task of the pool: large enough that a task's overhead (a few µs) is
/// noise, small enough that both cores get work from a 2 MiB object.
pub const GROUP_BYTES: usize = 1 << 20;

/// Groups on their way at once, per ingest.
pub const MAX_PENDING: usize = 4;

/// One chunk, encoded.
pub struct Encoded {
    pub hash: ChunkHash,
    /// The chunk's bytes (kept for the rare chunk that vanished between the lookup and the pin).
    pub data: Bytes,
    /// Its stored form, when the store lacked it at the lookup; `None` when it had it.
    pub stored: Option<Vec<u8>>,
}

type Group = Receiver<Result<Vec<Encoded>>>;

/// The encoder of one ingest.
pub struct Encoder {
    store: Arc<Store>,
    group: Vec<Bytes>,
    group_bytes: usize,
    pending: VecDeque<Group>,
}

impl Encoder {
    pub fn new(store: Arc<Store>) -> Encoder {
        Encoder {
            store,
            group: Vec::new(),
            group_bytes: 0,
            pending: VecDeque::new(),
        }
    }

    /// Hands the next chunk over; returns the chunks encoded so far, in order (perhaps none).
    /// Waits only while [`MAX_PENDING`] groups are already on their way.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Encoded>> {
        self.group.push(Bytes::copy_from_slice(data));
        self.group_bytes += data.len();
        if self.group_bytes >= GROUP_BYTES {
            self.dispatch();
        }
        let mut out = Vec::new();
        while self.pending.len() > MAX_PENDING {
            out.extend(self.wait_front()?);
        }
        while let Some(front) = self.pending.front() {
            match front.try_recv() {
                Ok(done) => {
                    self.pending.pop_front();
                    out.extend(done?);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(lost()),
            }
        }
        Ok(out)
    }

    /// Every chunk not returned yet, in order, once encoded.
    pub fn finish(&mut self) -> Result<Vec<Encoded>> {
        self.dispatch();
        let mut out = Vec::new();
        while !self.pending.is_empty() {
            out.extend(self.wait_front()?);
        }
        Ok(out)
    }

    fn wait_front(&mut self) -> Result<Vec<Encoded>> {
        let front = self.pending.pop_front().ok_or_else(lost)?;
        front.recv().map_err(|_| lost())?
    }

    fn dispatch(&mut self) {
        if self.group.is_empty() {
            return;
        }
        let group = std::mem::take(&mut self.group);
        self.group_bytes = 0;
        let store = self.store.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        rayon::spawn(move || {
            let encoded = group
                .into_iter()
                .map(|data| {
                    let hash = ChunkHash::of(&data);
                    let stored = if store.has_chunk(&hash)? {
                        None
                    } else {
                        Some(chunker::encode(&data))
                    };
                    Ok(Encoded { hash, data, stored })
                })
                .collect();
            // The ingest may be gone (its client hung up): nobody to tell.
            let _ = tx.send(encoded);
        });
        self.pending.push_back(rx);
    }
}

fn lost() -> Error {
    Error::Internal("an encoding task ended without an answer".into())
}
