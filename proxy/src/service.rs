//! The pingora [`ProxyHttp`] implementation: sticky placement, retries and accounting.
//!
//! Request walk: `request_filter` reads the session token (header, then cookie), verifies it
//! and places the request with the routing table (503 JSON when nothing can take it);
//! `upstream_peer` turns the placement into a peer; `fail_to_connect` / `error_while_proxy`
//! pick another instance and ask pingora to retry; `response_filter` writes the token when the
//! session is new, moved or due for a refresh; `logging` records metrics and the session.
//!
//! Who caused a failure decides how it is counted and logged ([`blame`]): the version's figures
//! the canary analysis reads hold only outcomes the service owns (an instance's answer, or its
//! failure to answer), and an error the client caused (it hung up, or sent a broken request) is
//! logged at debug level, not as pingora's ERROR line, since anyone can cause one per request.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};

use crate::edge::{self, RedirectError};
use crate::router::Router;
use crate::routing_table::{Placement, RoutingTable};
use crate::services::Services;
use crate::session::{is_legacy, now_ms, SessionId, SessionToken};
use crate::tracker::{InFlight, Touched};

/// Header API clients that keep no cookies use to carry the session token both ways.
pub const SESSION_HEADER: &str = "x-haddock-session";

/// Pingora's replay buffer size: bodies beyond it cannot be replayed whatever we configure.
const PINGORA_REPLAY_LIMIT: usize = 64 * 1024;

/// The proxy service.
#[derive(Debug, Clone)]
pub struct HaddockProxy {
    pub services: Arc<Services>,
}

/// Per-request state.
#[derive(Debug)]
pub struct RequestCtx {
    /// The service the request is for (set once its host and path are read).
    router: Option<Arc<Router>>,
    table: Option<Arc<RoutingTable>>,
    idx: usize,
    routed: bool,
    session: SessionId,
    hash: u64,
    issued_ms: u64,
    /// Write the token back (new session, moved session or refresh due).
    write_token: bool,
    /// The client sent the token in the header, so it gets it back there (no cookie).
    via_header: bool,
    /// Whether the request may be sent again after the upstream reset before answering.
    replayable: bool,
    tried: Vec<usize>,
    in_flight: Option<InFlight>,
    /// The status the instance answered with (`None`: no answer from an instance).
    upstream_status: Option<u16>,
    /// The request came over TLS: the cookie is `Secure`, HSTS may be sent.
    tls: bool,
    started: Instant,
}

fn idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::OPTIONS
    )
}

impl HaddockProxy {
    pub fn new(services: Arc<Services>) -> Self {
        HaddockProxy { services }
    }

    /// The raw token from the header or the cookie, and whether it came from the header.
    fn raw_token<'a>(session: &'a Session, cookie_name: &str) -> Option<(&'a str, bool)> {
        let headers = &session.req_header().headers;
        if let Some(v) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
            return Some((v.trim(), true));
        }
        for h in headers.get_all(http::header::COOKIE) {
            let Ok(h) = h.to_str() else { continue };
            for pair in h.split(';') {
                if let Some((k, v)) = pair.trim().split_once('=') {
                    if k == cookie_name {
                        return Some((v.trim_matches('"'), false));
                    }
                }
            }
        }
        None
    }

    /// Moves the request to another instance after instance `ctx.idx` failed it; false when
    /// there is none left or the attempt budget is spent.
    fn fail_over(&self, ctx: &mut RequestCtx) -> bool {
        let Some(table) = ctx.table.clone() else {
            return false;
        };
        ctx.tried.push(ctx.idx);
        let Some(router) = ctx.router.clone() else {
            return false;
        };
        if ctx.tried.len() >= self.services.options.max_attempts {
            return false;
        }
        let version = table.route(ctx.idx).version.clone();
        match table.relocate(&version, ctx.hash, &ctx.tried) {
            Some(next) => {
                ctx.idx = next;
                // The session follows: the failed instance is likely on its way out.
                ctx.write_token = true;
                router.metrics.retries.inc();
                true
            }
            None => false,
        }
    }

    /// Answers a plain HTTP request with a 308 to the same URL over HTTPS (400 when its `Host`
    /// names no host to send the client to).
    async fn redirect_to_https(session: &mut Session, port: u16) -> Result<()> {
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok());
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        match edge::redirect_location(host, path, port) {
            Ok(location) => {
                let mut resp = ResponseHeader::build(308, Some(3))?;
                resp.insert_header(http::header::LOCATION, location)?;
                resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
                session.write_response_header(Box::new(resp), true).await
            }
            Err(RedirectError::BadHost) => {
                Self::respond_json(
                    session,
                    400,
                    r#"{"error":{"code":"bad_host","message":"the Host header names no host to redirect to"}}"#,
                )
                .await
            }
        }
    }

    async fn respond_json(session: &mut Session, status: u16, body: &'static str) -> Result<()> {
        Self::respond(
            session,
            status,
            "application/json",
            Bytes::from_static(body.as_bytes()),
        )
        .await
    }

    async fn respond(
        session: &mut Session,
        status: u16,
        content_type: &'static str,
        body: Bytes,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header("content-type", content_type)?;
        resp.insert_header("content-length", body.len().to_string())?;
        if status == 503 {
            resp.insert_header("retry-after", "1")?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }
}

#[async_trait]
impl ProxyHttp for HaddockProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            router: None,
            table: None,
            idx: 0,
            routed: false,
            session: SessionId([0; 16]),
            hash: 0,
            issued_ms: 0,
            write_token: false,
            via_header: false,
            replayable: false,
            tried: Vec::new(),
            in_flight: None,
            upstream_status: None,
            tls: false,
            started: Instant::now(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let edge_options = &self.services.options.edge;
        ctx.tls = edge::is_tls(session)
            || (edge_options.trust_forwarded && edge::forwarded_https(session));
        if !ctx.tls {
            if let Some(challenges) = &edge_options.challenges {
                let path = session.req_header().uri.path();
                if let Some(token) = path.strip_prefix(edge::ACME_CHALLENGE_PREFIX) {
                    let token = token.to_string();
                    match challenges.answer(&token).await {
                        Some(answer) => {
                            Self::respond(session, 200, "text/plain", Bytes::from(answer)).await?;
                        }
                        None => {
                            Self::respond_json(
                                session,
                                404,
                                r#"{"error":{"code":"no_such_challenge","message":"no ACME challenge is pending with this token"}}"#,
                            )
                            .await?;
                        }
                    }
                    return Ok(true);
                }
            }
            if let Some(port) = edge_options.redirect_to_port {
                Self::redirect_to_https(session, port).await?;
                return Ok(true);
            }
        }
        // Which carried service the request is for.
        let req = session.req_header();
        let host = req.uri.host().or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        });
        let Some(router) = self.services.pick(host, req.uri.path()) else {
            self.services.edge.unknown_host.inc();
            Self::respond_json(
                session,
                404,
                r#"{"error":{"code":"unknown_host","message":"no service is served at this host and path"}}"#,
            )
            .await?;
            return Ok(true);
        };
        ctx.router = Some(router.clone());
        let router = &router;
        let table = router.table.load_full();
        if !ctx.tls && table.redirect_https {
            // The service's own policy; a proxy with no HTTPS serves it as it comes.
            if let Some(port) = edge_options.https_port {
                Self::redirect_to_https(session, port).await?;
                return Ok(true);
            }
        }
        let now = now_ms();
        let ttl = table.settings.idle_ttl_ms;

        let mut token = None;
        let mut legacy = false;
        if let Some((raw, via_header)) = Self::raw_token(session, &table.settings.cookie_name) {
            ctx.via_header = via_header;
            match router.keys.decode(&table.service, raw, now, ttl) {
                Ok(t) => {
                    legacy = is_legacy(raw);
                    token = Some(t);
                }
                Err(r) => router.metrics.token_rejected(r.reason()),
            }
        }

        let placement = match &token {
            Some(t) => {
                ctx.session = t.id;
                ctx.issued_ms = t.issued_ms;
                ctx.hash = t.id.hash64();
                // Refresh the token's last-seen time a few times per TTL, not on every response:
                // a Set-Cookie per request would cost more than it buys.
                // A legacy (readable) token is re-issued sealed on its first use.
                ctx.write_token = legacy || now.saturating_sub(t.last_seen_ms) > ttl / 4;
                table.place(Some((t.instance.as_str(), t.version.as_str())), ctx.hash)
            }
            None => {
                ctx.session = SessionId::random();
                ctx.issued_ms = now;
                ctx.hash = ctx.session.hash64();
                table.place(None, ctx.hash)
            }
        };
        match placement {
            None => {
                router.metrics.no_instance.inc();
                Self::respond_json(
                    session,
                    503,
                    r#"{"error":{"code":"no_ready_instance","message":"no instance of this service can take the request"}}"#,
                )
                .await?;
                return Ok(true);
            }
            Some(p) => {
                match p {
                    Placement::Kept(_) => {}
                    Placement::Moved(_) => {
                        router.metrics.sessions_moved.inc();
                        ctx.write_token = true;
                    }
                    Placement::New(_) => {
                        router.metrics.sessions_created.inc();
                        ctx.write_token = true;
                    }
                }
                ctx.idx = p.index();
            }
        }

        let req = session.req_header();
        let body_len = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let limit = router.options.max_replay_body.min(PINGORA_REPLAY_LIMIT);
        ctx.replayable = idempotent(&req.method) && body_len.is_none_or(|l| l <= limit);
        ctx.table = Some(table);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(table) = ctx.table.as_ref() else {
            return Error::e_explain(pingora_error::ErrorType::InternalError, "no placement");
        };
        let route = table.route(ctx.idx);
        // Replacing the guard releases the slot of a previous attempt.
        ctx.in_flight = Some(InFlight::enter(&route.in_flight));
        ctx.routed = true;
        let mut peer = HttpPeer::new(route.addr, false, String::new());
        peer.options.connection_timeout = Some(self.services.options.connect_timeout);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the instance, so any method can go elsewhere.
        if self.fail_over(ctx) {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let retry = match after_error(
            &e,
            client_reused,
            !session.as_ref().retry_buffer_truncated(),
            session.response_written().is_none(),
            ctx.replayable,
        ) {
            AfterError::GiveUp => false,
            AfterError::SameInstance => true,
            AfterError::FailOver => self.fail_over(ctx),
        };
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let sent = upstream_request
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let trust = self.services.options.edge.trust_forwarded;
        match edge::forwarded_for(sent, edge::client_ip(session), trust) {
            Some(value) => upstream_request.insert_header("x-forwarded-for", value)?,
            None => {
                upstream_request.remove_header("x-forwarded-for");
            }
        }
        let proto = if ctx.tls { "https" } else { "http" };
        upstream_request.insert_header("x-forwarded-proto", proto)?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if is_final(status) {
            ctx.upstream_status = Some(status);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if self.services.is_closing() {
            // Pingora then writes `Connection: close` and ends the connection after this answer.
            session.set_keepalive(None);
        }
        if ctx.tls
            && !resp
                .headers
                .contains_key(http::header::STRICT_TRANSPORT_SECURITY)
        {
            // The instance's header, when it sends one, wins; then the service's spec; then
            // the proxy's flag.
            let max_age = ctx.table.as_ref().and_then(|t| t.hsts_max_age_s).or(self
                .services
                .options
                .edge
                .hsts_max_age);
            if let Some(max_age) = max_age {
                resp.insert_header(
                    http::header::STRICT_TRANSPORT_SECURITY,
                    format!("max-age={max_age}"),
                )?;
            }
        }
        if !ctx.write_token {
            return Ok(());
        }
        let (Some(table), Some(router)) = (ctx.table.as_ref(), ctx.router.as_ref()) else {
            return Ok(());
        };
        let route = table.route(ctx.idx);
        let token = SessionToken {
            id: ctx.session,
            instance: route.id.to_string(),
            version: route.version.to_string(),
            issued_ms: ctx.issued_ms,
            last_seen_ms: now_ms(),
        };
        let value = router.keys.encode(&table.service, &token);
        if !ctx.via_header {
            resp.append_header(
                http::header::SET_COOKIE,
                format!(
                    "{}={value}; Path=/; HttpOnly; SameSite=Lax{}",
                    table.settings.cookie_name,
                    // Over HTTPS the browser must never send the session over plain HTTP.
                    if ctx.tls { "; Secure" } else { "" }
                ),
            )?;
        }
        resp.insert_header(SESSION_HEADER, value)?;
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.in_flight = None;
        if !ctx.routed {
            return;
        }
        let (Some(table), Some(router)) = (ctx.table.as_ref(), ctx.router.as_ref()) else {
            return;
        };
        let sent = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = table.route(ctx.idx);
        route.metrics.record(
            sent,
            service_outcome(ctx.upstream_status, e),
            ctx.started.elapsed(),
        );
        let touched =
            router
                .tracker
                .touch(ctx.hash, &route.id, now_ms(), table.settings.idle_ttl_ms);
        if touched == Touched::Refused {
            router.metrics.untracked_sessions.inc();
        }
    }

    fn suppress_error_log(&self, session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        if blame(e) != Blame::Client {
            return false;
        }
        // Pingora would log this at ERROR: one line per abandoned request, which any client
        // can produce at will and which says nothing about the service's health.
        tracing::debug!(error = %e, request = %session.as_ref().request_summary(), "request ended by the client");
        true
    }
}

/// Who caused a request's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// The client hung up, timed out or broke the protocol.
    Client,
    /// The instance: it refused the connection, reset it, timed out or answered garbage.
    Service,
    /// The proxy itself (an internal error).
    Proxy,
}

fn blame(e: &Error) -> Blame {
    match e.esource() {
        ErrorSource::Downstream => Blame::Client,
        ErrorSource::Upstream => Blame::Service,
        ErrorSource::Internal | ErrorSource::Unset => Blame::Proxy,
    }
}

/// The outcome of a request the service owns, for the version's figures: the instance's status,
/// or 502 when the instance failed the request (even after answering a status: a response cut
/// by a crash is a failure); `None` when the client or the proxy ended it.
fn service_outcome(upstream_status: Option<u16>, e: Option<&Error>) -> Option<u16> {
    match (e.map(blame), upstream_status) {
        (Some(Blame::Service), _) => Some(502),
        (_, Some(status)) => Some(status),
        (Some(Blame::Client | Blame::Proxy), None) | (None, None) => None,
    }
}

/// Whether an instance's status answers the request. An informational one (`100 Continue`,
/// `103 Early Hints`) comes before the answer: a client leaving after it has no answer from
/// the service, and must not count as one. `101 Switching Protocols` is final (a tunnel).
fn is_final(status: u16) -> bool {
    status >= 200 || status == 101
}

/// What to do after an error while proxying a request to an instance.
#[derive(Debug, PartialEq, Eq)]
enum AfterError {
    GiveUp,
    /// Again on the same instance: a pooled connection it had closed (pingora's `ReusedOnly`).
    SameInstance,
    /// On another instance of the same version, if there is one.
    FailOver,
}

fn after_error(
    e: &Error,
    client_reused: bool,
    replay_intact: bool,
    nothing_sent: bool,
    replayable: bool,
) -> AfterError {
    // The client hung up (or broke the protocol): nobody waits for an answer, and sending the
    // request again would only execute it again — a PUT up to `max_attempts` times, as the
    // proxy benchmark's log showed when wrk closed its connections.
    // And a request that is not idempotent is never sent twice: even on a pooled connection
    // that looked closed, the instance may have received it (pingora 0.9's default rule).
    if e.esource() == &pingora_error::ErrorSource::Downstream
        || !(replay_intact && nothing_sent && replayable)
    {
        return AfterError::GiveUp;
    }
    let mut retry = e.retry;
    retry.decide_reuse(client_reused);
    if retry.retry() {
        AfterError::SameInstance
    } else {
        AfterError::FailOver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_methods_are_replayed() {
        assert!(idempotent(&http::Method::GET));
        assert!(idempotent(&http::Method::PUT));
        assert!(idempotent(&http::Method::DELETE));
        assert!(!idempotent(&http::Method::POST));
        assert!(!idempotent(&http::Method::PATCH));
    }

    #[test]
    fn only_the_service_owns_its_outcomes_and_client_errors_log_at_debug() {
        use pingora_error::ErrorType::{ConnectTimedout, ConnectionClosed, InternalError};
        use pingora_error::ErrorType::{InvalidHTTPHeader, ReadError};
        let client_gone = Error::new_down(ConnectionClosed);
        let client_garbage = Error::new_down(InvalidHTTPHeader);
        let client_reset = Error::new_down(ReadError);
        let instance_down = Error::new_up(ConnectTimedout);
        let proxy_bug = Error::new_in(InternalError);
        for e in [&client_gone, &client_garbage, &client_reset] {
            // Logged at debug (pingora's ERROR line suppressed), never the service's 5xx.
            assert_eq!(blame(e), Blame::Client, "{e}");
            assert_eq!(service_outcome(None, Some(e)), None, "{e}");
        }
        assert_eq!(blame(&instance_down), Blame::Service);
        assert_eq!(blame(&proxy_bug), Blame::Proxy);
        // The instance's answers and failures are the service's.
        assert_eq!(service_outcome(Some(200), None), Some(200));
        assert_eq!(service_outcome(Some(503), None), Some(503));
        assert_eq!(service_outcome(None, Some(&instance_down)), Some(502));
        assert_eq!(service_outcome(Some(200), Some(&instance_down)), Some(502));
        // A client hanging up after the instance answered does not change the answer.
        assert_eq!(service_outcome(Some(200), Some(&client_gone)), Some(200));
        assert_eq!(service_outcome(Some(500), Some(&client_gone)), Some(500));
        // The proxy's own failures and answers are not the version's.
        assert_eq!(service_outcome(None, Some(&proxy_bug)), None);
        assert_eq!(service_outcome(None, None), None);
    }

    #[test]
    fn only_a_final_status_is_the_instance_answer() {
        for informational in [100, 102, 103] {
            assert!(!is_final(informational), "{informational}");
        }
        for status in [101, 200, 204, 304, 404, 500, 503] {
            assert!(is_final(status), "{status}");
        }
    }

    #[test]
    fn retries_follow_who_failed() {
        use pingora_error::{ErrorType::ConnectionClosed, RetryType};
        let up = |retry| {
            let mut e = Error::new_up(ConnectionClosed);
            e.retry = retry;
            e
        };
        let closed_pooled = up(RetryType::ReusedOnly);
        let mut client_gone = Error::new_down(ConnectionClosed);
        client_gone.retry = RetryType::ReusedOnly;
        let timed_out = up(RetryType::Decided(false));
        use AfterError::*;
        // (error, pooled connection, replay buffer intact, nothing sent yet, replayable, expected)
        let cases = [
            // A pooled connection the instance had closed: same instance...
            (&closed_pooled, true, true, true, true, SameInstance),
            // ...unless the request may not be executed twice.
            (&closed_pooled, true, true, true, false, GiveUp),
            // The same failure on a fresh connection: elsewhere if it may be replayed.
            (&closed_pooled, false, true, true, true, FailOver),
            (&closed_pooled, false, true, true, false, GiveUp),
            // Never once the answer has begun or the body can no longer be replayed.
            (&closed_pooled, true, true, false, true, GiveUp),
            (&closed_pooled, true, false, true, true, GiveUp),
            // Never when the client hung up, whatever the connection.
            (&client_gone, true, true, true, true, GiveUp),
            // Other upstream failures go elsewhere.
            (&timed_out, true, true, true, true, FailOver),
        ];
        for (i, (e, reused, intact, nothing_sent, replayable, expected)) in
            cases.into_iter().enumerate()
        {
            assert_eq!(
                after_error(e, reused, intact, nothing_sent, replayable),
                expected,
                "case {i}"
            );
        }
    }
}
