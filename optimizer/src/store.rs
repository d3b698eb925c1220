//! The chunk store: RocksDB with three column families, reference counts, and the rules that
//! keep them consistent.
//!
//! - `chunks`: chunk hash → stored form (codec flag byte, then raw or lz4 bytes);
//! - `manifests`: object key → manifest JSON;
//! - `refs`: chunk hash → number of objects referencing it (u64 LE), and the *reclaim queue*:
//!   `gy:` + chunk hash → when the chunk lost its last reference (unix ms, u64 LE).
//!
//! A chunk whose last reference goes away is not deleted at once: it is queued and reclaimed by
//! [`Store::reap`] only after the reclaim grace. A GET that read a manifest just before an
//! overwrite or DELETE — on the writer, or on a reader whose view is up to one catch-up
//! old — therefore still finds every chunk of the version it started with, instead of failing
//! half-way with `missing_chunk`. (The queue lives in `refs`, not in a column family of its own,
//! so that older and newer versions of the optimizer can open each other's volume.)
//!
//! A manifest and the reference-count changes it implies are written in one synced
//! `WriteBatch`, so an object is either wholly visible with durable chunks or not at all.
//! Chunks are written ahead of that batch (unsynced; the final synced write makes the WAL
//! durable up to and including them). A chunk with no `refs` entry is an orphan left by an
//! aborted or killed ingest, or uploaded by `PUT /v1/chunks/{hash}`; `sweep_orphans` reclaims them
//! when an instance becomes the writer (those no manifest ever referenced, so no reader needs
//! them; queued chunks are left to the reaper).
//!
//! Only the writer mutates. Every reference-count read-modify-write and every chunk deletion
//! happens under one mutex that also guards the *pins*: hashes an in-flight ingest relies on.
//! An ingest pins a hash before checking whether the chunk exists or writing it (on the CPU
//! pool, `encoder`, or inline), and deletion skips pinned chunks, so a chunk an ingest decided
//! not to upload is never reclaimed under it, nor one it wrote taken for an orphan.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};
use serde::Serialize;

use crate::chunker::{self, ChunkParams};
use crate::encoder::{Encoder, Group, Pending};
use crate::error::{Error, Result};
use crate::manifest::{ChunkHash, ChunkRef, Manifest};

const CF_CHUNKS: &str = "chunks";
const CF_MANIFESTS: &str = "manifests";
const CF_REFS: &str = "refs";
const CFS: [&str; 3] = [CF_CHUNKS, CF_MANIFESTS, CF_REFS];
/// Prefix of reclaim-queue keys in `refs` (reference-count keys are bare 32-byte hashes).
const QUEUED: &[u8] = b"gy:";
const QUEUED_KEY_LEN: usize = QUEUED.len() + 32;
/// Chunks of an ingest are written in batches of about this many bytes: small enough for the
/// batch to stay in cache (a 4 MiB one was regrown and page-faulted per object), large enough
/// that the per-write cost of the WAL is spread over a dozen chunks.
const CHUNK_BATCH_BYTES: usize = 256 << 10;
/// Catch-ups a reader tries on a miss before the miss stands. RocksDB's catch-up is best
/// effort: one that overlaps a flush of the writer reads the MANIFEST before the flush's edit,
/// lists the WAL the flush made obsolete, finds it deleted by the time it opens it, and
/// reports success having seen neither (`TryCatchUpWithPrimary` treats a purged WAL as OK). An
/// object the writer acknowledged was then a 404 for a moment (the hand-over flushes the
/// writer right after the pull it waited for). The flush writes its MANIFEST edit before it
/// deletes the WAL, so a second catch-up, begun after the first ended, sees the table file.
const MISS_CATCH_UPS: usize = 2;

/// Tuning of the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// RocksDB block cache shared by all column families, in bytes: manifests, reference
    /// counts, index and filter blocks (chunk data is read past it, see `chunk_reads`).
    pub block_cache_bytes: usize,
    pub chunk_params: ChunkParams,
    /// How long a chunk stays readable after its last reference went away.
    pub reclaim_grace: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            block_cache_bytes: 64 << 20,
            chunk_params: ChunkParams::default(),
            reclaim_grace: Duration::from_secs(300),
        }
    }
}

/// What an ingest (PUT or pull) did, as answered to the client.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct IngestReport {
    pub key: String,
    pub size: u64,
    pub digest: String,
    pub chunks: usize,
    pub new_chunks: usize,
    /// Bytes of chunk data actually added to the store (compressed form).
    pub stored_bytes: u64,
}

/// Size figures of the store, for `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStats {
    /// Bytes of the chunk column family on disk and in memtables.
    pub chunk_bytes: u64,
    pub chunk_count_estimate: u64,
    pub object_count_estimate: u64,
}

/// An open chunk store, as the writer (primary) or as a reader (secondary).
pub struct Store {
    db: DB,
    writer: bool,
    params: ChunkParams,
    reclaim_grace: Duration,
    /// Pin counts of in-flight ingests; the mutex also serialises all ref-count changes.
    pins: Mutex<HashMap<ChunkHash, u32>>,
    // Kept alive for as long as the DB uses it.
    _cache: Cache,
}

fn options(opts: &StoreOptions, writer: bool) -> (Options, Vec<ColumnFamilyDescriptor>, Cache) {
    let cache = Cache::new_lru_cache(opts.block_cache_bytes);
    let mut db = Options::default();
    db.create_if_missing(writer);
    db.create_missing_column_families(writer);
    // Secondaries must keep every table file open: the primary deletes compacted files and an
    // open descriptor is what keeps them readable until the next catch-up.
    db.set_max_open_files(-1);
    db.set_keep_log_file_num(4);
    db.set_db_write_buffer_size(64 << 20);
    // Not `atomic_flush`, though one flush of all column families would shorten a hand-over's
    // last flush (8-13 ms to 3.7-3.9 ms, measured in stop 28): a secondary of an atomic-flush
    // database can stop installing new versions for good, serving stale data, when a MANIFEST
    // rotation races a compaction (facebook/rocksdb#14439), and every writer's open rotates the
    // MANIFEST while our readers are secondaries.
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_bloom_filter(10.0, false);
    let cfs = CFS
        .iter()
        .map(|name| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            // Chunks are already lz4-compressed (or incompressible); don't compress twice.
            o.set_compression_type(if *name == CF_CHUNKS {
                rocksdb::DBCompressionType::None
            } else {
                rocksdb::DBCompressionType::Lz4
            });
            ColumnFamilyDescriptor::new(*name, o)
        })
        .collect();
    (db, cfs, cache)
}

/// Read options for chunk data: past the block cache. A chunk (~14 KiB stored) fills a block
/// of its own, so caching chunks only churns the cache and evicts the manifests, counts, index
/// and filter blocks it is for; the OS page cache keeps the table files' hot pages anyway.
/// Measured (`optimizer bench`, eight alternating rounds): a restore 1054-1293 MB/s with this
/// vs 1066-1155 through the cache, and repeated restores of the same data no slower
/// (1387-1390 vs 1370-1382 MB/s).
fn chunk_reads() -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.fill_cache(false);
    ro
}

impl Store {
    /// Opens (creating if needed) the database as its single writer. Fails with a lock error
    /// while another process holds it.
    pub fn open_writer(path: &Path, opts: &StoreOptions) -> Result<Store> {
        let (db_opts, cfs, cache) = options(opts, true);
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        Ok(Store::new(db, true, opts, cache))
    }

    /// Opens an existing database as a secondary (read-only, catches up with the writer).
    pub fn open_reader(path: &Path, secondary: &Path, opts: &StoreOptions) -> Result<Store> {
        let (db_opts, cfs, cache) = options(opts, false);
        let db = DB::open_cf_descriptors_as_secondary(&db_opts, path, secondary, cfs)?;
        Ok(Store::new(db, false, opts, cache))
    }

    fn new(db: DB, writer: bool, opts: &StoreOptions, cache: Cache) -> Store {
        Store {
            db,
            writer,
            params: opts.chunk_params,
            reclaim_grace: opts.reclaim_grace,
            pins: Mutex::default(),
            _cache: cache,
        }
    }

    pub fn is_writer(&self) -> bool {
        self.writer
    }

    pub fn chunk_params(&self) -> ChunkParams {
        self.params
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    fn lock_pins(&self) -> MutexGuard<'_, HashMap<ChunkHash, u32>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters more than losing the process, so poisoning is ignored.
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins `hashes` (each once) for an ingest, which releases them when it ends.
    pub(crate) fn pin(&self, hashes: &[ChunkHash]) {
        let mut pins = self.lock_pins();
        for h in hashes {
            *pins.entry(*h).or_insert(0) += 1;
        }
    }

    /// Replays what the writer has written since the last catch-up (no-op on the writer).
    ///
    /// Best effort, as RocksDB documents it: see [`MISS_CATCH_UPS`].
    pub fn catch_up(&self) -> Result<()> {
        if !self.writer {
            self.db.try_catch_up_with_primary()?;
        }
        Ok(())
    }

    /// Runs `read`; on a reader, when it finds nothing, catches up with the writer and runs it
    /// again (up to [`MISS_CATCH_UPS`] times), so that anything the writer acknowledged before
    /// this call is found.
    fn read_fresh<T>(&self, read: impl Fn(&Self) -> Result<Option<T>>) -> Result<Option<T>> {
        let mut found = read(self)?;
        let mut catch_ups = 0;
        while found.is_none() && !self.writer && catch_ups < MISS_CATCH_UPS {
            self.catch_up()?;
            catch_ups += 1;
            found = read(self)?;
        }
        Ok(found)
    }

    /// The manifest of `key`, if stored.
    pub fn manifest(&self, key: &str) -> Result<Option<Manifest>> {
        self.read_fresh(|s| s.manifest_here(key))
    }

    /// The manifest of `key` as this store holds it now, without catching up with the writer
    /// on a miss (see [`Store::manifest`]): one point read.
    pub fn manifest_here(&self, key: &str) -> Result<Option<Manifest>> {
        match self.db.get_pinned_cf(self.cf(CF_MANIFESTS), key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Internal(format!("manifest of {key} unreadable: {e}"))),
        }
    }

    /// The stored form of a chunk (codec flag + data), unverified.
    pub fn stored_chunk(&self, hash: &ChunkHash) -> Result<Option<Vec<u8>>> {
        self.read_fresh(|s| Ok(s.db.get_cf_opt(s.cf(CF_CHUNKS), hash.0, &chunk_reads())?))
    }

    /// The uncompressed data of a chunk, verified against its hash (tests; reads go by group).
    #[cfg(test)]
    pub fn chunk(&self, hash: &ChunkHash) -> Result<Bytes> {
        let mut one = self.chunks(std::slice::from_ref(hash))?;
        Ok(one.pop().expect("one chunk asked, one returned"))
    }

    /// The bytes of one read group of an object made of `chunks` (see
    /// [`Manifest::read_groups`]): each piece `(chunk index, offset, length)` cut from its
    /// verified chunk, all chunks fetched with one batched lookup.
    pub fn pieces(
        &self,
        chunks: &[ChunkRef],
        group: &[(usize, usize, usize)],
    ) -> Result<Vec<Bytes>> {
        let hashes: Vec<ChunkHash> = group.iter().map(|&(i, _, _)| chunks[i].hash).collect();
        cut(chunks, group, self.chunks(&hashes)?)
    }

    /// [`Store::pieces`] from what this store holds now, without catching up with the writer:
    /// `None` when a chunk is not here (yet). On a reader a read may still wait for a catch-up
    /// in progress (RocksDB's DB mutex), so only the writer's reads run on the async threads.
    pub fn pieces_here(
        &self,
        chunks: &[ChunkRef],
        group: &[(usize, usize, usize)],
    ) -> Result<Option<Vec<Bytes>>> {
        let hashes: Vec<ChunkHash> = group.iter().map(|&(i, _, _)| chunks[i].hash).collect();
        match self
            .chunks_local(&hashes)?
            .into_iter()
            .collect::<Option<Vec<Bytes>>>()
        {
            Some(found) => cut(chunks, group, found).map(Some),
            None => Ok(None),
        }
    }

    /// The uncompressed length of a stored chunk (from its header), `None` if it is absent.
    pub fn chunk_len(&self, hash: &ChunkHash) -> Result<Option<usize>> {
        let Some(stored) = self.db.get_pinned_cf(self.cf(CF_CHUNKS), hash.0)? else {
            return Ok(None);
        };
        chunker::decoded_len(&stored)
            .map(Some)
            .ok_or_else(|| Error::CorruptChunk {
                hash: hash.to_string(),
                reason: "no codec header".into(),
            })
    }

    /// The uncompressed data of several chunks, in order, each verified against its hash: one
    /// batched RocksDB lookup for the lot (a GET reads its object in groups of about 1 MiB).
    fn chunks(&self, hashes: &[ChunkHash]) -> Result<Vec<Bytes>> {
        let mut found = self.chunks_local(hashes)?;
        let mut catch_ups = 0;
        while !self.writer && found.iter().any(Option::is_none) && catch_ups < MISS_CATCH_UPS {
            self.catch_up()?;
            catch_ups += 1;
            let missing: Vec<usize> = (0..hashes.len()).filter(|&i| found[i].is_none()).collect();
            let again =
                self.chunks_local(&missing.iter().map(|&i| hashes[i]).collect::<Vec<_>>())?;
            for (i, chunk) in missing.into_iter().zip(again) {
                found[i] = chunk;
            }
        }
        found
            .into_iter()
            .zip(hashes)
            .map(|(chunk, h)| chunk.ok_or_else(|| Error::MissingChunk(h.to_string())))
            .collect()
    }

    fn chunks_local(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<Bytes>>> {
        // Decoded straight from RocksDB's pinned blocks: no copy of the stored forms.
        self.db
            .batched_multi_get_cf_opt(
                self.cf(CF_CHUNKS),
                hashes.iter().map(|h| &h.0),
                false,
                &chunk_reads(),
            )
            .into_iter()
            .zip(hashes)
            .map(|(stored, h)| match stored? {
                Some(stored) => chunker::decode_verified(h, &stored).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    pub(crate) fn has_chunk(&self, hash: &ChunkHash) -> Result<bool> {
        // A referenced chunk is stored (chunks are deleted only at count zero), and its count
        // is 8 bytes in a small, cached block, where reading the chunk itself loads its 16 KiB
        // block: this halved the cost of ingesting data already stored.
        if self.refcount(hash)? > 0 {
            return Ok(true);
        }
        let cf = self.cf(CF_CHUNKS);
        Ok(self.db.key_may_exist_cf(cf, hash.0) && self.db.get_pinned_cf(cf, hash.0)?.is_some())
    }

    /// The hashes among `hashes` this store does not hold.
    pub fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>> {
        let scan = |s: &Self| -> Result<Vec<ChunkHash>> {
            let mut out = Vec::new();
            for h in hashes {
                if !s.has_chunk(h)? {
                    out.push(*h);
                }
            }
            Ok(out)
        };
        // One catch-up, not MISS_CATCH_UPS: a chunk reported missing that a second catch-up
        // would have found costs its sender only a chunk sent again, and most asks here have
        // chunks really missing, for which every catch-up is a rescan of the lot.
        let missing = scan(self)?;
        if missing.is_empty() || self.writer {
            return Ok(missing);
        }
        self.catch_up()?;
        scan(self)
    }

    fn refcount(&self, hash: &ChunkHash) -> Result<u64> {
        Ok(match self.db.get_pinned_cf(self.cf(CF_REFS), hash.0)? {
            Some(v) => u64::from_le_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| Error::Internal(format!("bad refcount of {hash}")))?,
            ),
            None => 0,
        })
    }

    fn require_writer(&self) -> Result<()> {
        if self.writer {
            Ok(())
        } else {
            Err(Error::NotWriter)
        }
    }

    /// Starts ingesting one object (writer only).
    pub fn begin_ingest(self: &Arc<Self>) -> Result<Ingest> {
        self.require_writer()?;
        Ok(Ingest {
            encoder: Encoder::new(self.clone()),
            store: self.clone(),
            held: Held::default(),
            batch: ChunkBatch::default(),
            chunks: Vec::new(),
            new_chunks: 0,
            stored_bytes: 0,
            committed: false,
        })
    }

    /// Stores a chunk uploaded in stored form (`PUT /v1/chunks/{hash}`) after checking that it
    /// decodes to data hashing to `hash`. Returns whether it was new.
    pub fn put_stored_chunk(&self, hash: &ChunkHash, stored: &[u8]) -> Result<bool> {
        self.require_writer()?;
        check_upload(hash, stored)?;
        let _guard = self.lock_pins();
        if self.has_chunk(hash)? {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_CHUNKS), hash.0, stored);
        self.db.write_opt(batch, &synced())?;
        Ok(true)
    }

    /// Deletes an object and reclaims the chunks nothing references any more.
    /// Returns false when there was no such object.
    pub fn delete(&self, key: &str) -> Result<bool> {
        self.require_writer()?;
        let pins = self.lock_pins();
        let Some(old) = self.manifest_here(key)? else {
            return Ok(false);
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_MANIFESTS), key);
        let deltas = unique(&old.chunks).map(|h| (h, -1)).collect();
        self.apply_refcounts(&mut batch, deltas, &pins, SystemTime::now())?;
        self.db.write_opt(batch, &synced())?;
        Ok(true)
    }

    /// Adds the reference-count changes `deltas` to `batch`: a chunk that loses its last
    /// reference joins the reclaim queue (stamped `now`), one that gains its first leaves it.
    /// Caller holds the pins lock (`_pins` proves it), which serialises every count change.
    fn apply_refcounts(
        &self,
        batch: &mut WriteBatch,
        deltas: HashMap<ChunkHash, i64>,
        _pins: &HashMap<ChunkHash, u32>,
        now: SystemTime,
    ) -> Result<()> {
        let refs = self.cf(CF_REFS);
        for (hash, delta) in deltas {
            if delta == 0 {
                continue;
            }
            let before = self.refcount(&hash)? as i64;
            let count = before + delta;
            if count > 0 {
                batch.put_cf(refs, hash.0, (count as u64).to_le_bytes());
                if before == 0 {
                    // Usually nothing is queued (a new chunk); a tombstone is cheaper than a
                    // lookup per chunk.
                    batch.delete_cf(refs, queued_key(&hash));
                }
            } else {
                batch.delete_cf(refs, hash.0);
                batch.put_cf(refs, queued_key(&hash), unix_ms(now).to_le_bytes());
            }
        }
        Ok(())
    }

    /// Deletes the queued chunks whose grace has run out by `now`, unless something references
    /// or pins them again. Run periodically by the writer. Returns how many it deleted.
    pub fn reap(&self, now: SystemTime) -> Result<usize> {
        self.require_writer()?;
        let refs = self.cf(CF_REFS);
        let due_before = unix_ms(now).saturating_sub(self.reclaim_grace.as_millis() as u64);
        let mut due = Vec::new();
        let iter = self.db.iterator_cf(
            refs,
            IteratorMode::From(QUEUED, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(QUEUED) {
                break;
            }
            // A bare 32-byte count key can start with the prefix bytes by chance.
            let (Some(hash), Ok(since)) = (
                k.strip_prefix(QUEUED)
                    .and_then(|h| <[u8; 32]>::try_from(h).ok()),
                <[u8; 8]>::try_from(v.as_ref()),
            ) else {
                continue;
            };
            if u64::from_le_bytes(since) <= due_before {
                due.push(ChunkHash(hash));
            }
        }
        // A pinned chunk is about to be referenced by an ingest, whose commit dequeues it.
        self.delete_unpinned(&due, |h, batch| {
            batch.delete_cf(refs, queued_key(h));
            Ok(self.refcount(h)? == 0)
        })
    }

    /// Deletes each chunk of `hashes` that no ingest has pinned and for which `decide` (which
    /// may add its own writes to the batch) says yes. Works in groups under the pins lock, so
    /// that every chunk deletion is serialised with pinning and count changes. Returns how
    /// many it deleted.
    fn delete_unpinned(
        &self,
        hashes: &[ChunkHash],
        mut decide: impl FnMut(&ChunkHash, &mut WriteBatch) -> Result<bool>,
    ) -> Result<usize> {
        let mut deleted = 0;
        for group in hashes.chunks(1024) {
            let pins = self.lock_pins();
            let mut batch = WriteBatch::default();
            for h in group {
                if !pins.contains_key(h) && decide(h, &mut batch)? {
                    batch.delete_cf(self.cf(CF_CHUNKS), h.0);
                    deleted += 1;
                }
            }
            self.db.write(batch)?;
        }
        Ok(deleted)
    }

    fn is_queued(&self, hash: &ChunkHash) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_REFS), queued_key(hash))?
            .is_some())
    }

    /// Reclaims chunks that no object references, no ingest has pinned and the reclaim queue
    /// does not hold: leftovers of ingests killed before their commit, never part of a stored
    /// object. Run when this instance becomes the writer.
    pub fn sweep_orphans(&self) -> Result<usize> {
        self.require_writer()?;
        let mut candidates = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (k, _) = item?;
            let hash = ChunkHash(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::Internal("bad chunk key".into()))?,
            );
            candidates.push(hash);
        }
        self.delete_unpinned(&candidates, |h, _| {
            Ok(self.refcount(h)? == 0 && !self.is_queued(h)?)
        })
    }

    /// Size figures from RocksDB's own properties.
    pub fn stats(&self) -> StoreStats {
        let prop = |cf: &str, name: &str| {
            self.db
                .property_int_value_cf(self.cf(cf), name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        StoreStats {
            chunk_bytes: prop(CF_CHUNKS, "rocksdb.total-sst-files-size")
                + prop(CF_CHUNKS, "rocksdb.cur-size-all-mem-tables"),
            chunk_count_estimate: prop(CF_CHUNKS, "rocksdb.estimate-num-keys"),
            object_count_estimate: prop(CF_MANIFESTS, "rocksdb.estimate-num-keys"),
        }
    }

    /// Makes everything durable in table files (clean shutdown of the writer).
    pub fn flush(&self) -> Result<()> {
        if self.writer {
            self.db.flush_wal(true)?;
            for cf in CFS {
                self.db.flush_cf(self.cf(cf))?;
            }
        }
        Ok(())
    }

    /// Test support: overwrites a stored chunk with other bytes, bypassing every check.
    #[doc(hidden)]
    pub fn corrupt_chunk_for_tests(&self, hash: &ChunkHash, stored: &[u8]) -> Result<()> {
        self.db.put_cf(self.cf(CF_CHUNKS), hash.0, stored)?;
        Ok(())
    }
}

/// The pieces `(chunk index, offset, length)` of a read group cut from their verified chunks.
fn cut(
    chunks: &[ChunkRef],
    group: &[(usize, usize, usize)],
    found: Vec<Bytes>,
) -> Result<Vec<Bytes>> {
    group
        .iter()
        .zip(found)
        .map(|(&(i, off, len), chunk)| {
            // A manifest that disagrees with its chunk is an error, never a panic (a slice
            // past the end) nor a silently truncated object.
            let listed = chunks[i].len as usize;
            if chunk.len() != listed || off.saturating_add(len) > listed {
                return Err(Error::CorruptChunk {
                    hash: chunks[i].hash.to_string(),
                    reason: format!(
                        "the chunk has {} bytes where the manifest says {listed}",
                        chunk.len()
                    ),
                });
            }
            Ok(chunk.slice(off..off + len))
        })
        .collect()
}

/// Releases one pin of `hash`.
fn unpin(pins: &mut HashMap<ChunkHash, u32>, hash: &ChunkHash) {
    if let Some(n) = pins.get_mut(hash) {
        *n -= 1;
        if *n == 0 {
            pins.remove(hash);
        }
    }
}

/// Chunks on their way to the `chunks` column family, written (unsynced) every
/// [`CHUNK_BATCH_BYTES`]: an ingest's commit, whose synced write makes them durable, comes
/// after every one of them.
#[derive(Default)]
pub(crate) struct ChunkBatch {
    batch: WriteBatch,
    bytes: usize,
}

impl ChunkBatch {
    pub(crate) fn put(&mut self, store: &Store, hash: ChunkHash, stored: &[u8]) -> Result<()> {
        self.bytes += stored.len();
        self.batch.put_cf(store.cf(CF_CHUNKS), hash.0, stored);
        if self.bytes >= CHUNK_BATCH_BYTES {
            self.flush(store)?;
        }
        Ok(())
    }

    /// Writes what is batched.
    pub(crate) fn flush(&mut self, store: &Store) -> Result<()> {
        if !self.batch.is_empty() {
            store.db.write(std::mem::take(&mut self.batch))?;
            self.bytes = 0;
        }
        Ok(())
    }
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

fn queued_key(hash: &ChunkHash) -> [u8; QUEUED_KEY_LEN] {
    let mut key = [0; QUEUED_KEY_LEN];
    key[..QUEUED.len()].copy_from_slice(QUEUED);
    key[QUEUED.len()..].copy_from_slice(&hash.0);
    key
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unique(chunks: &[ChunkRef]) -> impl Iterator<Item = ChunkHash> + '_ {
    let mut seen = HashSet::new();
    chunks
        .iter()
        .map(|c| c.hash)
        .filter(move |h| seen.insert(*h))
}

/// Checks a chunk received in stored form: it must decode, and hash to `hash`.
pub fn check_upload(hash: &ChunkHash, stored: &[u8]) -> Result<Bytes> {
    chunker::decode_verified(hash, stored).map_err(|e| match e {
        Error::CorruptChunk { reason, .. } if reason.contains("does not match") => {
            let actual = chunker::decode_unverified(stored)
                .map(|d| ChunkHash::of(&d).to_string())
                .unwrap_or_default();
            Error::HashMismatch {
                expected: hash.to_string(),
                actual,
            }
        }
        Error::CorruptChunk { reason, .. } => {
            Error::BadRequest(format!("undecodable chunk: {reason}"))
        }
        other => other,
    })
}

/// One object being ingested. Dropping it without `commit` releases its pins and reclaims the
/// chunks it wrote that nothing else uses.
pub struct Ingest {
    /// Hashes, pins, compresses and writes the chunks given to `add` on the CPU pool.
    encoder: Encoder,
    store: Arc<Store>,
    /// Its pins and the chunks it wrote.
    held: Held,
    /// Chunks `supply` gave, not written yet.
    batch: ChunkBatch,
    chunks: Vec<ChunkRef>,
    new_chunks: usize,
    stored_bytes: u64,
    committed: bool,
}

impl Ingest {
    /// Adds the next chunk of the object from its uncompressed data. It is hashed, pinned,
    /// looked up and, when new, compressed and written on the CPU pool (`Encoder`); it is
    /// listed, in order, once its group is done (at the latest by `commit`).
    pub fn add(&mut self, data: Bytes) -> Result<()> {
        let groups = self.encoder.push(data)?;
        self.take(groups)
    }

    /// Takes groups back from the encoder: their chunks, in order, their pins and their
    /// writes; then the first error a group met. Every group is adopted first, so that an
    /// error leaves no pin of a later group unowned.
    fn take(&mut self, groups: Vec<Group>) -> Result<()> {
        let mut first_error = None;
        for g in groups {
            let new = self.held.adopt(&self.store, &g.pinned, &g.written);
            self.count(new);
            self.chunks.extend(g.chunks);
            first_error = first_error.or(g.error);
        }
        first_error.map_or(Ok(()), Err)
    }

    fn count(&mut self, (chunks, bytes): (usize, u64)) {
        self.new_chunks += chunks;
        self.stored_bytes += bytes;
    }

    /// Appends a chunk reference and pins the hash the first time this ingest sees it;
    /// whether it was the first time.
    fn pin(&mut self, chunk: ChunkRef) -> bool {
        let hash = chunk.hash;
        self.chunks.push(chunk);
        if !self.held.pinned.insert(hash) {
            return false;
        }
        self.store.pin(&[hash]);
        true
    }

    /// Appends a chunk reference. Returns true when the store lacks the chunk and the caller
    /// must `supply` it (once per distinct hash).
    pub fn reference(&mut self, chunk: ChunkRef) -> Result<bool> {
        let hash = chunk.hash;
        if !self.pin(chunk) {
            return Ok(false);
        }
        // Pinned first, then looked up: once pinned, the chunk cannot be reclaimed under us
        // (every reclaim checks the pins and deletes under the pins lock, which `pin` took).
        let exists = self.store.has_chunk(&hash)?;
        Ok(!exists)
    }

    /// Supplies the stored form of a chunk that `reference` reported missing.
    pub fn supply(&mut self, hash: ChunkHash, stored: Vec<u8>) -> Result<()> {
        let new = self.held.adopt(&self.store, &[], &[(hash, stored.len())]);
        self.count(new);
        self.batch.put(&self.store, hash, &stored)
    }

    /// Writes the manifest (with the object's digest, derived from its chunk list) and
    /// reference counts (replacing any previous object under `key`) together with the
    /// remaining chunks in one synced batch. Once this returns, the object survives a crash;
    /// before, none of it is visible.
    pub fn commit(mut self, key: &str, content_type: Option<String>) -> Result<IngestReport> {
        let groups = self.encoder.finish()?;
        self.take(groups)?;
        let chunks = std::mem::take(&mut self.chunks);
        let manifest = Manifest::new(chunks, content_type);
        let json = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
        let store = self.store.clone();
        let mut batch = std::mem::take(&mut self.batch).batch;
        {
            let pins = store.lock_pins();
            let mut deltas: HashMap<ChunkHash, i64> =
                unique(&manifest.chunks).map(|h| (h, 1)).collect();
            if let Some(old) = store.manifest_here(key)? {
                for h in unique(&old.chunks) {
                    *deltas.entry(h).or_insert(0) -= 1;
                }
            }
            store.apply_refcounts(&mut batch, deltas, &pins, SystemTime::now())?;
            batch.put_cf(store.cf(CF_MANIFESTS), key, json);
            fail::fail_point!("store::before_commit", |_| Err(Error::Internal(
                "injected fault before commit".into()
            )));
            store.db.write_opt(batch, &synced())?;
        }
        self.committed = true;
        Ok(IngestReport {
            key: key.to_owned(),
            size: manifest.size,
            digest: manifest.digest,
            chunks: manifest.chunks.len(),
            new_chunks: self.new_chunks,
            stored_bytes: self.stored_bytes,
        })
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let pending = self.encoder.abandon();
        let waits = !pending.is_empty();
        let held = std::mem::take(&mut self.held);
        let (store, committed) = (self.store.clone(), self.committed);
        let release = move || held.release(&store, pending, committed);
        // Groups still on their way pin (and may write) for this ingest, so the release waits
        // for them; a tokio worker must not (an ingest is dropped there when its client hangs
        // up mid-PUT). A runtime shutting down may drop the task unrun: the process is ending,
        // its pins with it, and the next writer's orphan sweep reclaims the chunks.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if waits => {
                rt.spawn_blocking(release);
            }
            _ => release(),
        }
    }
}

/// What an ingest holds in the store: one pin per distinct chunk it relies on, and the chunks
/// it wrote (to reclaim if it ends without a commit).
#[derive(Default)]
struct Held {
    pinned: HashSet<ChunkHash>,
    written: HashSet<ChunkHash>,
}

impl Held {
    /// Makes a group's pins and writes the ingest's: one pin per distinct hash is kept (one an
    /// earlier group pinned already is released at once). Returns the chunks and bytes written
    /// that were not counted yet (two groups may both have found a chunk absent, and written
    /// the same bytes).
    fn adopt(
        &mut self,
        store: &Store,
        pinned: &[ChunkHash],
        written: &[(ChunkHash, usize)],
    ) -> (usize, u64) {
        if !pinned.is_empty() {
            let mut pins = store.lock_pins();
            for h in pinned {
                if !self.pinned.insert(*h) {
                    unpin(&mut pins, h);
                }
            }
        }
        let mut new = (0, 0);
        for &(hash, len) in written {
            if self.written.insert(hash) {
                new.0 += 1;
                new.1 += len as u64;
            }
        }
        new
    }

    /// Once the groups still on their way (`pending`) are done, releases every pin and,
    /// unless the ingest `committed`, reclaims the chunks it wrote that nothing else now
    /// references or pins.
    fn release(mut self, store: &Store, pending: Pending, committed: bool) {
        for g in pending.wait() {
            self.adopt(store, &g.pinned, &g.written);
        }
        let mut pins = store.lock_pins();
        for h in &self.pinned {
            unpin(&mut pins, h);
        }
        if committed || self.written.is_empty() {
            return;
        }
        // Abandoned: reclaim what we wrote unless someone else now references or pins it.
        let mut batch = WriteBatch::default();
        for h in &self.written {
            if !pins.contains_key(h) && matches!(store.refcount(h), Ok(0)) {
                batch.delete_cf(store.cf(CF_CHUNKS), h.0);
            }
        }
        if let Err(e) = store.db.write(batch) {
            tracing::warn!(error = %e, "could not reclaim the chunks of an abandoned ingest");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::tests::noise;

    fn writer(dir: &Path) -> Arc<Store> {
        Arc::new(Store::open_writer(&dir.join("db"), &StoreOptions::default()).unwrap())
    }

    fn reader(dir: &Path) -> Store {
        Store::open_reader(&dir.join("db"), &dir.join("sec"), &StoreOptions::default()).unwrap()
    }

    fn put(store: &Arc<Store>, key: &str, data: &[u8]) -> IngestReport {
        let mut ingest = store.begin_ingest().unwrap();
        for c in chunker::chunks_of(data, store.chunk_params()) {
            ingest.add(c).unwrap();
        }
        ingest.commit(key, None).unwrap()
    }

    fn get(store: &Store, key: &str) -> Option<Vec<u8>> {
        let m = store.manifest(key).unwrap()?;
        Some(
            m.chunks
                .iter()
                .flat_map(|c| store.chunk(&c.hash).unwrap().to_vec())
                .collect(),
        )
    }

    /// A reader's miss while the writer flushes (as a hand-over does right after the pull it
    /// waited for): every object the writer acknowledged before the read is found. With one
    /// catch-up per miss, RocksDB's catch-up overlapping the flush lost some (see
    /// [`MISS_CATCH_UPS`]).
    #[test]
    fn a_reader_finds_what_the_writer_acknowledged_while_the_writer_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let reader = reader(dir.path());
        let mut misses = Vec::new();
        for i in 0..300 {
            let key = format!("k{i}");
            put(&store, &key, &noise(2_000, i));
            let start = Arc::new(std::sync::Barrier::new(2));
            let flusher = {
                let (store, start) = (store.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    store.flush().unwrap();
                })
            };
            start.wait();
            if reader.manifest(&key).unwrap().is_none() {
                misses.push(key);
            }
            flusher.join().unwrap();
        }
        assert!(misses.is_empty(), "acknowledged, then missed: {misses:?}");
    }

    #[test]
    fn a_manifest_length_that_disagrees_with_its_chunk_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let data = noise(10_000, 3);
        let hash = ChunkHash::of(&data);
        for listed in [10_000 + 500, 10_000 - 500] {
            let mut ingest = store.begin_ingest().unwrap();
            if ingest.reference(ChunkRef { hash, len: listed }).unwrap() {
                ingest.supply(hash, chunker::encode(&data)).unwrap();
            }
            ingest.commit("liar", None).unwrap();
            let m = store.manifest("liar").unwrap().unwrap();
            let groups = Manifest::read_groups(&m.chunks, 0, m.size, 1 << 20);
            let err = store.pieces(&m.chunks, &groups[0]).unwrap_err();
            assert_eq!(err.code(), "corrupt_chunk", "listed {listed}: {err}");
        }
        assert_eq!(store.chunk_len(&hash).unwrap(), Some(10_000));
        assert_eq!(store.chunk_len(&ChunkHash::of(b"absent")).unwrap(), None);
    }

    /// More groups than the encoder keeps on their way, with chunks repeated inside the object
    /// and chunks already stored: every chunk comes back in order, each stored once.
    #[test]
    fn an_ingest_through_the_encoder_keeps_order_and_stores_each_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let unit = noise(
            crate::encoder::GROUP_BYTES * (crate::encoder::MAX_PENDING + 2),
            11,
        );
        let stored = put(&store, "first", &unit[..1 << 20]);
        let data = [&unit[..], &unit[..], &unit[..1 << 20]].concat();
        let report = put(&store, "big", &data);
        assert_eq!(get(&store, "big").unwrap(), data);
        let hashes = |key: &str| -> HashSet<ChunkHash> {
            let m = store.manifest(key).unwrap().unwrap();
            m.chunks.iter().map(|c| c.hash).collect()
        };
        let (big, first) = (hashes("big"), hashes("first"));
        assert_eq!(stored.new_chunks, first.len());
        assert_eq!(
            report.new_chunks,
            big.difference(&first).count(),
            "each distinct chunk stored exactly once, none that was stored before"
        );
        assert_eq!(put(&store, "again", &data).new_chunks, 0);
    }

    /// The CPU pool kept busy (a task per thread) until `free` is sent or `after` has passed;
    /// `freed` turns true just before it is freed.
    struct BusyPool {
        free: std::sync::mpsc::Sender<()>,
        freed: Arc<std::sync::atomic::AtomicBool>,
        opener: std::thread::JoinHandle<()>,
    }

    fn busy_pool(after: Duration) -> BusyPool {
        let busy: Vec<std::sync::mpsc::Sender<()>> = (0..rayon::current_num_threads())
            .map(|_| {
                let (free, wait) = std::sync::mpsc::channel::<()>();
                rayon::spawn(move || {
                    let _ = wait.recv();
                });
                free
            })
            .collect();
        let (free, wait) = std::sync::mpsc::channel::<()>();
        let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opener = {
            let freed = freed.clone();
            std::thread::spawn(move || {
                let _ = wait.recv_timeout(after);
                freed.store(true, std::sync::atomic::Ordering::SeqCst);
                drop(busy);
            })
        };
        BusyPool {
            free,
            freed,
            opener,
        }
    }

    impl BusyPool {
        fn freed(&self) -> bool {
            self.freed.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// An ingest of fresh chunks whose groups (as many as the encoder sends before it waits)
    /// are all still waiting for a busy pool; and the chunks' hashes.
    fn ingest_waiting_for_the_pool(store: &Arc<Store>) -> (Ingest, Vec<ChunkHash>) {
        let data = noise(
            crate::encoder::GROUP_BYTES * crate::encoder::MAX_PENDING,
            21,
        );
        let chunks = chunker::chunks_of(&data, store.chunk_params());
        let mut ingest = store.begin_ingest().unwrap();
        for c in &chunks {
            ingest.add(c.clone()).unwrap();
        }
        assert!(
            store.lock_pins().is_empty(),
            "a group ran while the pool was busy"
        );
        (ingest, chunks.iter().map(|c| ChunkHash::of(c)).collect())
    }

    fn assert_nothing_left_of(store: &Store, hashes: &[ChunkHash]) {
        assert!(store.lock_pins().is_empty(), "pins outlived their ingest");
        assert_eq!(
            store.missing(hashes).unwrap().len(),
            hashes.len(),
            "chunks of the abandoned ingest stayed stored"
        );
    }

    /// An ingest dropped while its groups still wait for the pool (its client hung up): the
    /// drop waits for them, and once it returns no pin is left and nothing they wrote stays
    /// stored.
    #[test]
    fn an_ingest_dropped_with_groups_on_their_way_leaves_no_pin_and_no_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let pool = busy_pool(Duration::from_millis(100));
        let (ingest, hashes) = ingest_waiting_for_the_pool(&store);
        drop(ingest);
        assert!(
            pool.freed(),
            "the drop returned before its groups could even start"
        );
        assert_nothing_left_of(&store, &hashes);
        pool.opener.join().unwrap();
    }

    /// The same drop on a tokio worker (a PUT's task, dropped when its client hangs up): it
    /// returns at once, and its groups' pins and chunks are released on a blocking thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ingest_dropped_on_a_tokio_worker_does_not_wait_there() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let pool = busy_pool(Duration::from_secs(10));
        let (ingest, hashes) = ingest_waiting_for_the_pool(&store);
        drop(ingest);
        assert!(
            !pool.freed(),
            "the drop waited for the pool on a tokio worker"
        );
        pool.free.send(()).unwrap();
        // Its groups' tasks and the release each hold the store: done when none does.
        locator_wire::testing::eventually(
            "the groups and the release of the abandoned ingest done",
            Duration::from_secs(10),
            || async { Arc::strong_count(&store) == 1 },
        )
        .await;
        assert_nothing_left_of(&store, &hashes);
        pool.opener.join().unwrap();
    }

    #[test]
    fn dedup_and_reclaim() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let a = noise(1 << 20, 1);
        let r1 = put(&store, "a", &a);
        assert_eq!(r1.new_chunks, r1.chunks);
        let r2 = put(&store, "b", &a);
        assert_eq!((r2.new_chunks, r2.stored_bytes), (0, 0));
        assert_eq!(get(&store, "b").unwrap(), a);
        let hash = store.manifest("a").unwrap().unwrap().chunks[0].hash;
        assert!(store.delete("a").unwrap());
        // Still referenced by b.
        assert!(store.missing(&[hash]).unwrap().is_empty());
        assert!(store.delete("b").unwrap());
        // Unreferenced now, but kept for the reclaim grace...
        assert!(store.missing(&[hash]).unwrap().is_empty());
        assert_eq!(store.reap(SystemTime::now()).unwrap(), 0);
        // ...and reclaimed once it has run out.
        assert_eq!(store.reap(after_grace()).unwrap(), r1.chunks);
        assert_eq!(store.missing(&[hash]).unwrap(), vec![hash]);
        assert!(!store.delete("b").unwrap());
        assert_eq!(store.reap(after_grace()).unwrap(), 0, "the queue is empty");
        assert_eq!(store.stats().chunk_count_estimate, 0);
    }

    fn after_grace() -> SystemTime {
        SystemTime::now() + StoreOptions::default().reclaim_grace + Duration::from_secs(1)
    }

    #[test]
    fn a_chunk_referenced_again_leaves_the_reclaim_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let a = noise(200_000, 12);
        put(&store, "a", &a);
        store.delete("a").unwrap();
        // Stored again within the grace: deduplicated against the queued chunks...
        assert_eq!(put(&store, "again", &a).new_chunks, 0);
        // ...which are no longer due for reclaim.
        assert_eq!(store.reap(after_grace()).unwrap(), 0);
        assert_eq!(get(&store, "again").unwrap(), a);
    }

    #[test]
    fn overwrite_moves_references() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let (a, b) = (noise(300_000, 2), noise(300_000, 3));
        put(&store, "k", &a);
        let old = store.manifest("k").unwrap().unwrap();
        put(&store, "k", &b);
        assert_eq!(get(&store, "k").unwrap(), b);
        let old_hashes: Vec<_> = old.chunks.iter().map(|c| c.hash).collect();
        store.reap(after_grace()).unwrap();
        assert_eq!(store.missing(&old_hashes).unwrap().len(), old_hashes.len());
    }

    #[test]
    fn pinned_chunks_survive_deletion_and_abandoned_ingests_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let a = noise(100_000, 4);
        put(&store, "a", &a);
        let m = store.manifest("a").unwrap().unwrap();
        // An ingest relies on a's first chunk existing...
        let mut ingest = store.begin_ingest().unwrap();
        assert!(!ingest.reference(m.chunks[0].clone()).unwrap());
        // ...so deleting a must not reclaim it.
        store.delete("a").unwrap();
        assert_eq!(
            store.reap(after_grace()).unwrap(),
            m.chunks.len() - 1,
            "all but the pinned one"
        );
        let report = ingest.commit("b", None).unwrap();
        assert_eq!(report.new_chunks, 0);
        assert_eq!(store.reap(after_grace()).unwrap(), 0);
        assert!(store.chunk(&m.chunks[0].hash).is_ok());

        let mut abandoned = store.begin_ingest().unwrap();
        let fresh = noise(50_000, 5);
        abandoned.add(Bytes::copy_from_slice(&fresh)).unwrap();
        drop(abandoned);
        assert_eq!(store.missing(&[ChunkHash::of(&fresh)]).unwrap().len(), 1);
    }

    #[test]
    fn orphans_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let data = noise(10_000, 6);
        let hash = ChunkHash::of(&data);
        assert!(store
            .put_stored_chunk(&hash, &chunker::encode(&data))
            .unwrap());
        put(&store, "kept", &noise(10_000, 7));
        // A deleted object's chunks are queued, not orphans: readers may still need them.
        put(&store, "deleted", &noise(10_000, 13));
        store.delete("deleted").unwrap();
        assert_eq!(store.sweep_orphans().unwrap(), 1);
        assert_eq!(store.missing(&[hash]).unwrap(), vec![hash]);
        assert!(get(&store, "kept").is_some());
    }

    #[test]
    fn uploads_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let data = noise(10_000, 8);
        let wrong = ChunkHash::of(b"other");
        let err = store
            .put_stored_chunk(&wrong, &chunker::encode(&data))
            .unwrap_err();
        assert_eq!(err.code(), "hash_mismatch");
        assert_eq!(store.missing(&[wrong]).unwrap(), vec![wrong]);
        let err = store.put_stored_chunk(&wrong, &[7, 1, 2]).unwrap_err();
        assert_eq!(err.code(), "bad_request");
    }

    #[test]
    fn corrupt_chunks_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        put(&store, "a", &noise(20_000, 9));
        let hash = store.manifest("a").unwrap().unwrap().chunks[0].hash;
        store.corrupt_chunk_for_tests(&hash, &[0, 1, 2, 3]).unwrap();
        assert_eq!(store.chunk(&hash).unwrap_err().code(), "corrupt_chunk");
    }

    #[test]
    fn reader_sees_writes_after_ack_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        put(&store, "before", &noise(50_000, 10));
        let reader = reader(dir.path());
        assert!(get(&reader, "before").is_some());
        let data = noise(70_000, 11);
        put(&store, "after", &data);
        // No explicit catch-up: the miss path catches up by itself.
        assert_eq!(get(&reader, "after").unwrap(), data);
        assert_eq!(reader.delete("after").unwrap_err().code(), "not_writer");
        assert_eq!(reader.reap(after_grace()).unwrap_err().code(), "not_writer");
    }

    /// The reads without a catch-up (a GET on the writer does them on the async threads): a
    /// reader behind its writer answers `None` where `manifest`/`pieces` would catch up, the
    /// same bytes as `pieces` once the data is here, and a manifest that lies about a chunk's
    /// length is an error here too.
    #[test]
    fn reads_here_never_catch_up_and_agree_with_the_catching_up_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let reader = reader(dir.path());
        let data = noise(60_000, 18);
        put(&store, "k", &data);
        let m = store.manifest_here("k").unwrap().unwrap();
        let group: Vec<(usize, usize, usize)> = (0..m.chunks.len())
            .map(|i| (i, 0, m.chunks[i].len as usize))
            .collect();
        assert!(reader.manifest_here("k").unwrap().is_none());
        assert!(reader.pieces_here(&m.chunks, &group).unwrap().is_none());
        assert_eq!(
            store
                .pieces_here(&m.chunks, &group)
                .unwrap()
                .unwrap()
                .concat(),
            data
        );
        reader.catch_up().unwrap();
        assert_eq!(reader.manifest_here("k").unwrap().unwrap(), m);
        assert_eq!(
            reader.pieces_here(&m.chunks, &group).unwrap().unwrap(),
            reader.pieces(&m.chunks, &group).unwrap()
        );
        let mut lying = m.chunks.clone();
        lying[0].len += 1;
        let err = store.pieces_here(&lying, &group[..1]).unwrap_err();
        assert_eq!(err.code(), "corrupt_chunk");
    }

    #[test]
    fn a_reader_catches_up_for_chunks_it_lacks_and_keeps_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let reader = reader(dir.path());
        put(&store, "old", &noise(60_000, 16));
        reader.catch_up().unwrap();
        put(&store, "new", &noise(60_000, 17));
        // Chunks of both objects, interleaved; the reader has seen only the first object.
        let (old, new) = (
            store.manifest("old").unwrap().unwrap(),
            store.manifest("new").unwrap().unwrap(),
        );
        let hashes: Vec<ChunkHash> = old
            .chunks
            .iter()
            .zip(&new.chunks)
            .flat_map(|(a, b)| [a.hash, b.hash])
            .collect();
        let got = reader.chunks(&hashes).unwrap();
        assert_eq!(got.len(), hashes.len());
        for (h, data) in hashes.iter().zip(&got) {
            assert_eq!(ChunkHash::of(data), *h);
        }
        let unknown = ChunkHash::of(b"never stored");
        let err = reader.chunks(&[hashes[0], unknown]).unwrap_err();
        assert_eq!(err.code(), "missing_chunk");
        assert!(err.to_string().contains(&unknown.to_string()));
    }

    #[test]
    fn a_reader_with_a_stale_manifest_still_reads_the_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = writer(dir.path());
        let old = noise(120_000, 14);
        put(&store, "k", &old);
        let reader = reader(dir.path());
        // The reader has read the manifest when the writer overwrites the object...
        let stale = reader.manifest("k").unwrap().unwrap();
        put(&store, "k", &noise(120_000, 15));
        reader.catch_up().unwrap();
        // ...and still streams the version it started with.
        let bytes: Vec<u8> = stale
            .chunks
            .iter()
            .flat_map(|c| reader.chunk(&c.hash).unwrap().to_vec())
            .collect();
        assert_eq!(bytes, old);
        store.reap(after_grace()).unwrap();
        reader.catch_up().unwrap();
        assert_eq!(
            reader.chunk(&stale.chunks[0].hash).unwrap_err().code(),
            "missing_chunk"
        );
    }
}
