//! The services one proxy carries, and which of them a request is for.
//!
//! A proxy carries the services named with `--service` (one or several), each with its own
//! [`Router`]: routing table, cookie name, session tracker, metrics and reports, exactly as a
//! proxy of one service has. A request goes to the service whose routes (the deploy spec's
//! `[service] hosts` and `path_prefix`, kept by the locator and read from its snapshot) match
//! its host and path; the most specific rule wins (an exact host over a wildcard, then the
//! longest path prefix). A request no rule takes goes to the default service — the only one
//! when a single service is carried, or `--default-service` — and otherwise gets a 404 JSON
//! (`unknown_host`).

use std::sync::Arc;

use arc_swap::ArcSwap;
use locator_wire::api::{Routes, Snapshot};

use crate::router::Router;

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

/// The services this proxy carries.
#[derive(Debug)]
pub struct Services {
    routers: Vec<Arc<Router>>,
    /// The counters of the process, not of one service.
    pub edge: crate::metrics::EdgeMetrics,
    default: Option<usize>,
    hosts: ArcSwap<HostTable>,
}

impl Services {
    /// `routers` in `--service` order; `default` names the service requests no route takes go to.
    pub fn new(routers: Vec<Arc<Router>>, default: Option<&str>) -> Result<Arc<Self>, String> {
        assert!(!routers.is_empty(), "a proxy carries at least one service");
        let default = match default {
            Some(name) => Some(
                routers
                    .iter()
                    .position(|r| r.service == name)
                    .ok_or_else(|| format!("--default-service {name} is not one of --service"))?,
            ),
            None if routers.len() == 1 => Some(0),
            None => None,
        };
        Ok(Arc::new(Services {
            routers,
            edge: crate::metrics::EdgeMetrics::default(),
            default,
            hosts: ArcSwap::from_pointee(HostTable::default()),
        }))
    }

    pub fn routers(&self) -> &[Arc<Router>] {
        &self.routers
    }

    /// The first service's router: process-wide settings live there.
    pub fn first(&self) -> &Arc<Router> {
        &self.routers[0]
    }

    pub fn names(&self) -> Vec<String> {
        self.routers.iter().map(|r| r.service.clone()).collect()
    }

    /// The router of the service a request for `host` (as the client sent it: any case, maybe
    /// with a port) and `path` is for.
    pub fn pick(&self, host: Option<&str>, path: &str) -> Option<&Arc<Router>> {
        if self.routers.len() == 1 {
            return self.default.map(|i| &self.routers[i]);
        }
        let found = host
            .map(normalise_host)
            .and_then(|h| self.hosts.load().find(&h, path));
        found.or(self.default).map(|i| &self.routers[i])
    }

    /// Installs `snapshot` into the routers `concerned` says yes to, and rebuilds the host table
    /// (cheap: a few rules).
    pub fn install(&self, snapshot: &Snapshot, concerned: impl Fn(&Router) -> bool) {
        for r in &self.routers {
            if concerned(r) {
                r.install(snapshot);
            }
        }
        self.hosts
            .store(Arc::new(HostTable::build(snapshot, &self.routers)));
    }

    /// The exact hosts (no wildcards) the carried services' routes name.
    pub fn route_hosts(&self) -> Vec<String> {
        let table = self.hosts.load();
        let mut hosts: Vec<String> = table
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

    /// From now on every answer says `Connection: close` (see `server::close_keepalives`).
    pub fn start_closing(&self) {
        for r in &self.routers {
            r.start_closing();
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
    use crate::router::Options;
    use crate::routing_table::tests::snapshot;
    use crate::session::CookieKeys;

    fn carried(names: &[&str], default: Option<&str>) -> Arc<Services> {
        let routers = names
            .iter()
            .map(|n| Router::new(n, CookieKeys::random(), Options::default()))
            .collect();
        Services::new(routers, default).unwrap()
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
        let routers = vec![Router::new("a", CookieKeys::random(), Options::default())];
        let err = Services::new(routers, Some("b")).unwrap_err();
        assert!(err.contains("not one of --service"), "{err}");
    }
}
