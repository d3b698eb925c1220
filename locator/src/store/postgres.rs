//! The PostgreSQL store: several locator replicas on one database.
//!
//! Tables (created by the migrations at start, recorded in `schema_migrations`):
//! - `locator_revision`: one row holding the latest revision. Every write transaction locks it
//!   first (`SELECT … FOR UPDATE`), which orders all writes of all replicas: the release lock,
//!   `If-Match` and every other rule are checked against a state no one else can change
//!   before the commit;
//! - `locator_changes (revision, body)`: every event, the replication log (old rows pruned);
//! - `locator_entities (kind, key, body)`: the latest version of every entity, what a replica
//!   loads at start;
//! - `locator_reports`: each replica's share of the session sums, one row per replica and
//!   service (`proxy_id` holds the replica's id). A proxy's report stays in the memory of the
//!   replica it reached, which adds it to its own sums at once; each replica's sweep writes
//!   its sums here and publishes the total of every live replica's row. A report so costs no
//!   database write and no lock: at a thousand proxies, a report a second each taking the
//!   revision lock and reading every other report was more than the database could serve.
//!   (A proxy that moves to another replica is counted twice until its report on the first
//!   ages out, [`SESSION_REPORT_TTL_MS`]: a drain waits that much longer, never less.)
//!
//! - `locator_heartbeats (id, at)`: when each instance was last heard by any replica. A
//!   heartbeat is held in the memory of the replica it reached (it is not an event: see
//!   `State::hear`); before each sweep a replica writes what it heard here (each instance at
//!   most every TTL/4) and reads what the others heard of the instances it would otherwise
//!   find silent.
//!
//! A write: lock the revision row, catch up on changes other replicas made, run the rules on
//! the caught-up state, insert the events, bump the revision, `NOTIFY locator_changes`, commit,
//! then publish. Each replica also `LISTEN`s on a dedicated connection and, on a notification
//! (or every second, in case one was missed), reads the changes after its revision and
//! publishes them to its own watchers.

use super::{now_ms, Committed, Encoded, Store};
use crate::api::{Change, SessionReport, UnixMillis, WatchEvent};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reports::Reports;
use crate::state::{Command, Ctx, Reply, State, SESSION_REPORT_TTL_MS};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::{AsyncMessage, Client, GenericClient, NoTls};

/// Tunables of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct Options {
    pub heartbeat_ttl: Duration,
    /// See [`crate::state::LOAD_PUBLISH_MS`].
    pub load_publish: Duration,
    /// Changes kept in `locator_changes`; a replica further behind reloads everything.
    pub retain_changes: i64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat_ttl: Duration::from_secs(10),
            load_publish: Duration::from_millis(crate::state::LOAD_PUBLISH_MS),
            retain_changes: 10_000,
        }
    }
}

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE locator_revision (id int PRIMARY KEY, value bigint NOT NULL);
         INSERT INTO locator_revision VALUES (1, 0);
         CREATE TABLE locator_changes (revision bigint PRIMARY KEY, body text NOT NULL);
         CREATE TABLE locator_entities (kind text NOT NULL, key text NOT NULL, body text NOT NULL,
                                        PRIMARY KEY (kind, key));
         CREATE TABLE locator_reports (proxy_id text NOT NULL, service text NOT NULL,
                                       at bigint NOT NULL, body text NOT NULL,
                                       PRIMARY KEY (proxy_id, service));",
    ),
    (
        2,
        "CREATE TABLE locator_heartbeats (id text PRIMARY KEY, at bigint NOT NULL);",
    ),
];

/// An arbitrary constant: the advisory lock that serialises migrations of several replicas.
const MIGRATION_LOCK: i64 = 0x6c6f_6361_746f;

/// See the module documentation.
pub struct PostgresStore {
    url: String,
    committed: Arc<Committed>,
    /// The write connection; `None` after it broke (reconnected on the next write).
    writer: Mutex<Option<Client>>,
    /// The reports of the proxies that reach this replica (see the module documentation).
    local: std::sync::Mutex<Reports>,
    /// This replica's name in `locator_reports`: unique per process.
    replica_id: String,
    /// When each instance's heartbeat was last written to `locator_heartbeats`.
    heard_shared: std::sync::Mutex<std::collections::HashMap<String, UnixMillis>>,
    /// The connection sweeps share through (see [`PostgresStore::share`]).
    sharer: Mutex<Option<Client>>,
    options: Options,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn db(e: tokio_postgres::Error) -> Error {
    let detail = match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    };
    Error::Unavailable(format!("PostgreSQL: {detail}"))
}

fn corrupt(e: serde_json::Error) -> Error {
    Error::Internal(format!("unreadable row in the locator tables: {e}"))
}

async fn open_client(url: &str) -> Result<Client, Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(db)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

impl Store for PostgresStore {
    async fn execute(&self, command: Command) -> Result<Reply, Error> {
        if let Command::Sessions(report) = &command {
            return self.take_report(report);
        }
        if matches!(command, Command::Sweep) {
            // Sums and heartbeats from the other replicas first.
            // Without the other replicas' heartbeats this one would find every instance they
            // hear silent: no sweep then (the sweeper logs the error and tries again).
            if let Err(e) = self.share(now_ms()).await {
                *self.sharer.lock().await = None;
                return Err(e);
            }
        }
        let heartbeats = State::heartbeat_ids(&command);
        if !heartbeats.is_empty() {
            // Most heartbeats change nothing recorded: answered from memory, no lock.
            let now = now_ms();
            let outcome = self
                .committed
                .read(|s| s.execute(&command, self.ctx(now)))?;
            if outcome.events.is_empty() {
                self.hear(heartbeats, now);
                return Ok(outcome.reply);
            }
        }
        let mut guard = self.writer.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(open_client(&self.url).await?);
        }
        let Some(client) = guard.as_mut() else {
            return Err(Error::Internal("no write connection".into()));
        };
        let result = self.write(client, &command).await;
        if result.is_ok() && !heartbeats.is_empty() {
            self.hear(heartbeats, now_ms());
        }
        if let Err(e @ (Error::Unavailable(_) | Error::Internal(_))) = &result {
            tracing::error!(error = %e, "PostgreSQL write failed");
            if client.is_closed() {
                *guard = None;
            }
        }
        result
    }

    fn committed(&self) -> &Arc<Committed> {
        &self.committed
    }
}

impl PostgresStore {
    /// Connects, migrates, loads the state and starts following other replicas.
    pub async fn connect(
        url: &str,
        options: Options,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let mut client = open_client(url).await?;
        migrate(&mut client).await?;
        let mut state = load_consistent(&client).await?;
        state.start_reports(now_ms());
        tracing::info!(revision = state.revision, "PostgreSQL store opened");
        let committed = Arc::new(Committed::new(state, metrics));
        let listener = tokio::spawn(follow(url.to_string(), committed.clone()));
        Ok(PostgresStore {
            url: url.to_string(),
            committed,
            writer: Mutex::new(Some(client)),
            local: Default::default(),
            replica_id: format!("replica-{:016x}", rand::random::<u64>()),
            heard_shared: Default::default(),
            sharer: Mutex::new(None),
            options,
            listener,
        })
    }

    fn ctx(&self, now: UnixMillis) -> Ctx {
        Ctx {
            now,
            heartbeat_ttl_ms: self.options.heartbeat_ttl.as_millis() as u64,
            load_publish_ms: self.options.load_publish.as_millis() as u64,
        }
    }

    fn hear(&self, ids: &[String], now: UnixMillis) {
        let heard = ids.iter().map(|id| (id.as_str(), now));
        self.committed.view_mut().state.hear(heard);
    }

    /// Writes the heartbeats this replica heard (each instance at most every TTL/4, as
    /// heartbeats were once written) and takes in what the others heard of the instances that
    /// look silent here, in one statement each (see the module documentation).
    async fn share_heartbeats(&self, pg: &Client, now: UnixMillis) -> Result<(), Error> {
        let ttl = self.options.heartbeat_ttl.as_millis() as u64;
        let mine: Vec<(String, UnixMillis)> = {
            let mut shared = self.heard_shared.lock().unwrap_or_else(|p| p.into_inner());
            let heard = self.committed.read(|s| s.heard());
            // Instances no longer heard (gone) are forgotten here too.
            let live: std::collections::HashSet<&str> =
                heard.iter().map(|(id, _)| id.as_str()).collect();
            shared.retain(|id, _| live.contains(id.as_str()));
            heard
                .into_iter()
                .filter(|(id, at)| {
                    let due = shared.get(id).is_none_or(|s| *at >= s + ttl / 4);
                    if due {
                        shared.insert(id.clone(), *at);
                    }
                    due
                })
                .collect()
        };
        if !mine.is_empty() {
            let (ids, ats): (Vec<String>, Vec<i64>) =
                mine.into_iter().map(|(id, at)| (id, at as i64)).unzip();
            pg.execute(
                "INSERT INTO locator_heartbeats (id, at) SELECT * FROM UNNEST($1::text[], $2::bigint[])
                 ON CONFLICT (id) DO UPDATE SET at = GREATEST(locator_heartbeats.at, EXCLUDED.at)",
                &[&ids, &ats],
            )
            .await
            .map_err(db)?;
        }
        // Only what this replica would otherwise find silent: with every agent on one replica
        // that is nothing, and no row is read.
        let quiet = self.committed.read(|s| s.quiet(now, ttl / 2));
        if !quiet.is_empty() {
            let rows = pg
                .query(
                    "SELECT id, at FROM locator_heartbeats WHERE id = ANY($1)",
                    &[&quiet],
                )
                .await
                .map_err(db)?;
            let heard = rows
                .iter()
                .map(|r| (r.get::<_, &str>(0), r.get::<_, i64>(1) as u64));
            self.committed.view_mut().state.hear(heard);
        }
        let forgotten = now.saturating_sub(60_000.max(6 * ttl)) as i64;
        pg.execute(
            "DELETE FROM locator_heartbeats WHERE at < $1",
            &[&forgotten],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Before each sweep, on a connection of its own (so that neither the revision lock nor
    /// this replica's other writes wait for it): shares heartbeats and report sums with the
    /// other replicas and takes in theirs.
    async fn share(&self, now: UnixMillis) -> Result<(), Error> {
        let mut guard = self.sharer.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(open_client(&self.url).await?);
        }
        let Some(pg) = guard.as_ref() else {
            return Err(Error::Internal("no sharing connection".into()));
        };
        self.share_heartbeats(pg, now).await?;
        self.share_reports(pg, now).await?;
        let shares = Reports::from_whole(load_reports(pg, now).await?);
        self.committed.view_mut().state.set_reports(shares);
        Ok(())
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Reports> {
        // Reports are plain data updated in one call each; a panic elsewhere cannot leave
        // them half-changed, so a poisoned lock is still usable.
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A proxy's report goes into this replica's own sums, in memory; the sweep shares them.
    fn take_report(&self, report: &SessionReport) -> Result<Reply, Error> {
        let now = now_ms();
        // One hold of the lock for the check and the record: the sweep's pruning in between
        // would turn a report of changes into a whole one.
        let mut local = self.local();
        let known = self
            .committed
            .read(|s| s.checked_report(report, &local, now))?;
        local.record(known, now);
        Ok(Reply::Accepted)
    }

    /// Writes this replica's share of every reported service's sums (see the module
    /// documentation).
    async fn share_reports(&self, pg: &Client, now: UnixMillis) -> Result<(), Error> {
        let shares: Vec<SessionReport> = {
            let mut local = self.local();
            local.prune(now);
            local
                .services()
                .map(|service| local.partial(service, &self.replica_id, now))
                .collect()
        };
        if shares.is_empty() {
            return Ok(());
        }
        // One statement for every service, as for the events and the heartbeats.
        let services: Vec<&str> = shares.iter().map(|s| s.service.as_str()).collect();
        let bodies = shares
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(corrupt)?;
        pg.execute(
            "INSERT INTO locator_reports (proxy_id, service, at, body)
             SELECT $1, service, $2, body FROM UNNEST($3::text[], $4::text[]) AS s (service, body)
             ON CONFLICT (proxy_id, service) DO UPDATE SET at = EXCLUDED.at, body = EXCLUDED.body",
            &[&self.replica_id, &(now as i64), &services, &bodies],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn write(&self, client: &mut Client, command: &Command) -> Result<Reply, Error> {
        let now = now_ms();
        let tx = client.transaction().await.map_err(db)?;
        let row = tx
            .query_one(
                "SELECT value FROM locator_revision WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(db)?;
        let db_revision = row.get::<_, i64>(0) as u64;
        if db_revision > self.committed.revision() {
            catch_up(&tx, &self.committed).await?;
        }
        if self.committed.revision() != db_revision {
            return Err(Error::Internal(format!(
                "replica at revision {} while the database is at {db_revision}",
                self.committed.revision()
            )));
        }
        let ctx = self.ctx(now);
        // A refused command returns here; dropping `tx` rolls it back.
        let outcome = self.committed.read(|s| s.execute(command, ctx))?;
        if matches!(command, Command::Sweep) {
            let old = now.saturating_sub(60_000) as i64;
            tx.execute("DELETE FROM locator_reports WHERE at < $1", &[&old])
                .await
                .map_err(db)?;
            let keep_after = db_revision as i64 - self.options.retain_changes;
            tx.execute(
                "DELETE FROM locator_changes WHERE revision <= $1",
                &[&keep_after],
            )
            .await
            .map_err(db)?;
        }
        if outcome.events.is_empty() {
            tx.commit().await.map_err(db)?;
            return Ok(outcome.reply);
        }
        let started = Instant::now();
        let mut encoded = Vec::with_capacity(outcome.events.len());
        let (mut revisions, mut lines) = (Vec::new(), Vec::new());
        // The latest body of each entity the events touch (an entity changed twice in one
        // command is written once: one statement cannot update a row twice).
        let mut entities: BTreeMap<(&'static str, String), String> = BTreeMap::new();
        for event in outcome.events {
            let e = Encoded::new(event)?;
            let line = std::str::from_utf8(&e.line[..e.line.len() - 1])
                .map_err(|err| Error::Internal(err.to_string()))?;
            revisions.push(e.event.revision as i64);
            lines.push(line.to_string());
            let body = serde_json::to_string(&e.event.change).map_err(corrupt)?;
            entities.insert(entity_key(&e.event.change), body);
            encoded.push(e);
        }
        // One statement per table, whatever the number of events: a sweep publishing the
        // session sums of ten thousand instances was twenty thousand round trips under the
        // revision lock, and every write waited for them.
        tx.execute(
            "INSERT INTO locator_changes (revision, body) SELECT * FROM UNNEST($1::bigint[], $2::text[])",
            &[&revisions, &lines],
        )
        .await
        .map_err(db)?;
        let (mut kinds, mut keys, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
        for ((kind, key), body) in entities {
            kinds.push(kind);
            keys.push(key);
            bodies.push(body);
        }
        tx.execute(
            "INSERT INTO locator_entities (kind, key, body)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])
             ON CONFLICT (kind, key) DO UPDATE SET body = EXCLUDED.body",
            &[&kinds, &keys, &bodies],
        )
        .await
        .map_err(db)?;
        let last = encoded
            .last()
            .map(|e| e.event.revision)
            .unwrap_or(db_revision);
        tx.execute(
            "UPDATE locator_revision SET value = $1 WHERE id = 1",
            &[&(last as i64)],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "SELECT pg_notify('locator_changes', $1)",
            &[&last.to_string()],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let m = &self.committed.metrics;
        m.commits.inc();
        m.commit_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(gap) = self.committed.publish(&encoded) {
            tracing::error!(?gap, "published out of order; reloading");
            let client = open_client(&self.url).await?;
            self.committed.reset(load_consistent(&client).await?);
        }
        Ok(outcome.reply)
    }
}

fn entity_key(change: &Change) -> (&'static str, String) {
    match change {
        Change::Service(s) => ("service", s.name.clone()),
        Change::Instance(i) => ("instance", i.id.clone()),
        Change::Release(r) => ("release", r.id.clone()),
        Change::Traffic { service, .. } => ("traffic", service.clone()),
        Change::Snapshot(_) => ("snapshot", String::new()),
    }
}

async fn migrate(client: &mut Client) -> Result<(), Error> {
    let tx = client.transaction().await.map_err(db)?;
    // Two replicas starting together must not both create the tables.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version bigint PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(db)?;
    let applied: Vec<i64> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(db)?;
        tracing::info!(version, "applied migration");
    }
    tx.commit().await.map_err(db)
}

/// Loads the whole state in one repeatable-read snapshot.
async fn load_consistent(client: &Client) -> Result<State, Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(db)?;
    let state = load_state(client).await;
    client.batch_execute("COMMIT").await.map_err(db)?;
    state
}

async fn load_state<C: GenericClient>(client: &C) -> Result<State, Error> {
    let revision = client
        .query_one("SELECT value FROM locator_revision WHERE id = 1", &[])
        .await
        .map_err(db)?
        .get::<_, i64>(0) as u64;
    let mut state = State::default();
    for row in client
        .query("SELECT body FROM locator_entities", &[])
        .await
        .map_err(db)?
    {
        let change: Change = serde_json::from_str(row.get::<_, &str>(0)).map_err(corrupt)?;
        state.apply(&WatchEvent { revision, change });
    }
    state.revision = revision;
    Ok(state)
}

async fn load_reports<C: GenericClient>(
    client: &C,
    now: UnixMillis,
) -> Result<Vec<(UnixMillis, SessionReport)>, Error> {
    let since = now.saturating_sub(SESSION_REPORT_TTL_MS) as i64;
    let rows = client
        .query(
            "SELECT at, body FROM locator_reports WHERE at > $1",
            &[&since],
        )
        .await
        .map_err(db)?;
    rows.iter()
        .map(|r| {
            let report = serde_json::from_str(r.get::<_, &str>(1)).map_err(corrupt)?;
            Ok((r.get::<_, i64>(0) as u64, report))
        })
        .collect()
}

/// Publishes the changes after this replica's revision; reloads everything if they are no
/// longer retained.
async fn catch_up<C: GenericClient>(client: &C, committed: &Committed) -> Result<(), Error> {
    let from = committed.revision();
    let rows = client
        .query(
            "SELECT revision, body FROM locator_changes WHERE revision > $1 ORDER BY revision",
            &[&(from as i64)],
        )
        .await
        .map_err(db)?;
    let Some(first) = rows.first() else {
        return Ok(());
    };
    if first.get::<_, i64>(0) as u64 > from + 1 {
        tracing::warn!(
            from,
            "changes no longer retained; reloading the whole state"
        );
        committed.reset(load_state(client).await?);
        return Ok(());
    }
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let body: &str = row.get(1);
        let event: WatchEvent = serde_json::from_str(body).map_err(corrupt)?;
        let mut line = Vec::with_capacity(body.len() + 1);
        line.extend_from_slice(body.as_bytes());
        line.push(b'\n');
        events.push(Encoded {
            event,
            line: line.into(),
        });
    }
    if let Err(gap) = committed.publish(&events) {
        tracing::warn!(?gap, "gap in the changes; reloading the whole state");
        committed.reset(load_state(client).await?);
    }
    Ok(())
}

/// Follows other replicas forever: LISTEN on a dedicated connection, reconnecting on failure.
async fn follow(url: String, committed: Arc<Committed>) {
    loop {
        if let Err(e) = follow_once(&url, &committed).await {
            tracing::warn!(error = %e, "following PostgreSQL changes failed; reconnecting");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn follow_once(url: &str, committed: &Committed) -> Result<(), Error> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.map_err(db)?;
    let (notify, mut notified) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if notify.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed");
                    return;
                }
            }
        }
    });
    let result = async {
        client
            .batch_execute("LISTEN locator_changes")
            .await
            .map_err(db)?;
        catch_up(&client, committed).await?;
        // Safety net: a notification lost with a broken connection is picked up here.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                n = notified.recv() => {
                    if n.is_none() {
                        return Err(Error::Unavailable("LISTEN connection closed".into()));
                    }
                    while notified.try_recv().is_ok() {} // one read covers them all
                }
                _ = tick.tick() => {}
            }
            catch_up(&client, committed).await?;
        }
    }
    .await;
    driver.abort();
    result
}
