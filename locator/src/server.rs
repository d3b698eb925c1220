//! The HTTP API on hyper: routing, auth, body limits, JSON in and out.
//!
//! Every route is listed once in [`ROUTES`] with the role it needs; the OpenAPI document and
//! the auth test both walk that table, so a new route cannot be forgotten by either.

use crate::api::*;
use crate::auth::{Identity, Role, Tokens};
use crate::connections::{
    shed, shed_response, AcceptWarnings, Clock, Timeouts, Watched, SHED_LINGERING,
};
use crate::error::Error;
use crate::metrics::{method_label, RequestLabels, RouteLabels};
use crate::state::{Command, Reply};
use crate::store::Store;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The response body type: whole JSON documents or the watch stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The OpenAPI 3 document served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub use crate::api::WATCH_KEEPALIVE;

/// Default of `--header-read-timeout`: a request head is one packet for any real client, so
/// 10 s allows a very slow link and still frees a stalled or trickling client's connection soon.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of `--body-read-timeout`: the largest body (1 MiB) at ~35 KB/s; session reports and
/// every other body are a few KB.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of `--idle-timeout`: far longer than the gaps between a proxy's reports (1 s) or
/// haddock's polls, so their pooled connections are reused, while forgotten ones are freed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default of `--max-connections`: one watch per proxy plus a few for haddock and scrapes
/// leaves room for hundreds of proxies, and stays under the common 1024 soft limit on open
/// files, so shedding (not a failing `accept`) is what a flood meets.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub tokens: Tokens,
    /// Larger request bodies are refused with 413.
    pub body_limit: usize,
    /// Period of the empty keep-alive line on watch streams.
    pub keepalive: Duration,
    /// A request head must arrive within this of the connection's accept or of its first byte.
    pub header_read_timeout: Duration,
    /// A request body must arrive within this of its head, else 408.
    pub body_read_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections beyond this many get a 503 and are closed at once.
    pub max_connections: usize,
}

impl ServerConfig {
    pub fn new(tokens: Tokens) -> Self {
        ServerConfig {
            tokens,
            body_limit: 1024 * 1024,
            keepalive: WATCH_KEEPALIVE,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Needs(Role),
}

/// What a request asks for, once its method and path matched a row of [`ROUTES`]: the handler
/// matches on this (exhaustively), so method and path are written only in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Metrics,
    OpenApi,
    ListServices,
    GetService,
    PutService,
    SetWeights,
    RecordLimits,
    Lock,
    Unlock,
    Register,
    ListInstances,
    GetInstance,
    SetState,
    Heartbeat,
    Heartbeats,
    Sessions,
    CreateRelease,
    ListReleases,
    GetRelease,
    UpdateRelease,
    Control,
    Snapshot,
    Watch,
}

/// Every route: method, path template, access, endpoint — the one place each is written (the
/// OpenAPI document, the dispatch and the metrics' route label all follow it). Templates use
/// `{name}`-style parameters.
pub const ROUTES: &[(&str, &str, Access, Endpoint)] = &[
    ("GET", "/healthz", Access::Open, Endpoint::Healthz),
    ("GET", "/metrics", Access::Open, Endpoint::Metrics),
    ("GET", "/openapi.json", Access::Open, Endpoint::OpenApi),
    (
        "GET",
        "/v1/services",
        Access::Needs(Role::Read),
        Endpoint::ListServices,
    ),
    (
        "GET",
        "/v1/services/{name}",
        Access::Needs(Role::Read),
        Endpoint::GetService,
    ),
    (
        "PUT",
        "/v1/services/{name}",
        Access::Needs(Role::Deploy),
        Endpoint::PutService,
    ),
    (
        "PUT",
        "/v1/services/{name}/weights",
        Access::Needs(Role::Deploy),
        Endpoint::SetWeights,
    ),
    (
        "POST",
        "/v1/services/{name}/limits",
        Access::Needs(Role::Deploy),
        Endpoint::RecordLimits,
    ),
    (
        "PUT",
        "/v1/services/{name}/lock",
        Access::Needs(Role::Deploy),
        Endpoint::Lock,
    ),
    (
        "DELETE",
        "/v1/services/{name}/lock",
        Access::Needs(Role::Deploy),
        Endpoint::Unlock,
    ),
    (
        "POST",
        "/v1/instances",
        Access::Needs(Role::Deploy),
        Endpoint::Register,
    ),
    (
        "GET",
        "/v1/instances",
        Access::Needs(Role::Read),
        Endpoint::ListInstances,
    ),
    (
        "GET",
        "/v1/instances/{id}",
        Access::Needs(Role::Read),
        Endpoint::GetInstance,
    ),
    (
        "PUT",
        "/v1/instances/{id}/state",
        Access::Needs(Role::Deploy),
        Endpoint::SetState,
    ),
    (
        "POST",
        "/v1/instances/{id}/heartbeat",
        Access::Needs(Role::Deploy),
        Endpoint::Heartbeat,
    ),
    (
        "POST",
        "/v1/heartbeats",
        Access::Needs(Role::Deploy),
        Endpoint::Heartbeats,
    ),
    (
        "POST",
        "/v1/sessions",
        Access::Needs(Role::Proxy),
        Endpoint::Sessions,
    ),
    (
        "POST",
        "/v1/releases",
        Access::Needs(Role::Deploy),
        Endpoint::CreateRelease,
    ),
    (
        "GET",
        "/v1/releases",
        Access::Needs(Role::Read),
        Endpoint::ListReleases,
    ),
    (
        "GET",
        "/v1/releases/{id}",
        Access::Needs(Role::Read),
        Endpoint::GetRelease,
    ),
    (
        "PATCH",
        "/v1/releases/{id}",
        Access::Needs(Role::Deploy),
        Endpoint::UpdateRelease,
    ),
    (
        "POST",
        "/v1/releases/{id}/control",
        Access::Needs(Role::Deploy),
        Endpoint::Control,
    ),
    (
        "GET",
        "/v1/snapshot",
        Access::Needs(Role::Read),
        Endpoint::Snapshot,
    ),
    (
        "GET",
        "/v1/watch",
        Access::Needs(Role::Read),
        Endpoint::Watch,
    ),
];

/// Finds the route template of a path and its parameters (percent-decoded). Public for the
/// fuzz target `locator_request`, which feeds it whatever a client could send.
pub fn resolve(path: &str) -> Option<(&'static str, Vec<String>)> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut templates: Vec<&'static str> = ROUTES.iter().map(|r| r.1).collect();
    templates.dedup();
    for t in templates {
        let tsegs: Vec<&str> = t.trim_start_matches('/').split('/').collect();
        if tsegs.len() != segs.len() {
            continue;
        }
        let mut params = Vec::new();
        let matched = tsegs.iter().zip(&segs).all(|(t, s)| {
            if t.starts_with('{') {
                params.push(percent_decode(s));
                true
            } else {
                t == s
            }
        });
        if matched {
            return Some((t, params));
        }
    }
    None
}

/// Percent-decoding of a path segment or query part; invalid escapes stay as they are and
/// invalid UTF-8 becomes U+FFFD, so any input decodes to some string.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    parse_query(req.uri().query().unwrap_or(""))
}

/// A query string's `key=value` pairs, percent-decoded (the last of a repeated key wins).
pub fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect()
}

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json<T: Serialize>(value: &T) -> Result<Response<Body>, Error> {
    let body = serde_json::to_vec(value)
        .map_err(|e| Error::Internal(format!("cannot serialise a response: {e}")))?;
    Ok(full(StatusCode::OK, "application/json", body.into()))
}

fn error_response(e: &Error) -> Response<Body> {
    let body = serde_json::to_vec(&e.body()).unwrap_or_default();
    full(e.status(), "application/json", body.into())
}

/// `{"control": "promote|abort|pause|resume"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlBody {
    control: Control,
}

struct App<S> {
    store: Arc<S>,
    config: ServerConfig,
}

impl<S: Store> App<S> {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        // The dashboard's static files: open, since the page itself holds no data.
        if req.method() == http::Method::GET {
            if let Some((content_type, bytes)) = crate::dashboard::asset(req.uri().path()) {
                let mut resp = full(StatusCode::OK, content_type, Bytes::from_static(bytes));
                for (name, value) in crate::dashboard::HEADERS {
                    resp.headers_mut()
                        .insert(*name, HeaderValue::from_static(value));
                }
                return resp;
            }
        }
        let started = Instant::now();
        let method = req.method().clone();
        let resolved = resolve(req.uri().path());
        let template = resolved.as_ref().map(|r| r.0).unwrap_or("unknown");
        let resp = match resolved {
            None => Err(Error::NotFound(req.uri().path().to_string())),
            Some((template, params)) => self.route(template, params, req).await,
        };
        let resp = resp.unwrap_or_else(|e| {
            if e.status().is_server_error() {
                tracing::warn!(error = %e, %method, route = template, "request failed");
            } else {
                tracing::debug!(error = %e, %method, route = template, "request refused");
            }
            error_response(&e)
        });
        let m = &self.store.committed().metrics;
        m.requests
            .get_or_create(&RequestLabels {
                method: method_label(&method),
                route: template,
                status: resp.status().as_u16(),
            })
            .inc();
        m.request_seconds
            .get_or_create(&RouteLabels {
                method: method_label(&method),
                route: template,
            })
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    async fn route(
        &self,
        template: &'static str,
        params: Vec<String>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Error> {
        let method = req.method().as_str().to_string();
        let (access, endpoint) = ROUTES
            .iter()
            .find(|(m, t, _, _)| *m == method && *t == template)
            .map(|r| (r.2, r.3))
            .ok_or_else(|| Error::MethodNotAllowed(method.clone()))?;
        // Open routes answer anyone; every write needs a role, so it has an identity.
        let identity = match access {
            Access::Needs(role) => {
                let auth = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                Some(self.config.tokens.check(auth, role)?)
            }
            Access::Open => None,
        };
        let who = identity
            .as_ref()
            .map(|i| i.name.clone())
            .unwrap_or_default();
        let writer = Writer {
            server: self,
            identity: identity.as_ref(),
        };
        let p = |i: usize| params.get(i).cloned().unwrap_or_default();
        let committed = self.store.committed();
        match endpoint {
            Endpoint::Healthz => json(&serde_json::json!({
                "status": "ok",
                "revision": committed.revision(),
            })),
            Endpoint::Metrics => Ok(full(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                committed.metrics.render().into(),
            )),
            Endpoint::OpenApi => Ok(full(
                StatusCode::OK,
                "application/json",
                Bytes::from_static(OPENAPI.as_bytes()),
            )),
            Endpoint::ListServices => json(&committed.read(|s| s.services())),
            Endpoint::GetService => json(&committed.read(|s| s.service(&p(0)))?),
            Endpoint::PutService => {
                let spec: ServiceSpec = self.body(req).await?;
                writer.write(Command::PutService { name: p(0), spec }).await
            }
            Endpoint::SetWeights => {
                let if_match = if_match(&req)?;
                let update: WeightsUpdate = self.body(req).await?;
                writer
                    .write(Command::SetWeights {
                        service: p(0),
                        update,
                        if_match,
                    })
                    .await
            }
            Endpoint::RecordLimits => {
                let mut change: NewLimitsChange = self.body(req).await?;
                change.who = who;
                writer
                    .write(Command::RecordLimits {
                        service: p(0),
                        change,
                    })
                    .await
            }
            Endpoint::Lock => {
                let mut lock: NewLock = self.body(req).await?;
                lock.who = who;
                writer
                    .write(Command::Lock {
                        service: p(0),
                        lock: Some(lock),
                    })
                    .await
            }
            Endpoint::Unlock => {
                writer
                    .write(Command::Lock {
                        service: p(0),
                        lock: None,
                    })
                    .await
            }
            Endpoint::Register => {
                let r: RegisterInstance = self.body(req).await?;
                writer.write(Command::Register(r)).await
            }
            Endpoint::ListInstances => {
                let q = query(&req);
                let service = q.get("service").map(String::as_str);
                json(&committed.read(|s| s.instances(service))?)
            }
            Endpoint::GetInstance => json(&committed.read(|s| s.instance(&p(0)))?),
            Endpoint::SetState => {
                let c: StateChange = self.body(req).await?;
                writer
                    .write(Command::SetState {
                        id: p(0),
                        state: c.state,
                    })
                    .await
            }
            Endpoint::Heartbeat => {
                self.drain(req).await?;
                writer.write(Command::Heartbeat { id: p(0) }).await
            }
            Endpoint::Heartbeats => {
                let h: Heartbeats = self.body(req).await?;
                writer.write(Command::Heartbeats { ids: h.ids }).await
            }
            Endpoint::Sessions => {
                let r: SessionReport = self.body(req).await?;
                writer.write(Command::Sessions(r)).await
            }
            Endpoint::CreateRelease => {
                let mut n: NewRelease = self.body(req).await?;
                n.who = who;
                writer.write(Command::CreateRelease(n)).await
            }
            Endpoint::ListReleases => {
                let q = query(&req);
                let active = match q.get("active").map(String::as_str) {
                    None | Some("false") | Some("0") => false,
                    Some("true") | Some("1") | Some("") => true,
                    Some(other) => {
                        return Err(Error::InvalidInput(format!(
                            "active must be true or false, not `{other}`"
                        )))
                    }
                };
                let service = q.get("service").map(String::as_str);
                json(&committed.read(|s| s.releases(service, active)))
            }
            Endpoint::GetRelease => json(&committed.read(|s| s.release(&p(0)))?),
            Endpoint::UpdateRelease => {
                let update: ReleaseUpdate = self.body(req).await?;
                writer
                    .write(Command::UpdateRelease { id: p(0), update })
                    .await
            }
            Endpoint::Control => {
                let c: ControlBody = self.body(req).await?;
                writer
                    .write(Command::Control {
                        id: p(0),
                        control: c.control,
                        who,
                    })
                    .await
            }
            Endpoint::Snapshot => Ok(full(
                StatusCode::OK,
                "application/json",
                committed.snapshot_json()?,
            )),
            Endpoint::Watch => {
                let since = match query(&req).get("since") {
                    None => None,
                    Some(s) => Some(s.parse::<Revision>().map_err(|_| {
                        Error::InvalidInput(format!("since must be a revision number, not `{s}`"))
                    })?),
                };
                let only = match query(&req).get("service") {
                    None => None,
                    Some(list) => Some(service_filter(list)?),
                };
                let scope = match query(&req).get("routing").map(String::as_str) {
                    None | Some("false") => crate::store::Scope::All,
                    Some("true") => crate::store::Scope::Routing,
                    Some(other) => {
                        return Err(Error::InvalidInput(format!(
                            "routing must be true or false, not `{other}`"
                        )))
                    }
                };
                let lines = crate::watch::open(
                    committed.clone(),
                    since,
                    self.config.keepalive,
                    only,
                    scope,
                )?;
                let body = StreamBody::new(lines.map(|b| Ok::<_, Infallible>(Frame::data(b))));
                let mut resp = Response::new(body.boxed_unsync());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                resp.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                Ok(resp)
            }
        }
    }

    /// Reads the whole body, refusing more than the limit.
    async fn drain(&self, req: Request<Incoming>) -> Result<Bytes, Error> {
        let limit = self.config.body_limit;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(Error::PayloadTooLarge(limit));
        }
        let read = Limited::new(req.into_body(), limit).collect();
        let read = tokio::time::timeout(self.config.body_read_timeout, read)
            .await
            .map_err(|_| Error::RequestTimeout(self.config.body_read_timeout))?;
        match read {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(Error::PayloadTooLarge(limit))
            }
            Err(e) => Err(Error::InvalidInput(format!(
                "cannot read the request body: {e}"
            ))),
        }
    }

    async fn body<T: DeserializeOwned>(&self, req: Request<Incoming>) -> Result<T, Error> {
        let bytes = self.drain(req).await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::InvalidJson(format!("request body: {e}")))
    }
}

fn if_match(req: &Request<Incoming>) -> Result<Option<Revision>, Error> {
    let Some(v) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    // Accept ETag spelling too: `"7"` or `W/"7"`.
    let bare = text.trim_start_matches("W/").trim_matches('"');
    bare.parse::<Revision>().map(Some).map_err(|_| {
        Error::InvalidInput(format!("If-Match must be a revision number, not `{text}`"))
    })
}

/// A running HTTP server; dropping it stops accepting connections.
pub struct RunningServer {
    pub addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    /// Waits until the accept loop ends (it only ends when aborted).
    pub async fn wait(mut self) {
        let _ = (&mut self.accept).await;
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Serves the API for `store` on `listener`.
pub fn spawn<S: Store>(
    listener: TcpListener,
    store: Arc<S>,
    config: ServerConfig,
) -> RunningServer {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let timeouts = Timeouts {
        header_read: config.header_read_timeout,
        idle: config.idle_timeout,
    };
    let cap = config.max_connections;
    let answer_shed = shed_response(cap);
    let permits = Arc::new(tokio::sync::Semaphore::new(cap));
    let lingering = Arc::new(tokio::sync::Semaphore::new(SHED_LINGERING));
    let app = Arc::new(App { store, config });
    let accept = tokio::spawn(async move {
        let mut warnings = AcceptWarnings::default();
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning, and say so once a second.
                    if let Some(suppressed) = warnings.admit(tokio::time::Instant::now()) {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let metrics = app.store.committed().metrics.clone();
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                // Shed the newest: the open connections are as legitimate as this one, and
                // closing it soon keeps the file descriptors for when they are gone.
                metrics.connections_shed.inc();
                tracing::debug!(%peer, cap, "too many connections; shedding one");
                shed(stream, &answer_shed, &lingering);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let open = OpenConnection::new(&metrics.connections);
            tokio::spawn(async move {
                let clock = Clock::new();
                let io = TokioIo::new(Watched::new(stream, clock.clone()));
                let requests = clock.clone();
                let service = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    // Busy until the response body is dropped: a watch stream is one request.
                    let in_flight = requests.start_request();
                    async move {
                        let resp = app.handle(req).await;
                        Ok::<_, Infallible>(resp.map(|body| {
                            body.map_frame(move |frame| {
                                let _busy = &in_flight;
                                frame
                            })
                            .boxed_unsync()
                        }))
                    }
                });
                // hyper's own header timeout is off: `Clock` does it (see `connections`).
                let conn = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(None)
                    .serve_connection(io, service);
                tokio::select! {
                    result = conn => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                    why = clock.expired(timeouts) => {
                        // Dropping the connection closes the socket.
                        tracing::debug!(%peer, why, "closing a connection");
                    }
                }
                drop((open, permit));
            });
        }
    });
    RunningServer { addr, accept }
}

/// One open connection in `haddock_locator_connections`, counted down on drop — also when a
/// panicking handler unwinds the connection's task, which a plain `dec()` at its end missed.
struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl OpenConnection {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        OpenConnection(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Binds `addr` and serves the API.
pub async fn bind<S: Store>(
    addr: SocketAddr,
    store: Arc<S>,
    config: ServerConfig,
) -> std::io::Result<RunningServer> {
    let listener = TcpListener::bind(addr).await?;
    Ok(spawn(listener, store, config))
}

/// The `service` query of a watch: comma-separated service names, at least one.
fn service_filter(list: &str) -> Result<std::collections::BTreeSet<String>, Error> {
    let names: std::collections::BTreeSet<String> = list
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    if names.is_empty() || names.len() > 1024 || names.iter().any(|n| n.len() > 253) {
        return Err(Error::InvalidInput(format!(
            "service must list 1..=1024 service names separated by commas, not `{list}`"
        )));
    }
    Ok(names)
}

/// Executes the write commands of one request, on behalf of the token that sent it.
struct Writer<'a, S> {
    server: &'a App<S>,
    identity: Option<&'a Identity>,
}

impl<S: Store> Writer<'_, S> {
    /// Refuses a command that changes a service outside the token's scope (nothing changes);
    /// executes the others.
    async fn write(&self, command: Command) -> Result<Response<Body>, Error> {
        if let Some(id) = self.identity.filter(|i| i.services.is_some()) {
            let touched = self
                .server
                .store
                .committed()
                .read(|s| s.services_of(&command));
            if let Some(service) = touched.into_iter().find(|s| !id.may_change(s)) {
                return Err(Error::OutOfScope {
                    token: id.name.clone(),
                    service,
                });
            }
        }
        match self.server.store.execute(command).await? {
            Reply::Service(s) => json(&s),
            Reply::Instance(i) => json(&i),
            Reply::Release(r) => json(&r),
            Reply::Accepted => json(&serde_json::json!({ "accepted": true })),
            Reply::Heartbeats(h) => json(&h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve() {
        assert_eq!(
            resolve("/v1/services/a%20b"),
            Some(("/v1/services/{name}", vec!["a b".into()]))
        );
        assert_eq!(
            resolve("/v1/instances/x/state"),
            Some(("/v1/instances/{id}/state", vec!["x".into()]))
        );
        assert_eq!(resolve("/v1/nope"), None);
        assert_eq!(percent_decode("%41%zz%4"), "A%zz%4");
    }

    #[test]
    fn openapi_covers_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        for (method, template, _, _) in ROUTES {
            let op = &doc["paths"][template][method.to_lowercase()];
            assert!(op.is_object(), "openapi.json lacks {method} {template}");
        }
    }
}
