//! The HTTP/1.1 API on hyper: routing, handlers, and the accept loop with graceful shutdown.
//!
//! Reads (objects, manifests, chunks, missing) are answered from the local store, whatever the
//! instance's role, to anyone; an object missing there is first fetched from the peers on other
//! hosts and kept (read-through, `App::read_through`). Mutations (object PUT/DELETE, chunk PUT,
//! pull) need the write token (`auth`) and run where the writer is: locally if this instance is
//! the writer, else streamed to it (see `volume`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{
    ACCEPT_RANGES, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    IF_RANGE, RANGE, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::auth::WriteToken;
use crate::chunker::{self, Chunker};
use crate::error::{task_failed, Error, Result};
use crate::manifest::{self, parse_range, validate_key, ChunkHash, ChunkRef, Manifest};
use crate::metrics::{
    method_label, read_through, Metrics, OutcomeLabels, RequestLabels, RouteLabels,
};
use crate::peers::{Peers, FRESH_ENOUGH, MISS_LISTING_WAIT};
use crate::store::Store;
use crate::sync;
use crate::volume::{BodyOverLimit, Forward, ForwardBody, Routed, Volume, FORWARDED_HEADER};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body of every handler.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// Request body of a mutation: the client's, or an empty one for a mutation without a body
/// whose (empty) body was checked before forwarding.
/// A mutation's body where it runs: the client's own, or (when this instance became the writer
/// while forwarding) the forwarded body replayed from its start (`volume::ForwardBody`).
type InBody = Body;

/// Bytes of an object verified before its response headers are sent: a corrupt chunk in this
/// window is answered as a clean 500 `corrupt_chunk`; past it, the connection is aborted (the
/// status line is gone), and the client sees a truncated body, never wrong data.
const VERIFY_AHEAD: usize = 4 << 20;
/// Bytes read per blocking task (one batched lookup) while streaming an object.
pub const READ_GROUP: usize = 1 << 20;

/// On the writer, a read group of at most this many bytes of chunks is read, decoded and
/// verified on the async thread that asks (tens of microseconds), as is an object's
/// manifest: the hand-off to the blocking pool and back, two thread wake-ups, cost more than
/// such reads. Measured (wrk, 64 connections, GET of one 8 KiB object, two alternating runs
/// each): 27 378-28 564 requests/s through the pool, 43 569-48 250 so. Larger groups, and
/// every read of a reader, still go to the pool: a reader's read can wait for its catch-up
/// with the writer (RocksDB's DB mutex, held while it replays the writer's WAL).
pub const INLINE_READ_BYTES: usize = 64 << 10;
/// Largest accepted stored chunk (lz4 worst case of FastCDC's largest chunk, plus headers).
const MAX_STORED_CHUNK: u64 = sync::MAX_STORED_CHUNK as u64;
/// Largest body of `POST /v1/chunks/missing`: about 120 000 hashes, the chunk list of a
/// 2 GiB object at the default 16 KiB chunks. The body, its parsed strings and the hashes
/// are all in memory at once (~3x the body), so this stays far below the 256 MiB cap of a
/// container (it was 64 MiB: ~200 MB per request).
const MISSING_BODY_LIMIT: u64 = 8 << 20;
/// `POST /v1/volume/handover` takes a short list of instance ids.
const HANDOVER_BODY_LIMIT: u64 = 64 << 10;
/// How long a hand-over's answer waits for a successor to publish itself as the writer.
const HANDOVER_TAKEN_WAIT: Duration = Duration::from_secs(5);
/// An oversized body is read and discarded up to this much before answering 413, so that the
/// client sees the answer instead of a reset connection.
const DRAIN_LIMIT: u64 = 64 << 20;
/// Peer hosts asked per local miss, at most (the first ones of `Peers::read_through_order`). A
/// key no host has (a typo, a deleted object, a client probing) costs one manifest round trip
/// across the WAN per host asked before its 404, and any client can ask for such keys: the
/// cost must not grow with the number of hosts. Three still finds an object while a host or
/// two are down or lack it.
const READ_THROUGH_HOSTS: usize = 3;
/// Longest silence of a peer within one answer (between reads). A host lost mid-transfer, or
/// with our pooled keep-alive connection to it silently dead, fails the read in this time
/// instead of holding the user's request until TCP gives up (minutes): seen when a test host
/// was cut off mid-release, its peers' reads hung past the clients' 20 s timeout.
const PEER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-instance HTTP settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub max_body_bytes: u64,
    /// The image's version, answered at `/version`.
    pub version: String,
    pub instance_id: String,
    /// The credential of mutations; `None` only with `--allow-anonymous-writes`.
    pub write_token: Option<Arc<WriteToken>>,
    /// The peers a pull or a read-through may fetch from (`--peer`, discovered).
    pub peers: Peers,
}

/// Shared state of all connections.
pub struct App {
    pub volume: Arc<Volume>,
    pub metrics: Arc<Metrics>,
    pub cfg: ServerConfig,
    client: reqwest::Client,
}

#[derive(Clone, Copy)]
enum Route<'a> {
    Healthz,
    Readyz,
    Version,
    Metrics,
    Object(&'a str),
    Manifest(&'a str),
    Pull(&'a str),
    Missing,
    Chunk(&'a str),
    Handover,
    Unknown,
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Self {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segs.as_slice() {
            ["healthz"] => Route::Healthz,
            ["readyz"] => Route::Readyz,
            ["version"] => Route::Version,
            ["metrics"] => Route::Metrics,
            ["v1", "objects", k] => Route::Object(k),
            ["v1", "objects", k, "manifest"] => Route::Manifest(k),
            ["v1", "objects", k, "pull"] => Route::Pull(k),
            ["v1", "chunks", "missing"] => Route::Missing,
            ["v1", "chunks", h] => Route::Chunk(h),
            ["v1", "volume", "handover"] => Route::Handover,
            _ => Route::Unknown,
        }
    }

    /// The path template, the bounded `route` label of the metrics (never the key itself).
    fn template(&self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Version => "/version",
            Route::Metrics => "/metrics",
            Route::Object(_) => "/v1/objects/{key}",
            Route::Manifest(_) => "/v1/objects/{key}/manifest",
            Route::Pull(_) => "/v1/objects/{key}/pull",
            Route::Missing => "/v1/chunks/missing",
            Route::Chunk(_) => "/v1/chunks/{hash}",
            Route::Handover => "/v1/volume/handover",
            Route::Unknown => "unknown",
        }
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("serialising our own types");
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &Error) -> Response<Body> {
    let mut resp = json(e.status(), &e.body());
    if let Error::Unauthorized = e {
        resp.headers_mut()
            .insert(WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    }
    resp
}

fn build(builder: http::response::Builder, body: Body) -> Result<Response<Body>> {
    builder
        .body(body)
        .map_err(|e| Error::Internal(e.to_string()))
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(task_failed)?
}

fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Reads and discards what is left of a body (bounded), see `DRAIN_LIMIT`.
async fn drain<B: hyper::body::Body + Unpin>(mut body: B) {
    let mut seen = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame
            .data_ref()
            .map_or(0, |d| hyper::body::Buf::remaining(d) as u64);
        if seen > DRAIN_LIMIT {
            break;
        }
    }
}

/// Reads a whole (small) body, at most `limit` bytes. Frame by frame rather than through
/// `http_body_util::Limited`: over the boxed body of a forwarded request, `Limited`'s error
/// bound (`Into<BoxError>` of a boxed error) trips rustc's `Send` check of the handler future
/// ("implementation of `From` is not general enough").
async fn read_body<B>(mut body: B, limit: u64) -> Result<Bytes>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(e.into(), limit))?;
        if let Ok(data) = frame.into_data() {
            if (read.len() + data.len()) as u64 > limit {
                return Err(Error::TooLarge { limit });
            }
            read.extend_from_slice(&data);
        }
    }
    Ok(read.freeze())
}

/// What a failed body read means for the client: over the limit a forwarded body enforces as
/// it streams, or a broken body.
fn body_error(e: BoxError, limit: u64) -> Error {
    if e.downcast_ref::<BodyOverLimit>().is_some() {
        Error::TooLarge { limit }
    } else {
        Error::BadRequest(format!("reading the body: {e}"))
    }
}

fn injected_request_fault() -> Result<()> {
    fail::fail_point!("http::request", |_| Err(Error::Internal(
        "injected fault (http::request)".into()
    )));
    Ok(())
}

fn injected_readyz_fault() -> Result<()> {
    fail::fail_point!("http::readyz", |_| Err(Error::NotReady));
    Ok(())
}

/// Either the mutation runs here (with its request) or the writer already answered it.
enum Exec {
    Local(Arc<Store>, Request<InBody>),
    Remote(Response<Body>),
}

#[derive(Deserialize)]
struct MissingRequest {
    hashes: Vec<String>,
}

/// Body of `POST /v1/volume/handover`: the instances that may become the writer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoverRequest {
    to: Vec<String>,
}

impl App {
    pub fn new(volume: Arc<Volume>, metrics: Arc<Metrics>, cfg: ServerConfig) -> Arc<App> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(PEER_READ_TIMEOUT)
            // A peer's redirect is an error, never followed: it could point anywhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a client without TLS always builds");
        Arc::new(App {
            volume,
            metrics,
            cfg,
            client,
        })
    }

    /// Answers one request; never fails (errors become JSON error responses).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = method_label(req.method());
        let path = req.uri().path().to_owned();
        let route = Route::parse(&path);
        let resp = match self.dispatch(route, req).await {
            Ok(r) => r,
            Err(e) => {
                if let Error::CorruptChunk { .. } = e {
                    self.metrics.corrupt_chunks.inc();
                    tracing::error!(%path, error = %e, "corrupt chunk; not served");
                } else if let Error::NotWriter = e {
                    // Only a forwarded write gets it, and its sender retries at the writer
                    // it finds next: expected, dozens at a time, while the role moves.
                    tracing::debug!(%method, %path, "forwarded write refused: not the writer");
                } else if e.status().is_server_error() {
                    tracing::warn!(%method, %path, error = %e, "request failed");
                }
                error_response(&e)
            }
        };
        let name = route.template();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                method,
                route: name,
                status: resp.status().as_u16(),
            })
            .inc();
        self.metrics
            .latency
            .get_or_create(&RouteLabels {
                method,
                route: name,
            })
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    async fn dispatch(&self, route: Route<'_>, req: Request<Incoming>) -> Result<Response<Body>> {
        // Probes stay healthy under `http::request`, so that a failure test gets a version
        // that turns healthy and then answers users with 5xx (what canary analysis must catch).
        if !matches!(route, Route::Healthz | Route::Readyz) {
            injected_request_fault()?;
        }
        let method = req.method().clone();
        let mutation = matches!(
            (route, &method),
            (Route::Object(_), &Method::PUT | &Method::DELETE)
                | (Route::Chunk(_), &Method::PUT)
                | (Route::Pull(_), &Method::POST)
                | (Route::Handover, &Method::POST)
        );
        if mutation {
            // Before anything else (key checks, forwarding): an anonymous client learns nothing.
            if let Err(e) = self.authorize(&req) {
                // The body is read (bounded) and dropped first: answered mid-upload, the client
                // saw the connection close under it instead of the 401 (a test's PUT, now and then).
                drain(req.into_body()).await;
                return Err(e);
            }
        }
        match route {
            Route::Healthz => Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "status": "alive" }),
            )),
            Route::Readyz => {
                injected_readyz_fault()?;
                let store = self.volume.store()?;
                let role = if store.is_writer() {
                    "writer"
                } else {
                    "reader"
                };
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "status": "ready", "role": role }),
                ))
            }
            Route::Version => Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "version": self.cfg.version, "instance_id": self.cfg.instance_id }),
            )),
            Route::Metrics => {
                let store = self.volume.store().ok();
                let writer = store.as_ref().is_some_and(|s| s.is_writer());
                let text = self.metrics.encode(store.map(|s| s.stats()), writer);
                build(
                    Response::builder().header(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    full(text),
                )
            }
            Route::Object(key) => {
                validate_key(key)?;
                match method {
                    Method::GET | Method::HEAD => self.get_object(key, &req).await,
                    Method::PUT => match self.on_writer(req, self.cfg.max_body_bytes).await? {
                        Exec::Local(store, req) => self.put_object(store, key, req).await,
                        Exec::Remote(resp) => Ok(resp),
                    },
                    Method::DELETE => match self.on_writer(req, 0).await? {
                        Exec::Local(store, _) => {
                            let k = key.to_owned();
                            if blocking(move || store.delete(&k)).await? {
                                Ok(json(StatusCode::OK, &serde_json::json!({ "deleted": key })))
                            } else {
                                Err(Error::NotFound(format!("object {key}")))
                            }
                        }
                        Exec::Remote(resp) => Ok(resp),
                    },
                    _ => Err(Error::MethodNotAllowed),
                }
            }
            Route::Manifest(key) if method == Method::GET => {
                validate_key(key)?;
                let store = self.volume.store()?;
                let k = key.to_owned();
                let manifest = blocking(move || store.manifest(&k))
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("object {key}")))?;
                let mut resp = json(StatusCode::OK, &manifest);
                if let Ok(v) = http::HeaderValue::from_str(&manifest.etag()) {
                    resp.headers_mut().insert(ETAG, v);
                }
                Ok(resp)
            }
            Route::Pull(key) if method == Method::POST => {
                validate_key(key)?;
                let from = req
                    .uri()
                    .query()
                    .and_then(|q| {
                        reqwest::Url::parse(&format!("http://q/?{q}"))
                            .ok()?
                            .query_pairs()
                            .find(|(k, _)| k == "from")
                            .map(|(_, v)| v.into_owned())
                    })
                    .ok_or_else(|| Error::BadRequest("pull needs ?from=<peer url>".into()))?;
                // A peer that registered a moment ago may be known to the reader that forwarded
                // this pull and not yet to us: one fresh listing before refusing it.
                let peer = match self.cfg.peers.resolve(&from) {
                    Ok(peer) => peer,
                    Err(_) => {
                        self.cfg
                            .peers
                            .refresh_if_older(FRESH_ENOUGH, MISS_LISTING_WAIT)
                            .await;
                        self.cfg.peers.resolve(&from)?
                    }
                };
                match self.on_writer(req, 0).await? {
                    Exec::Local(store, _) => {
                        let report =
                            sync::pull(&self.client, &store, key, &peer, self.cfg.max_body_bytes)
                                .await?;
                        self.metrics
                            .ingested(report.ingest.size, report.ingest.stored_bytes);
                        self.metrics
                            .pull_transferred_bytes
                            .inc_by(report.bytes_transferred);
                        Ok(json(StatusCode::OK, &report))
                    }
                    Exec::Remote(resp) => Ok(resp),
                }
            }
            Route::Handover if method == Method::POST => {
                let body = read_body(req.into_body(), HANDOVER_BODY_LIMIT).await?;
                let parsed: HandoverRequest = serde_json::from_slice(&body).map_err(|e| {
                    Error::BadRequest(format!(
                        "expected {{\"to\": [\"<instance id>\", ...]}}: {e}"
                    ))
                })?;
                if parsed.to.is_empty() || parsed.to.len() > 64 {
                    return Err(Error::BadRequest(
                        "\"to\" lists 1 to 64 instance ids".into(),
                    ));
                }
                let volume = self.volume.clone();
                let report =
                    blocking(move || volume.hand_over(&parsed.to, HANDOVER_TAKEN_WAIT)).await?;
                Ok(json(StatusCode::OK, &report))
            }
            Route::Missing if method == Method::POST => {
                // The body first: the store is not held while a client sends (a writer
                // handing its role over waits for every holder of its database).
                let body = read_body(req.into_body(), MISSING_BODY_LIMIT).await?;
                let store = self.volume.store()?;
                let parsed: MissingRequest = serde_json::from_slice(&body).map_err(|e| {
                    Error::BadRequest(format!("expected {{\"hashes\": [...]}}: {e}"))
                })?;
                let hashes = parsed
                    .hashes
                    .iter()
                    .map(|h| h.parse())
                    .collect::<Result<Vec<ChunkHash>>>()?;
                let missing = blocking(move || store.missing(&hashes)).await?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "missing": missing }),
                ))
            }
            Route::Chunk(hash) => {
                let hash: ChunkHash = hash.parse()?;
                match method {
                    Method::GET | Method::HEAD => {
                        let store = self.volume.store()?;
                        let stored = blocking(move || store.stored_chunk(&hash))
                            .await?
                            .ok_or_else(|| Error::NotFound(format!("chunk {hash}")))?;
                        chunker::decode_verified(&hash, &stored)?;
                        self.metrics.bytes_out.inc_by(stored.len() as u64);
                        let builder = Response::builder()
                            .header(CONTENT_TYPE, "application/x-optimizer-chunk")
                            .header(CONTENT_LENGTH, stored.len());
                        build(
                            builder,
                            if method == Method::HEAD {
                                empty()
                            } else {
                                full(stored)
                            },
                        )
                    }
                    Method::PUT => match self.on_writer(req, MAX_STORED_CHUNK).await? {
                        Exec::Local(store, req) => {
                            let body = read_body(req.into_body(), MAX_STORED_CHUNK).await?;
                            self.metrics.bytes_in.inc_by(body.len() as u64);
                            let new =
                                blocking(move || store.put_stored_chunk(&hash, &body)).await?;
                            let status = if new {
                                StatusCode::CREATED
                            } else {
                                StatusCode::OK
                            };
                            Ok(json(
                                status,
                                &serde_json::json!({ "hash": hash, "new": new }),
                            ))
                        }
                        Exec::Remote(resp) => Ok(resp),
                    },
                    _ => Err(Error::MethodNotAllowed),
                }
            }
            Route::Unknown => Err(Error::NotFound(format!("route {}", req.uri().path()))),
            _ => Err(Error::MethodNotAllowed),
        }
    }

    /// Checks the write token of a mutation (see `auth`).
    fn authorize<B>(&self, req: &Request<B>) -> Result<()> {
        match &self.cfg.write_token {
            None => Ok(()),
            Some(token) if token.admits(req.headers().get(AUTHORIZATION)) => Ok(()),
            Some(_) => Err(Error::Unauthorized),
        }
    }

    /// Routes a mutation to the writer. `limit` bounds its body; a forwarded body is streamed,
    /// never held whole (see `volume::ForwardBody`).
    async fn on_writer(&self, req: Request<Incoming>, limit: u64) -> Result<Exec> {
        if let Some(store) = self.volume.writer() {
            return Ok(Exec::Local(
                store,
                req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
            ));
        }
        if req.headers().contains_key(FORWARDED_HEADER) {
            return Err(Error::NotWriter);
        }
        let length = content_length(&req);
        if length.is_some_and(|l| l > limit) {
            drain(req.into_body()).await;
            return Err(Error::TooLarge { limit });
        }
        let (parts, body) = req.into_parts();
        let body = if limit == 0 {
            // No body expected (DELETE, pull): check it is empty and forward none.
            read_body(body, 0).await?;
            None
        } else {
            Some(ForwardBody::new(body, limit))
        };
        let forward = Forward {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            content_type: parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            content_length: length,
            body,
        };
        match self.volume.route(&forward).await? {
            Routed::Local(store) => {
                // We became the writer while forwarding: `route` only gets here with a body
                // that can still be sent whole, so it is read again from its first byte.
                let body = match &forward.body {
                    None => empty(),
                    Some(b) => b.body(),
                };
                Ok(Exec::Local(store, Request::from_parts(parts, body)))
            }
            Routed::Remote(answer) => {
                let mut builder = Response::builder().status(answer.status);
                if let Some(ct) = answer.content_type {
                    builder = builder.header(CONTENT_TYPE, ct);
                }
                if answer.status == StatusCode::UNAUTHORIZED {
                    builder = builder.header(WWW_AUTHENTICATE, "Bearer");
                }
                Ok(Exec::Remote(build(builder, full(answer.body))?))
            }
        }
    }

    /// On a local miss of `key`, fetches it from the first [`READ_THROUGH_HOSTS`] peer hosts of
    /// [`Peers::read_through_order`] into the volume (a pull, on the writer) until one has it.
    /// When none had it and discovery is on, the locator is listed again (if its last listing
    /// is older than [`FRESH_ENOUGH`]) and the peers that brings are asked too, within the
    /// same bound. Whether one had it. Failures are logged and counted, never answered: the client gets the
    /// 404 it would have had without peers. Only object reads come here, never the manifest
    /// route, which is what peers ask: reading through there would bounce a miss between hosts.
    async fn read_through(&self, key: &str) -> bool {
        let mut hosts_asked: Vec<String> = Vec::new();
        let mut failed = false;
        // The known peers first; when none had it, once more with a fresh list from the
        // locator if that brought hosts not asked yet (one that registered a moment ago).
        'rounds: for round in 0..2 {
            if round == 1 {
                // Whoever lists (we, or the discovery task a moment ago while we waited for
                // its listing), the hosts not asked yet are asked now.
                self.cfg
                    .peers
                    .refresh_if_older(FRESH_ENOUGH, MISS_LISTING_WAIT)
                    .await;
            }
            let hosts: Vec<(String, Vec<String>)> = self
                .cfg
                .peers
                .read_through_order()
                .into_iter()
                .filter(|(host, _)| !hosts_asked.contains(host))
                .collect();
            for (host, urls) in hosts {
                if hosts_asked.len() == READ_THROUGH_HOSTS {
                    break 'rounds;
                }
                hosts_asked.push(host);
                // One answer per host: its instances share one volume. Another instance of
                // the host is asked only when one fails (stopping, as old ones at a release).
                let mut answered = false;
                for peer in urls {
                    match self.pull_for_read(key, &peer).await {
                        Ok(()) => {
                            tracing::info!(%key, %peer, "read through a peer");
                            self.count_read_through(read_through::HIT);
                            return true;
                        }
                        Err(Error::NotFound(_)) => {
                            tracing::debug!(%key, %peer, "the peer's host does not have it either");
                            answered = true;
                            break;
                        }
                        Err(e @ Error::WriterUnavailable(_)) => {
                            // Waited `--forward-timeout` already; the next would wait as long.
                            failed = true;
                            tracing::warn!(%key, error = %e, "read-through needs the volume's writer; none answers");
                            break 'rounds;
                        }
                        Err(e) => {
                            if unreachable_peer(&e) {
                                // Asked last for a while: not every read pays its timeout.
                                self.cfg.peers.mark_down(&peer);
                            }
                            tracing::warn!(%key, %peer, error = %e, "read-through from a peer failed; trying another");
                        }
                    }
                }
                failed |= !answered;
            }
        }
        if hosts_asked.is_empty() {
            return false; // no peer at all: a plain miss, nothing to count
        }
        tracing::debug!(%key, ?hosts_asked, failed, "read-through: no peer host has it");
        self.count_read_through(if failed {
            read_through::FAILED
        } else {
            read_through::MISS
        });
        false
    }

    fn count_read_through(&self, outcome: &'static str) {
        self.metrics
            .read_through
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Pulls `key` from `peer` into the volume: here if this instance is (or becomes) the
    /// writer, else by the writer, asked with a pull like a client's. `Error::NotFound` when
    /// the peer does not have it.
    async fn pull_for_read(&self, key: &str, peer: &str) -> Result<()> {
        let store = match self.volume.writer() {
            Some(store) => store,
            None => {
                // The peer URL as a query value, encoded by `url` (what reqwest builds URLs with).
                let mut url = reqwest::Url::parse("http://writer/")
                    .map_err(|e| Error::Config(format!("pull URL: {e}")))?;
                url.set_path(&format!("/v1/objects/{key}/pull"));
                url.query_pairs_mut().append_pair("from", peer);
                let forward = Forward {
                    method: Method::POST,
                    path_and_query: format!("{}?{}", url.path(), url.query().unwrap_or_default()),
                    content_type: None,
                    content_length: None,
                    body: None,
                };
                match self.volume.route(&forward).await? {
                    Routed::Local(store) => store,
                    Routed::Remote(answer) if answer.status.is_success() => return Ok(()),
                    Routed::Remote(answer) if answer.status == StatusCode::NOT_FOUND => {
                        return Err(Error::NotFound(format!("object {key} on peer {peer}")))
                    }
                    Routed::Remote(answer) => {
                        // The writer's own error body (ours, so safe to log): its code says why.
                        let code = serde_json::from_slice::<serde_json::Value>(&answer.body)
                            .ok()
                            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        return Err(Error::PeerError {
                            peer: peer.to_owned(),
                            status: answer.status.as_u16(),
                            message: format!("the writer's pull failed ({code})"),
                        });
                    }
                }
            }
        };
        let report = sync::pull(&self.client, &store, key, peer, self.cfg.max_body_bytes).await?;
        self.metrics
            .ingested(report.ingest.size, report.ingest.stored_bytes);
        self.metrics
            .pull_transferred_bytes
            .inc_by(report.bytes_transferred);
        Ok(())
    }

    async fn put_object(
        &self,
        store: Arc<Store>,
        key: &str,
        req: Request<InBody>,
    ) -> Result<Response<Body>> {
        let limit = self.cfg.max_body_bytes;
        if content_length(&req).is_some_and(|l| l > limit) {
            drain(req.into_body()).await;
            return Err(Error::TooLarge { limit });
        }
        let content_type =
            match manifest::content_type(req.headers().get(CONTENT_TYPE).map(|v| v.as_bytes())) {
                Ok(ct) => ct,
                Err(e) => {
                    drain(req.into_body()).await;
                    return Err(e);
                }
            };
        let mut body = req.into_body();
        let mut ingest = store.begin_ingest()?;
        let mut chunker = Chunker::new(store.chunk_params());
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| body_error(e, limit))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            received += data.len() as u64;
            if received > limit {
                drain(body).await;
                return Err(Error::TooLarge { limit });
            }
            self.metrics.bytes_in.inc_by(data.len() as u64);
            chunker.push(&data, |c| ingest.add(c))?;
        }
        chunker.finish(|c| ingest.add(c))?;
        let k = key.to_owned();
        let report = blocking(move || {
            fail::fail_point!("ingest::before_commit");
            ingest.commit(&k, content_type)
        })
        .await?;
        self.metrics.ingested(report.size, report.stored_bytes);
        Ok(json(StatusCode::OK, &report))
    }

    async fn get_object(&self, key: &str, req: &Request<Incoming>) -> Result<Response<Body>> {
        // The store is taken afresh for each step, never held across the read-through's peer
        // I/O: a writer handing its role over waits for every user of its database.
        let manifest_of = |key: &str| {
            let (store, k) = (self.volume.store(), key.to_owned());
            async move {
                let s = store?;
                // On the writer one point read, done here: handing it to the blocking pool
                // and back cost more than the read itself (see `INLINE_READ_BYTES`).
                if s.is_writer() {
                    s.manifest_here(&k)
                } else {
                    blocking(move || s.manifest(&k)).await
                }
            }
        };
        let mut manifest = manifest_of(key).await?;
        if manifest.is_none() && self.read_through(key).await {
            // Read again where the object now is: the writer's store, which may have become
            // ours meanwhile (a reader's `manifest` catches up with the writer on a miss).
            manifest = manifest_of(key).await?;
        }
        let store = self.volume.store()?;
        let manifest = manifest.ok_or_else(|| Error::NotFound(format!("object {key}")))?;
        let etag = manifest.etag();
        let header = |name: http::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
        if header(IF_NONE_MATCH)
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
        {
            return build(
                Response::builder()
                    .status(StatusCode::NOT_MODIFIED)
                    .header(ETAG, &etag),
                empty(),
            );
        }
        let size = manifest.size;
        let range = match header(RANGE) {
            Some(r) if header(IF_RANGE).is_none_or(|v| v == etag) => parse_range(r, size)?,
            _ => None,
        };
        let (start, end) = range.unwrap_or((0, size));
        let mut builder = Response::builder()
            .header(ETAG, &etag)
            .header(ACCEPT_RANGES, "bytes")
            .header(
                CONTENT_TYPE,
                manifest
                    .content_type
                    .as_deref()
                    .unwrap_or("application/octet-stream"),
            )
            .header(CONTENT_LENGTH, end - start);
        if range.is_some() {
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(CONTENT_RANGE, format!("bytes {start}-{}/{size}", end - 1));
        }
        if req.method() == Method::HEAD {
            return build(builder, empty());
        }

        let groups = Manifest::read_groups(&manifest.chunks, start, end, READ_GROUP);
        let chunks = Arc::new(manifest.chunks);
        let read_group = move |store: Arc<Store>,
                               chunks: Arc<Vec<ChunkRef>>,
                               group: Vec<(usize, usize, usize)>| async move {
            let stored: usize = group.iter().map(|&(i, _, _)| chunks[i].len as usize).sum();
            if store.is_writer() && stored <= INLINE_READ_BYTES {
                if let Some(pieces) = store.pieces_here(&chunks, &group)? {
                    return Ok(pieces);
                }
            }
            blocking(move || store.pieces(&chunks, &group)).await
        };
        // Verify the first window before the status line goes out.
        let mut groups = groups.into_iter();
        let mut first = Vec::new();
        let mut verified = 0;
        while verified < VERIFY_AHEAD {
            let Some(group) = groups.next() else { break };
            let pieces = read_group(store.clone(), chunks.clone(), group).await?;
            verified += pieces.iter().map(Bytes::len).sum::<usize>();
            first.extend(pieces);
        }
        let metrics = self.metrics.clone();
        let path = req.uri().path().to_owned();
        // The rest is read from whatever store the volume has then, not from `store`: a
        // response that outlives a hand-over of the writer role must not hold the old
        // writer's database open (the successor could not open it); the chunks it needs are
        // in the secondary too, kept by the reclaim grace.
        drop(store);
        let volume = self.volume.clone();
        // Several groups at once, one per core, delivered in order: a single download
        // decodes and verifies on every core (docs/optimizer.md, "Benchmarks").
        let rest = futures_util::stream::iter(groups)
            .map(move |group| {
                let (store, chunks) = (volume.store(), chunks.clone());
                async move { read_group(store?, chunks, group).await }
            })
            .buffered(read_ahead())
            .map_ok(|pieces| futures_util::stream::iter(pieces.into_iter().map(Ok::<Bytes, Error>)))
            .try_flatten()
            .map_err(move |e: Error| {
                if let Error::CorruptChunk { .. } = e {
                    metrics.corrupt_chunks.inc();
                }
                tracing::error!(%path, error = %e, "aborting an object response mid-stream");
                BoxError::from(e)
            });
        let out = self.metrics.clone();
        let stream = futures_util::stream::iter(first.into_iter().map(Ok))
            .chain(rest)
            .map_ok(move |b| {
                out.bytes_out.inc_by(b.len() as u64);
                Frame::data(b)
            });
        build(builder, StreamBody::new(stream).boxed_unsync())
    }
}

/// Read groups of one response decoded at once: the cores (at most 4, so that one download
/// cannot take a bigger machine whole).
pub fn read_ahead() -> usize {
    static READ_AHEAD: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *READ_AHEAD.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
}

/// A peer that could not be reached, by us (`PeerUnreachable`) or by the writer a reader asked
/// to pull (its `peer_unreachable` answer, which `pull_for_read` passes on as a `PeerError`).
fn unreachable_peer(e: &Error) -> bool {
    match e {
        Error::PeerUnreachable { .. } => true,
        Error::PeerError { message, .. } => message.contains("(peer_unreachable)"),
        _ => false,
    }
}

/// Connections the kernel may hold for us before we accept them (capped by the host's
/// `net.core.somaxconn`, 4 096 on current kernels). tokio's `TcpListener::bind` queues 128
/// (measured: 129 of a burst of 1 500 completed their handshake, the test below). A proxy
/// whose idle connections ran out while this instance was short of CPU opens one per waiting
/// request at once, and a SYN that finds the queue full is dropped and sent again by the
/// client only after a second: in the proof, 354 such drops in the container of the naive
/// restart, and a haddock release in which 21 requests took 1.00-1.04 s.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the API's listener with [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's bind: a restart may bind again while the old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections until `shutdown` resolves, then stops accepting and waits up to
/// `grace` for in-flight requests.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer): (_, SocketAddr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let app = app.clone();
                let service = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move {
                        // A panic answers a generic 500, its text only in the log (it may
                        // quote data; the client needs none of it).
                        let resp = std::panic::AssertUnwindSafe(app.handle(req))
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|panic| {
                                let text = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_default();
                                tracing::error!(panic = %text, "a request handler panicked");
                                error_response(&Error::Internal("the request failed; see the instance's log".into()))
                            });
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        "stopped accepting; draining in-flight requests"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?grace, "grace period over with requests still in flight");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of connections beyond tokio's default backlog (128) while nothing accepts
    /// them, as when an instance is short of CPU: every one completes its handshake at once,
    /// none waits a second for its SYN to be sent again.
    #[tokio::test]
    async fn a_burst_beyond_tokios_default_backlog_is_queued_not_dropped() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("Linux")
            .trim()
            .parse()
            .unwrap();
        // One descriptor per client socket: a soft limit of 1 024 would fail the connects,
        // not the backlog.
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        if soft < 2048 {
            setrlimit(Resource::RLIMIT_NOFILE, hard.min(2048), hard).unwrap();
        }
        let (files, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let burst = 1500.min(somaxconn).min(files.saturating_sub(64) as usize);
        assert!(
            burst > 256,
            "net.core.somaxconn is {somaxconn} and the open-file limit {files}: too low to test a backlog above tokio's 128"
        );
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..burst).map(|_| {
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
        });
        let results = futures_util::future::join_all(connects).await;
        let connected = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(
            connected, burst,
            "connections that completed their handshake within 500 ms"
        );
        // And they are there to be accepted.
        let (_first, _) = listener.accept().await.unwrap();
    }
}
