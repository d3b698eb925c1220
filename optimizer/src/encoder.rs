//! The encoder: the CPU-heavy part of an ingest on every core, while the caller goes on
//! chunking. Each chunk is hashed (BLAKE3), pinned and looked up in the store, and when the
//! store lacks it, lz4-compressed and written (unsynced: the ingest's synced commit makes it
//! durable).
//!
//! An ingest hands its chunks over in order; they are cut into groups of about
//! [`GROUP_BYTES`], each group is encoded by one task of the CPU pool (rayon), and the groups
//! come back in the order they were pushed, so the ingest lists its chunks in order. At most
//! [`MAX_PENDING`] groups are on their way at a time: a PUT's memory stays bounded (a few MiB)
//! whatever its size.
//!
//! A task pins each chunk before it looks it up or writes it, the order the store's reclaim
//! rules rely on (see `store`): a chunk found present is not reclaimed before the commit
//! references it, and one written is never taken for an orphan. The pins are the ingest's: it
//! keeps one per distinct chunk and releases them when it ends. So that no pin outlives it, an
//! ingest dropped with groups on their way waits for them ([`Encoder::abandon`]) before it
//! releases its pins (on a blocking thread when it is dropped on a tokio worker).
//!
//! Measured against the inline ingest in docs/optimizer.md ("Benchmarks").

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;

use bytes::Bytes;

use crate::chunker;
use crate::error::{Error, Result};
use crate::manifest::{ChunkHash, ChunkRef};
use crate::store::{ChunkBatch, Store};

/// Bytes of chunks per task of the pool: large enough that a task's overhead (a few µs) is
/// noise, small enough that both cores get work from a 2 MiB object.
pub const GROUP_BYTES: usize = 1 << 20;

/// Groups on their way at once, per ingest.
pub const MAX_PENDING: usize = 4;

/// One group of chunks, encoded and stored.
pub struct Group {
    /// The group's chunks, in order.
    pub chunks: Vec<ChunkRef>,
    /// The distinct hashes of the group, each pinned once for the ingest.
    pub pinned: Vec<ChunkHash>,
    /// The chunks the task wrote, with their stored size in bytes.
    pub written: Vec<(ChunkHash, usize)>,
    /// Why the task stopped short, if it did (what it pinned and wrote is listed anyway, for
    /// the ingest to release and reclaim).
    pub error: Option<Error>,
}

/// The encoder of one ingest.
pub struct Encoder {
    store: Arc<Store>,
    group: Vec<Bytes>,
    group_bytes: usize,
    pending: VecDeque<Receiver<Group>>,
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

    /// Hands the next chunk over; returns the groups done so far, in order (perhaps none).
    /// Waits only while [`MAX_PENDING`] groups are already on their way.
    pub fn push(&mut self, data: Bytes) -> Result<Vec<Group>> {
        self.group_bytes += data.len();
        self.group.push(data);
        if self.group_bytes >= GROUP_BYTES {
            self.dispatch();
        }
        let mut out = Vec::new();
        while self.pending.len() > MAX_PENDING {
            out.push(self.wait_front()?);
        }
        while let Some(front) = self.pending.front() {
            match front.try_recv() {
                Ok(done) => {
                    self.pending.pop_front();
                    out.push(done);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(lost()),
            }
        }
        Ok(out)
    }

    /// Every group not returned yet, in order, once done.
    pub fn finish(&mut self) -> Result<Vec<Group>> {
        self.dispatch();
        let mut out = Vec::new();
        while !self.pending.is_empty() {
            out.push(self.wait_front()?);
        }
        Ok(out)
    }

    /// The groups on their way, for an ingest that ends without a commit: the chunks not
    /// dispatched yet are dropped (nothing pinned them).
    pub fn abandon(&mut self) -> Pending {
        self.group.clear();
        Pending(self.pending.drain(..).collect())
    }

    fn wait_front(&mut self) -> Result<Group> {
        let front = self.pending.pop_front().ok_or_else(lost)?;
        front.recv().map_err(|_| lost())
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
            let done = encode(&store, group);
            // Let go before the answer, so that once every group is back no task holds the
            // store: a caller dropping its last handle then closes the database at once (the
            // benchmark closes one store per round and removes its files).
            drop(store);
            // The ingest waits for every group it sent, even when it is dropped.
            let _ = tx.send(done);
        });
        self.pending.push_back(rx);
    }
}

/// The task of one group: hash, pin, look up, compress and write what the store lacks.
fn encode(store: &Store, data: Vec<Bytes>) -> Group {
    let chunks: Vec<ChunkRef> = data
        .iter()
        .map(|d| ChunkRef {
            hash: ChunkHash::of(d),
            len: d.len() as u32,
        })
        .collect();
    let mut distinct = HashSet::with_capacity(chunks.len());
    let firsts: Vec<(ChunkHash, &Bytes)> = chunks
        .iter()
        .zip(&data)
        .filter(|(c, _)| distinct.insert(c.hash))
        .map(|(c, d)| (c.hash, d))
        .collect();
    let pinned: Vec<ChunkHash> = firsts.iter().map(|(h, _)| *h).collect();
    // Pinned first, then looked up and written: see the module's documentation.
    store.pin(&pinned);
    let mut group = Group {
        chunks,
        pinned,
        written: Vec::new(),
        error: None,
    };
    group.error = store_missing(store, &firsts, &mut group.written).err();
    group
}

/// Compresses and writes the chunks of `firsts` the store lacks (already pinned), listing each
/// in `written` before its write.
fn store_missing(
    store: &Store,
    firsts: &[(ChunkHash, &Bytes)],
    written: &mut Vec<(ChunkHash, usize)>,
) -> Result<()> {
    let mut batch = ChunkBatch::default();
    // One output buffer for the group's chunks: the batch copies each stored form anyway.
    let mut buf = Vec::new();
    for (hash, data) in firsts {
        if store.has_chunk(hash)? {
            continue;
        }
        let stored = chunker::encode_into(data, &mut buf);
        written.push((*hash, stored.len()));
        batch.put(store, *hash, stored)?;
    }
    batch.flush(store)
}

/// Groups on their way of an abandoned ingest.
pub struct Pending(Vec<Receiver<Group>>);

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The groups, once done.
    pub fn wait(self) -> Vec<Group> {
        self.0.into_iter().filter_map(|rx| rx.recv().ok()).collect()
    }
}

/// A task that ended without sending its group: unreachable while rayon aborts the process on
/// a panic in a spawned task (its default, which this crate keeps).
fn lost() -> Error {
    Error::Internal("an encoding task ended without an answer".into())
}
