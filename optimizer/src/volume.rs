//! Sharing one cache volume between instances: who writes, how the others read and forward,
//! and how a reader takes over when the writer goes away. See docs/optimizer.md.
//!
//! Layout of the cache directory:
//! - `db/`: the RocksDB database (one primary process at a time: RocksDB's `LOCK`);
//! - `leader.lock`: flock(2)-ed by the writer for its whole life. The kernel drops it when the
//!   process dies, even by kill -9, which is what lets a reader notice and take over. Probing
//!   it is free of side effects, unlike a failed `DB::open` (which rotates RocksDB's info log);
//! - `writer.json`: the advertised URL of the current writer, where readers forward mutations;
//! - `handover.json`: a planned hand-over of the writer role in progress (`Volume::hand_over`);
//! - `format.json`: the volume's on-disk format (`crate::format`);
//! - `secondary/<instance-id>/`: each reader's RocksDB secondary directory.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::auth::WriteToken;
use crate::error::{Error, Result};
use crate::format::Marker;
use crate::store::{Store, StoreOptions};

/// Header marking a request forwarded by a reader, so that a stale writer.json can never make
/// two readers bounce a request between them.
pub const FORWARDED_HEADER: &str = "x-optimizer-forwarded-by";

/// How an instance uses the volume.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    pub cache_dir: PathBuf,
    pub instance_id: String,
    /// URL under which the other instances reach this one.
    pub advertise: String,
    pub store: StoreOptions,
    /// Period of a reader's background catch-up with the writer.
    pub catch_up_interval: Duration,
    /// Period of a reader's attempts to become the writer.
    pub takeover_interval: Duration,
    /// How long a forwarded request keeps retrying while no writer answers (failover).
    pub forward_timeout: Duration,
    /// Sent with every forwarded mutation: the writer checks it like any client's.
    pub write_token: Option<Arc<WriteToken>>,
}

/// Contents of `writer.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriterInfo {
    pub instance_id: String,
    pub url: String,
    pub pid: u32,
}

/// Contents of `handover.json`: a planned hand-over of the writer role (see
/// [`Volume::hand_over`]). While it is fresh ([`HANDOVER_WINDOW`]) only the instances it names
/// may take the volume over, and they try at once.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Handover {
    pub from: String,
    pub to: Vec<String>,
    /// When it was written, in milliseconds since the Unix epoch (one kernel's clock).
    pub at_ms: u64,
    /// The old writer closed its database cleanly: no interrupted ingest left orphans to sweep.
    pub clean: bool,
}

/// How long a hand-over reserves the volume for its successors. Past it, a successor that
/// never came (it died meanwhile) no longer keeps the volume without a writer: anyone takes it.
pub const HANDOVER_WINDOW: Duration = Duration::from_secs(10);

/// How long a hand-over waits for the writes in flight before it gives up (and stays the writer).
pub const QUIESCE_LIMIT: Duration = Duration::from_secs(10);

/// How often a forwarded mutation tries again while no writer answers.
const FORWARD_RETRY: Duration = Duration::from_millis(25);

/// How often a named successor probes the volume's lock during a hand-over.
const HANDOVER_POLL: Duration = Duration::from_millis(2);

/// What [`Volume::hand_over`] did, answered to whoever asked (haddock, through `optimizer handover`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HandoverReport {
    /// False when this instance was not the writer: nothing to hand over.
    pub handed_over: bool,
    pub instance_id: String,
    pub to: Vec<String>,
    /// The successor that published itself as the writer, if one did within the wait.
    pub taken_by: Option<String>,
    /// Flushing the memtables and opening a secondary while writes still flow (not felt).
    pub prepare_ms: u64,
    /// From holding new writes (they are forwarded and wait) until those in flight finished.
    pub quiesce_ms: u64,
    /// Making the last writes durable, closing the database and releasing the lock.
    pub close_ms: u64,
    /// From holding new writes until a successor published itself: the longest a write that
    /// arrived then waited for a writer (or until the wait ran out).
    pub held_ms: u64,
    /// From the request until a successor published itself (or the wait ran out).
    pub total_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A mutating request to be executed by the writer.
#[derive(Clone)]
pub struct Forward {
    pub method: http::Method,
    pub path_and_query: String,
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
    /// `None` for requests without a body (DELETE, pull).
    pub body: Option<ForwardBody>,
}

/// The body of a forwarded request, streamed to the writer as it arrives: never buffered
/// whole, since a reader runs under the same memory cap as the writer (a 200 MB PUT once took
/// a reader to 565 MB). Its first [`REPLAY_BYTES`] are kept, so an attempt that fails part-way
/// (the writer handed over or died mid-request, as in every release) is sent again whole to
/// the next writer; a longer body that had started to flow cannot be replayed, and the request
/// fails with 503 (a client may retry a PUT).
#[derive(Clone)]
pub struct ForwardBody(Arc<tokio::sync::Mutex<BodyState>>);

/// How much of a forwarded body is kept for a retry through a failover. Most objects are
/// smaller; a canary release's writer hand-over failed user PUTs mid-body without it.
pub const REPLAY_BYTES: u64 = 1 << 20;

struct BodyState {
    body: Option<Incoming>,
    started: bool,
    sent: u64,
    limit: u64,
    too_large: bool,
    /// Every frame read so far while they add up to at most [`REPLAY_BYTES`]; `None` beyond.
    replay: Option<Vec<Bytes>>,
}

impl ForwardBody {
    /// Wraps a request body of at most `limit` bytes.
    pub fn new(body: Incoming, limit: u64) -> ForwardBody {
        ForwardBody(Arc::new(tokio::sync::Mutex::new(BodyState {
            body: Some(body),
            started: false,
            sent: 0,
            limit,
            too_large: false,
            replay: Some(Vec::new()),
        })))
    }

    /// The whole body again as a request body, for when this instance became the writer
    /// meanwhile: what an earlier attempt read (kept for replay), then the rest from the
    /// client. Only called while [`ForwardBody::replayable`] holds (`Volume::route` checks).
    pub fn body(&self) -> crate::server::Body {
        use futures_util::TryStreamExt;
        use http_body_util::BodyExt;
        http_body_util::StreamBody::new(self.stream().map_ok(hyper::body::Frame::data))
            .boxed_unsync()
    }

    /// Whether a next attempt can send the whole body: nothing of it read yet, or all that was
    /// read still kept.
    async fn replayable(&self) -> bool {
        let s = self.0.lock().await;
        !s.started || s.replay.is_some()
    }

    async fn too_large(&self) -> Option<u64> {
        let s = self.0.lock().await;
        s.too_large.then_some(s.limit)
    }

    /// The body as a stream of its data frames, enforcing the limit as they pass: first what
    /// an earlier attempt read (kept for replay), then the rest from the client.
    fn stream(
        &self,
    ) -> impl futures_util::Stream<Item = std::result::Result<Bytes, crate::server::BoxError>>
           + Send
           + 'static {
        futures_util::stream::try_unfold((self.0.clone(), 0usize), |(state, replayed)| async move {
            let next = {
                let mut guard = state.lock().await;
                let s = &mut *guard;
                s.started = true;
                if let Some(frame) = s.replay.as_ref().and_then(|r| r.get(replayed)) {
                    let frame = frame.clone();
                    drop(guard);
                    return Ok(Some((frame, (state, replayed + 1))));
                }
                let Some(body) = s.body.as_mut() else {
                    return Ok(None);
                };
                loop {
                    match body.frame().await {
                        None => break None,
                        Some(Err(e)) => return Err(Box::new(e) as crate::server::BoxError),
                        Some(Ok(frame)) => {
                            let Ok(data) = frame.into_data() else {
                                continue;
                            };
                            s.sent += data.len() as u64;
                            if s.sent > s.limit {
                                s.too_large = true;
                                return Err(
                                    Box::new(BodyOverLimit(s.limit)) as crate::server::BoxError
                                );
                            }
                            if s.sent > REPLAY_BYTES {
                                s.replay = None;
                            } else if let Some(r) = s.replay.as_mut() {
                                r.push(data.clone());
                            }
                            break Some(data);
                        }
                    }
                }
            };
            // A frame just kept for replay is not to be replayed within this same attempt.
            let replayed = replayed + usize::from(state.lock().await.replay.is_some());
            Ok(next.map(|data| (data, (state, replayed))))
        })
    }
}

/// A forwarded body went over its limit while streaming.
#[derive(Debug, thiserror::Error)]
#[error("the request body is over the limit of {0} bytes")]
pub struct BodyOverLimit(pub u64);

/// The writer's answer to a forwarded request.
#[derive(Debug)]
pub struct Forwarded {
    pub status: http::StatusCode,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// Either the request is ours to execute (we are, or just became, the writer) or it was
/// executed by the writer.
pub enum Routed {
    Local(Arc<Store>),
    Remote(Forwarded),
}

/// This instance's view of the shared cache volume.
pub struct Volume {
    cfg: VolumeConfig,
    store: RwLock<Option<Arc<Store>>>,
    leader: Mutex<Option<Flock<File>>>,
    /// Held while the role changes (becoming the writer, handing it over): the two never interleave.
    role: Mutex<()>,
    /// Wakes the mutations waiting for a writer ([`Volume::route`]) when this process sees
    /// the role move: it became the writer, or the successor it handed over to published.
    writer_moved: tokio::sync::Notify,
    marker: Marker,
    client: reqwest::Client,
}

impl Volume {
    pub fn new(cfg: VolumeConfig) -> Arc<Volume> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // The writer answers; it never redirects, and a forward must not go elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a client without TLS always builds");
        Arc::new(Volume {
            marker: Marker::new(&cfg.cache_dir),
            cfg,
            store: RwLock::new(None),
            leader: Mutex::new(None),
            role: Mutex::new(()),
            writer_moved: tokio::sync::Notify::new(),
            client,
        })
    }

    fn db_path(&self) -> PathBuf {
        self.cfg.cache_dir.join("db")
    }

    fn writer_json(&self) -> PathBuf {
        self.cfg.cache_dir.join("writer.json")
    }

    fn handover_json(&self) -> PathBuf {
        self.cfg.cache_dir.join("handover.json")
    }

    /// The hand-over in progress, if `handover.json` is fresh.
    pub fn handover(&self) -> Option<Handover> {
        let bytes = std::fs::read(self.handover_json()).ok()?;
        let h: Handover = serde_json::from_slice(&bytes).ok()?;
        (now_ms().saturating_sub(h.at_ms) < HANDOVER_WINDOW.as_millis() as u64).then_some(h)
    }

    /// The open store, whatever our role.
    pub fn store(&self) -> Result<Arc<Store>> {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::NotReady)
    }

    /// The store if this instance is the writer.
    pub fn writer(&self) -> Option<Arc<Store>> {
        self.store().ok().filter(|s| s.is_writer())
    }

    pub fn is_open(&self) -> bool {
        self.store().is_ok()
    }

    /// Tries to become the writer: takes `leader.lock` without waiting.
    fn try_lead(&self) -> Result<bool> {
        let mut leader = self.leader.lock().unwrap_or_else(|p| p.into_inner());
        if leader.is_some() {
            return Ok(true);
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.cfg.cache_dir.join("leader.lock"))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                *leader = Some(lock);
                Ok(true)
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(false),
            Err((_, e)) => Err(Error::Io(e.into())),
        }
    }

    /// Opens the database as the writer. RocksDB's own LOCK may still be held for a moment by
    /// a writer that is closing (it releases the flock only after closing the DB, but a killed
    /// one releases both at once), so lock errors are retried for a while.
    fn open_writer(&self) -> Result<Store> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Store::open_writer(&self.db_path(), &self.cfg.store) {
                Ok(s) => return Ok(s),
                Err(Error::Storage(e))
                    if e.to_string().contains("lock") && Instant::now() < deadline =>
                {
                    tracing::debug!(error = %e, "rocksdb LOCK still held, retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn open_reader(&self) -> Result<Store> {
        let secondary = self
            .cfg
            .cache_dir
            .join("secondary")
            .join(&self.cfg.instance_id);
        // Stale state of an earlier process with the same id is of no use to a new secondary.
        let _ = std::fs::remove_dir_all(&secondary);
        std::fs::create_dir_all(&secondary)?;
        Store::open_reader(&self.db_path(), &secondary, &self.cfg.store)
    }

    fn publish_writer(&self) -> Result<()> {
        let info = WriterInfo {
            instance_id: self.cfg.instance_id.clone(),
            url: self.cfg.advertise.clone(),
            pid: std::process::id(),
        };
        replace_file(
            &self.writer_json(),
            &serde_json::to_vec(&info).map_err(|e| Error::Internal(e.to_string()))?,
        )
    }

    /// The current writer as published in writer.json.
    pub fn writer_info(&self) -> Option<WriterInfo> {
        let bytes = std::fs::read(self.writer_json()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// One step of the life cycle: open if not open, take over if the writer is gone (and no
    /// hand-over reserves the volume for others). `catch_up`: a reader that stays one catches
    /// up with the writer. Blocking (RocksDB opens and recovery); run on a blocking thread.
    fn step(&self, catch_up: bool) -> Result<()> {
        let _role = self.role.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.store().ok();
        if current.as_ref().is_some_and(|s| s.is_writer()) {
            return Ok(());
        }
        // A newer, incompatible version may have claimed the volume since we opened it: then
        // we must neither write nor serve what we can no longer read.
        match self.marker.check() {
            Err(e @ Error::IncompatibleFormat(_)) => {
                self.store.write().unwrap_or_else(|p| p.into_inner()).take();
                return Err(e);
            }
            // Not a verdict (EMFILE, EIO): keep serving, try again at the next step.
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let planned = self.handover();
        let named = planned
            .as_ref()
            .is_some_and(|h| h.to.contains(&self.cfg.instance_id));
        if (planned.is_none() || named) && self.try_lead()? {
            let t = Instant::now();
            if let Err(e) = self.marker.claim() {
                self.leader.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(e);
            }
            let store = Arc::new(self.open_writer()?);
            *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store.clone());
            self.writer_moved.notify_waiters();
            self.publish_writer()?;
            // Read again now that the lock is ours: the old writer marks it clean last.
            let planned = self
                .handover()
                .filter(|h| h.to.contains(&self.cfg.instance_id));
            match &planned {
                Some(h) => {
                    let _ = std::fs::remove_file(self.handover_json());
                    tracing::info!(instance = %self.cfg.instance_id, url = %self.cfg.advertise, from = %h.from,
                        open_ms = t.elapsed().as_millis() as u64, since_handover_ms = now_ms().saturating_sub(h.at_ms),
                        "became the writer of the cache volume (handed over)");
                }
                None => tracing::info!(instance = %self.cfg.instance_id, url = %self.cfg.advertise,
                    open_ms = t.elapsed().as_millis() as u64, "became the writer of the cache volume"),
            }
            // A clean hand-over leaves no interrupted ingest behind: nothing to sweep (and the
            // sweep reads every chunk, a cost users would feel right after the hand-over).
            if !planned.is_some_and(|h| h.clean) {
                match store.sweep_orphans() {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(reclaimed = n, "reclaimed chunks of interrupted ingests")
                    }
                    Err(e) => tracing::warn!(error = %e, "orphan sweep failed"),
                }
            }
            return Ok(());
        }
        match current {
            Some(reader) if catch_up => reader.catch_up(),
            Some(_) => Ok(()),
            None => {
                let store = self.open_reader()?;
                *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(store));
                tracing::info!(instance = %self.cfg.instance_id, "opened the cache volume as a reader");
                Ok(())
            }
        }
    }

    /// Keeps the volume open and this instance's role current until `stop` turns true; as the
    /// writer, reclaims the chunks whose grace has run out.
    pub async fn maintain(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut last_takeover_try = Instant::now()
            .checked_sub(self.cfg.takeover_interval)
            .unwrap_or_else(Instant::now);
        // Reaping a few seconds late costs nothing; a tight loop on a huge queue would.
        let reap_interval = (self.cfg.store.reclaim_grace / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        let mut refused = false;
        let mut last_catch_up = Instant::now();
        loop {
            let this = self.clone();
            let writer = self.writer();
            let is_writer = writer.is_some();
            let (wait, res) = if let Some(store) = writer {
                let res = tokio::task::spawn_blocking(move || {
                    let n = store.reap(std::time::SystemTime::now())?;
                    if n > 0 {
                        tracing::info!(reclaimed = n, "reclaimed chunks past their grace");
                    }
                    Ok::<_, Error>(())
                })
                .await;
                (reap_interval, res)
            } else {
                // Named by a hand-over: the old writer is closing for us, take its place at once.
                let named = self
                    .handover()
                    .is_some_and(|h| h.to.contains(&self.cfg.instance_id));
                let due = last_takeover_try.elapsed() >= self.cfg.takeover_interval;
                let try_lead = due || named || !self.is_open();
                if try_lead {
                    last_takeover_try = Instant::now();
                }
                // A named successor probes the lock every few ms; it still catches up at the
                // usual pace meanwhile (it serves reads until it is the writer).
                let catch_up = !named || last_catch_up.elapsed() >= self.cfg.catch_up_interval;
                if catch_up {
                    last_catch_up = Instant::now();
                }
                let res = tokio::task::spawn_blocking(move || {
                    if try_lead {
                        this.step(catch_up)
                    } else {
                        this.store()?.catch_up()
                    }
                })
                .await;
                let wait = if named {
                    HANDOVER_POLL
                } else {
                    self.cfg.catch_up_interval
                };
                (wait, res)
            };
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) if is_writer => tracing::warn!(error = %e, "reclaiming chunks failed"),
                // Logged once, not at every takeover try.
                Ok(Err(e @ Error::IncompatibleFormat(_))) if !refused => {
                    refused = true;
                    tracing::error!(error = %e, "the cache volume is closed to this instance")
                }
                Ok(Err(Error::IncompatibleFormat(_))) => {}
                // Normal while the writer has not created the database yet.
                Ok(Err(e)) => tracing::debug!(error = %e, "cache volume step failed; retrying"),
                Err(e) => tracing::warn!(error = %e, "cache volume task panicked"),
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Executes a mutating request on the writer: locally if that is us, else forwarded to the
    /// URL in writer.json, retrying through a failover until `forward_timeout`.
    pub async fn route(&self, req: &Forward) -> Result<Routed> {
        let deadline = Instant::now() + self.cfg.forward_timeout;
        let mut last_problem = String::from("no writer has published its URL");
        loop {
            // Registered before the checks below, so that a move seen between them and the
            // wait still wakes this one.
            let moved = self.writer_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if let Some(store) = self.writer() {
                return Ok(Routed::Local(store));
            }
            if let Some(info) = self
                .writer_info()
                .filter(|i| i.instance_id != self.cfg.instance_id)
            {
                match self.send(&info.url, req).await {
                    Ok(answer) if !is_not_writer(&answer) => return Ok(Routed::Remote(answer)),
                    Ok(_) => last_problem = format!("{} is no longer the writer", info.url),
                    Err(e) => last_problem = format!("{}: {e}", info.url),
                }
                if let Some(body) = &req.body {
                    if let Some(limit) = body.too_large().await {
                        return Err(Error::TooLarge { limit });
                    }
                    if !body.replayable().await {
                        return Err(Error::WriterUnavailable(format!(
                            "{last_problem}; the request body (over {REPLAY_BYTES} bytes) was partly sent, retry the request"
                        )));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::WriterUnavailable(last_problem));
            }
            tracing::debug!(problem = %last_problem, "writer not reachable; retrying");
            // Short: a planned hand-over moves the role in tens of milliseconds. The writes
            // waiting in the old writer and in its successor go out as soon as either sees
            // the move; others at the next retry. (Not a shorter retry: each reads
            // writer.json, and a hundred writes held in a 2 ms loop read it 50 000 times a
            // second, on the cores the successor needs to open the database.)
            tokio::select! {
                _ = tokio::time::sleep(FORWARD_RETRY) => {}
                _ = moved => {}
            }
        }
    }

    async fn send(
        &self,
        base: &str,
        req: &Forward,
    ) -> std::result::Result<Forwarded, reqwest::Error> {
        let url = format!("{}{}", base.trim_end_matches('/'), req.path_and_query);
        let mut builder = self
            .client
            .request(req.method.clone(), url)
            .header(FORWARDED_HEADER, &self.cfg.instance_id);
        if let Some(token) = &self.cfg.write_token {
            builder = builder.header(http::header::AUTHORIZATION, token.bearer());
        }
        if let Some(body) = &req.body {
            builder = builder.body(reqwest::Body::wrap_stream(body.stream()));
            // Passed on so that the writer can refuse an oversized body before reading it.
            if let Some(len) = req.content_length {
                builder = builder.header(http::header::CONTENT_LENGTH, len);
            }
        }
        if let Some(ct) = &req.content_type {
            builder = builder.header(http::header::CONTENT_TYPE, ct);
        }
        let resp = builder.send().await?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await?;
        Ok(Forwarded {
            status,
            content_type,
            body,
        })
    }

    /// Hands the writer role over to one of `to` (instance ids of readers of this volume),
    /// planned, so that writers wait for it a fraction of a second instead of the seconds of a
    /// takeover after the old writer's exit: new requests are served from a secondary and
    /// their writes forwarded (they wait for the successor); the writes in flight finish
    /// (at most [`QUIESCE_LIMIT`], else nothing changes and this instance stays the writer);
    /// the database is flushed and closed, `handover.json` names the successors, and the lock
    /// is released. The successors, which read `handover.json` every catch-up, probe the lock
    /// every few milliseconds and the first takes it, with no WAL to replay and no orphans to
    /// sweep. Waits up to `wait` for one to publish itself. Blocking; run on a blocking thread.
    pub fn hand_over(&self, to: &[String], wait: Duration) -> Result<HandoverReport> {
        let t0 = Instant::now();
        let mut report = HandoverReport {
            handed_over: false,
            instance_id: self.cfg.instance_id.clone(),
            to: to.to_vec(),
            taken_by: None,
            prepare_ms: 0,
            quiesce_ms: 0,
            close_ms: 0,
            held_ms: 0,
            total_ms: 0,
        };
        let role = self.role.lock().unwrap_or_else(|p| p.into_inner());
        let Some(primary) = self.writer() else {
            return Ok(report);
        };
        // Never ourselves: we would race our own successor for the lock.
        let to: Vec<String> = to
            .iter()
            .filter(|id| **id != self.cfg.instance_id)
            .cloned()
            .collect();
        report.to = to.clone();
        let readers = self.cfg.cache_dir.join("secondary");
        let known = to.iter().any(|id| {
            !id.is_empty()
                && !id.contains(['/', '\\'])
                && !id.starts_with('.')
                && readers.join(id).is_dir()
        });
        if !known {
            return Err(Error::BadRequest(format!(
                "none of {to:?} is a reader of this cache volume: the writer stays {}",
                self.cfg.instance_id
            )));
        }
        let mut handover = Handover {
            from: self.cfg.instance_id.clone(),
            to: to.clone(),
            at_ms: now_ms(),
            clean: false,
        };
        let announce = |h: &Handover| {
            let json = serde_json::to_vec(h).map_err(|e| Error::Internal(e.to_string()))?;
            replace_file(&self.handover_json(), &json)
        };
        // Announced first: the successors start probing the lock while the writes in flight
        // finish, and no other reader will take it.
        announce(&handover)?;
        let restore = |primary: Arc<Store>, e: Error| {
            *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(primary);
            let _ = std::fs::remove_file(self.handover_json());
            tracing::warn!(error = %e, "hand-over abandoned: still the writer");
            Err(e)
        };
        // Most of the memtables go to table files now, while writes still flow: the flush
        // after the quiesce below, which writes wait for, then has only the last moments' to
        // write (measured under the proof's load: 203 ms of waiting writes before this).
        if let Err(e) = primary.flush() {
            let _ = std::fs::remove_file(self.handover_json());
            return Err(e);
        }
        // From here new requests find a reader: their reads go to a secondary, their writes
        // are forwarded and wait for the successor.
        let reader = match self.open_reader() {
            Ok(reader) => Arc::new(reader),
            Err(e) => return restore(primary, e),
        };
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(reader.clone());
        let held = Instant::now();
        report.prepare_ms = t0.elapsed().as_millis() as u64;
        let deadline = held + QUIESCE_LIMIT;
        while Arc::strong_count(&primary) > 1 {
            if Instant::now() >= deadline {
                let e = Error::WriterUnavailable(format!(
                    "writes in flight did not finish within {} s; {} stays the writer",
                    QUIESCE_LIMIT.as_secs(),
                    self.cfg.instance_id
                ));
                return restore(primary, e);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        report.quiesce_ms = held.elapsed().as_millis() as u64;
        let t1 = Instant::now();
        if let Err(e) = primary.flush() {
            return restore(primary, e);
        }
        handover.clean = true;
        handover.at_ms = now_ms();
        if let Err(e) = announce(&handover) {
            return restore(primary, e);
        }
        // The last reference (counted above): RocksDB's LOCK goes with it, then ours.
        drop(primary);
        self.leader.lock().unwrap_or_else(|p| p.into_inner()).take();
        report.close_ms = t1.elapsed().as_millis() as u64;
        // What the writes in flight committed after the secondary was opened: our own reads
        // must not miss them. Done once the lock is released, as the successor needs nothing
        // of it (measured: 3-4 ms that writes waited for before).
        if let Err(e) = reader.catch_up() {
            tracing::warn!(error = %e, "catching up after the writes in flight failed");
        }
        drop(role);
        report.handed_over = true;
        tracing::info!(to = ?to, prepare_ms = report.prepare_ms, quiesce_ms = report.quiesce_ms,
            close_ms = report.close_ms, "handed the cache volume over");
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if let Some(w) = self.writer_info().filter(|w| to.contains(&w.instance_id)) {
                report.taken_by = Some(w.instance_id);
                self.writer_moved.notify_waiters();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        report.held_ms = held.elapsed().as_millis() as u64;
        if report.taken_by.is_none() && self.handover().is_some_and(|h| h.from == handover.from) {
            // None of them came (gone meanwhile?): the volume must not stay without a writer
            // for the rest of the window. Anyone may take it now, as after an exit.
            let _ = std::fs::remove_file(self.handover_json());
            tracing::warn!(to = ?to, "no successor took the cache volume; it is open to any instance");
        }
        report.total_ms = t0.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Closes the store (flushing it if we are the writer), then gives up the leadership.
    pub fn close(&self) {
        // Not in the middle of a hand-over (it may still put the primary back).
        let _role = self.role.lock().unwrap_or_else(|p| p.into_inner());
        let store = self.store.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(store) = store {
            if let Err(e) = store.flush() {
                tracing::warn!(error = %e, "flush on shutdown failed");
            }
            match Arc::try_unwrap(store) {
                Ok(store) => drop(store),
                Err(_) => {
                    tracing::warn!("store still in use at shutdown; closing with the process")
                }
            }
        }
        self.leader.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cfg.cache_dir
    }
}

/// Replaces `path` whole: readers of the volume see the old contents or the new, never a
/// part (a temporary file beside it, synced, then renamed over it).
pub(crate) fn replace_file(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| Error::Io(e.error))?;
    Ok(())
}

fn is_not_writer(answer: &Forwarded) -> bool {
    answer.status == http::StatusCode::SERVICE_UNAVAILABLE
        && serde_json::from_slice::<serde_json::Value>(&answer.body)
            .is_ok_and(|v| v["error"]["code"] == "not_writer")
}
