//! Assembles the pingora server: the proxy service, the admin port and the two background
//! tasks (watcher, reporters), all sharing one [`Services`].

use std::path::Path;
use std::sync::Arc;

use locator_wire::api::Snapshot;
use locator_wire::client::Client;
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

use crate::acme::AcmeClient;
use crate::admin::Admin;
use crate::certificates::{CertificateWatcher, Certificates};
use crate::config::ServeArgs;
use crate::error::ProxyError;
use crate::reporter::Reporters;
use crate::request_head::{HeadDeadline, KEEPALIVE_IDLE};
use crate::run_dir::{current_uid, default_run_dir, ensure_private_dir};
use crate::service::HaddockProxy;
use crate::services::{Scope, Services};
use crate::watcher::{load_state, Watcher, STATE_FILE};

/// Pingora drops idle keep-alive connections as soon as its shutdown starts, which resets a
/// client that sent a request on one at that instant. On an upgrade it first waits a few
/// seconds with the sockets handed over: answering `Connection: close` during that window moves
/// every active client to the new process before any connection is dropped.
fn close_keepalives_on_shutdown(server: &Server, services: Arc<Services>) {
    use pingora_core::server::ExecutionPhase;
    let mut phases = server.watch_execution_phase();
    std::thread::spawn(move || {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match phases.blocking_recv() {
                Ok(
                    ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulTerminate
                    | ExecutionPhase::ShutdownStarted,
                ) => {
                    services.start_closing();
                    return;
                }
                // The channel holds 100 phases and a process goes through about ten.
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// The addresses of the `shards` listening sockets on `addr`, one per shard: the same address,
/// spelled with more leading zeros in the port each time (`0.0.0.0:8080`, `0.0.0.0:08080`, …).
/// Pingora keeps the listening sockets it hands to an upgraded process in a table keyed by the
/// address as written, so distinct spellings are what lets each shard own a socket of its own
/// (SO_REUSEPORT) and hand it over on `--upgrade`; every spelling parses to the same address.
pub fn shard_addresses(addr: &str, shards: usize) -> Vec<String> {
    let (host, port) = addr.rsplit_once(':').unwrap_or(("", addr));
    (0..shards)
        .map(|k| format!("{host}:{}{port}", "0".repeat(k)))
        .collect()
}

/// Waits until nothing listens on `addr` (at most 30 s, as pingora waits for an address in
/// use). The shards bind with SO_REUSEPORT, which would let a proxy started by mistake on the
/// address of a running one quietly share its connections (the kernel allows it for the same
/// user); a plain bind first makes that an error, as it was before the shards.
fn wait_until_free(flag: &str, addr: &str) -> Result<(), ProxyError> {
    let first = first_address(addr)
        .ok_or_else(|| ProxyError::Config(format!("{flag} {addr}: not an address to listen on")))?;
    if first.port() == 0 {
        return Err(ProxyError::Config(format!(
            "{flag} {addr}: a fixed port is needed (every thread listens on the same one)"
        )));
    }
    let mut tries = 0;
    loop {
        match std::net::TcpListener::bind(first) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 30 => {
                if tries == 0 {
                    tracing::warn!(%addr, "address in use: waiting for it (30 s at most)");
                }
                tries += 1;
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => {
                return Err(ProxyError::Config(format!(
                    "{flag} {addr}: {e} (another process listens there; to take a running \
                     proxy's sockets over, start with --upgrade)"
                )))
            }
        }
    }
}

/// Pingora hands an upgraded process its listening sockets in one message of at most 32
/// descriptors, with their addresses in a 2 048-byte buffer; beyond either the new process
/// fails to start after the old one has let go of its sockets. Checked before anything binds.
fn check_upgrade_hand_over(addresses: &[String]) -> Result<(), ProxyError> {
    let bytes: usize = addresses.iter().map(|a| a.len() + 1).sum();
    if addresses.len() > 32 || bytes > 2048 {
        return Err(ProxyError::Config(format!(
            "{} listening sockets ({bytes} bytes of addresses): pingora's upgrade hands over at \
             most 32 sockets and 2 048 bytes of addresses; lower --threads",
            addresses.len()
        )));
    }
    Ok(())
}

/// Whether a socket with SO_REUSEPORT may bind `addr` now: on an upgrade, whether the
/// listening socket the running proxy hands over lets the shards bind beside it. A proxy of a
/// release before the shards listened without SO_REUSEPORT, and Linux lets no socket with it
/// bind beside such a listener (each shard's bind would fail, after pingora's 30 s of retries,
/// inside its thread). The probe only binds, never listens, so it takes no connection.
pub fn shards_can_join(addr: &str) -> bool {
    first_address(addr).is_some_and(|want| reuse_port_socket(want).is_ok())
}

/// The address pingora binds for `addr`: the first the name resolves to.
fn first_address(addr: &str) -> Option<std::net::SocketAddr> {
    std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()
        .and_then(|mut all| all.next())
}

/// A TCP socket bound to `addr` as a shard's is (SO_REUSEADDR and SO_REUSEPORT), not
/// listening.
fn reuse_port_socket(addr: std::net::SocketAddr) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// The HTTPS listener's settings: certificates from `--tls-certs` (or the state dir's `certs`)
/// chosen by SNI (read once here, then again on every change), HTTP/2 offered by ALPN unless
/// `--no-h2`.
fn tls_settings(
    args: &ServeArgs,
    counters: &crate::certificates::TlsCounters,
) -> Result<(TlsSettings, Arc<Certificates>), ProxyError> {
    let Some(dir) = args.certs_dir() else {
        return Err(ProxyError::Config(
            "--tls-listen needs --tls-certs DIR or --state-dir".into(),
        ));
    };
    std::fs::create_dir_all(&dir).map_err(|e| {
        ProxyError::Config(format!(
            "cannot create the certificate directory {}: {e}",
            dir.display()
        ))
    })?;
    let certificates = Arc::new(Certificates::new(
        dir,
        args.tls_default_host.clone(),
        counters.clone(),
    ));
    certificates.reload();
    let hosts = certificates.hosts();
    if hosts.is_empty() {
        tracing::warn!(dir = %certificates.dir().display(), "no certificate loaded: every TLS handshake fails until one is");
    } else {
        tracing::info!(?hosts, "serving HTTPS");
    }
    let mut settings = TlsSettings::intermediate("", "")
        .map_err(|e| ProxyError::Server(format!("TLS settings: {e}")))?;
    settings.set_cert_resolver(certificates.clone());
    if !args.no_h2 {
        settings.enable_h2();
    }
    Ok((settings, certificates))
}

/// Pingora's HTTP application with our hooks, behind our total deadline on request heads. An
/// HTTP/2 connection with no request open is closed after the keep-alive idle time, as an idle
/// HTTP/1 one is.
fn proxy_service(
    server: &Server,
    services: &Arc<Services>,
    name: String,
) -> Service<HeadDeadline<pingora_proxy::HttpProxy<HaddockProxy>>> {
    let mut app =
        pingora_proxy::http_proxy(&server.configuration, HaddockProxy::new(services.clone()));
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(KEEPALIVE_IDLE);
    app.server_options = Some(options);
    Service::new(
        name,
        HeadDeadline::new(
            app,
            services.options.header_timeout,
            services.edge.request_heads.clone(),
        ),
    )
}

/// Runs `proxy serve` until a signal stops it (SIGTERM: graceful; SIGQUIT: hand the listening
/// sockets to a proxy started with `--upgrade`, then exit gracefully).
pub fn serve(args: &ServeArgs) -> Result<(), ProxyError> {
    let scope = args.scope()?;
    let (keys, options) = (args.keys()?, args.options()?);
    let services = Services::new(
        scope.clone(),
        args.default_service.as_deref(),
        keys,
        options,
    )
    .map_err(ProxyError::Config)?;
    let acme = args.acme()?;

    // The upgrade socket and the pid file live in the run directory: the state dir, else a
    // private default (never the shared temp dir, where another user could plant the socket
    // and be handed the listening sockets at the next upgrade).
    // One per service: two services' proxies must not share an upgrade socket.
    let uid = current_uid();
    let run_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => default_run_dir(
            std::env::var_os("XDG_RUNTIME_DIR")
                .as_deref()
                .map(Path::new),
            &std::env::temp_dir(),
            uid,
            &match &scope {
                Scope::Named(names) => names.join(","),
                // Not a service name (no `@` in one), so never another proxy's directory.
                Scope::Discovered => "@all".to_string(),
            },
        ),
    };
    ensure_private_dir(&run_dir, uid)?;
    let state_file = args.state_dir.as_ref().map(|dir| dir.join(STATE_FILE));
    // Serve from the last known table straight away: the locator may be down right now.
    let initial = match &state_file {
        Some(path) => match load_state(path) {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the persisted routing snapshot");
                Snapshot::default()
            }
        },
        None => Snapshot::default(),
    };
    if initial.revision > 0 {
        services.install(&initial, |_| true);
    }

    let conf = ServerConf {
        threads: args.threads,
        work_stealing: false,
        grace_period_seconds: Some(args.grace_period_s),
        graceful_shutdown_timeout_seconds: Some(args.grace_period_s),
        upgrade_sock: run_dir.join("upgrade.sock").display().to_string(),
        pid_file: run_dir.join("proxy.pid").display().to_string(),
        // One more than our own attempt budget: the budget is enforced in the service.
        max_retries: services.options.max_attempts + 1,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: args.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    close_keepalives_on_shutdown(&server, services.clone());

    let client = Client::new(&args.locator, args.token.clone());

    let shards = shard_addresses(&args.listen, args.threads);
    let listening: Vec<String> = shards
        .iter()
        .chain(&args.tls_listen)
        .chain(std::iter::once(&args.admin))
        .cloned()
        .collect();
    check_upgrade_hand_over(&listening)?;
    // On an upgrade from a proxy before the shards, plain HTTP is served as it was then: one
    // service of `--threads` threads on the one socket handed over (a restart brings shards).
    let sharded = !args.upgrade || shards_can_join(&args.listen);
    if !sharded {
        tracing::warn!(listen = %args.listen, "the running proxy's socket does not let shards share it (a proxy before shards): serving plain HTTP on it with one service of --threads threads; restart the proxy, not --upgrade, to get a socket per thread");
    }
    if !args.upgrade {
        wait_until_free("--listen", &args.listen)?;
        if let Some(addr) = &args.tls_listen {
            wait_until_free("--tls-listen", addr)?;
        }
    }
    // Plain HTTP: `--threads` shards, as nginx's workers, each a pingora service of one thread
    // with its own runtime, upstream connection pool and listening socket (SO_REUSEPORT; the
    // kernel spreads new connections over them). A pooled upstream connection then never
    // crosses threads: with one service of N threads, pingora returned each to a random
    // thread's runtime, and the next request woke that thread to release it (an eventfd write
    // and a context switch per request; docs/proxy.md, "one shard per thread").
    let mut reuse_port = pingora_core::listeners::TcpSocketOptions::default();
    reuse_port.so_reuseport = Some(true);
    if sharded {
        for (shard, addr) in shards.iter().enumerate() {
            let mut proxy = proxy_service(&server, &services, format!("haddock proxy {shard}"));
            proxy.threads = Some(1);
            proxy.add_tcp_with_settings(addr, reuse_port.clone());
            server.add_service(proxy);
        }
    } else {
        let mut proxy = proxy_service(&server, &services, "haddock proxy".into());
        proxy.threads = Some(args.threads);
        proxy.add_tcp(&args.listen);
        server.add_service(proxy);
    }
    // HTTPS: one service of `--threads` threads on one socket. Pingora builds a TLS config per
    // service, each with its own session cache, so shards would resume a client's session
    // only on the shard that started it: with a handshake per connection the shards measured
    // 7–20 % more CPU a request and 19–28 % fewer requests a second (docs/proxy.md).
    let certificates = match &args.tls_listen {
        Some(addr) => {
            let (settings, certificates) = tls_settings(args, &services.edge.tls)?;
            let mut proxy = proxy_service(&server, &services, "haddock proxy tls".into());
            proxy.threads = Some(args.threads);
            proxy.add_tls_with_settings(addr, None, settings);
            server.add_service(proxy);
            Some(certificates)
        }
        None => None,
    };

    let mut admin = Service::new(
        "haddock proxy admin".to_string(),
        Admin::new(services.clone()),
    );
    admin.threads = Some(1);
    admin.add_tcp(&args.admin);

    let watcher = background_service(
        "watcher",
        Watcher::new(services.clone(), client.clone(), state_file, initial),
    );
    server.add_service(admin);
    server.add_service(watcher);
    // Each service reports its own sessions, as a proxy carrying it alone would.
    let proxy_id = args.proxy_id();
    server.add_service(background_service(
        "reporters",
        Reporters::new(services.clone(), client.clone(), proxy_id),
    ));
    if let Some(certificates) = certificates {
        if let Some(acme) = acme {
            let tls = &services.edge.tls;
            tracing::info!(hosts = ?acme.hosts, directory = %acme.directory, "certificates over ACME");
            server.add_service(background_service(
                "acme",
                AcmeClient::new(
                    acme,
                    services.clone(),
                    certificates.clone(),
                    tls.acme_failures.clone(),
                    tls.acme_issued.clone(),
                ),
            ));
        }
        server.add_service(background_service(
            "certificates",
            CertificateWatcher::new(certificates),
        ));
    }
    tracing::info!(listen = %args.listen, tls_listen = ?args.tls_listen, admin = %args.admin, services = ?scope, run_dir = %run_dir.display(), "proxy serving");
    server.run_forever()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn each_shard_spells_the_same_address_its_own_way() {
        let addrs = shard_addresses("0.0.0.0:8080", 3);
        assert_eq!(addrs, ["0.0.0.0:8080", "0.0.0.0:08080", "0.0.0.0:008080"]);
        for a in &addrs {
            assert_eq!(
                a.parse::<SocketAddr>().unwrap(),
                "0.0.0.0:8080".parse().unwrap()
            );
        }
        let v6 = shard_addresses("[::1]:443", 2);
        assert_eq!(
            v6[1].parse::<SocketAddr>().unwrap(),
            "[::1]:443".parse().unwrap()
        );
        assert_eq!(shard_addresses("127.0.0.1:1", 1), ["127.0.0.1:1"]);
    }

    #[test]
    fn more_sockets_than_an_upgrade_can_hand_over_are_refused() {
        let fits = shard_addresses("0.0.0.0:8080", 24);
        assert!(check_upgrade_hand_over(&fits).is_ok());
        let too_many = shard_addresses("0.0.0.0:8080", 33);
        let err = check_upgrade_hand_over(&too_many).unwrap_err().to_string();
        assert!(err.contains("at most 32 sockets"), "{err}");
        let long = shard_addresses(&format!("{}.example:8080", "h".repeat(90)), 20);
        assert!(check_upgrade_hand_over(&long).is_err(), "over 2 048 bytes");
    }

    #[test]
    fn shards_join_a_listener_with_reuse_port_and_not_one_without() {
        // As a proxy before the shards left it: bound and listening, no SO_REUSEPORT.
        let old = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!shards_can_join(&old.local_addr().unwrap().to_string()));
        // As a shard of this release leaves it.
        let shard = reuse_port_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        shard.listen(16).unwrap();
        let addr = shard.local_addr().unwrap().as_socket().unwrap();
        assert!(shards_can_join(&addr.to_string()));
    }

    #[test]
    fn a_port_of_zero_is_refused() {
        let err = wait_until_free("--listen", "127.0.0.1:0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a fixed port"), "{err}");
    }
}
