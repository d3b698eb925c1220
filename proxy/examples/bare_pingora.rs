//! The benchmark's framework baseline (`proxy/bench/run.sh`): pingora with nothing of ours, a
//! `ProxyHttp` whose only hook names one fixed upstream, on the same server configuration and
//! allocator as `proxy serve` (threads, no work stealing, pingora's default upstream keep-alive
//! pool, mimalloc). The gap between this row and the proxy's is what our hooks cost; the gap
//! between this row and nginx's is what the framework costs.
//! With a TLS address, certificate and key it also serves HTTPS from the same rustls stack as
//! `proxy serve --tls-listen` (pingora's listener; one certificate, no SNI choice), the
//! baseline of `proxy/bench/edge.sh`.
//! Like `proxy serve`, it serves plain HTTP with THREADS shards — services of one thread, each
//! with its own listening socket (SO_REUSEPORT) and upstream pool — and HTTPS with one service
//! of THREADS threads; `BARE_SHARDS=0` serves plain HTTP that way too (the model before stop
//! 23), to measure the difference.
//! Usage: `bare_pingora LISTEN UPSTREAM [THREADS [TLS_LISTEN CERT KEY]]`.
use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

// As in `proxy serve`: glibc's malloc alone was ~13 % of the proxy's cycles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18083".into());
    let upstream = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18081".into())
        .parse()
        .expect("UPSTREAM: an address such as 127.0.0.1:18081");
    let threads = args
        .next()
        .map_or(2, |t| t.parse().expect("THREADS: a number"));
    let conf = ServerConf {
        threads,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let tls = match (args.next(), args.next(), args.next()) {
        (Some(tls), Some(cert), Some(key)) => Some((tls, cert, key)),
        _ => None,
    };
    let sharded = std::env::var("BARE_SHARDS").map_or(true, |v| v != "0");
    let (services, threads_each) = if sharded { (threads, 1) } else { (1, threads) };
    let mut reuse_port = pingora_core::listeners::TcpSocketOptions::default();
    reuse_port.so_reuseport = Some(true);
    for (shard, addr) in proxy::server::shard_addresses(&listen, services)
        .iter()
        .enumerate()
    {
        let mut proxy = pingora_proxy::http_proxy_service_with_name(
            &server.configuration,
            Bare { upstream },
            &format!("bare {shard}"),
        );
        proxy.threads = Some(threads_each);
        proxy.add_tcp_with_settings(addr, reuse_port.clone());
        server.add_service(proxy);
    }
    // HTTPS as `proxy serve` has it: one service of THREADS threads (one TLS session cache).
    if let Some((addr, cert, key)) = tls {
        let mut proxy = pingora_proxy::http_proxy_service_with_name(
            &server.configuration,
            Bare { upstream },
            "bare tls",
        );
        proxy.threads = Some(threads);
        let mut settings = pingora_core::listeners::tls::TlsSettings::intermediate(&cert, &key)
            .expect("TLS settings");
        settings.enable_h2();
        proxy.add_tls_with_settings(&addr, None, settings);
        server.add_service(proxy);
    }
    server.run_forever()
}
