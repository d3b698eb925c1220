//! Hostile clients over real sockets: invented methods, stalled or trickled requests, idle
//! connections and floods. Every limit here is set short by the test and checked from outside.

use futures_util::StreamExt;
use locator::server::ServerConfig;
use locator::testing::{self, eventually, PROXY_TOKEN, READ_TOKEN};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bound on waiting for what must happen, so a regression fails instead of hanging.
const BOUND: Duration = Duration::from_secs(15);

/// Reads until the server closes the connection (EOF or reset); what arrived and when.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(BOUND, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the server kept the connection open for {BOUND:?}; got: {}",
            String::from_utf8_lossy(&got)
        )
    });
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

async fn metrics(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_are_counted_as_other() {
    let loc = testing::embedded(Duration::from_secs(10)).await;
    let invented = format!("FROBNICATE{}", "Z".repeat(4000));
    let mut s = TcpStream::connect(loc.server.addr).await.unwrap();
    let request = format!("{invented} /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let (answer, _) = read_until_closed(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let text = metrics(&loc.url).await;
    assert!(
        text.contains(
            r#"haddock_locator_http_requests_total{method="OTHER",route="/healthz",status="405"} 1"#
        ),
        "{text}"
    );
    assert!(
        !text.contains("FROBNICATE"),
        "the invented method is a label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_heads_are_closed_after_the_header_timeout() {
    let timeout = Duration::from_millis(300);
    let loc = testing::embedded_with(Duration::from_secs(10), |c| {
        c.header_read_timeout = timeout;
    })
    .await;
    // Part of a request line, then nothing.
    let started = Instant::now();
    let mut partial = TcpStream::connect(loc.server.addr).await.unwrap();
    partial.write_all(b"GET /heal").await.unwrap();
    // A connection that never says anything owes its first head just the same.
    let mut silent = TcpStream::connect(loc.server.addr).await.unwrap();
    for s in [&mut partial, &mut silent] {
        let (answer, closed) = read_until_closed(s).await;
        assert_eq!(answer, "", "closed without an answer");
        assert!(closed - started >= timeout, "closed before the timeout");
    }
    // One byte at a time does not buy more time: the deadline counts from the first byte.
    let mut trickle = TcpStream::connect(loc.server.addr).await.unwrap();
    let started = Instant::now();
    let trickling = async {
        for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".iter().cycle() {
            if trickle.write_all(&[*b]).await.is_err() {
                return Instant::now();
            }
            if started.elapsed() > BOUND {
                panic!("still writing after {BOUND:?}: the trickle was never cut off");
            }
            // Pacing the trickle is the client's behaviour under test, not a wait for a result.
            tokio::time::sleep(timeout / 10).await;
        }
        unreachable!("cycle never ends")
    };
    let cut = tokio::time::timeout(BOUND, trickling).await.unwrap();
    assert!(cut - started >= timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_watch_streams_live_on() {
    let idle = Duration::from_millis(300);
    let loc = testing::embedded_with(Duration::from_secs(10), |c| {
        c.header_read_timeout = Duration::from_millis(200);
        c.idle_timeout = idle;
        c.keepalive = Duration::from_millis(100);
    })
    .await;
    // A keep-alive connection: one answer, then silence until the idle timeout.
    let mut s = TcpStream::connect(loc.server.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(r#""status":"ok""#) {
        let n = tokio::time::timeout(BOUND, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    let (more, closed) = read_until_closed(&mut s).await;
    assert_eq!(more, "");
    assert!(closed - answered >= idle, "closed before the idle timeout");

    // A watch stream is one long response: it outlives many idle and header timeouts.
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/watch", loc.url))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let opened = Instant::now();
    let mut bytes = resp.bytes_stream();
    let mut keepalives = 0;
    while opened.elapsed() < 4 * idle {
        let chunk = tokio::time::timeout(BOUND, bytes.next())
            .await
            .unwrap()
            .expect("the watch stream ended")
            .expect("the watch stream broke");
        keepalives += chunk.iter().filter(|b| **b == b'\n').count();
    }
    assert!(keepalives >= 3, "{keepalives} lines in {:?}", 4 * idle);

    // The client's silence detection does not fire while keep-alives flow.
    let client = loc
        .client(READ_TOKEN)
        .with_watch_silence(Duration::from_millis(300));
    let mut events = Box::pin(client.watch(None).await.unwrap());
    assert!(events.next().await.unwrap().is_ok(), "the snapshot");
    // Three silence periods with only keep-alives: no event, no error, no end.
    let quiet = tokio::time::timeout(Duration::from_millis(900), events.next()).await;
    assert!(quiet.is_err(), "the watch ended or failed: {quiet:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_shed_and_healthz_recovers() {
    let header = Duration::from_secs(2);
    let loc = testing::embedded_with(Duration::from_secs(10), |c: &mut ServerConfig| {
        c.max_connections = 3;
        c.header_read_timeout = header;
    })
    .await;
    let addr: SocketAddr = loc.server.addr;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /").await.unwrap();
        stalled.push(s);
    }
    // The fourth is answered 503 and closed at once, not left waiting for a slot.
    let asked = Instant::now();
    let mut extra = TcpStream::connect(addr).await.unwrap();
    // A real client sends its request at once; closing with it unread would reset the
    // connection and lose the answer.
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: locator\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut extra).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains(r#""code":"too_many_connections""#),
        "{answer}"
    );
    assert!(
        closed - asked < header,
        "shed only after {:?}",
        closed - asked
    );
    // Once the stalled ones time out, /healthz answers again.
    let healthz = format!("{}/healthz", loc.url);
    eventually("/healthz to answer 200", BOUND, || {
        let healthz = healthz.clone();
        async move {
            let resp = reqwest::get(healthz).await.ok()?;
            (resp.status() == 200).then_some(())
        }
    })
    .await;
    for s in &mut stalled {
        read_until_closed(s).await;
    }
    let text = metrics(&loc.url).await;
    let shed = text
        .lines()
        .find_map(|l| l.strip_prefix("haddock_locator_connections_shed_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no shed counter in\n{text}"));
    assert!(shed >= 1, "{shed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_refused_with_408() {
    let timeout = Duration::from_millis(300);
    let loc = testing::embedded_with(Duration::from_secs(10), |c| {
        c.body_read_timeout = timeout;
    })
    .await;
    let mut s = TcpStream::connect(loc.server.addr).await.unwrap();
    let head = format!(
        "POST /v1/sessions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
    );
    let started = Instant::now();
    s.write_all(head.as_bytes()).await.unwrap();
    let (answer, closed) = read_until_closed(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(closed - started >= timeout);
}
