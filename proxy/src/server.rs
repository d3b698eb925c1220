//! Assembles the pingora server: the proxy service, the admin port and the two background
//! tasks (watcher, reporter), all sharing one [`Router`].

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
use crate::reporter::{Reporter, Reporters};
use crate::request_head::{HeadDeadline, KEEPALIVE_IDLE};
use crate::router::Router;
use crate::run_dir::{current_uid, default_run_dir, ensure_private_dir};
use crate::service::HaddockProxy;
use crate::services::Services;
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

/// The HTTPS listener's settings: certificates from `--tls-certs` chosen by SNI (read once here,
/// then again on every change), HTTP/2 offered by ALPN unless `--no-h2`.
fn tls_settings(
    args: &ServeArgs,
    counters: &crate::certificates::TlsCounters,
) -> Result<(TlsSettings, Arc<Certificates>), ProxyError> {
    let Some(dir) = args.tls_certs.clone() else {
        return Err(ProxyError::Config("--tls-listen needs --tls-certs".into()));
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

/// Runs `proxy serve` until a signal stops it (SIGTERM: graceful; SIGQUIT: hand the listening
/// sockets to a proxy started with `--upgrade`, then exit gracefully).
pub fn serve(args: &ServeArgs) -> Result<(), ProxyError> {
    let names = args.service_names()?;
    let (keys, options) = (args.keys()?, args.options()?);
    let routers = names
        .iter()
        .map(|name| Router::new(name, keys.clone(), options.clone()))
        .collect();
    let services =
        Services::new(routers, args.default_service.as_deref()).map_err(ProxyError::Config)?;
    // Process-wide settings and counters are the first service's.
    let router = services.first().clone();
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
            &names.join(","),
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
        max_retries: router.options.max_attempts + 1,
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

    // Pingora's HTTP application behind our total deadline on request heads. An HTTP/2
    // connection with no request open is closed after the keep-alive idle time, as an idle
    // HTTP/1 one is.
    let mut app =
        pingora_proxy::http_proxy(&server.configuration, HaddockProxy::new(services.clone()));
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(KEEPALIVE_IDLE);
    app.server_options = Some(options);
    let mut proxy = Service::new(
        "haddock proxy".to_string(),
        HeadDeadline::new(
            app,
            router.options.header_timeout,
            services.edge.request_heads.clone(),
        ),
    );
    proxy.add_tcp(&args.listen);
    let certificates = match &args.tls_listen {
        Some(addr) => {
            let (settings, certificates) = tls_settings(args, &services.edge.tls)?;
            proxy.add_tls_with_settings(addr, None, settings);
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
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(watcher);
    // Each service reports its own sessions, as a proxy carrying it alone would.
    let proxy_id = args.proxy_id();
    let reporters = services
        .routers()
        .iter()
        .map(|r| Reporter::new(Arc::clone(r), client.clone(), proxy_id.clone()))
        .collect();
    server.add_service(background_service("reporters", Reporters::new(reporters)));
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
    tracing::info!(listen = %args.listen, tls_listen = ?args.tls_listen, admin = %args.admin, services = ?names, run_dir = %run_dir.display(), "proxy serving");
    server.run_forever()
}
