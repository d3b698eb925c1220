//! The embedded store: one process, durable on local disk, no database to run.
//!
//! Layout of the data directory:
//! - `changes.log`: one [`WatchEvent`] per line, appended and fsynced before any write is
//!   acknowledged;
//! - `snapshot.json`: the whole [`State`] at some revision; the log holds what came after.
//!
//! One writer task owns the working state. It takes every queued command at once, runs them
//! through the rules one after the other, appends all their events with a single `write` +
//! `fdatasync` (group commit) and only then publishes the events and answers. A crash before
//! the fsync loses only writes nobody was told about; a crash in the middle of an append leaves
//! a torn last line, which recovery cuts off.
//!
//! When the log grows long it is folded into the snapshot, in the background: between two
//! commits the writer renames `changes.log` to `changes.folding.log` (which then holds exactly
//! the events up to the working state's revision) and appends to a fresh `changes.log`, while
//! a blocking task writes that state as the new snapshot (temp file, fsync, rename, fsync the
//! directory) and then deletes the folded log. Writes go on meanwhile: at ten thousand
//! instances a snapshot is megabytes, and writing it inline held every write (a weight change
//! among them) for a hundred milliseconds every few seconds. A crash at any point leaves a
//! snapshot and the logs after it: recovery replays `changes.folding.log` then `changes.log`,
//! skipping what the snapshot already holds, and finishes the fold before it opens.

use super::{now_ms, Committed, Encoded, Store};
use crate::api::WatchEvent;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::state::{Command, Ctx, Reply, State};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const LOG: &str = "changes.log";
/// The log being folded into the snapshot (see the module documentation).
const FOLDING: &str = "changes.folding.log";
const SNAPSHOT: &str = "snapshot.json";
/// Commands taken per group commit at most (bounds the latency of the first one).
const MAX_BATCH: usize = 256;

/// Tunables of the embedded store.
#[derive(Debug, Clone)]
pub struct Options {
    pub heartbeat_ttl: Duration,
    /// See [`crate::state::LOAD_PUBLISH_MS`].
    pub load_publish: Duration,
    /// Fold the log into the snapshot after this many lines.
    pub compact_after: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat_ttl: Duration::from_secs(10),
            load_publish: Duration::from_millis(crate::state::LOAD_PUBLISH_MS),
            compact_after: 20_000,
        }
    }
}

struct Job {
    command: Command,
    reply: oneshot::Sender<Result<Reply, Error>>,
}

/// See the module documentation.
pub struct EmbeddedStore {
    committed: Arc<Committed>,
    jobs: mpsc::Sender<Job>,
}

impl Store for EmbeddedStore {
    async fn execute(&self, command: Command) -> Result<Reply, Error> {
        let stopped = || Error::Unavailable("the embedded store stopped after a disk error".into());
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { command, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    fn committed(&self) -> &Arc<Committed> {
        &self.committed
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, replaying what is on disk.
    pub async fn open(dir: &Path, options: Options, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let dir = dir.to_path_buf();
        let d = dir.clone();
        let (state, log, lines) = tokio::task::spawn_blocking(move || recover(&d))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        tracing::info!(dir = %dir.display(), revision = state.revision, log_lines = lines, "embedded store opened");
        let mut working = state.clone();
        working.start_reports(now_ms());
        let committed = Arc::new(Committed::new(state, metrics));
        let (jobs, rx) = mpsc::channel(1024);
        let writer = Writer {
            dir,
            log: Arc::new(log),
            lines,
            folding: None,
            working,
            committed: committed.clone(),
            options,
        };
        tokio::spawn(writer.run(rx));
        Ok(EmbeddedStore { committed, jobs })
    }
}

struct Writer {
    dir: PathBuf,
    log: Arc<File>,
    lines: usize,
    /// The fold in progress, if any (see the module documentation).
    folding: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    working: State,
    committed: Arc<Committed>,
    options: Options,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.commit(batch).await {
                // The working state may now be ahead of the disk; stop rather than acknowledge
                // anything that could be lost. Every later write answers `unavailable`.
                tracing::error!(error = %e, dir = %self.dir.display(), "embedded store failed to write; refusing further writes");
                return;
            }
        }
    }

    async fn commit(&mut self, batch: Vec<Job>) -> Result<(), Error> {
        let ctx = Ctx {
            now: now_ms(),
            heartbeat_ttl_ms: self.options.heartbeat_ttl.as_millis() as u64,
            load_publish_ms: self.options.load_publish.as_millis() as u64,
        };
        let mut encoded = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        let mut heard: Vec<String> = Vec::new();
        for job in batch {
            if matches!(job.command, Command::Sweep) {
                self.working.prune_reports(ctx.now);
            }
            // A report goes into the sums first; the command then publishes them when due.
            let accepted = match &job.command {
                Command::Sessions(report) => self.working.accept_report(report, ctx.now),
                _ => Ok(()),
            };
            let result = accepted.and_then(|()| self.working.execute(&job.command, ctx));
            let result = match result {
                Ok(outcome) => {
                    for event in outcome.events {
                        self.working.apply(&event);
                        encoded.push(Encoded::new(event)?);
                    }
                    if let Command::Sessions(report) = &job.command {
                        self.working.note_report(&report.service, ctx);
                    }
                    let ids = State::heartbeat_ids(&job.command);
                    self.working
                        .hear(ids.iter().map(|id| (id.as_str(), ctx.now)));
                    heard.extend_from_slice(ids);
                    Ok(outcome.reply)
                }
                Err(e) => Err(e),
            };
            answers.push((job.reply, result));
        }
        if !encoded.is_empty() {
            let started = Instant::now();
            let mut buf = Vec::with_capacity(encoded.iter().map(|e| e.line.len()).sum());
            for e in &encoded {
                buf.extend_from_slice(&e.line);
            }
            let log = self.log.clone();
            let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                (&*log).write_all(&buf)?;
                log.sync_data()
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))
            .and_then(|r| r.map_err(|e| Error::Unavailable(format!("appending to {LOG}: {e}"))));
            if let Err(e) = written {
                for (reply, _) in answers {
                    let _ = reply.send(Err(e.clone()));
                }
                return Err(e);
            }
            let m = &self.committed.metrics;
            m.commits.inc();
            m.commit_seconds.observe(started.elapsed().as_secs_f64());
            if let Err(gap) = self.committed.publish(&encoded) {
                // Cannot happen: this task is the only publisher. Resynchronise anyway.
                tracing::error!(?gap, "embedded store published out of order");
                self.committed.reset(self.working.clone());
            }
            self.lines += encoded.len();
        }
        if !heard.is_empty() {
            // Readers see heartbeats too (an instance's `last_heartbeat`).
            let heard = heard.iter().map(|id| (id.as_str(), ctx.now));
            self.committed.view_mut().state.hear(heard);
        }
        for (reply, result) in answers {
            let _ = reply.send(result);
        }
        if self.lines >= self.options.compact_after {
            self.compact().await?;
        }
        Ok(())
    }

    /// Starts folding the log into the snapshot in the background, unless a fold is still
    /// running (the log then grows a little longer). A failed fold stops the store, as a
    /// failed append does.
    async fn compact(&mut self) -> Result<(), Error> {
        if let Some(fold) = &self.folding {
            if !fold.is_finished() {
                return Ok(());
            }
        }
        if let Some(fold) = self.folding.take() {
            fold.await
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(|e| Error::Unavailable(format!("compacting into {SNAPSHOT}: {e}")))?;
        }
        let unavailable =
            |e: std::io::Error| Error::Unavailable(format!("starting a fold of {LOG}: {e}"));
        // Every event up to the working revision is in the log and fsynced: the renamed file
        // holds exactly what the snapshot below will.
        std::fs::rename(self.dir.join(LOG), self.dir.join(FOLDING)).map_err(unavailable)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(LOG))
            .map_err(unavailable)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(unavailable)?;
        self.log = Arc::new(log);
        let lines = std::mem::take(&mut self.lines);
        let state = self.working.clone();
        let dir = self.dir.clone();
        self.folding = Some(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let folded = write_snapshot(&dir, &state)
                .and_then(|()| std::fs::remove_file(dir.join(FOLDING)))
                .and_then(|()| File::open(&dir)?.sync_all());
            match &folded {
                Ok(()) => tracing::info!(
                    lines,
                    revision = state.revision,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "log folded into the snapshot"
                ),
                // The next fold stops the store with this error; until then nothing is lost:
                // both logs are on disk.
                Err(e) => {
                    tracing::error!(error = %e, dir = %dir.display(), "folding the log into the snapshot failed")
                }
            }
            folded
        }));
        Ok(())
    }
}

/// Writes `state` as the new snapshot: a crash at any point leaves the old one or the new one.
fn write_snapshot(dir: &Path, state: &State) -> std::io::Result<()> {
    let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(state)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(SNAPSHOT))?;
    File::open(dir)?.sync_all()
}

/// One log file's events, where its last readable line ends, and its length.
fn read_log(path: &Path) -> Result<(Vec<WatchEvent>, usize, usize), Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(Error::Unavailable(format!(
                "reading {}: {e}",
                path.display()
            )))
        }
    };
    let mut events = Vec::new();
    let mut good_end = 0;
    let mut pos = 0;
    let mut torn_at = None;
    while let Some(nl) = bytes[pos..].iter().position(|b| *b == b'\n') {
        let end = pos + nl + 1;
        match serde_json::from_slice::<WatchEvent>(&bytes[pos..end - 1]) {
            Ok(ev) if torn_at.is_none() => {
                events.push(ev);
                good_end = end;
            }
            // A valid line after a broken one: not a torn append but corruption.
            Ok(_) => {
                return Err(Error::Unavailable(format!(
                    "{}: unreadable line at byte {} followed by valid ones; refusing to guess",
                    path.display(),
                    torn_at.unwrap_or(0)
                )))
            }
            Err(_) => torn_at = torn_at.or(Some(pos)),
        }
        pos = end;
    }
    Ok((events, good_end, bytes.len()))
}

/// Rebuilds the state from the snapshot and the logs, cutting off a torn tail, and finishes
/// a fold a crash interrupted.
fn recover(dir: &Path) -> Result<(State, File, usize), Error> {
    let io = |what: &str, e: std::io::Error| {
        Error::Unavailable(format!("{what} in {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("creating the data directory", e))?;
    let mut state = match std::fs::read(dir.join(SNAPSHOT)) {
        Ok(bytes) => serde_json::from_slice::<State>(&bytes).map_err(|e| {
            Error::Unavailable(format!(
                "{}: corrupt snapshot: {e}",
                dir.join(SNAPSHOT).display()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) => return Err(io("reading the snapshot", e)),
    };
    let folding_path = dir.join(FOLDING);
    let folding = folding_path.exists();
    let (folded, end, len) = read_log(&folding_path)?;
    if end < len {
        // It was renamed only after every line in it was fsynced.
        return Err(Error::Unavailable(format!(
            "{}: unreadable tail at byte {end} in a log that was complete; refusing to guess",
            folding_path.display()
        )));
    }
    let log_path = dir.join(LOG);
    let (events, good_end, len) = read_log(&log_path)?;
    for ev in folded.iter().chain(&events) {
        if ev.revision <= state.revision {
            continue; // already in the snapshot (a crash during a fold)
        }
        if ev.revision != state.revision + 1 {
            return Err(Error::Unavailable(format!(
                "{}: revision {} follows {}; the log is not contiguous",
                log_path.display(),
                ev.revision,
                state.revision
            )));
        }
        state.apply(ev);
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io("opening the log", e))?;
    if good_end < len {
        tracing::warn!(
            bytes = len - good_end,
            "cutting off a torn write at the end of the log"
        );
        log.set_len(good_end as u64)
            .map_err(|e| io("truncating the log", e))?;
        log.sync_all().map_err(|e| io("syncing the log", e))?;
    }
    if folding {
        // Finish the fold: the snapshot takes everything, then both logs go.
        write_snapshot(dir, &state).map_err(|e| io("finishing a fold", e))?;
        std::fs::remove_file(&folding_path).map_err(|e| io("removing the folded log", e))?;
        log.set_len(0).map_err(|e| io("emptying the log", e))?;
        log.sync_all().map_err(|e| io("syncing the log", e))?;
        tracing::info!(
            revision = state.revision,
            "finished a fold a stop interrupted"
        );
        return Ok((state, log, 0));
    }
    Ok((state, log, events.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::*;

    fn spec(ttl: u64) -> Command {
        Command::PutService {
            name: "svc".into(),
            spec: ServiceSpec {
                sessions: SessionSettings {
                    cookie_name: "c".into(),
                    idle_ttl_ms: ttl,
                    max_drain_ms: 10,
                },
                routes: Default::default(),
            },
        }
    }

    async fn open(dir: &Path, compact_after: usize) -> EmbeddedStore {
        let options = Options {
            compact_after,
            ..Options::default()
        };
        EmbeddedStore::open(dir, options, Arc::new(Metrics::new()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn reopens_with_every_acknowledged_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000).await;
        for ttl in 1..=20 {
            store.execute(spec(ttl)).await.unwrap();
        }
        let rev = store.committed().revision();
        drop(store);
        let store = open(dir.path(), 1000).await;
        assert_eq!(store.committed().revision(), rev);
        let s = store.committed().read(|s| s.service("svc")).unwrap();
        assert_eq!(s.sessions.idle_ttl_ms, 20);
    }

    #[tokio::test]
    async fn compaction_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 5).await;
        for ttl in 1..=12 {
            store.execute(spec(ttl)).await.unwrap();
        }
        let rev = store.committed().revision();
        drop(store);
        let folded =
            || async { dir.path().join(SNAPSHOT).exists() && !dir.path().join(FOLDING).exists() };
        crate::testing::eventually("the last fold to finish", Duration::from_secs(10), folded)
            .await;
        let store = open(dir.path(), 5).await;
        assert_eq!(store.committed().revision(), rev);
        assert_eq!(
            store
                .committed()
                .read(|s| s.service("svc"))
                .unwrap()
                .sessions
                .idle_ttl_ms,
            12
        );
        store.execute(spec(99)).await.unwrap();
        assert_eq!(store.committed().revision(), rev + 1);
    }

    /// A stop in the middle of a fold (the log renamed, the snapshot not yet written, new
    /// writes in a fresh log) loses nothing: recovery replays both logs and finishes the fold.
    #[tokio::test]
    async fn a_fold_interrupted_by_a_stop_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000).await;
        for ttl in 1..=3 {
            store.execute(spec(ttl)).await.unwrap();
        }
        drop(store);
        // What a fold does first, and the writes after it.
        std::fs::rename(dir.path().join(LOG), dir.path().join(FOLDING)).unwrap();
        let store = open(dir.path(), 1000).await;
        assert_eq!(store.committed().revision(), 3);
        assert!(!dir.path().join(FOLDING).exists(), "the fold was finished");
        store.execute(spec(4)).await.unwrap();
        drop(store);
        std::fs::rename(dir.path().join(LOG), dir.path().join(FOLDING)).unwrap();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join(LOG))
            .unwrap();
        // Revision 5, appended to the fresh log while the fold ran.
        let five = Encoded::new(WatchEvent {
            revision: 5,
            change: Change::Service(Service {
                name: "other".into(),
                sessions: SessionSettings {
                    cookie_name: "o".into(),
                    idle_ttl_ms: 1,
                    max_drain_ms: 1,
                },
                weights: Default::default(),
                primary_version: None,
                revision: 5,
                limit_changes: Vec::new(),
                lock: None,
                routes: Default::default(),
            }),
        })
        .unwrap();
        log.write_all(&five.line).unwrap();
        drop(log);
        let store = open(dir.path(), 1000).await;
        assert_eq!(store.committed().revision(), 5);
        let ttl = store.committed().read(|s| s.service("svc")).unwrap();
        assert_eq!(ttl.sessions.idle_ttl_ms, 4);
        assert!(store.committed().read(|s| s.service("other")).is_ok());
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000).await;
        store.execute(spec(1)).await.unwrap();
        store.execute(spec(2)).await.unwrap();
        drop(store);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG))
            .unwrap();
        f.write_all(br#"{"revision":3,"kind":"serv"#).unwrap();
        drop(f);
        let store = open(dir.path(), 1000).await;
        assert_eq!(store.committed().revision(), 2);
        store.execute(spec(3)).await.unwrap();
        drop(store);
        let store = open(dir.path(), 1000).await;
        assert_eq!(
            store.committed().revision(),
            3,
            "appends after the cut are readable"
        );
    }

    #[tokio::test]
    async fn corruption_in_the_middle_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000).await;
        store.execute(spec(1)).await.unwrap();
        store.execute(spec(2)).await.unwrap();
        drop(store);
        let text = std::fs::read_to_string(dir.path().join(LOG)).unwrap();
        let broken = text.replacen("{", "#", 1);
        std::fs::write(dir.path().join(LOG), broken).unwrap();
        let err = EmbeddedStore::open(dir.path(), Options::default(), Arc::new(Metrics::new()))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("refusing to guess"), "{err}");
    }
}
