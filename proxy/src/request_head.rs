//! The request head (request line and headers): read under a *total* deadline.
//!
//! Pingora 0.9.1 reads a request head before any `ProxyHttp` hook runs (`early_request_filter`
//! comes after it) and bounds each read only (60 s; on a kept-alive connection the keep-alive
//! timeout, per read too): a client sending one byte every few seconds holds a connection and
//! its buffer forever (slowloris). Its `HttpSession` has no total header timeout to set.
//!
//! So [`HeadDeadline`] wraps pingora's HTTP/1 application as the service's [`ServerApp`]: it
//! reads the head itself, checking completeness with `httparse` (the parser pingora uses), and
//! hands the bytes to pingora as the session's pre-read prefix — pingora's documented way to
//! feed a session bytes read before it (`set_pipelined_prefix`), which it parses without reading
//! again (so a malformed head is handed over only once its empty line is in: see [`head_len`]).
//! Everything after the head (hooks, body, reuse) is pingora's, unchanged. It mirrors
//! what pingora's own `ServerApp` does for an HTTP/1 connection, plain or over TLS. A TLS
//! connection that negotiated HTTP/2 goes to pingora's own path untouched (no h2c: a plain
//! connection is always read as HTTP/1.1).
//!
//! The deadline runs from the accept on a new connection, and from the first byte of the next
//! request on a kept-alive one (the idle wait in between stays bounded by pingora's keep-alive
//! timeout). A head that misses it is answered `408` with a JSON error, one larger than
//! [`MAX_HEAD_BYTES`] `431`; a connection that sent nothing is closed silently (browsers open
//! spare connections they may never use).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};

use crate::first_bytes::{FirstBytes, H2_FIRST_BYTES};
use pingora_core::server::ShutdownWatch;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Largest request head accepted. Pingora's own limit is 1 MiB, which lets every slow client
/// make the proxy hold a megabyte; nginx's default allows 32 KiB of header lines, and a session
/// cookie is under 200 bytes, so 64 KiB leaves ample room for real clients.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Headers per request, as in pingora (`MAX_HEADERS`): a head with more is left to pingora to
/// refuse, exactly as it would without this module.
const MAX_HEADERS: usize = 256;

/// Pingora's keep-alive idle timeout (its `ServerApp` sets 60 s on every new connection, and
/// the proxy never changes it): how long a kept-alive connection may wait for its next request.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// How long the error answer may take to write before the connection is dropped anyway.
const ANSWER_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What reading a request head came to.
#[derive(Debug)]
enum Head {
    /// A complete head (or a malformed one up to its empty line: pingora's to refuse or to
    /// escape), maybe with body bytes after it.
    Read(BytesMut),
    /// The client closed, reset or never started a request (also: the server is shutting down).
    Gone,
    /// The head did not arrive within the deadline.
    TimedOut,
    /// The head grew past [`MAX_HEAD_BYTES`].
    TooLarge,
}

/// Counters of refused request heads.
#[derive(Debug, Clone, Default)]
pub struct HeadCounters {
    pub timed_out: Counter,
    pub too_large: Counter,
}

/// Pingora's HTTP application behind a total request-head deadline (see the module docs).
#[derive(Debug)]
pub struct HeadDeadline<A> {
    app: Arc<A>,
    total: Duration,
    counters: HeadCounters,
}

impl<A> HeadDeadline<A> {
    pub fn new(app: A, total: Duration, counters: HeadCounters) -> Self {
        HeadDeadline {
            app: Arc::new(app),
            total,
            counters,
        }
    }
}

#[async_trait]
impl<A> ServerApp for HeadDeadline<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 (negotiated over TLS) frames its requests itself: pingora's own path takes
            // the connection, with its opening bytes due within the same deadline as a head
            // (see `first_bytes`).
            let stream: Stream = Box::new(FirstBytes::new(stream, H2_FIRST_BYTES, self.total));
            return self.app.process_new(stream, shutdown).await;
        }
        // `None` on the first request; then what pingora kept from the previous one.
        let mut reused: Option<Option<HttpPersistentSettings>> = None;
        let mut accepted_at = Some(Instant::now());
        loop {
            let head = read_head(&mut stream, self.total, accepted_at.take(), shutdown).await;
            let head = match head {
                Head::Read(head) => head,
                Head::Gone => return None,
                Head::TimedOut => {
                    self.counters.timed_out.inc();
                    answer(
                        &mut stream,
                        "408 Request Timeout",
                        r#"{"error":{"code":"request_header_timeout","message":"the request header did not arrive in time"}}"#,
                    )
                    .await;
                    return None;
                }
                Head::TooLarge => {
                    self.counters.too_large.inc();
                    answer(
                        &mut stream,
                        "431 Request Header Fields Too Large",
                        r#"{"error":{"code":"request_header_too_large","message":"the request header is larger than 64 KiB"}}"#,
                    )
                    .await;
                    return None;
                }
            };
            // As pingora's own `ServerApp` prepares an HTTP/1 session.
            let mut session = ServerSession::new_http1(stream);
            match reused.take() {
                None => {
                    session.set_keepalive(if *shutdown.borrow() {
                        None
                    } else {
                        Some(KEEPALIVE_IDLE.as_secs())
                    });
                    session.set_keepalive_reuses_remaining(
                        self.app
                            .server_options()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
                Some(Some(settings)) => settings.apply_to_session(&mut session),
                Some(None) => {}
            }
            session.set_pipelined_prefix(head);
            let (next, settings) = self
                .app
                .process_new_http(session, shutdown)
                .await?
                .consume();
            stream = next;
            reused = Some(settings);
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

/// The length of the request head at the start of `buf` once it has all arrived; `None` while
/// it has not.
///
/// A head httparse refuses counts as arrived only once `buf` holds the end of a head (an empty
/// line after the request line): pingora refuses most such heads at once (400), but one whose
/// request line has a bad token or version it percent-escapes and parses again, and if that
/// parse is partial it goes back to reading the socket itself, bound by its 60 s per-read
/// timeout only — a slowloris past our deadline (`GET /a b HTTP/1.1`, then a header byte a
/// minute). With the end of the head in the buffer, pingora has nothing left to read.
fn head_len(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut headers).parse(buf) {
        Ok(httparse::Status::Complete(len)) => Some(len),
        Ok(httparse::Status::Partial) => None,
        Err(_) => end_of_head(buf),
    }
}

/// Where the first empty line after the request line ends (line ends may be bare line feeds, as
/// httparse allows). Leading empty lines, which httparse skips, do not count.
fn end_of_head(buf: &[u8]) -> Option<usize> {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let rest = &buf[start..];
    (0..rest.len()).find_map(|i| match &rest[i..] {
        [b'\n', b'\n', ..] => Some(start + i + 2),
        [b'\n', b'\r', b'\n', ..] => Some(start + i + 3),
        _ => None,
    })
}

/// Reads one request head. `accepted_at`: when the connection was accepted (a new connection);
/// `None` on a kept-alive one, whose deadline starts at the request's first byte.
async fn read_head(
    stream: &mut Stream,
    total: Duration,
    accepted_at: Option<Instant>,
    shutdown: &ShutdownWatch,
) -> Head {
    let mut shutdown = shutdown.clone();
    let mut buf = BytesMut::with_capacity(4096);
    let mut deadline = accepted_at.map(|t| t + total);
    loop {
        let until = deadline.unwrap_or_else(|| Instant::now() + KEEPALIVE_IDLE);
        let idle = buf.is_empty();
        let before = buf.len();
        // Never more than one byte past the limit: what a read brings is bounded too (a single
        // read may otherwise bring twice the buffer's size).
        let mut room = (&mut buf).limit(MAX_HEAD_BYTES + 1 - before);
        tokio::select! {
            biased;
            // Pingora's timer, as pingora's own reads use: tokio's re-registered its entry on
            // every read and, the new deadline being the earliest, woke the runtime's driver
            // through its eventfd each time (a write syscall and an extra epoll wake per request,
            // ~1/3 of the CPU this proxy spent above bare pingora in `proxy/bench/hooks.sh`).
            // Pingora's is only armed when the read is pending, rounded to 10 ms.
            read = pingora_timeout::timeout(until.saturating_duration_since(Instant::now()), stream.read_buf(&mut room)) => match read {
                Ok(Ok(0)) => return Head::Gone,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "client connection failed while sending a request head");
                    return Head::Gone;
                }
                Err(_) if idle => return Head::Gone,
                Err(_) => return Head::TimedOut,
            },
            // Like pingora, drop a connection waiting for its next request when shutting down
            // (a head already begun is read to its end or deadline).
            _ = shutdown.wait_for(|down| *down), if idle => return Head::Gone,
        }
        deadline.get_or_insert_with(|| Instant::now() + total);
        // A head ends with an empty line: only a read that brought a line feed can complete it.
        if buf[before..].contains(&b'\n') {
            match head_len(&buf) {
                Some(len) if len > MAX_HEAD_BYTES => return Head::TooLarge,
                Some(_) => return Head::Read(buf),
                None => {}
            }
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Head::TooLarge;
        }
    }
}

/// Writes a final error answer and closes the connection (best effort: the client may be gone).
async fn answer(stream: &mut Stream, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        AsyncWriteExt::shutdown(stream).await
    };
    match tokio::time::timeout(ANSWER_WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, status, "could not answer a refused request head")
        }
        Err(_) => tracing::debug!(
            status,
            "the client did not read the answer to its refused request head"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_complete_at_its_empty_line() {
        let complete = |buf: &[u8]| head_len(buf).is_some();
        assert!(!complete(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!complete(b"GET / HTTP/1.1\r\nX-Slow: aaaa"));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(head_len(b"GET / HTTP/1.1\nHost: a\n\nbody"), Some(24));
        // Leading empty lines are skipped by the parser: they do not end a head early.
        assert!(!complete(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n"));
        // Garbage is pingora's to refuse (400), not ours to wait for, once it is all there.
        assert!(complete(b"\x00\x01 nonsense\r\n\r\n"));
    }

    #[test]
    fn a_refused_head_is_complete_only_at_its_end() {
        // Pingora escapes such a request line and would read the rest itself (the 60 s
        // per-read slowloris): the head is ours to read until its empty line.
        for partial in [
            &b"GET /a b HTTP/1.1\r\n"[..],
            b"GET /a b HTTP/1.1\r\nX: ",
            b"GET /a b HTTP/1.1\r\nHost: a\r\n",
            b"GET /a b HTTP/1.1\nHost: a\n",
            // Empty lines before the request line are not its end.
            b"\r\n\r\nGET /a b HTTP/1.1\r\nX: ",
            b"\n\nGET /a b HTTP/1.1\nX: ",
        ] {
            assert!(
                httparse::Request::new(&mut [httparse::EMPTY_HEADER; 4])
                    .parse(partial)
                    .is_err(),
                "{}",
                partial.escape_ascii()
            );
            assert_eq!(head_len(partial), None, "{}", partial.escape_ascii());
        }
        let whole = b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(head_len(whole), Some(whole.len() - 4));
        let lf = b"GET /a b HTTP/1.1\nHost: a\n\nbody";
        assert_eq!(head_len(lf), Some(lf.len() - 4));
        let mixed = b"GET /a b HTTP/1.1\nHost: a\n\r\nbody";
        assert_eq!(head_len(mixed), Some(mixed.len() - 4));
        assert_eq!(head_len(b"GET /a b HTTP/1.1\r\n\r\n"), Some(21));
    }
}
