//! The admin port: `/metrics` (Prometheus), `/healthz`, and `/routing` (the table in use, as
//! JSON: what operators and tests look at to see what the proxy believes).

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::router::Router;

/// The admin HTTP app.
#[derive(Debug)]
pub struct Admin {
    router: Arc<Router>,
}

impl Admin {
    pub fn new(router: Arc<Router>) -> Self {
        Admin { router }
    }

    /// Answers one admin path (split out so it can be tested without sockets).
    pub fn answer(&self, path: &str) -> (u16, &'static str, Vec<u8>) {
        match path {
            "/metrics" => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.router.metrics.encode().into_bytes(),
            ),
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/routing" => {
                let table = self.router.table.load();
                let body = serde_json::json!({
                    "table": table.summary(),
                    "live_sessions": self.router.tracker.len(),
                });
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
    use crate::session::CookieKeys;

    #[test]
    fn serves_metrics_health_and_routing() {
        let admin = Admin::new(Router::new("svc", CookieKeys::random(), Options::default()));
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
