//! The services one proxy carries, and which of them a request is for.
//!
//! A proxy carries either the services named with `--service` ([`Scope::Named`]) or, without
//! that flag, every service the locator knows ([`Scope::Discovered`]): a service that appears in
//! the watch stream gets its router then, with no restart, as Caddy and kamal-proxy pick up a
//! new site. Each service has its own [`Router`]: routing table, cookie name, session tracker,
//! metrics and reports, exactly as a proxy of one service has. A request goes to the service
//! whose routes (the deploy spec's `[service] hosts` and `path_prefix`, kept by the locator and
//! read from its snapshot) match its host and path; the most specific rule wins (an exact host
//! over a wildcard, then the longest path prefix). A request no rule takes goes to the default
//! service — the only one when a single service is named, or `--default-service` — and
//! otherwise gets a 404 JSON (`unknown_host`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use locator_wire::api::{Routes, Snapshot};
use tokio::sync::Notify;

use crate::router::{Options, Router};
use crate::session::CookieKeys;

/// Which services a proxy carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Exactly these (`--service`), in this order, known or not to the locator yet.
    Named(Vec<String>),
    /// Every service in the locator's snapshot, as it appears.
    Discovered,
}

/// One service's routes, ranked for matching.
#[derive(Debug)]
struct Rule {
    routes: Routes,
    /// Index of the service's router.
    router: usize,
}

/// The routes of every carried service that declares hosts.
#[derive(Debug, Default)]
struct HostTable {
    rules: Vec<Rule>,
}

impl HostTable {
    fn build(snapshot: &Snapshot, routers: &[Arc<Router>]) -> Self {
        let rules: Vec<Rule> = routers
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let svc = snapshot.service(&r.service)?;
                (!svc.routes.hosts.is_empty()).then(|| Rule {
                    routes: svc.routes.clone(),
                    router: i,
                })
            })
            .collect();
        HostTable { rules }
    }

    /// The most specific rule taking `host` and `path`: one naming the host exactly over one
    /// covering it by a wildcard, then the longest path prefix. (The locator refuses two
    /// services the same host and prefix, so there is no tie.)
    fn find(&self, host: &str, path: &str) -> Option<usize> {
        let best = |exact_only: bool| {
            self.rules
                .iter()
                .filter(|r| {
                    r.routes.matches(host, path)
                        && (!exact_only || r.routes.hosts.iter().any(|h| h == host))
                })
                .max_by_key(|r| r.routes.path_prefix.as_deref().map_or(0, str::len))
        };
        best(true).or_else(|| best(false)).map(|r| r.router)
    }
}

/// What is carried right now: swapped whole when a snapshot adds a service or changes routes,
/// so a request reads one consistent set without a lock.
#[derive(Debug, Default)]
struct Carried {
    routers: Vec<Arc<Router>>,
    hosts: HostTable,
    /// Index of the default service's router, once it is carried.
    default: Option<usize>,
}

/// The services this proxy carries.
#[derive(Debug)]
pub struct Services {
    scope: Scope,
    /// The service requests no route takes go to (`--default-service`, or the only named one).
    default: Option<String>,
    /// Shared by every service's router (each seals under its own service name).
    keys: CookieKeys,
    /// The request path's tunables: process-wide, the same for every service.
    pub options: Options,
    /// The counters of the process, not of one service.
    pub edge: crate::metrics::EdgeMetrics,
    carried: ArcSwap<Carried>,
    /// Woken when a service is added, for the reporters to start its reporter.
    added: Notify,
    /// Set once this process hands its sockets to a successor or is told to stop: from then
    /// on every answer says `Connection: close`, so that clients leave their keep-alive
    /// connections before the old process drops the idle ones.
    closing: AtomicBool,
}

impl Services {
    /// A proxy carrying `scope`; `default` names the service requests no route takes go to
    /// (a named scope must name it too).
    pub fn new(
        scope: Scope,
        default: Option<&str>,
        keys: CookieKeys,
        options: Options,
    ) -> Result<Arc<Self>, String> {
        let default = match (&scope, default) {
            (Scope::Named(names), Some(name)) if !names.iter().any(|n| n == name) => {
                return Err(format!(
                    "--default-service {name} is not one of --service {}",
                    names.join(",")
                ))
            }
            (Scope::Named(names), None) if names.len() == 1 => Some(names[0].clone()),
            (_, default) => default.map(str::to_string),
        };
        let services = Services {
            scope,
            default,
            keys,
            options,
            edge: crate::metrics::EdgeMetrics::default(),
            carried: ArcSwap::from_pointee(Carried::default()),
            added: Notify::new(),
            closing: AtomicBool::new(false),
        };
        if let Scope::Named(names) = &services.scope {
            assert!(
                !names.is_empty(),
                "a named scope names at least one service"
            );
            let routers = names.iter().map(|n| services.router_for(n)).collect();
            services.carry(routers, &Snapshot::default());
        }
        Ok(Arc::new(services))
    }

    fn router_for(&self, name: &str) -> Arc<Router> {
        Router::new(name, self.keys.clone(), self.options.clone())
    }

    fn carry(&self, routers: Vec<Arc<Router>>, snapshot: &Snapshot) {
        let default = self
            .default
            .as_deref()
            .and_then(|d| routers.iter().position(|r| r.service == d));
        let hosts = HostTable::build(snapshot, &routers);
        self.carried.store(Arc::new(Carried {
            routers,
            hosts,
            default,
        }));
    }

    /// The routers of the services carried now.
    pub fn routers(&self) -> Vec<Arc<Router>> {
        self.carried.load().routers.clone()
    }

    pub fn names(&self) -> Vec<String> {
        self.carried
            .load()
            .routers
            .iter()
            .map(|r| r.service.clone())
            .collect()
    }

    /// Whether this proxy carries every service the locator knows.
    pub fn discovers(&self) -> bool {
        self.scope == Scope::Discovered
    }

    /// The services to ask the locator's watch for: the named ones, or every one (empty).
    pub fn watch_filter(&self) -> Vec<String> {
        match &self.scope {
            Scope::Named(names) => names.clone(),
            Scope::Discovered => Vec::new(),
        }
    }

    /// The router of the service a request for `host` (as the client sent it: any case, maybe
    /// with a port) and `path` is for.
    pub fn pick(&self, host: Option<&str>, path: &str) -> Option<Arc<Router>> {
        let carried = self.carried.load();
        let index = if matches!(&self.scope, Scope::Named(n) if n.len() == 1) {
            carried.default
        } else {
            host.map(normalise_host)
                .and_then(|h| carried.hosts.find(&h, path))
                .or(carried.default)
        };
        index.map(|i| carried.routers[i].clone())
    }

    /// Installs `snapshot` into the routers of the services `concerned` says yes to, and
    /// rebuilds the host table (cheap: a few rules). A discovering proxy first adds a router
    /// for each service the snapshot names that it does not carry yet (installed whatever
    /// `concerned` says), and retires those of services the snapshot no longer has.
    pub fn install(&self, snapshot: &Snapshot, concerned: impl Fn(&str) -> bool) {
        let mut routers = self.routers();
        let mut added = Vec::new();
        if self.discovers() {
            routers.retain(|r| {
                let known = snapshot.service(&r.service).is_some();
                if !known {
                    tracing::info!(service = %r.service, "no longer in the locator: not carried any more");
                    r.retire();
                }
                known
            });
            for svc in &snapshot.services {
                if !routers.iter().any(|r| r.service == svc.name) {
                    tracing::info!(service = %svc.name, hosts = ?svc.routes.hosts, "carrying a service the locator knows");
                    added.push(svc.name.clone());
                    routers.push(self.router_for(&svc.name));
                }
            }
        }
        for r in &routers {
            if concerned(&r.service) || added.contains(&r.service) {
                r.install(snapshot);
            }
        }
        self.carry(routers, snapshot);
        if !added.is_empty() {
            self.added.notify_one();
        }
    }

    /// Resolves once a service has been added since the last call (or the first).
    pub async fn added(&self) {
        self.added.notified().await;
    }

    /// The exact hosts (no wildcards) the carried services' routes name.
    pub fn route_hosts(&self) -> Vec<String> {
        let carried = self.carried.load();
        let mut hosts: Vec<String> = carried
            .hosts
            .rules
            .iter()
            .flat_map(|r| r.routes.hosts.iter())
            .filter(|h| !h.starts_with("*."))
            .cloned()
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// From now on every answer says `Connection: close` (see `server::close_keepalives`).
    pub fn start_closing(&self) {
        if !self.closing.swap(true, Ordering::Relaxed) {
            tracing::info!("closing: answering with `Connection: close` from now on");
        }
    }
}

/// A `Host` value as routes hold hosts: lower case, no port, no trailing dot.
fn normalise_host(host: &str) -> String {
    let host = host.trim();
    if host.starts_with('[') {
        // An IPv6 literal: never a route's host (routes are DNS names), kept as it is.
        return host.to_string();
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _port)| name);
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing_table::tests::snapshot;

    fn carried(names: &[&str], default: Option<&str>) -> Arc<Services> {
        let names = names.iter().map(|n| n.to_string()).collect();
        Services::new(
            Scope::Named(names),
            default,
            CookieKeys::random(),
            Options::default(),
        )
        .unwrap()
    }

    fn with_routes(names_routes: &[(&str, &[&str], Option<&str>)]) -> Snapshot {
        let template = snapshot(&[("1", 100)], vec![]).services[0].clone();
        let mut snap = Snapshot::default();
        for (name, hosts, prefix) in names_routes {
            let mut svc = template.clone();
            svc.name = name.to_string();
            svc.routes = Routes {
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                path_prefix: prefix.map(str::to_string),
                ..Routes::default()
            };
            snap.services.push(svc);
        }
        snap
    }

    #[test]
    fn the_most_specific_route_wins_and_the_rest_goes_to_the_default() {
        let services = carried(&["shop", "api", "wild", "blog"], Some("blog"));
        services.install(
            &with_routes(&[
                ("shop", &["shop.test"], None),
                ("api", &["shop.test"], Some("/api")),
                ("wild", &["*.shop.test", "wild.test"], None),
                ("blog", &[], None),
            ]),
            |_| false,
        );
        let pick =
            |host: Option<&str>, path: &str| services.pick(host, path).map(|r| r.service.clone());
        assert_eq!(pick(Some("shop.test"), "/").as_deref(), Some("shop"));
        assert_eq!(
            pick(Some("SHOP.test:8443"), "/api/cart").as_deref(),
            Some("api")
        );
        assert_eq!(pick(Some("shop.test."), "/apix").as_deref(), Some("shop"));
        assert_eq!(pick(Some("eu.shop.test"), "/api").as_deref(), Some("wild"));
        assert_eq!(pick(Some("other.test"), "/").as_deref(), Some("blog"));
        assert_eq!(pick(None, "/").as_deref(), Some("blog"));
        assert_eq!(pick(Some("[::1]:80"), "/").as_deref(), Some("blog"));
        // What --acme-routes orders for: exact hosts, each once.
        assert_eq!(services.route_hosts(), ["shop.test", "wild.test"]);

        let strict = carried(&["shop", "blog"], None);
        strict.install(&with_routes(&[("shop", &["shop.test"], None)]), |_| false);
        assert!(strict.pick(Some("blog.test"), "/").is_none());
        assert!(strict.pick(Some("shop.test"), "/").is_some());
    }

    #[test]
    fn one_service_takes_every_request_and_a_default_must_be_carried() {
        let one = carried(&["svc"], None);
        assert_eq!(one.pick(Some("anything"), "/").unwrap().service, "svc");
        let scope = Scope::Named(vec!["a".into()]);
        let err =
            Services::new(scope, Some("b"), CookieKeys::random(), Options::default()).unwrap_err();
        assert!(err.contains("not one of --service"), "{err}");
    }

    #[test]
    fn a_discovering_proxy_carries_what_the_locator_knows_as_it_appears() {
        let services = Services::new(
            Scope::Discovered,
            Some("blog"),
            CookieKeys::random(),
            Options::default(),
        )
        .unwrap();
        assert!(services.routers().is_empty());
        assert!(services.watch_filter().is_empty(), "watches every service");
        assert!(services.pick(Some("shop.test"), "/").is_none());

        services.install(&with_routes(&[("shop", &["shop.test"], None)]), |_| false);
        let shop = services
            .pick(Some("shop.test"), "/")
            .expect("shop is carried");
        assert_eq!(shop.service, "shop");
        assert_eq!(
            shop.table.load().service,
            "shop",
            "a new service's table is installed though nothing said it was concerned"
        );
        // The default is named before it exists, and takes the rest once it does.
        assert!(services.pick(Some("other.test"), "/").is_none());
        services.install(
            &with_routes(&[("shop", &["shop.test"], None), ("blog", &[], None)]),
            |_| false,
        );
        assert_eq!(services.names(), ["shop", "blog"]);
        assert_eq!(
            services.pick(Some("other.test"), "/").unwrap().service,
            "blog"
        );
        assert!(
            Arc::ptr_eq(&services.pick(Some("shop.test"), "/").unwrap(), &shop),
            "a carried service keeps its router (tracker, metrics) across snapshots"
        );
        // A snapshot without shop retires its router: its reporter stops, its hosts are gone.
        services.install(&with_routes(&[("blog", &[], None)]), |_| true);
        assert!(shop.is_retired());
        assert_eq!(services.names(), ["blog"]);
        assert_eq!(
            services.pick(Some("shop.test"), "/").unwrap().service,
            "blog"
        );
    }

    #[test]
    fn a_named_proxy_carries_only_its_services() {
        let services = carried(&["shop"], None);
        services.install(
            &with_routes(&[
                ("shop", &["shop.test"], None),
                ("blog", &["blog.test"], None),
            ]),
            |_| true,
        );
        assert_eq!(services.names(), ["shop"]);
        assert_eq!(services.watch_filter(), ["shop"]);
    }
}
