//! The locator as a driving haddock sees it: a [`Snapshot`] kept current by the watch stream,
//! the same push the proxies get. The bake, the drain and the wait for an operator's abort
//! react to a change the moment it is committed instead of polling for it.
//!
//! A background task follows `GET /v1/watch` (resuming from the last revision it saw, with
//! backoff while the locator is away) and publishes each new snapshot on a
//! `tokio::sync::watch` channel. Readers also wake every [`SAFETY`] without a change, and
//! those that act on what they read (operator controls) re-read the locator over HTTP then,
//! so a stalled stream costs at most that much.

use locator_wire::api::{Release, Snapshot, TrafficByVersion};
use locator_wire::client::Client;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The longest a reader waits without any change before it looks again anyway.
pub const SAFETY: Duration = Duration::from_secs(1);

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A followed copy of the locator's state; stops following when dropped.
pub struct View {
    rx: watch::Receiver<Snapshot>,
    task: JoinHandle<()>,
}

impl View {
    /// Starts following the locator. The first snapshot arrives with the stream's first event;
    /// until then the view is empty (readers fall back to HTTP where it matters).
    pub fn follow(client: Client) -> View {
        let (tx, rx) = watch::channel(Snapshot::default());
        let task = tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut snapshot = Snapshot::default();
            let mut backoff = MIN_BACKOFF;
            loop {
                let since = (snapshot.revision > 0).then_some(snapshot.revision);
                if let Ok(stream) = client.watch(since).await {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(Ok(event)) = stream.next().await {
                        backoff = MIN_BACKOFF;
                        snapshot.apply(&event);
                        if tx.send(snapshot.clone()).is_err() {
                            return;
                        }
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
        View { rx, task }
    }

    /// Waits for the next change, at most `limit` (`SAFETY` at most).
    pub async fn changed(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit.min(SAFETY), self.rx.changed()).await;
    }

    /// The traffic figures of `service` by version, as the proxies last reported them.
    pub fn traffic(&self, service: &str) -> TrafficByVersion {
        self.rx
            .borrow()
            .traffic
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// The release as the view holds it (`None` before the first snapshot, or once finished).
    pub fn release(&self, id: &str) -> Option<Release> {
        self.rx
            .borrow()
            .releases
            .iter()
            .find(|r| r.id == id)
            .cloned()
    }

    /// Whether the view has seen the locator at all yet.
    pub fn is_live(&self) -> bool {
        self.rx.borrow().revision > 0
    }

    /// The instances of `service` as the view holds them.
    pub fn instances(&self, service: &str) -> Vec<locator_wire::api::Instance> {
        self.rx
            .borrow()
            .instances
            .iter()
            .filter(|i| i.service == service)
            .cloned()
            .collect()
    }

    /// A receiver of its own, for a reader that waits beside another (the abort watch).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.rx.clone()
    }
}

impl Drop for View {
    fn drop(&mut self) {
        self.task.abort();
    }
}
