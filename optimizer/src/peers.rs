//! The peer optimizers of this instance: those its operator named (`--peer`) and those found
//! in the locator (`--locator`: instances of the same service on other Docker hosts). A pull
//! fetches only from them, and a local miss of a GET reads through them (`server`), never
//! from a URL a client chose.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use locator_wire::api::{Instance, InstanceState};
use tokio::sync::watch;

use crate::error::{Error, Result};

/// The environment variable holding the locator's `read` token of the discovery. Never a
/// flag (argv is readable by every local user), never logged.
pub const LOCATOR_TOKEN_ENV: &str = "OPTIMIZER_LOCATOR_TOKEN";

/// Longest wait for one listing of the locator: `locator_wire`'s client bounds only the
/// connect, and a hung listing must neither freeze the peer list's refresh nor the shutdown.
const LOCATOR_TIMEOUT: Duration = Duration::from_secs(10);

/// A local miss lists the locator again when its last listing is older than this: a peer that
/// registered a moment ago (all hosts of a first release register together, and users reach
/// them some 50 ms later, once haddock sets the weights) must not cost a user a 404 for up to
/// `--peer-refresh`. Bounds the listings misses cause to twenty a second per instance (at
/// 500 ms, one read in a 3-host demo still missed an object its peer had just stored).
pub const FRESH_ENOUGH: Duration = Duration::from_millis(50);

/// Longest a user's read waits for that listing: a hung locator must cost a miss a fraction
/// of a second, not the discovery task's 10 s (nor 10 s per miss queued behind it).
pub const MISS_LISTING_WAIT: Duration = Duration::from_millis(300);

/// How long a peer that could not be reached is asked last (after every other peer of its
/// host, and its host after the others): a lost host costs the reads that reach it, not every
/// read for as long as the locator still lists it.
pub const DOWN_FOR: Duration = Duration::from_secs(10);

/// At most one warning per this period while the locator fails: it is listed every
/// `--peer-refresh` (2 s), and a locator down for an hour must not fill the log.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The peers an instance may fetch from, by their canonical base URL. Pulling from a URL a
/// client chose was a server-side request forgery: any host, path and query of the
/// instance's network, fetched with its address. Clones share the discovered list and the
/// rotation, so the discovery task updates what the server reads.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    /// `--peer`, checked at startup.
    configured: Vec<String>,
    /// From the locator: `(Docker host, canonical URL)`, sorted; replaced whole by each
    /// successful listing. The instances of one host share its volume: one answer per host.
    discovered: Arc<RwLock<Vec<(String, String)>>>,
    /// Start of the next read-through order, so that misses spread over the peers.
    next: Arc<AtomicUsize>,
    /// Where to list the discovered peers, if anywhere (`--locator`).
    discovery: Option<Arc<Discovery>>,
    /// Peers that could not be reached, and until when they are asked last.
    down: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    /// When a listing was last attempted. A tokio mutex: concurrent misses that want a fresh
    /// list wait for the one listing in flight instead of each sending their own.
    listed_at: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// When a listing last answered (for the discovery task's warning).
    answered_at: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Peers {
    /// Checks the configured peer URLs (`http(s)://host[:port][/path]`, nothing else).
    pub fn new(urls: &[String]) -> Result<Peers> {
        let configured = urls
            .iter()
            .map(|u| canonical(u).map_err(|why| Error::Config(format!("--peer {u:?}: {why}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Peers {
            configured,
            ..Peers::default()
        })
    }

    /// These peers, also discovered from the locator (`Peers::discover` keeps them current).
    pub fn discovering(mut self, discovery: Discovery) -> Peers {
        self.discovery = Some(Arc::new(discovery));
        self
    }

    /// Lists the locator now unless a listing was attempted within `age` (answered or not:
    /// a failing locator is not asked once per miss); whether the discovered peers changed.
    /// Without discovery, or when the locator fails, nothing changes. The listing waits at most
    /// `wait` (the discovery task gives it 10 s; a user's read much less).
    pub async fn refresh_if_older(&self, age: Duration, wait: Duration) -> bool {
        let Some(d) = &self.discovery else {
            return false;
        };
        // The lock too within `wait`: the discovery task may hold it through a slow listing.
        let Ok(mut listed_at) = tokio::time::timeout(wait, self.listed_at.lock()).await else {
            return false;
        };
        if listed_at.is_some_and(|at| at.elapsed() < age) {
            return false;
        }
        *listed_at = Some(Instant::now());
        match tokio::time::timeout(wait, d.locator.instances(&d.service)).await {
            Ok(Ok(instances)) => {
                *self.answered_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                let changed = self.set_discovered(&peers_from(&instances, &d.own_host, &d.own_id));
                if changed {
                    tracing::info!(peers = ?self.discovered(), "discovered peers changed");
                }
                changed
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "listing peers from the locator failed");
                false
            }
            Err(_) => false,
        }
    }

    /// The known peer (configured or discovered) a pull's `from=` names, as its base URL
    /// without a trailing slash.
    pub fn resolve(&self, from: &str) -> Result<String> {
        let wanted = canonical(from).map_err(|_| Error::UnknownPeer(from.to_owned()))?;
        if self.configured.contains(&wanted)
            || self.discovered_read().iter().any(|(_, url)| *url == wanted)
        {
            Ok(wanted)
        } else {
            Err(Error::UnknownPeer(from.to_owned()))
        }
    }

    /// Replaces the discovered peers with `found`, `(Docker host, URL)` pairs (those whose URL
    /// is not a valid base URL are dropped). Whether the list changed.
    pub fn set_discovered(&self, found: &[(String, String)]) -> bool {
        let mut found: Vec<(String, String)> = found
            .iter()
            .filter_map(|(host, u)| match canonical(u) {
                Ok(c) => Some((host.clone(), c)),
                Err(why) => {
                    tracing::debug!(url = %u, %why, "ignoring a discovered peer");
                    None
                }
            })
            .collect();
        // Sorted: the locator's order is not promised, and the rotation wants a stable one.
        found.sort();
        found.dedup();
        let mut current = self.discovered.write().unwrap_or_else(|p| p.into_inner());
        if *current == found {
            return false;
        }
        *current = found;
        true
    }

    /// The discovered peers' URLs now.
    pub fn discovered(&self) -> Vec<String> {
        self.discovered_read()
            .iter()
            .map(|(_, url)| url.clone())
            .collect()
    }

    /// Asks `url` last for [`DOWN_FOR`]: it could not be reached.
    pub fn mark_down(&self, url: &str) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        down.retain(|_, until| *until > now);
        down.insert(url.to_owned(), now + DOWN_FOR);
    }

    /// Every known peer once, grouped by the host whose volume it serves (each configured peer
    /// is a host of its own) as `(host, URLs)`, in an order rotated by one more place at each
    /// call, the hosts and the instances within each, so that the misses of all clients do not
    /// all land on the first peer. Peers marked down ([`Peers::mark_down`]) come last for
    /// [`DOWN_FOR`], behind the others of their host, and a host with all its peers down
    /// behind the other hosts: still asked when nothing else has an object (its only copy may
    /// be on a host that just came back), but not before.
    pub fn read_through_order(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = self
            .configured
            .iter()
            .map(|u| (u.clone(), vec![u.clone()]))
            .collect();
        for (host, url) in self.discovered_read().iter() {
            if self.configured.contains(url) {
                continue;
            }
            match groups.iter_mut().find(|(h, _)| h == host) {
                Some((_, urls)) => urls.push(url.clone()),
                None => groups.push((host.clone(), vec![url.clone()])),
            }
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if !groups.is_empty() {
            let by = turn % groups.len();
            groups.rotate_left(by);
        }
        let now = Instant::now();
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let is_down = |u: &String| down.get(u).is_some_and(|until| *until > now);
        for (_, urls) in &mut groups {
            let by = turn % urls.len();
            urls.rotate_left(by);
            // Stable sorts: the rotation stays among the peers that answer.
            urls.sort_by_key(|u| is_down(u));
        }
        groups.sort_by_key(|(_, urls)| urls.iter().all(&is_down));
        groups
    }

    fn discovered_read(&self) -> std::sync::RwLockReadGuard<'_, Vec<(String, String)>> {
        self.discovered.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the discovered peers current until `stop` turns true: lists the instances of the
    /// service every `--peer-refresh` (see [`Peers::discovering`]); on a locator failure keeps
    /// the last list. Returns at once without discovery.
    pub async fn discover(self, mut stop: watch::Receiver<bool>) {
        let Some(d) = self.discovery.clone() else {
            return;
        };
        tracing::info!(service = %d.service, docker_host = %d.own_host, every = ?d.every, "discovering peers from the locator");
        // When the last warning was logged, kept across recoveries: a flapping locator too
        // warns once a minute at most.
        let mut last_warning: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.refresh_if_older(Duration::ZERO, LOCATOR_TIMEOUT) => {}
                _ = stop.changed() => return,
            }
            let stale = self
                .answered_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none_or(|at| at.elapsed() >= d.every + LOCATOR_TIMEOUT);
            if stale && last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                last_warning = Some(Instant::now());
                tracing::warn!(service = %d.service, "listing peers from the locator fails; keeping the last list");
            }
            tokio::select! {
                _ = tokio::time::sleep(d.every) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Where and as whom [`Peers::discover`] looks for peers.
#[derive(Debug)]
pub struct Discovery {
    /// A client of the locator, with its `read` token if it needs one.
    pub locator: locator_wire::client::Client,
    pub service: String,
    /// The Docker host this instance runs on, as the locator records it.
    pub own_host: String,
    /// This instance's `--instance-id`.
    pub own_id: String,
    /// Period of the listing (`--peer-refresh`).
    pub every: Duration,
}

/// The peers among the instances of our service, as `(Docker host, URL)`: those serving
/// (ready, or draining: still up with the cache of their host), on another Docker host (the
/// instances of our host share our cache volume, asking them would only cost a round trip),
/// and not ourselves.
pub fn peers_from(instances: &[Instance], own_host: &str, own_id: &str) -> Vec<(String, String)> {
    instances
        .iter()
        .filter(|i| matches!(i.state, InstanceState::Ready | InstanceState::Draining))
        .filter(|i| i.docker_host != own_host && i.id != own_id)
        .map(|i| (i.docker_host.clone(), format!("http://{}", i.address)))
        .collect()
}

/// One spelling per peer (lowercase host, no default port, no trailing slash), so that
/// `from=` matches however a client writes the same URL.
fn canonical(url: &str) -> std::result::Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https")
        || parsed.host_str().is_none()
        || !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err("must be http(s)://host[:port][/path], without credentials or query".into());
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_peers_resolve() {
        let peers =
            Peers::new(&["http://Site-B:8080/".into(), "https://c.example".into()]).unwrap();
        assert_eq!(
            peers.resolve("http://site-b:8080").unwrap(),
            "http://site-b:8080"
        );
        assert_eq!(
            peers.resolve("https://c.example:443/").unwrap(),
            "https://c.example"
        );
        for other in [
            "http://site-b:8081",
            "http://169.254.169.254",
            "http://site-b:8080/admin",
            "http://site-b:8080/?x=1",
            "nonsense",
        ] {
            assert_eq!(
                peers.resolve(other).unwrap_err().code(),
                "unknown_peer",
                "{other}"
            );
        }
        assert!(Peers::default().resolve("http://site-b:8080").is_err());
        for bad in ["ftp://a", "nonsense", "http://u:p@a", "http://a/?q=1"] {
            assert!(Peers::new(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn discovered_peers_resolve_until_replaced() {
        let peers = Peers::new(&["http://a:1".into()]).unwrap();
        // The discovery task holds a clone: what it sets, the server's copy sees.
        let task = peers.clone();
        assert!(peers.resolve("http://10.0.0.7:8080").is_err());
        let on_b = |u: &str| ("tcp://b:2376".to_string(), u.to_string());
        assert!(task.set_discovered(&[on_b("http://10.0.0.7:8080"), on_b("nonsense")]));
        assert_eq!(
            peers.resolve("http://10.0.0.7:8080/").unwrap(),
            "http://10.0.0.7:8080"
        );
        assert_eq!(peers.resolve("http://a:1").unwrap(), "http://a:1");
        assert!(!task.set_discovered(&[on_b("http://10.0.0.7:8080")]));
        assert!(task.set_discovered(&[on_b("http://10.0.0.8:8080")]));
        assert_eq!(
            peers.resolve("http://10.0.0.7:8080").unwrap_err().code(),
            "unknown_peer"
        );
        assert_eq!(peers.discovered(), ["http://10.0.0.8:8080"]);
    }

    #[test]
    fn read_through_order_groups_by_host_rotates_and_puts_down_peers_last() {
        assert!(Peers::default().read_through_order().is_empty());
        let peers = Peers::new(&["http://a:1".into(), "http://b:2".into()]).unwrap();
        let at = |h: &str, u: &str| (h.to_string(), u.to_string());
        peers.set_discovered(&[
            at("tcp://h3", "http://c:3"),
            at("tcp://h3", "http://c:4"),
            at("tcp://h2", "http://B:2/"), // configured already: asked as such, once
        ]);
        let urls = |order: Vec<(String, Vec<String>)>| -> Vec<Vec<String>> {
            order.into_iter().map(|(_, u)| u).collect()
        };
        let orders: Vec<Vec<Vec<String>>> =
            (0..4).map(|_| urls(peers.read_through_order())).collect();
        assert_eq!(
            orders[0],
            [
                vec!["http://a:1"],
                vec!["http://b:2"],
                vec!["http://c:3", "http://c:4"]
            ]
        );
        assert_eq!(
            orders[1],
            [
                vec!["http://b:2"],
                vec!["http://c:4", "http://c:3"],
                vec!["http://a:1"]
            ]
        );
        assert_eq!(
            orders[2],
            [
                vec!["http://c:3", "http://c:4"],
                vec!["http://a:1"],
                vec!["http://b:2"]
            ]
        );
        assert_eq!(orders[3][0], ["http://a:1"]);
        assert_eq!(peers.read_through_order()[0].0, "http://b:2", "turn 4 keys");
        // A peer that could not be reached goes last in its host, a host all down goes last.
        peers.mark_down("http://c:3");
        peers.mark_down("http://a:1");
        let order = urls(peers.read_through_order()); // turn 5: as turn 2
        assert_eq!(
            order,
            [
                vec!["http://c:4", "http://c:3"],
                vec!["http://b:2"],
                vec!["http://a:1"]
            ]
        );
    }

    fn instance(id: &str, host: &str, address: &str, state: InstanceState) -> Instance {
        Instance {
            id: id.into(),
            service: "optimizer".into(),
            version: "1.0.0".into(),
            address: address.into(),
            docker_host: host.into(),
            container_id: String::new(),
            labels: Default::default(),
            state,
            registered_at: 0,
            last_heartbeat: 0,
            load: Default::default(),
        }
    }

    #[test]
    fn peers_are_serving_instances_of_other_hosts_but_ourselves() {
        use InstanceState::*;
        let instances = [
            instance("me", "tcp://h1:2376", "10.0.0.1:8080", Ready),
            instance("sibling", "tcp://h1:2376", "10.0.0.2:8080", Ready),
            instance("b-ready", "tcp://h2:2376", "10.0.1.1:8080", Ready),
            instance("b-draining", "tcp://h2:2376", "10.0.1.2:8080", Draining),
            instance("b-starting", "tcp://h2:2376", "10.0.1.3:8080", Starting),
            instance("b-unhealthy", "tcp://h2:2376", "10.0.1.4:8080", Unhealthy),
            instance("b-gone", "tcp://h2:2376", "10.0.1.5:8080", Gone),
            instance("c", "tcp://h3:2376", "10.0.2.1:8080", Ready),
            // Our own id on a host name we do not know: still ourselves.
            instance("me", "unix:///var/run/docker.sock", "10.0.0.1:8080", Ready),
        ];
        assert_eq!(
            peers_from(&instances, "tcp://h1:2376", "me"),
            [
                (
                    "tcp://h2:2376".to_string(),
                    "http://10.0.1.1:8080".to_string()
                ),
                (
                    "tcp://h2:2376".to_string(),
                    "http://10.0.1.2:8080".to_string()
                ),
                (
                    "tcp://h3:2376".to_string(),
                    "http://10.0.2.1:8080".to_string()
                ),
            ]
        );
        assert!(peers_from(&[], "tcp://h1:2376", "me").is_empty());
    }
}
