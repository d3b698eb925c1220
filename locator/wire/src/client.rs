//! A typed HTTP client for the locator, used by haddock, the proxy and the tests.
//!
//! Every method maps one route of the API (docs/api.md). Non-2xx answers become
//! [`ClientError::Api`] carrying the status and the server's error code, so callers can match
//! on `code` (`release_active`, `revision_mismatch`, …) instead of parsing messages.
//!
//! A client may know several replicas (`http://a:7070,http://b:7070`): a request that cannot
//! reach one (refused) goes to the next at once, and every clone of the client then stays on
//! the one that answered. A request whose connection broke after it was sent goes to the next
//! only when it is safe to send twice: GET, PUT, DELETE, and a release driver's update (see
//! [`Client::update_release`]). A watch that breaks is resumed by
//! its caller from the last revision, on whichever replica answers.

use crate::api::*;
use futures_util::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Why a call to the locator failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The locator answered with an error body.
    #[error("locator answered {status}: {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// The locator could not be reached or the connection broke.
    #[error("locator unreachable at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not the JSON this client expects (version skew or a proxy in between).
    #[error("unexpected answer from the locator: {0}")]
    Decode(String),
    /// A watch stream carried nothing, not even a keep-alive line, for this long: the locator
    /// or the path to it is gone without closing the connection (a frozen host, a dropped
    /// NAT entry). The stream ends; reconnect from the last revision.
    #[error("the locator at {url} sent nothing for {silence:?} on a watch")]
    Silent {
        url: String,
        silence: std::time::Duration,
    },
}

impl ClientError {
    /// The server's error code, if the locator answered at all.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The server's message when it answered, else the whole error.
    pub fn message(&self) -> String {
        match self {
            ClientError::Api { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A cheap-to-clone handle on one locator. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Client {
    /// The replicas, in the order given.
    bases: Arc<Vec<String>>,
    /// The replica in use (an index into `bases`), shared by every clone.
    current: Arc<AtomicUsize>,
    token: Option<String>,
    http: reqwest::Client,
    /// How long a request keeps retrying while the locator refuses connections.
    connect_retry: std::time::Duration,
    /// A watch that receives nothing for this long ends with [`ClientError::Silent`].
    watch_silence: std::time::Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("bases", &self.bases)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connect_retry", &self.connect_retry)
            .field("watch_silence", &self.watch_silence)
            .finish_non_exhaustive()
    }
}

/// Default of [`Client::with_watch_silence`]: three of the locator's keep-alive periods, so one
/// or two lines delayed by a busy network or locator are not mistaken for a dead one.
pub const DEFAULT_WATCH_SILENCE: std::time::Duration =
    std::time::Duration::from_secs(3 * crate::api::WATCH_KEEPALIVE.as_secs());

impl Client {
    /// `base_url` is e.g. `http://127.0.0.1:7070`, or several replicas separated by commas;
    /// `token` is sent as `Authorization: Bearer`.
    pub fn new(base_url: &str, token: Option<String>) -> Self {
        let mut bases: Vec<String> = base_url
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            bases.push(String::new());
        }
        Client {
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            token,
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .expect("a client without TLS always builds"),
            connect_retry: std::time::Duration::ZERO,
            watch_silence: DEFAULT_WATCH_SILENCE,
        }
    }

    /// A watch (its response headers, then its lines) that stays silent this long is given up
    /// with [`ClientError::Silent`], so that the caller reconnects instead of waiting forever
    /// on a connection nobody answers. Keep it a few times the locator's keep-alive period.
    pub fn with_watch_silence(mut self, silence: std::time::Duration) -> Self {
        self.watch_silence = silence;
        self
    }

    /// Keeps retrying refused connections for up to `window` (with backoff) before a call
    /// fails: for callers like haddock that must outlive a locator restart.
    pub fn with_connect_retry(mut self, window: std::time::Duration) -> Self {
        self.connect_retry = window;
        self
    }

    /// The replica in use.
    pub fn base_url(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Moves every clone of this client from replica `from` to the next one (unless another
    /// call moved it already).
    fn fail_over(&self, from: usize) {
        let next = (from + 1) % self.bases.len();
        let moved = self
            .current
            .compare_exchange(from, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if moved {
            tracing::warn!(from = %self.bases[from], to = %self.bases[next], "locator replica unreachable; moving to the next");
        }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self
            .http
            .request(method, format!("{}{}", self.base_url(), path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends `req`, resending it after a broken connection when its method is idempotent.
    async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let idempotent = req
            .try_clone()
            .and_then(|r| r.build().ok())
            .is_some_and(|r| matches!(*r.method(), Method::GET | Method::PUT | Method::DELETE));
        self.send_as(req, idempotent).await
    }

    /// Sends `req`; `resend_safe` says whether the locator may be sent it twice.
    async fn send_as<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
        resend_safe: bool,
    ) -> Result<T> {
        // A refused connection means the request never reached the locator, so even a POST
        // is safe to send again: this rides out a locator restart without a special case in
        // every caller. A request that is safe to resend is also sent again after any other
        // transport error — typically a pooled keep-alive connection to a replica that was
        // killed, which fails with "error sending request" rather than a refused connect, and
        // may or may not have reached the replica before it died.
        let deadline = std::time::Instant::now() + self.connect_retry;
        let mut pause = std::time::Duration::from_millis(100);
        let template = req.build().map_err(|source| ClientError::Transport {
            url: self.base_url().to_string(),
            source,
        })?;
        // Replicas tried since the last pause: each gets one attempt before backing off.
        let mut tried = 0;
        let resp = loop {
            let at = self.current.load(Ordering::Relaxed) % self.bases.len();
            let mut attempt = template
                .try_clone()
                .expect("request bodies are buffered JSON");
            rebase(attempt.url_mut(), &self.bases[at]);
            match self.http.execute(attempt).await {
                Ok(resp) => break resp,
                Err(e) if e.is_connect() || (resend_safe && e.is_request()) => {
                    tried += 1;
                    if tried < self.bases.len() {
                        self.fail_over(at);
                        continue;
                    }
                    if std::time::Instant::now() + pause >= deadline {
                        return Err(ClientError::Transport {
                            url: self.bases[at].clone(),
                            source: e,
                        });
                    }
                    self.fail_over(at);
                    tried = 0;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
                Err(source) => {
                    return Err(ClientError::Transport {
                        url: self.bases[at].clone(),
                        source,
                    })
                }
            }
        };
        let url = resp.url().clone();
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.origin().ascii_serialization(),
                source,
            })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => ClientError::Api {
                    status,
                    code: e.error.code,
                    message: e.error.message,
                },
                Err(_) => ClientError::Api {
                    status,
                    code: "http_error".into(),
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    // --- services ---

    pub async fn put_service(&self, name: &str, spec: &ServiceSpec) -> Result<Service> {
        self.call(Method::PUT, &format!("/v1/services/{name}"), Some(spec))
            .await
    }

    pub async fn service(&self, name: &str) -> Result<Service> {
        self.get(&format!("/v1/services/{name}")).await
    }

    pub async fn services(&self) -> Result<Vec<Service>> {
        self.get("/v1/services").await
    }

    /// Records an in-place limits change of the service's instances (`haddock update`).
    pub async fn record_limits(&self, service: &str, change: &NewLimitsChange) -> Result<Service> {
        let req = self
            .request(Method::POST, &format!("/v1/services/{service}/limits"))
            .json(change);
        self.send(req).await
    }

    /// Takes the service's deploy lock (409 `service_locked` when someone holds it).
    pub async fn lock(&self, service: &str, lock: &NewLock) -> Result<Service> {
        let req = self
            .request(Method::PUT, &format!("/v1/services/{service}/lock"))
            .json(lock);
        self.send(req).await
    }

    /// Gives the service's deploy lock up (whoever holds it; no lock is fine).
    pub async fn unlock(&self, service: &str) -> Result<Service> {
        let req = self.request(Method::DELETE, &format!("/v1/services/{service}/lock"));
        self.send(req).await
    }

    /// Sets the weights; with `if_match` the write fails with `412 revision_mismatch` when the
    /// service changed since that revision.
    pub async fn set_weights(
        &self,
        service: &str,
        update: &WeightsUpdate,
        if_match: Option<Revision>,
    ) -> Result<Service> {
        let mut req = self
            .request(Method::PUT, &format!("/v1/services/{service}/weights"))
            .json(update);
        if let Some(rev) = if_match {
            req = req.header("If-Match", rev.to_string());
        }
        self.send(req).await
    }

    // --- instances ---

    pub async fn register(&self, instance: &RegisterInstance) -> Result<Instance> {
        self.call(Method::POST, "/v1/instances", Some(instance))
            .await
    }

    pub async fn instance(&self, id: &str) -> Result<Instance> {
        self.get(&format!("/v1/instances/{id}")).await
    }

    pub async fn instances(&self, service: &str) -> Result<Vec<Instance>> {
        self.get(&format!("/v1/instances?service={service}")).await
    }

    pub async fn set_state(&self, id: &str, state: InstanceState) -> Result<Instance> {
        let body = StateChange { state };
        self.call(
            Method::PUT,
            &format!("/v1/instances/{id}/state"),
            Some(&body),
        )
        .await
    }

    pub async fn heartbeat(&self, id: &str) -> Result<Instance> {
        self.call::<(), _>(Method::POST, &format!("/v1/instances/{id}/heartbeat"), None)
            .await
    }

    /// Heartbeats many instances in one request (a host agent's round).
    pub async fn heartbeats(&self, ids: &[String]) -> Result<HeartbeatsAccepted> {
        self.call(
            Method::POST,
            "/v1/heartbeats",
            Some(&Heartbeats { ids: ids.to_vec() }),
        )
        .await
    }

    // --- sessions (role `proxy`) ---

    pub async fn report_sessions(&self, report: &SessionReport) -> Result<serde_json::Value> {
        self.call(Method::POST, "/v1/sessions", Some(report)).await
    }

    /// Sends the whole `report` as its changes since `previous` (the last accepted report)
    /// when given; whole when not, or when the locator lacks the previous one (409
    /// `full_report_needed`: it restarted, or this client moved to another replica). Figures
    /// are absolute, not increments, so a report whose answer was lost is harmless to send
    /// again. Returns whether the whole report went.
    pub async fn report_session_changes(
        &self,
        report: &SessionReport,
        previous: Option<&SessionReport>,
    ) -> Result<bool> {
        if let Some(previous) = previous {
            match self.report_sessions(&report.changes_since(previous)).await {
                Ok(_) => return Ok(false),
                // `invalid_json`: a locator from before reports of changes, which refuses the
                // unknown fields; it takes whole reports.
                Err(e) if matches!(e.code(), Some("full_report_needed" | "invalid_json")) => {
                    tracing::debug!(error = %e, "the locator asks for the whole report");
                }
                Err(e) => return Err(e),
            }
        }
        self.report_sessions(report).await.map(|_| true)
    }

    // --- releases ---

    /// Takes the service's release lock: `409 release_active` names the active release.
    pub async fn create_release(&self, release: &NewRelease) -> Result<Release> {
        self.call(Method::POST, "/v1/releases", Some(release)).await
    }

    /// A driver's update (one that names its lease holder) is resent after a broken
    /// connection, so that a replica killed between receiving the update and answering it
    /// does not fail the release. Applying it twice is applying it once: its fields set values
    /// (none adds to one), and a second copy of a state move already made is answered as a
    /// success (`locator::state`, the lease names the same holder). Not resent: an update that
    /// clears an operator's control, as a second copy could clear a newer control.
    pub async fn update_release(&self, id: &str, update: &ReleaseUpdate) -> Result<Release> {
        let req = self
            .request(Method::PATCH, &format!("/v1/releases/{id}"))
            .json(update);
        self.send_as(req, update.lease.is_some() && !update.clear_control)
            .await
    }

    pub async fn release(&self, id: &str) -> Result<Release> {
        self.get(&format!("/v1/releases/{id}")).await
    }

    /// Newest first; `service` narrows it down.
    pub async fn history(&self, service: Option<&str>) -> Result<Vec<Release>> {
        match service {
            Some(s) => self.get(&format!("/v1/releases?service={s}")).await,
            None => self.get("/v1/releases").await,
        }
    }

    pub async fn active_release(&self, service: &str) -> Result<Option<Release>> {
        let active: Vec<Release> = self
            .get(&format!("/v1/releases?service={service}&active=true"))
            .await?;
        Ok(active.into_iter().next())
    }

    pub async fn control(&self, id: &str, control: Control) -> Result<Release> {
        let body = serde_json::json!({ "control": control });
        self.call(
            Method::POST,
            &format!("/v1/releases/{id}/control"),
            Some(&body),
        )
        .await
    }

    // --- reading the whole state ---

    pub async fn snapshot(&self) -> Result<Snapshot> {
        self.get("/v1/snapshot").await
    }

    /// Streams every change after `since` (or a snapshot first when `since` is `None` or too
    /// old). The stream ends when the connection does, or with [`ClientError::Silent`] when the
    /// locator sends nothing for the watch-silence period; callers reconnect from the last
    /// revision.
    pub async fn watch(
        &self,
        since: Option<Revision>,
    ) -> Result<impl Stream<Item = Result<WatchEvent>>> {
        self.watch_only(since, &[], false).await
    }

    /// [`Client::watch`] of only what concerns `services` (all when empty): their part of the
    /// snapshot, and their services', instances', releases' and traffic's events. With
    /// `routing_only`, only the events that can change a proxy's routing table (see
    /// [`Change::is_routing`](crate::api::Change::is_routing)): what a proxy needs, without the
    /// session sums and heartbeat times that move every second.
    pub async fn watch_only(
        &self,
        since: Option<Revision>,
        services: &[String],
        routing_only: bool,
    ) -> Result<impl Stream<Item = Result<WatchEvent>>> {
        let mut query = Vec::new();
        if let Some(rev) = since {
            query.push(format!("since={rev}"));
        }
        if !services.is_empty() {
            query.push(format!("service={}", services.join(",")));
        }
        if routing_only {
            query.push("routing=true".to_string());
        }
        let path = if query.is_empty() {
            "/v1/watch".to_string()
        } else {
            format!("/v1/watch?{}", query.join("&"))
        };
        let silence = self.watch_silence;
        // Each replica once, from the one in use: a watch broken by a dead replica resumes on
        // the next within this call.
        let mut last_error = None;
        let mut answered = None;
        for _ in 0..self.bases.len() {
            let at = self.current.load(Ordering::Relaxed) % self.bases.len();
            let url = self.bases[at].clone();
            let attempt = tokio::time::timeout(silence, self.request(Method::GET, &path).send());
            match attempt.await {
                Ok(Ok(resp)) => {
                    answered = Some((resp, url));
                    break;
                }
                Ok(Err(source)) => last_error = Some(ClientError::Transport { url, source }),
                Err(_) => last_error = Some(ClientError::Silent { url, silence }),
            }
            self.fail_over(at);
        }
        let Some((resp, url)) = answered else {
            return Err(last_error.expect("at least one replica was tried"));
        };
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.bytes().await.unwrap_or_default();
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => (e.error.code, e.error.message),
                Err(_) => (
                    "http_error".into(),
                    String::from_utf8_lossy(&body).into_owned(),
                ),
            };
            return Err(ClientError::Api {
                status,
                code,
                message,
            });
        }
        let bytes = resp.bytes_stream();
        Ok(ndjson_lines(bytes, url, silence))
    }
}

/// Points `url` at replica `base` (scheme, host and port; path and query are kept).
fn rebase(url: &mut reqwest::Url, base: &str) {
    if let Ok(b) = reqwest::Url::parse(base) {
        let _ = url.set_scheme(b.scheme());
        let _ = url.set_host(b.host_str());
        let _ = url.set_port(b.port());
    }
}

/// Splits a byte stream into newline-delimited JSON events; ends with [`ClientError::Silent`]
/// when no byte arrives for `silence`.
fn ndjson_lines(
    bytes: impl Stream<Item = reqwest::Result<bytes::Bytes>>,
    url: String,
    silence: std::time::Duration,
) -> impl Stream<Item = Result<WatchEvent>> {
    let buf = Vec::<u8>::new();
    futures_util::stream::unfold(
        (Some(Box::pin(bytes)), buf, url),
        move |(bytes, mut buf, url)| async move {
            // `None` after a silence: the connection is dropped and the stream ends.
            let mut bytes = bytes?;
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let line = &line[..line.len() - 1];
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue; // keep-alive
                    }
                    let item = serde_json::from_slice::<WatchEvent>(line)
                        .map_err(|e| ClientError::Decode(e.to_string()));
                    return Some((item, (Some(bytes), buf, url)));
                }
                let Ok(next) = tokio::time::timeout(silence, bytes.next()).await else {
                    let err = ClientError::Silent {
                        url: url.clone(),
                        silence,
                    };
                    return Some((Err(err), (None, Vec::new(), url)));
                };
                match next {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(source)) => {
                        let err = ClientError::Transport {
                            url: url.clone(),
                            source,
                        };
                        return Some((Err(err), (Some(bytes), Vec::new(), url)));
                    }
                    None => return None,
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads one request from `s`: its head, then its body (by content-length), or what came
    /// before the client closed.
    async fn read_request(s: &mut tokio::net::TcpStream) -> Vec<u8> {
        let whole = |r: &[u8]| {
            let text = String::from_utf8_lossy(r).to_ascii_lowercase();
            let Some(end) = text.find("\r\n\r\n") else {
                return false;
            };
            let length = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            r.len() >= end + 4 + length
        };
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !whole(&request) {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        request
    }

    /// A locator that froze: it answers a watch's headers (or, with `answer: false`, not even
    /// those), then keeps the connection open and sends nothing. Counts the connections.
    async fn frozen_locator(answer: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                read_request(&mut s).await;
                if answer {
                    let headers = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                                   transfer-encoding: chunked\r\n\r\n";
                    let _ = s.write_all(headers.as_bytes()).await;
                }
                open.push(s); // never closed, never written to again
            }
        });
        (url, accepted)
    }

    /// A replica that reads each request whole, then (`answer: false`) dies on it: closes the
    /// connection without a word, as a killed process does; or (`answer: true`) answers
    /// `404 not_found`. Counts the requests it read.
    async fn replica(answer: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let read = Arc::new(AtomicUsize::new(0));
        let count = read.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                read_request(&mut s).await;
                count.fetch_add(1, Ordering::SeqCst);
                if answer {
                    let body = r#"{"error":{"code":"not_found","message":"no such release"}}"#;
                    let reply = format!(
                        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                }
                drop(s);
            }
        });
        (url, read)
    }

    /// A replica dies on an update (reads it, closes without answering): a driver's update
    /// goes to the next replica; one without a lease, or one clearing a control, is not sent
    /// twice.
    #[tokio::test]
    async fn only_a_drivers_update_goes_to_the_next_replica_when_one_dies_on_it() {
        let driver = ReleaseUpdate {
            step: Some(2),
            lease: Some("7@deployer".into()),
            ..Default::default()
        };
        let cases = [
            (driver.clone(), true),
            (
                ReleaseUpdate {
                    lease: None,
                    ..driver.clone()
                },
                false,
            ),
            (
                ReleaseUpdate {
                    clear_control: true,
                    ..driver.clone()
                },
                false,
            ),
        ];
        for (update, resent) in cases {
            let (dying, died_on) = replica(false).await;
            let (live, answered) = replica(true).await;
            let client = Client::new(&format!("{dying},{live}"), None);
            let err = client.update_release("rel-1", &update).await.unwrap_err();
            assert_eq!(died_on.load(Ordering::SeqCst), 1, "{update:?}");
            if resent {
                assert_eq!(err.code(), Some("not_found"), "{update:?}: {err}");
                assert_eq!(answered.load(Ordering::SeqCst), 1, "{update:?}");
                assert_eq!(client.base_url(), live);
            } else {
                assert!(
                    matches!(err, ClientError::Transport { .. }),
                    "{update:?}: {err}"
                );
                assert_eq!(answered.load(Ordering::SeqCst), 0, "{update:?} sent twice");
            }
        }
    }

    #[tokio::test]
    async fn a_silent_watch_ends_and_the_caller_reconnects() {
        let interval = Duration::from_millis(100);
        let silence = 3 * interval;
        let (url, accepted) = frozen_locator(true).await;
        let client = Client::new(&url, None).with_watch_silence(silence);
        let started = Instant::now();
        let mut events = Box::pin(client.watch(None).await.unwrap());
        let first = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the watch never noticed the silence");
        assert!(
            matches!(first, Some(Err(ClientError::Silent { .. }))),
            "{first:?}"
        );
        assert!(
            events.next().await.is_none(),
            "the stream ends after a silence"
        );
        let noticed = started.elapsed();
        assert!(noticed >= silence, "gave up after {noticed:?}");
        // What every caller (the proxy's watcher) does next: watch again, on a new connection.
        let _again = client.watch(None).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_watch_without_response_headers_gives_up() {
        let silence = Duration::from_millis(300);
        let (url, accepted) = frozen_locator(false).await;
        let client = Client::new(&url, None).with_watch_silence(silence);
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), client.watch(None))
            .await
            .expect("the watch waited for headers forever")
            .err()
            .expect("no locator answered");
        assert!(matches!(err, ClientError::Silent { .. }), "{err}");
        assert!(started.elapsed() >= silence);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
