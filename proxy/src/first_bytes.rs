//! A connection whose first bytes must arrive before a deadline.
//!
//! An HTTP/2 connection (negotiated over TLS) starts with the client's preface and SETTINGS
//! frame, and pingora's HTTP/2 server waits for them with no time limit: a client that finishes
//! its TLS handshake and then sends nothing would hold the connection until the process exits
//! (the HTTP/2 form of slowloris, which [`crate::request_head`] stops for HTTP/1). [`FirstBytes`]
//! wraps the stream so that its reads fail with `TimedOut` when the first bytes have not all
//! arrived by the deadline. After them, the HTTP/2 server's idle timeout bounds a connection
//! with no request open (`h2_idle_timeout`, set in [`crate::server`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The HTTP/2 client preface (24 bytes) and the frame header of the SETTINGS frame that must
/// follow it: what a real client sends at once.
pub const H2_FIRST_BYTES: usize = 24 + 9;

/// A stream whose first `remaining` bytes must be read before `deadline`.
#[derive(Debug)]
pub struct FirstBytes {
    inner: Stream,
    remaining: usize,
    deadline: Pin<Box<Sleep>>,
}

impl FirstBytes {
    pub fn new(inner: Stream, first: usize, within: Duration) -> Self {
        FirstBytes {
            inner,
            remaining: first,
            deadline: Box::pin(tokio::time::sleep(within)),
        }
    }
}

impl AsyncRead for FirstBytes {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Polled before the read, so that a pending read also wakes at the deadline.
        if this.remaining > 0 && this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection's first bytes did not arrive in time",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            this.remaining = this.remaining.saturating_sub(buf.filled().len() - before);
        }
        read
    }
}

impl AsyncWrite for FirstBytes {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// Everything else is the wrapped stream's.

#[async_trait]
impl Shutdown for FirstBytes {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for FirstBytes {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for FirstBytes {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for FirstBytes {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for FirstBytes {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for FirstBytes {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for FirstBytes {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (tokio::net::TcpStream, Stream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let server: pingora_core::protocols::l4::stream::Stream = server.into();
        (client, Box::new(server))
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_and_a_prompt_one_is_read_whole() {
        let (_silent, stream) = pair().await;
        let mut late = FirstBytes::new(stream, 4, Duration::from_millis(100));
        let started = std::time::Instant::now();
        let err = late.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));

        let (mut client, stream) = pair().await;
        let mut prompt = FirstBytes::new(stream, 4, Duration::from_millis(200));
        client.write_all(b"abcd").await.unwrap();
        let mut got = [0u8; 4];
        prompt.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcd");
        // Past its first bytes the deadline no longer applies.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"e").await.unwrap();
        let mut more = [0u8; 1];
        prompt.read_exact(&mut more).await.unwrap();
        assert_eq!(&more, b"e");
    }
}
