//! The admin port: `/metrics` (Prometheus, every carried service's in one document),
//! `/healthz`, and `/routing` (the tables in use, as JSON: what operators and tests look at to
//! see what the proxy believes; `table` is the first service's, `services` has each).

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::metrics::merge_openmetrics;
use crate::services::Services;

/// The admin HTTP app.
#[derive(Debug)]
pub struct Admin {
    services: Arc<Services>,
}

impl Admin {
    pub fn new(services: Arc<Services>) -> Self {
        Admin { services }
    }

    /// Answers one admin path (split out so it can be tested without sockets).
    pub fn answer(&self, path: &str) -> (u16, &'static str, Vec<u8>) {
        match path {
            "/metrics" => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                {
                    let parts: Vec<String> = std::iter::once(self.services.edge.encode())
                        .chain(self.services.routers().iter().map(|r| r.metrics.encode()))
                        .collect();
                    merge_openmetrics(&parts).into_bytes()
                },
            ),
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/routing" => {
                let one = |r: &crate::router::Router| {
                    serde_json::json!({
                        "table": r.table.load().summary(),
                        "live_sessions": r.tracker.len(),
                    })
                };
                let routers = self.services.routers();
                // The first service's figures at the top level too, as a proxy of one
                // service has always answered.
                let mut body = routers
                    .first()
                    .map_or_else(|| serde_json::json!({}), |r| one(r));
                body["services"] = routers.iter().map(|r| one(r)).collect();
                (200, "application/json", body.to_string().into_bytes())
            }
            _ => (
                404,
                "application/json",
                br#"{"error":{"code":"not_found","message":"try /metrics, /healthz or /routing"}}"#
                    .to_vec(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let (status, content_type, body) = self.answer(&path);
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Options;
    use crate::services::Scope;
    use crate::session::CookieKeys;

    #[test]
    fn serves_metrics_health_and_routing() {
        let scope = Scope::Named(vec!["svc".into()]);
        let services =
            Services::new(scope, None, CookieKeys::random(), Options::default()).unwrap();
        let admin = Admin::new(services);
        let (s, _, body) = admin.answer("/metrics");
        assert_eq!(s, 200);
        assert!(String::from_utf8(body)
            .unwrap()
            .contains("haddock_proxy_retries_total{service=\"svc\"}"));
        assert_eq!(admin.answer("/healthz").0, 200);
        let (_, _, body) = admin.answer("/routing");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["table"]["service"], "svc");
        assert_eq!(admin.answer("/nope").0, 404);
    }
}
