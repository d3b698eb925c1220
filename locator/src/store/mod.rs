//! Where committed state lives: one [`Store`] trait, two implementations.
//!
//! Both stores run every write through the same rules ([`State::execute`]) and differ only in
//! how they make the resulting events durable and how they number them:
//! - [`embedded`]: one process, an fsynced append-only log on local disk (the default);
//! - [`postgres`]: several replicas on one database, ordered by one revision row, following
//!   each other through `LISTEN/NOTIFY`.
//!
//! What readers and watchers see is the [`Committed`] view every store keeps: only events that
//! are durable are applied to it, so nothing a client reads can be lost by a crash.

pub mod embedded;
pub mod postgres;

use crate::api::{Change, Revision, UnixMillis, WatchEvent};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::state::{Command, Reply, State};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use tokio::sync::broadcast;

/// A durable home for the locator's state.
pub trait Store: Send + Sync + 'static {
    /// Runs `command` through the rules and, if it produced changes, commits them durably
    /// before answering. A refused command changes nothing.
    fn execute(&self, command: Command) -> impl Future<Output = Result<Reply, Error>> + Send;

    /// The committed view readers and watchers use.
    fn committed(&self) -> &Arc<Committed>;
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One committed event with its wire form (one NDJSON line, newline included), serialised
/// once and shared by the log file, the replication table and every watcher.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub event: WatchEvent,
    pub line: Bytes,
}

impl Encoded {
    pub fn new(event: WatchEvent) -> Result<Self, Error> {
        let mut line = serde_json::to_vec(&event)
            .map_err(|e| Error::Internal(format!("cannot serialise an event: {e}")))?;
        line.push(b'\n');
        Ok(Encoded {
            event,
            line: line.into(),
        })
    }
}

/// What watchers receive from the committed view.
#[derive(Debug, Clone)]
pub enum Feed {
    Event {
        revision: Revision,
        /// The service the event is about (`None`: every service), for filtered watchers.
        service: Option<Arc<str>>,
        line: Bytes,
    },
    /// The view was replaced wholesale (a replica that fell too far behind reloaded):
    /// every watcher must start again from a snapshot.
    Reset,
}

/// Events were not contiguous with the view: the caller must reload the whole state.
#[derive(Debug)]
pub struct Gap {
    pub have: Revision,
    pub got: Revision,
}

/// Routing watchers' snapshot lines of one routing revision, keyed by service filter.
#[derive(Default)]
struct RoutingSnapshots {
    routing_revision: Revision,
    lines: HashMap<Option<BTreeSet<String>>, (Revision, Bytes)>,
}

/// Filters kept per routing revision at most (a proxy's filter is its service list).
const ROUTING_SNAPSHOTS: usize = 1024;

/// One retained event: its revision, its service (`None`: every service), whether it routes
/// (see [`Change::is_routing`]) and its line.
pub(crate) struct Retained {
    pub(crate) revision: Revision,
    pub(crate) service: Option<Arc<str>>,
    pub(crate) routing: bool,
    pub(crate) line: Bytes,
}

/// Which of the two feeds a watcher follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every event.
    All,
    /// Only events that can change a proxy's routing table. They are a few a minute, where
    /// session sums and heartbeat times are thousands a second at ten thousand instances: a
    /// feed of their own means a thousand proxies are not woken for each of those.
    Routing,
}

pub(crate) struct View {
    pub(crate) state: State,
    /// The revision of the last event that could change a routing table (see
    /// [`Scope::Routing`]): a routing watcher's snapshot taken since is still good.
    pub(crate) routing_revision: Revision,
    /// The most recent events, so that a watcher reconnecting with `since` gets exactly what
    /// it missed instead of a full snapshot.
    pub(crate) recent: VecDeque<Retained>,
}

/// The committed state as readers and watchers see it.
pub struct Committed {
    view: RwLock<View>,
    feed: broadcast::Sender<Feed>,
    /// The routing events of `feed` alone (see [`Scope::Routing`]).
    routing_feed: broadcast::Sender<Feed>,
    retain: usize,
    /// `GET /v1/snapshot` is the proxies' hot read: serialise it once per revision.
    snapshot_cache: Mutex<Option<(Revision, Bytes)>>,
    /// Routing watchers' first lines, per service filter, good until the next routing event
    /// (see [`Committed::snapshot_line`]).
    routing_snapshots: Mutex<RoutingSnapshots>,
    pub metrics: Arc<Metrics>,
}

impl Committed {
    pub fn new(state: State, metrics: Arc<Metrics>) -> Self {
        metrics.revision.set(state.revision as i64);
        let (feed, _) = broadcast::channel(4096);
        let (routing_feed, _) = broadcast::channel(4096);
        Committed {
            view: RwLock::new(View {
                routing_revision: state.revision,
                state,
                recent: VecDeque::new(),
            }),
            feed,
            routing_feed,
            retain: 10_000,
            snapshot_cache: Mutex::new(None),
            routing_snapshots: Default::default(),
            metrics,
        }
    }

    pub(crate) fn view(&self) -> RwLockReadGuard<'_, View> {
        // A panic while holding the lock cannot leave the view half-applied in a way readers
        // could misuse (apply is infallible), so a poisoned lock is still usable.
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn view_mut(&self) -> RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the committed state.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.view().state)
    }

    pub fn revision(&self) -> Revision {
        self.view().state.revision
    }

    pub(crate) fn subscribe(&self, scope: Scope) -> broadcast::Receiver<Feed> {
        match scope {
            Scope::All => self.feed.subscribe(),
            Scope::Routing => self.routing_feed.subscribe(),
        }
    }

    /// Applies durable events, logs the state changes among them and hands them to watchers.
    /// Events at or below the current revision are skipped (a replica may learn of the same
    /// change twice: from its own commit and from the notification), so each replica logs each
    /// change once.
    pub fn publish(&self, events: &[Encoded]) -> Result<(), Gap> {
        let mut view = self.view_mut();
        for e in events {
            let have = view.state.revision;
            if e.event.revision <= have {
                continue;
            }
            if e.event.revision != have + 1 {
                return Err(Gap {
                    have,
                    got: e.event.revision,
                });
            }
            view.state.log_change(&e.event);
            let routing = view.state.is_routing(&e.event.change);
            view.state.apply(&e.event);
            if routing {
                view.routing_revision = e.event.revision;
                if let Some(service) = e.event.change.service() {
                    let labels = crate::metrics::ServiceLabels {
                        service: service.to_string(),
                    };
                    let gauge = self.metrics.routing_revision.get_or_create(&labels);
                    gauge.set(e.event.revision as i64);
                }
            }
            let service: Option<Arc<str>> = e.event.change.service().map(Arc::from);
            view.recent.push_back(Retained {
                revision: e.event.revision,
                service: service.clone(),
                routing,
                line: e.line.clone(),
            });
            if view.recent.len() > self.retain {
                view.recent.pop_front();
            }
            let feed = Feed::Event {
                revision: e.event.revision,
                service,
                line: e.line.clone(),
            };
            // No receivers is fine: nobody is watching.
            if routing {
                let _ = self.routing_feed.send(feed.clone());
            }
            let _ = self.feed.send(feed);
            self.metrics.events.inc();
        }
        self.metrics.revision.set(view.state.revision as i64);
        Ok(())
    }

    /// Replaces the whole view (after a reload) and tells every watcher to start over.
    pub fn reset(&self, mut state: State) {
        let mut view = self.view_mut();
        // Reports are local knowledge the reload did not carry.
        std::mem::swap(&mut state, &mut view.state);
        let reports_state = state;
        view.state.take_reports_from(reports_state);
        view.recent.clear();
        view.routing_revision = view.state.revision;
        self.metrics.revision.set(view.state.revision as i64);
        let _ = self.feed.send(Feed::Reset);
        let _ = self.routing_feed.send(Feed::Reset);
    }

    /// The body of `GET /v1/snapshot`, cached per revision.
    pub fn snapshot_json(&self) -> Result<Bytes, Error> {
        let view = self.view();
        let rev = view.state.revision;
        let mut cache = self
            .snapshot_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((r, body)) = cache.as_ref() {
            if *r == rev {
                return Ok(body.clone());
            }
        }
        let body: Bytes = serde_json::to_vec(&view.state.snapshot())
            .map_err(|e| Error::Internal(format!("cannot serialise the snapshot: {e}")))?
            .into();
        *cache = Some((rev, body.clone()));
        Ok(body)
    }

    /// A `snapshot` watch line of `only` these services when given (all otherwise), and its
    /// revision. For [`Scope::All`], at the current revision. For [`Scope::Routing`], possibly
    /// an earlier one, built for another watcher of the same filter since the last routing
    /// event: it routes exactly as the current state, and the watcher's live events all come
    /// after it. A thousand proxies reconnecting after a restart then cost one serialisation
    /// per service, not one of the whole service each.
    pub(crate) fn snapshot_line(
        &self,
        view: &View,
        only: Option<&BTreeSet<String>>,
        scope: Scope,
    ) -> Result<(Revision, Bytes), Error> {
        let build = || {
            let rev = view.state.revision;
            let e = Encoded::new(WatchEvent {
                revision: rev,
                change: Change::Snapshot(view.state.snapshot_of(only)),
            })?;
            Ok::<_, Error>((rev, e.line))
        };
        if scope == Scope::All {
            return build();
        }
        let mut cache = self
            .routing_snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cache.routing_revision != view.routing_revision {
            *cache = RoutingSnapshots {
                routing_revision: view.routing_revision,
                lines: HashMap::new(),
            };
        }
        let key = only.cloned();
        if let Some(hit) = cache.lines.get(&key) {
            return Ok(hit.clone());
        }
        let line = build()?;
        if cache.lines.len() < ROUTING_SNAPSHOTS {
            cache.lines.insert(key, line.clone());
        }
        Ok(line)
    }
}

/// Runs [`Command::Sweep`] every `every` until the store is dropped everywhere else.
pub fn spawn_sweeper<S: Store>(store: &Arc<S>, every: Duration) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            if let Err(e) = store.execute(Command::Sweep).await {
                tracing::warn!(error = %e, "sweep failed");
            }
        }
    })
}
