//! Draining: waiting until instances that get no new sessions have finished with the ones they
//! have.
//!
//! Every proxy reports, per instance, its live sessions (a session lives until it has been idle
//! for the service's `idle_ttl`) and in-flight requests; the locator sums them over the proxies.
//! An instance is drained when both are zero, or when the deadline passes (the spec's
//! `max_drain` after promotion; a short bound on in-flight requests only when rolling back, so
//! that users leave a bad version at once).

use crate::error::Result;
use crate::view::View;
use locator_wire::api::{Instance, InstanceLoad};
use locator_wire::client::Client;
use std::time::{Duration, Instant};

/// What to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// No live sessions and no in-flight requests.
    SessionsExpired,
    /// No in-flight requests (sessions will be moved by the proxy when the instance goes).
    RequestsFinished,
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drained {
    pub waited: Duration,
    /// False when the deadline cut it short.
    pub clean: bool,
    /// Live sessions and in-flight requests left at the end (summed).
    pub left: InstanceLoad,
}

/// Whether these instances (as the locator reports them) are drained.
pub fn is_drained(instances: &[&Instance], until: Until) -> (bool, InstanceLoad) {
    let left = instances
        .iter()
        .fold(InstanceLoad::default(), |acc, i| InstanceLoad {
            live_sessions: acc.live_sessions + i.load.live_sessions,
            in_flight: acc.in_flight + i.load.in_flight,
        });
    let done = match until {
        Until::SessionsExpired => left.live_sessions == 0 && left.in_flight == 0,
        Until::RequestsFinished => left.in_flight == 0,
    };
    (done, left)
}

/// Polls the locator until the instances `ids` of `service` are drained or `max` has passed.
/// Instances the locator no longer knows count as drained.
pub async fn wait(
    view: &mut View,
    client: &Client,
    service: &str,
    ids: &[String],
    until: Until,
    max: Duration,
) -> Result<Drained> {
    let start = Instant::now();
    loop {
        // The proxies' session sums arrive on the watch stream the moment they change; the
        // locator is asked directly only before the view has seen it.
        let all = if view.is_live() {
            view.instances(service)
        } else {
            client.instances(service).await?
        };
        let ours: Vec<&Instance> = all.iter().filter(|i| ids.contains(&i.id)).collect();
        let (done, left) = is_drained(&ours, until);
        let waited = start.elapsed();
        if done || waited >= max {
            return Ok(Drained {
                waited,
                clean: done,
                left,
            });
        }
        view.changed(max - waited).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locator_wire::api::InstanceState;

    fn inst(id: &str, live_sessions: u64, in_flight: u64) -> Instance {
        Instance {
            id: id.into(),
            service: "s".into(),
            version: "1".into(),
            address: "10.0.0.1:80".into(),
            docker_host: String::new(),
            container_id: String::new(),
            labels: Default::default(),
            state: InstanceState::Draining,
            registered_at: 0,
            last_heartbeat: 0,
            load: InstanceLoad {
                live_sessions,
                in_flight,
            },
        }
    }

    #[test]
    fn sessions_keep_an_instance_draining_until_they_expire() {
        let a = inst("a", 3, 0);
        let b = inst("b", 0, 0);
        assert!(!is_drained(&[&a, &b], Until::SessionsExpired).0);
        assert!(is_drained(&[&a, &b], Until::RequestsFinished).0);
        let c = inst("c", 0, 2);
        let (done, left) = is_drained(&[&b, &c], Until::RequestsFinished);
        assert!(!done);
        assert_eq!(left.in_flight, 2);
        assert!(is_drained(&[], Until::SessionsExpired).0);
    }
}
