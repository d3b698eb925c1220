//! The Docker events of a release's new containers: a die, an OOM kill or a failed Docker
//! HEALTHCHECK is a reason to roll back, and the bake should hear of it at its next tick rather
//! than at the next readiness probe.
//!
//! One background task per Docker host forwards that host's event stream into one channel;
//! [`Events`] owns the tasks and the receiving end, and stops the tasks when it is stopped or
//! dropped.

use crate::docker::{ContainerEvent, Host};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The new containers' trouble, as reported by Docker. The default watches nothing (and so
/// reports nothing): a run has one before it starts watching.
#[derive(Default)]
pub(super) struct Events {
    rx: Option<mpsc::UnboundedReceiver<ContainerEvent>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Events {
    /// Starts watching the containers of `release` of `service` on every host.
    pub(super) fn spawn(hosts: &[Host], service: &str, release: &str) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for h in hosts {
            let stream = h.events(service, Some(release));
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                use futures_util::StreamExt;
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            }));
        }
        Events {
            rx: Some(rx),
            tasks,
        }
    }

    /// A die/oom/unhealthy event of a new container, if any arrived.
    pub(super) fn trouble(&mut self) -> Option<String> {
        let ev = self.rx.as_mut()?.try_recv().ok()?;
        Some(describe(ev))
    }

    /// Waits for the next die/oom/unhealthy event of a new container (forever, when nothing
    /// is watched): the bake waits on this beside the locator's changes, so a container's
    /// death is acted on the moment Docker reports it.
    pub(super) async fn next_trouble(&mut self) -> String {
        match self.rx.as_mut() {
            Some(rx) => match rx.recv().await {
                Some(ev) => describe(ev),
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Stops the forwarding tasks (events already received can still be read).
    pub(super) fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

/// What an event says about the new instance, as a reason to roll back.
fn describe(ev: ContainerEvent) -> String {
    {
        let what = match ev.action.as_str() {
            "die" => format!(
                "exited with code {}",
                ev.exit_code.as_deref().unwrap_or("?")
            ),
            "oom" => "was killed by the OOM killer".to_string(),
            _ => "is unhealthy (Docker HEALTHCHECK)".to_string(),
        };
        let who = if ev.instance.is_empty() {
            &ev.container
        } else {
            &ev.instance
        };
        format!("new instance {who} {what}")
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.stop();
    }
}
