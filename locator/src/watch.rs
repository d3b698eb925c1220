//! `GET /v1/watch?since=REV`: every committed change as one NDJSON line, pushed as it happens.
//!
//! A watcher that passes the revision it has gets exactly the events after it, from the
//! retained recent events. Without `since`, or when `since` is older than what is retained (or
//! newer than anything committed: a locator restored from an older backup), it first gets one
//! `snapshot` event. A watcher too slow for the broadcast buffer also gets a fresh snapshot
//! rather than a silent gap. An empty line every keep-alive period lets both sides notice a
//! dead connection.
//!
//! `GET /v1/watch?service=a,b` gets only what concerns those services (their snapshot part,
//! and their service, instance, release and traffic events): a proxy serves a few services and
//! need not hear of the others. Revisions stay the locator's, so a filtered stream has gaps;
//! `since` still means "everything of mine after this".
//!
//! `GET /v1/watch?routing=true` gets only the events that can change a proxy's routing table
//! ([`Change::is_routing`](crate::api::Change::is_routing)): service settings and instances'
//! state, address and version, not the session sums and heartbeat times that move every
//! second. It follows a feed of its own, so a routing watcher is not even woken for the rest.

use crate::api::Revision;
use crate::error::Error;
use crate::store::{Committed, Feed, Scope};
use bytes::Bytes;
use futures_util::Stream;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError};

/// Decrements the watcher gauge when the stream is dropped (client gone).
struct Counted(Arc<Committed>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.metrics.watchers.dec();
    }
}

struct Watcher {
    committed: Counted,
    rx: broadcast::Receiver<Feed>,
    pending: VecDeque<Bytes>,
    last: Revision,
    keepalive: tokio::time::Interval,
    /// The services this watcher hears of; `None`: all.
    only: Option<Arc<BTreeSet<String>>>,
    scope: Scope,
}

/// Whether an event about `service` (`None`: every service) goes to a watcher of `only`.
fn wanted(only: Option<&BTreeSet<String>>, service: Option<&str>) -> bool {
    match (only, service) {
        (Some(set), Some(s)) => set.contains(s),
        _ => true,
    }
}

/// Opens a watch from `since`. The backlog and the live subscription are taken under one read
/// lock of the committed view, so no event falls between them.
pub fn open(
    committed: Arc<Committed>,
    since: Option<Revision>,
    keepalive: Duration,
    only: Option<BTreeSet<String>>,
    scope: Scope,
) -> Result<impl Stream<Item = Bytes> + Send, Error> {
    let only = only.map(Arc::new);
    let (rx, pending, last) = {
        let view = committed.view();
        let rx = committed.subscribe(scope);
        let current = view.state.revision;
        let oldest = view.recent.front().map(|r| r.revision);
        let replayable = match since {
            Some(s) if s == current => true,
            // Everything after `s` is retained when the oldest retained event is `s + 1`.
            Some(s) if s < current => oldest.is_some_and(|o| o <= s + 1),
            _ => false,
        };
        if replayable {
            let s = since.unwrap_or(current);
            let backlog: VecDeque<Bytes> = view
                .recent
                .iter()
                .filter(|r| {
                    r.revision > s
                        && (scope == Scope::All || r.routing)
                        && wanted(only.as_deref(), r.service.as_deref())
                })
                .map(|r| r.line.clone())
                .collect();
            (rx, backlog, current)
        } else {
            let (rev, line) = committed.snapshot_line(&view, only.as_deref(), scope)?;
            (rx, VecDeque::from([line]), rev)
        }
    };
    committed.metrics.watchers.inc();
    let start = tokio::time::Instant::now() + keepalive;
    let mut keepalive = tokio::time::interval_at(start, keepalive);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watcher = Watcher {
        committed: Counted(committed),
        rx,
        pending,
        last,
        keepalive,
        only,
        scope,
    };
    Ok(futures_util::stream::unfold(watcher, |mut w| async move {
        loop {
            if let Some(line) = w.pending.pop_front() {
                return Some((line, w));
            }
            tokio::select! {
                msg = w.rx.recv() => match msg {
                    Ok(Feed::Event { revision, service, line }) => {
                        if revision > w.last {
                            w.last = revision;
                            if wanted(w.only.as_deref(), service.as_deref()) {
                                w.pending.push_back(line);
                            }
                        }
                    }
                    Ok(Feed::Reset) | Err(RecvError::Lagged(_)) => {
                        let committed = &w.committed.0;
                        let snap =
                            committed.snapshot_line(&committed.view(), w.only.as_deref(), w.scope);
                        match snap {
                            Ok((rev, line)) => {
                                w.last = rev;
                                w.pending.push_back(line);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot build a snapshot for a watcher");
                                return None;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = w.keepalive.tick() => w.pending.push_back(Bytes::from_static(b"\n")),
            }
        }
    }))
}
