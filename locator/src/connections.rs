//! How long and how many: the limits that keep hostile or broken clients from holding the
//! locator's connections (and so its file descriptors) forever.
//!
//! - A connection owes a complete request head within the header-read timeout, counted from
//!   its accept or from the first byte of the head: a client that connects and says nothing, or
//!   sends one byte a second, is closed.
//! - Between requests a keep-alive connection may stay idle for the idle timeout.
//! - While a request is being answered — including a watch stream, which is one long response —
//!   neither applies: the stream's own keep-alive lines and the client's read decide its life.
//! - Beyond the connection cap a new connection gets a minimal `503 too_many_connections` and
//!   is closed at once, so the cap holds even under a flood and `/healthz` answers again as
//!   soon as the flood's connections are gone.
//!
//! hyper's own `header_read_timeout` is not used: it starts as soon as the connection waits for
//! a request, so it would also be the keep-alive idle timeout, and the two want different
//! values (seconds for a head that is one packet, a minute for a pooled client connection).

use crate::error::Error;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// What a connection is doing, and since when.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Owes a request head: the deadline is this instant plus the header-read timeout.
    Head(Instant),
    /// Between requests, nothing received since this instant.
    Idle(Instant),
    /// Answering this many requests (one at a time in HTTP/1; the count keeps it honest).
    Busy(usize),
}

/// The per-connection timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
}

/// One connection's phase, shared by its socket wrapper, its requests and its watchdog.
#[derive(Debug)]
pub struct Clock {
    phase: Mutex<Phase>,
}

impl Clock {
    /// A fresh connection owes its first request head now.
    pub fn new() -> Arc<Self> {
        Arc::new(Clock {
            phase: Mutex::new(Phase::Head(Instant::now())),
        })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        // The lock guards a Copy value and no code panics while holding it.
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: an idle connection starts owing a request head.
    fn received(&self) {
        let mut phase = self.phase();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
        }
    }

    /// A request head was parsed; the connection is busy until the returned guard (held by
    /// the response body) is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
        InFlight(self.clone())
    }

    fn end_request(&self) {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        };
    }

    /// When the connection must be closed if nothing changes; `None` while busy.
    fn deadline(&self, t: Timeouts) -> Option<Instant> {
        match *self.phase() {
            Phase::Head(since) => Some(since + t.header_read),
            Phase::Idle(since) => Some(since + t.idle),
            Phase::Busy(_) => None,
        }
    }

    /// Resolves when the connection overstayed its phase: the caller closes it.
    pub async fn expired(&self, t: Timeouts) -> &'static str {
        loop {
            let phase = *self.phase();
            match self.deadline(t) {
                Some(deadline) if deadline <= Instant::now() => {
                    return match phase {
                        Phase::Idle(_) => "idle timeout",
                        _ => "header read timeout",
                    };
                }
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                // Busy: look again later (a request ending moves the phase on).
                None => tokio::time::sleep(t.header_read.min(t.idle)).await,
            }
        }
    }
}

/// A request being answered; see [`Clock::start_request`].
#[derive(Debug)]
pub struct InFlight(Arc<Clock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

/// A socket that tells its [`Clock`] when bytes arrive.
#[derive(Debug)]
pub struct Watched<IO> {
    io: IO,
    clock: Arc<Clock>,
}

impl<IO> Watched<IO> {
    pub fn new(io: IO, clock: Arc<Clock>) -> Self {
        Watched { io, clock }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.received();
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The whole answer to a connection beyond the cap: a 503 with the usual JSON error body.
pub fn shed_response(cap: usize) -> Vec<u8> {
    let e = Error::TooManyConnections(cap);
    let body = serde_json::to_vec(&e.body()).unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// How long a shed connection is read from before it is closed, and how much of it.
pub const SHED_LINGER: Duration = Duration::from_secs(1);
const SHED_DRAIN_BYTES: usize = 64 * 1024;
/// Shed connections lingering at once; beyond this they are closed at once.
pub const SHED_LINGERING: usize = 64;

/// Answers a connection beyond the cap and closes it so the client reads the answer.
///
/// A client has usually sent its request by the time it is shed, and closing a socket with
/// unread bytes makes the kernel send a reset: the client then sees `ECONNRESET`, not the 503.
/// So the answer is written, our side shut down, and what the client sent read and dropped
/// until it closes — at most [`SHED_LINGER`], 64 KiB, and [`SHED_LINGERING`] connections at
/// once, since the point of shedding is to give file descriptors back. The accept loop never
/// waits: the write is non-blocking and the rest runs in its own task.
pub fn shed(stream: tokio::net::TcpStream, answer: &[u8], lingering: &Arc<Semaphore>) {
    let _ = stream.try_write(answer);
    let Ok(permit) = lingering.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = stream;
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut left = SHED_DRAIN_BYTES;
        let _ = tokio::time::timeout(SHED_LINGER, async {
            while left > 0 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
        drop(permit);
    });
}

/// At most one accept-error warning per this period. An exhausted file-descriptor table fails
/// every accept, and the loop retries every 50 ms: unthrottled that is 20 lines a second.
pub const ACCEPT_WARNING_PERIOD: Duration = Duration::from_secs(1);

/// Rate-limits the accept loop's warnings, counting what it held back.
#[derive(Debug, Default)]
pub struct AcceptWarnings {
    last: Option<Instant>,
    suppressed: u64,
}

impl AcceptWarnings {
    /// Whether to log an accept error seen at `now`: `Some(n)` with the number of errors held
    /// back since the last warning, `None` to stay quiet.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now < last + ACCEPT_WARNING_PERIOD => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The soft limit on open file descriptors (Linux), to warn when the connection cap cannot be
/// reached before accepts start failing.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_warnings_are_one_per_period_with_a_count() {
        let mut w = AcceptWarnings::default();
        let t0 = Instant::now();
        assert_eq!(w.admit(t0), Some(0));
        // 50 ms apart, as the accept loop retries: quiet for the rest of the period.
        for i in 1..20 {
            assert_eq!(w.admit(t0 + Duration::from_millis(50 * i)), None);
        }
        assert_eq!(w.admit(t0 + ACCEPT_WARNING_PERIOD), Some(19));
        assert_eq!(w.admit(t0 + 3 * ACCEPT_WARNING_PERIOD), Some(0));
    }

    #[test]
    fn phases_move_with_requests_and_bytes() {
        let t = Timeouts {
            header_read: Duration::from_secs(2),
            idle: Duration::from_secs(60),
        };
        let clock = Clock::new();
        let d = clock.deadline(t).unwrap();
        assert!(
            d <= Instant::now() + t.header_read,
            "a new connection owes a head"
        );
        let req = clock.start_request();
        assert_eq!(clock.deadline(t), None, "busy: no deadline");
        clock.received();
        assert_eq!(
            clock.deadline(t),
            None,
            "a body's bytes do not end the request"
        );
        drop(req);
        let idle = clock.deadline(t).unwrap();
        assert!(
            idle > Instant::now() + t.header_read,
            "idle: the longer timeout"
        );
        clock.received();
        let head = clock.deadline(t).unwrap();
        assert!(
            head <= Instant::now() + t.header_read,
            "a head started: the short one"
        );
    }

    #[test]
    fn the_shed_answer_is_a_json_503() {
        let text = String::from_utf8(shed_response(7)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let e: crate::api::ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(e.error.code, "too_many_connections");
    }

    #[test]
    fn the_open_files_limit_is_read() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
