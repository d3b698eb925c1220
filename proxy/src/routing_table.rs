//! The routing table: one service's instances, weights and session settings, built from a
//! locator [`Snapshot`] and swapped atomically under the request path.
//!
//! Everything a request needs is precomputed here (resolved socket addresses, ready instances
//! per version, metric and in-flight handles), so choosing an upstream is a few lookups with no
//! lock and no allocation beyond the cookie.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use locator_wire::api::{InstanceState, SessionSettings, Snapshot};
use serde::Serialize;

use crate::balancer::{choose_index, choose_version};
use crate::metrics::{Metrics, RouteMetrics};
use crate::tracker::Tracker;

/// Session settings used until the locator has told us the service's own.
pub fn default_settings() -> SessionSettings {
    SessionSettings {
        cookie_name: "haddock_session".into(),
        idle_ttl_ms: 30 * 60 * 1000,
        max_drain_ms: 60 * 60 * 1000,
    }
}

/// One upstream instance.
#[derive(Debug)]
pub struct Route {
    pub id: Arc<str>,
    pub version: Arc<str>,
    pub addr: SocketAddr,
    pub state: InstanceState,
    pub in_flight: Arc<AtomicU64>,
    pub metrics: RouteMetrics,
}

/// Where a request goes and whether its session token must be (re)written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The session's instance still keeps sessions.
    Kept(usize),
    /// The session's instance is gone or unhealthy; it moved here.
    Moved(usize),
    /// A new session placed by the weights.
    New(usize),
}

impl Placement {
    pub fn index(self) -> usize {
        match self {
            Placement::Kept(i) | Placement::Moved(i) | Placement::New(i) => i,
        }
    }
}

/// The routing state of one service.
#[derive(Debug)]
pub struct RoutingTable {
    pub revision: u64,
    pub service: String,
    pub settings: SessionSettings,
    /// Plain-HTTP requests get a 308 to HTTPS when the proxy serves HTTPS (the service's
    /// `Routes::redirect_https`).
    pub redirect_https: bool,
    /// HSTS max-age in place of the proxy's `--hsts-max-age` (`Routes::hsts_max_age_s`).
    pub hsts_max_age_s: Option<u64>,
    pub primary: Option<Arc<str>>,
    routes: Vec<Route>,
    by_id: HashMap<Arc<str>, usize>,
    /// Indices of `ready` routes per version.
    ready: HashMap<Arc<str>, Vec<usize>>,
    /// Weights restricted to versions that have a ready instance (a weight on a version that
    /// cannot take sessions would otherwise strand its share of new users).
    weights: Vec<(Arc<str>, u32)>,
}

impl RoutingTable {
    /// A table with no instance: every request is answered 503 until the locator speaks.
    pub fn empty(service: &str) -> Self {
        RoutingTable {
            revision: 0,
            service: service.to_string(),
            settings: default_settings(),
            redirect_https: false,
            hsts_max_age_s: None,
            primary: None,
            routes: Vec::new(),
            by_id: HashMap::new(),
            ready: HashMap::new(),
            weights: Vec::new(),
        }
    }

    /// Builds the table of `service` from a snapshot. Instances whose address does not resolve
    /// are left out (and logged): a session pinned to one moves like for a gone instance.
    pub fn build(snapshot: &Snapshot, service: &str, tracker: &Tracker, metrics: &Metrics) -> Self {
        let mut table = RoutingTable::empty(service);
        table.revision = snapshot.revision;
        let svc = snapshot.service(service);
        if let Some(s) = svc {
            table.settings = s.sessions.clone();
            table.redirect_https = s.routes.redirect_https;
            table.hsts_max_age_s = s.routes.hsts_max_age_s;
            table.primary = s.primary_version.as_deref().map(Arc::from);
        }
        let mut versions: HashMap<String, Arc<str>> = HashMap::new();
        for inst in snapshot.instances_of(service) {
            if inst.state == InstanceState::Gone {
                continue;
            }
            let Some(addr) = resolve(&inst.address) else {
                tracing::warn!(instance = %inst.id, address = %inst.address, "unresolvable address, instance left out");
                continue;
            };
            let version = versions
                .entry(inst.version.clone())
                .or_insert_with(|| Arc::from(inst.version.as_str()))
                .clone();
            let idx = table.routes.len();
            let id: Arc<str> = Arc::from(inst.id.as_str());
            table.routes.push(Route {
                id: id.clone(),
                version: version.clone(),
                addr,
                state: inst.state,
                in_flight: tracker.in_flight_counter(&inst.id),
                metrics: metrics.route(&inst.version, &inst.id),
            });
            table.by_id.insert(id, idx);
            if inst.state.accepts_new_sessions() {
                table.ready.entry(version).or_default().push(idx);
            }
        }
        if let Some(s) = svc {
            table.weights = s
                .weights
                .iter()
                .filter(|(v, w)| **w > 0 && table.ready.contains_key(v.as_str()))
                .map(|(v, w)| (Arc::from(v.as_str()), u32::from(*w)))
                .collect();
        }
        table
    }

    pub fn route(&self, idx: usize) -> &Route {
        &self.routes[idx]
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Whether any instance can take a new session.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Places a request: on its session's instance if that one keeps sessions, else moved.
    /// `pinned` is the `(instance, version)` from a valid token, `None` for a new session.
    pub fn place(&self, pinned: Option<(&str, &str)>, hash: u64) -> Option<Placement> {
        match pinned {
            Some((instance, version)) => {
                if let Some(&i) = self.by_id.get(instance) {
                    if self.routes[i].state.keeps_sessions() {
                        return Some(Placement::Kept(i));
                    }
                }
                self.relocate(version, hash, &[]).map(Placement::Moved)
            }
            None => self.new_session(hash, &[]).map(Placement::New),
        }
    }

    /// An instance for a new session: version by weight, then an instance of it; versions
    /// without weight (or a table without weights at all) fall back to the primary, then to any
    /// ready instance, so that a routing glitch never turns into a 503 while something is up.
    pub fn new_session(&self, hash: u64, exclude: &[usize]) -> Option<usize> {
        choose_version(hash, &self.weights)
            .and_then(|v| self.ready_of(v, hash, exclude))
            .or_else(|| {
                self.primary
                    .as_deref()
                    .and_then(|p| self.ready_of(p, hash, exclude))
            })
            .or_else(|| self.any_ready(hash, exclude))
    }

    /// Another instance for a session of `version`: same version if one is ready, else primary,
    /// else by weight (a rollback may have removed both).
    pub fn relocate(&self, version: &str, hash: u64, exclude: &[usize]) -> Option<usize> {
        self.ready_of(version, hash, exclude)
            .or_else(|| self.new_session(hash, exclude))
    }

    fn ready_of(&self, version: &str, hash: u64, exclude: &[usize]) -> Option<usize> {
        let ready = self.ready.get(version)?;
        if exclude.is_empty() {
            return choose_index(hash, ready.len()).map(|i| ready[i]);
        }
        let left: Vec<usize> = ready
            .iter()
            .copied()
            .filter(|i| !exclude.contains(i))
            .collect();
        choose_index(hash, left.len()).map(|i| left[i])
    }

    fn any_ready(&self, hash: u64, exclude: &[usize]) -> Option<usize> {
        let mut all: Vec<usize> = self
            .ready
            .values()
            .flatten()
            .copied()
            .filter(|i| !exclude.contains(i))
            .collect();
        all.sort_unstable();
        choose_index(hash, all.len()).map(|i| all[i])
    }

    /// A JSON summary for the admin port (`/routing`), used by operators and tests.
    pub fn summary(&self) -> TableSummary {
        TableSummary {
            revision: self.revision,
            service: self.service.clone(),
            cookie_name: self.settings.cookie_name.clone(),
            idle_ttl_ms: self.settings.idle_ttl_ms,
            primary: self.primary.as_deref().map(str::to_string),
            weights: self
                .weights
                .iter()
                .map(|(v, w)| (v.to_string(), *w))
                .collect(),
            instances: self
                .routes
                .iter()
                .map(|r| InstanceSummary {
                    id: r.id.to_string(),
                    version: r.version.to_string(),
                    address: r.addr.to_string(),
                    state: r.state,
                })
                .collect(),
        }
    }
}

/// What `/routing` answers.
#[derive(Debug, Serialize)]
pub struct TableSummary {
    pub revision: u64,
    pub service: String,
    pub cookie_name: String,
    pub idle_ttl_ms: u64,
    pub primary: Option<String>,
    pub weights: Vec<(String, u32)>,
    pub instances: Vec<InstanceSummary>,
}

#[derive(Debug, Serialize)]
pub struct InstanceSummary {
    pub id: String,
    pub version: String,
    pub address: String,
    pub state: InstanceState,
}

/// Resolves `host:port` once, when the table is built, so the request path never does DNS.
fn resolve(address: &str) -> Option<SocketAddr> {
    if let Ok(a) = address.parse() {
        return Some(a);
    }
    address.to_socket_addrs().ok()?.next()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::session::SessionId;
    use locator_wire::api::{Instance, InstanceLoad, Service};
    use std::collections::BTreeMap;

    pub(crate) fn instance(id: &str, version: &str, port: u16, state: InstanceState) -> Instance {
        Instance {
            id: id.into(),
            service: "svc".into(),
            version: version.into(),
            address: format!("127.0.0.1:{port}"),
            docker_host: String::new(),
            container_id: String::new(),
            labels: BTreeMap::new(),
            state,
            registered_at: 0,
            last_heartbeat: 0,
            load: InstanceLoad::default(),
        }
    }

    pub(crate) fn snapshot(weights: &[(&str, u8)], instances: Vec<Instance>) -> Snapshot {
        Snapshot {
            revision: 7,
            services: vec![Service {
                name: "svc".into(),
                sessions: SessionSettings {
                    cookie_name: "sid".into(),
                    idle_ttl_ms: 1_000,
                    max_drain_ms: 5_000,
                },
                weights: weights.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
                primary_version: Some("1".into()),
                revision: 7,
                limit_changes: Vec::new(),
                lock: None,
                routes: Default::default(),
            }],
            instances,
            ..Snapshot::default()
        }
    }

    fn table(s: &Snapshot) -> RoutingTable {
        RoutingTable::build(s, "svc", &Tracker::new(100), &Metrics::new("svc"))
    }

    fn id_of(t: &RoutingTable, p: Option<Placement>) -> (String, &'static str) {
        let p = p.expect("placed");
        let kind = match p {
            Placement::Kept(_) => "kept",
            Placement::Moved(_) => "moved",
            Placement::New(_) => "new",
        };
        (t.route(p.index()).id.to_string(), kind)
    }

    use InstanceState::*;

    #[test]
    fn new_sessions_follow_the_weights() {
        let s = snapshot(
            &[("1", 90), ("2", 10)],
            vec![instance("a", "1", 1, Ready), instance("b", "2", 2, Ready)],
        );
        let t = table(&s);
        assert_eq!(t.settings.cookie_name, "sid");
        let n = 10_000;
        let canary = (0..n)
            .filter(|_| {
                let p = t.place(None, SessionId::random().hash64());
                id_of(&t, p).0 == "b"
            })
            .count();
        assert!((800..=1200).contains(&canary), "{canary}");
    }

    #[test]
    fn draining_instances_keep_sessions_but_get_no_new_ones() {
        let s = snapshot(
            &[("1", 100)],
            vec![
                instance("a", "1", 1, Draining),
                instance("b", "1", 2, Ready),
            ],
        );
        let t = table(&s);
        for _ in 0..1_000 {
            assert_eq!(
                id_of(&t, t.place(None, SessionId::random().hash64())).0,
                "b"
            );
        }
        assert_eq!(
            id_of(&t, t.place(Some(("a", "1")), 1)),
            ("a".into(), "kept")
        );
    }

    #[test]
    fn sessions_move_within_their_version_then_to_the_primary() {
        let s = snapshot(
            &[("1", 50), ("2", 50)],
            vec![
                instance("a", "1", 1, Ready),
                instance("b", "2", 2, Unhealthy),
                instance("c", "2", 3, Ready),
            ],
        );
        let t = table(&s);
        // Unhealthy: moves to the other instance of version 2.
        assert_eq!(
            id_of(&t, t.place(Some(("b", "2")), 9)),
            ("c".into(), "moved")
        );
        // Gone (not in the table at all): same rule, using the version the token carries.
        assert_eq!(
            id_of(&t, t.place(Some(("zz", "2")), 9)),
            ("c".into(), "moved")
        );
        // A version with nothing ready left goes to the primary.
        let s = snapshot(
            &[("1", 100)],
            vec![
                instance("a", "1", 1, Ready),
                instance("b", "2", 2, Unhealthy),
            ],
        );
        let t = table(&s);
        assert_eq!(
            id_of(&t, t.place(Some(("b", "2")), 9)),
            ("a".into(), "moved")
        );
    }

    #[test]
    fn weights_on_versions_without_ready_instances_fall_back() {
        // Version 2 holds 50 % but its only instance is still starting.
        let s = snapshot(
            &[("1", 50), ("2", 50)],
            vec![
                instance("a", "1", 1, Ready),
                instance("b", "2", 2, Starting),
            ],
        );
        let t = table(&s);
        for _ in 0..200 {
            assert_eq!(
                id_of(&t, t.place(None, SessionId::random().hash64())).0,
                "a"
            );
        }
    }

    #[test]
    fn nothing_ready_places_nothing() {
        let s = snapshot(&[("1", 100)], vec![instance("a", "1", 1, Draining)]);
        let t = table(&s);
        assert!(!t.has_ready());
        assert_eq!(t.place(None, 3), None);
        // …but the draining instance still serves its own sessions.
        assert_eq!(id_of(&t, t.place(Some(("a", "1")), 3)).1, "kept");
        assert!(table(&Snapshot::default()).place(None, 1).is_none());
    }

    #[test]
    fn retries_exclude_instances_already_tried() {
        let s = snapshot(
            &[("1", 100)],
            vec![instance("a", "1", 1, Ready), instance("b", "1", 2, Ready)],
        );
        let t = table(&s);
        let first = t.new_session(42, &[]).unwrap();
        let second = t.relocate("1", 42, &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(t.relocate("1", 42, &[first, second]), None);
    }
}
