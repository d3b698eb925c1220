//! Command-line interface (`proxy serve …`). The flags named in the issue are stable:
//! `--listen --admin --locator --service --token --state-dir`, plus the cookie keys.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use locator_wire::logging::LogFormat;

use crate::acme::{AcmeOptions, Challenges};
use crate::edge::EdgeOptions;
use crate::error::ProxyError;
use crate::router::Options;
use crate::services::Scope;
use crate::session::CookieKeys;

#[derive(Debug, Parser)]
#[command(
    name = "proxy",
    version,
    about = "Haddock's sticky-session reverse proxy"
)]
pub struct Cli {
    /// Log format (logs go to stderr, pingora's included; RUST_LOG filters, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Proxy one service's traffic, following the locator.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address users connect to.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Address of the admin port (/metrics, /healthz, /routing).
    #[arg(long, default_value = "127.0.0.1:9180")]
    pub admin: String,
    /// Base URL of the locator; several replicas separated by commas (the proxy moves to the
    /// next when one fails and resumes its watch there).
    #[arg(long, env = "HADDOCK_LOCATOR_URL")]
    pub locator: String,
    /// The services whose traffic this proxy carries (repeat the flag, or separate by commas;
    /// each a name the locator accepts: 1 to 63 letters, digits and -_.:+). Without it the
    /// proxy carries every service the locator knows, each from the moment it appears. A
    /// request goes to the service whose routes (spec `hosts`, `path_prefix`) take its host and
    /// path.
    #[arg(long = "service", value_parser = service_name, value_delimiter = ',')]
    pub services: Vec<String>,
    /// The service requests that no route takes go to (default: the only service, when one is
    /// named; otherwise such requests get 404 `unknown_host`).
    #[arg(long)]
    pub default_service: Option<String>,
    /// Locator token with the `proxy` role (reads the watch stream, posts session reports).
    #[arg(long, env = "HADDOCK_PROXY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Directory for the persisted routing snapshot, the upgrade socket and the pid file
    /// (created mode 0700; refused if another user owns it or its group or everyone may write
    /// to it).
    /// Without it nothing is persisted, and the socket and pid file go to a private directory:
    /// $XDG_RUNTIME_DIR/haddock-proxy-<service>, else /tmp/haddock-proxy-<uid>-<service>.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Key material session cookies are sealed under (at least 16 bytes). Without one a random
    /// key is used and sessions do not survive a proxy restart.
    #[arg(long, env = "HADDOCK_COOKIE_KEY", hide_env_values = true)]
    pub cookie_key: Option<String>,
    /// The key being rotated out: cookies signed with it are still accepted.
    #[arg(long, env = "HADDOCK_COOKIE_KEY_PREVIOUS", hide_env_values = true)]
    pub cookie_key_previous: Option<String>,
    /// Name this proxy reports under (default: host name and process id).
    #[arg(long)]
    pub proxy_id: Option<String>,
    /// Worker threads: each serves its own listening socket on the address (SO_REUSEPORT) with
    /// its own upstream connections. Keep it across an `--upgrade`: the sockets of threads the
    /// new process does not have are closed, with the connections waiting on them.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Largest request body kept so that an idempotent request can be replayed (≤ 64 KiB).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_replay_body: usize,
    /// Connect timeout to an instance, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub connect_timeout_ms: u64,
    /// Cap on the number of sessions tracked (bounds memory, 69 bytes a session measured). At the
    /// cap new sessions are served but not counted; a live session is never dropped.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_sessions: usize,
    /// Total time, in milliseconds, a client may take to send a request's line and headers
    /// (from the connection's accept, or from the first byte of a kept-alive connection's next
    /// request); past it the proxy answers 408 and closes (slowloris).
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Take the listening sockets over from a running proxy (pingora graceful upgrade: start
    /// this one, then send SIGQUIT to the old one).
    #[arg(long)]
    pub upgrade: bool,
    /// Seconds an exiting proxy keeps serving the connections it has.
    #[arg(long, default_value_t = 5)]
    pub grace_period_s: u64,
    /// Address of the HTTPS listener (TLS 1.2 and 1.3 by rustls; HTTP/2 or HTTP/1.1 chosen by
    /// ALPN). Needs --tls-certs or --state-dir.
    #[arg(long)]
    pub tls_listen: Option<String>,
    /// Directory of certificate pairs NAME.crt (PEM chain) + NAME.key (PEM key), chosen per
    /// connection by SNI and read again when they change (created if missing); ACME
    /// certificates are written there. Default: <--state-dir>/certs. Several proxies given the
    /// same directory share their certificates.
    #[arg(long, requires = "tls_listen")]
    pub tls_certs: Option<PathBuf>,
    /// Host whose certificate answers client hellos that name no host (clients connecting by
    /// IP address); without it they fail their handshake.
    #[arg(long, requires = "tls_listen")]
    pub tls_default_host: Option<String>,
    /// Offer only HTTP/1.1 over TLS (HTTP/2 is offered by default).
    #[arg(long, requires = "tls_listen")]
    pub no_h2: bool,
    /// Answer plain HTTP requests with a 308 to the same URL over HTTPS.
    #[arg(long, requires = "tls_listen")]
    pub redirect_https: bool,
    /// The port users reach HTTPS on, for redirects (this flag's and the services' own
    /// `redirect_https`; default: --tls-listen's port; differs behind a port mapping).
    #[arg(long, requires = "tls_listen")]
    pub https_port: Option<u16>,
    /// Send `Strict-Transport-Security: max-age=N` over HTTPS (off by default: a browser then
    /// refuses plain HTTP to the host for N seconds).
    #[arg(long, requires = "tls_listen")]
    pub hsts_max_age: Option<u64>,
    /// Append to the client's X-Forwarded-For instead of replacing it, and believe its
    /// X-Forwarded-Proto: https (no redirect, Secure cookie): only behind a balancer that sets
    /// both (anyone can send them).
    #[arg(long)]
    pub trust_forwarded: bool,
    /// ACME directory URL (https) to obtain certificates from, by HTTP-01: the CA must reach
    /// a proxy on the certificate directory at port 80 of each host. Needs --acme-host or
    /// --acme-routes.
    #[arg(long, requires = "tls_listen")]
    pub acme_directory: Option<String>,
    /// A host to keep a certificate for over ACME (repeat the flag, or separate by commas).
    #[arg(long, value_delimiter = ',', requires = "acme_directory")]
    pub acme_host: Vec<String>,
    /// Also keep a certificate for every host the carried services' routes name (spec
    /// `hosts`; wildcards, which HTTP-01 cannot prove, are skipped), as they change.
    #[arg(long, requires = "acme_directory")]
    pub acme_routes: bool,
    /// Contact address given to the ACME CA (expiry notices).
    #[arg(long, requires = "acme_directory")]
    pub acme_email: Option<String>,
    /// A PEM root certificate to trust for the ACME server's own HTTPS (a private or test CA).
    #[arg(long, requires = "acme_directory")]
    pub acme_ca_root: Option<PathBuf>,
    /// Seconds between checks for certificates due for renewal.
    #[arg(long, default_value_t = 3600, requires = "acme_directory")]
    pub acme_check_interval_s: u64,
}

/// A service name as the locator accepts one (its `check_name`): 1 to 63 ASCII letters, digits
/// and `-_.:+`. A proxy for any other name could never be routed anything; the check also keeps
/// the name safe in the default run directory's name (`haddock-proxy-<service>`: no `/`).
pub fn service_name(value: &str) -> Result<String, String> {
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:+".contains(&c));
    if ok {
        Ok(value.to_string())
    } else {
        Err("a service name is 1 to 63 letters, digits and -_.:+".into())
    }
}

impl ServeArgs {
    pub fn keys(&self) -> Result<CookieKeys, ProxyError> {
        match &self.cookie_key {
            Some(k) => CookieKeys::new(
                k.as_bytes(),
                self.cookie_key_previous.as_deref().map(str::as_bytes),
            ),
            None => {
                tracing::warn!(
                    "no --cookie-key: using a random one, sessions will not survive a restart"
                );
                Ok(CookieKeys::random())
            }
        }
    }

    /// The carried services: the named ones, each once, or every one the locator knows.
    pub fn scope(&self) -> Result<Scope, ProxyError> {
        if self.services.is_empty() {
            if let Some(default) = &self.default_service {
                service_name(default)
                    .map_err(|e| ProxyError::Config(format!("--default-service {default}: {e}")))?;
            }
            return Ok(Scope::Discovered);
        }
        let mut names: Vec<String> = Vec::new();
        for name in &self.services {
            if names.contains(name) {
                return Err(ProxyError::Config(format!(
                    "--service {name} is given twice"
                )));
            }
            names.push(name.clone());
        }
        if let Some(default) = &self.default_service {
            if !names.contains(default) {
                return Err(ProxyError::Config(format!(
                    "--default-service {default} is not one of --service {}",
                    names.join(",")
                )));
            }
        }
        Ok(Scope::Named(names))
    }

    pub fn options(&self) -> Result<Options, ProxyError> {
        // Each thread's socket is handed over on an upgrade, 32 at most (server.rs).
        if !(1..=24).contains(&self.threads) {
            return Err(ProxyError::Config("--threads must be 1 to 24".into()));
        }
        if self.header_timeout_ms == 0 {
            return Err(ProxyError::Config(
                "--header-timeout-ms must be at least 1".into(),
            ));
        }
        Ok(Options {
            max_replay_body: self.max_replay_body,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            max_tracked_sessions: self.max_sessions,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            edge: self.edge()?,
            ..Options::default()
        })
    }

    /// Where the HTTPS listener's certificates are: `--tls-certs`, else `certs` in the state
    /// dir; `None` without `--tls-listen`, or with neither directory.
    pub fn certs_dir(&self) -> Option<PathBuf> {
        self.tls_listen.as_ref()?;
        self.tls_certs
            .clone()
            .or_else(|| self.state_dir.as_ref().map(|d| d.join("certs")))
    }

    fn edge(&self) -> Result<EdgeOptions, ProxyError> {
        if self.tls_listen.is_some() && self.certs_dir().is_none() {
            return Err(ProxyError::Config(
                "--tls-listen needs --tls-certs DIR or --state-dir (certificates then go to <state-dir>/certs)"
                    .into(),
            ));
        }
        if self.https_port == Some(0) {
            return Err(ProxyError::Config(
                "the HTTPS port to redirect to cannot be 0".into(),
            ));
        }
        // A listener on port 0 (any free port) names no port users could be sent to.
        let https_port = self.https_port.or_else(|| {
            self.tls_listen
                .as_deref()
                .and_then(port_of)
                .filter(|p| *p != 0)
        });
        let redirect_to_port = match (self.redirect_https, https_port, &self.tls_listen) {
            (false, _, _) => None,
            (true, Some(port), _) => Some(port),
            (true, None, Some(listen)) => {
                return Err(ProxyError::Config(format!(
                    "--tls-listen {listen:?} names no port to redirect to (give --https-port)"
                )))
            }
            (true, None, None) => {
                return Err(ProxyError::Config(
                    "--redirect-https needs --tls-listen".into(),
                ))
            }
        };
        Ok(EdgeOptions {
            redirect_to_port,
            https_port,
            hsts_max_age: self.hsts_max_age,
            trust_forwarded: self.trust_forwarded,
            // Every proxy on a certificate directory answers its pending challenges, whichever
            // proxy ordered the certificate.
            challenges: self.certs_dir().as_deref().map(Challenges::new),
        })
    }

    /// The ACME settings, checked (`None` without --acme-directory).
    pub fn acme(&self) -> Result<Option<AcmeOptions>, ProxyError> {
        let Some(directory) = &self.acme_directory else {
            return Ok(None);
        };
        if !directory.starts_with("https://") {
            return Err(ProxyError::Config(format!(
                "--acme-directory {directory:?}: an ACME directory is an https:// URL"
            )));
        }
        let mut hosts = Vec::new();
        for host in &self.acme_host {
            let host = host.trim().to_ascii_lowercase();
            if let Some(why) = not_an_acme_host(&host) {
                return Err(ProxyError::Config(format!("--acme-host {host:?}: {why}")));
            }
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        if hosts.is_empty() && !self.acme_routes {
            return Err(ProxyError::Config(
                "--acme-directory needs --acme-host or --acme-routes: no host to order for".into(),
            ));
        }
        if self.acme_check_interval_s == 0 {
            return Err(ProxyError::Config(
                "--acme-check-interval-s must be at least 1".into(),
            ));
        }
        Ok(Some(AcmeOptions {
            directory: directory.clone(),
            hosts,
            from_routes: self.acme_routes,
            email: self.acme_email.clone(),
            ca_root: self.acme_ca_root.clone(),
            check_every: Duration::from_secs(self.acme_check_interval_s),
        }))
    }

    pub fn proxy_id(&self) -> String {
        self.proxy_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "proxy".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Why `host` cannot get a certificate over HTTP-01 (`None`: it can). It also names the
/// certificate's files, so it must be a plain DNS name.
pub(crate) fn not_an_acme_host(host: &str) -> Option<&'static str> {
    if host.starts_with("*.") {
        return Some("HTTP-01 cannot prove a wildcard name");
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Some("an IP address gets no certificate over HTTP-01 here; name a DNS host");
    }
    if !locator_wire::api::is_dns_name(host) || !host.contains('.') {
        return Some("not a DNS name with at least two labels (letters, digits, hyphens)");
    }
    None
}

/// The port of a listen address (`host:port`, `[v6]:port`).
fn port_of(listen: &str) -> Option<u16> {
    listen.rsplit_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_flags_parse() {
        let cli = Cli::try_parse_from([
            "proxy",
            "serve",
            "--listen",
            "127.0.0.1:1",
            "--admin",
            "127.0.0.1:2",
            "--locator",
            "http://l",
            "--service",
            "svc",
            "--token",
            "t",
            "--state-dir",
            "/tmp/x",
            "--cookie-key",
            "0123456789abcdef",
            "--cookie-key-previous",
            "fedcba9876543210",
        ])
        .unwrap();
        assert_eq!(cli.log_format, LogFormat::Pretty);
        let Command::Serve(a) = cli.command;
        assert_eq!(a.services, ["svc"]);
        assert!(a.keys().is_ok());
        assert_eq!(a.options().unwrap().header_timeout, Duration::from_secs(10));
    }

    #[test]
    fn a_zero_header_timeout_is_refused() {
        let cli = Cli::try_parse_from([
            "proxy",
            "serve",
            "--locator",
            "http://l",
            "--service",
            "svc",
            "--header-timeout-ms",
            "0",
        ])
        .unwrap();
        let Command::Serve(a) = cli.command;
        let err = a.options().unwrap_err();
        assert!(err.to_string().contains("--header-timeout-ms"), "{err}");
    }

    #[test]
    fn the_service_name_is_checked() {
        for good in ["svc", "optimizer-2", "a_b.c:d+e", &"x".repeat(63)] {
            assert_eq!(service_name(good).as_deref(), Ok(good));
        }
        for bad in ["", "a/b", "../x", "a b", "é", &"x".repeat(64)] {
            assert!(service_name(bad).is_err(), "{bad:?}");
        }
        let args = [
            "proxy",
            "serve",
            "--locator",
            "http://l",
            "--service",
            "a/b",
        ];
        let Err(err) = Cli::try_parse_from(args) else {
            panic!("--service a/b was accepted")
        };
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn tls_flags_need_each_other_and_the_redirect_port_is_found() {
        let base = [
            "proxy",
            "serve",
            "--locator",
            "http://l",
            "--service",
            "svc",
        ];
        let parse = |extra: &[&str]| Cli::try_parse_from([&base[..], extra].concat());
        for lonely in [
            &["--tls-certs", "/tmp/c"][..],
            &["--redirect-https"],
            &["--hsts-max-age", "60"],
            &["--https-port", "443"],
        ] {
            let Err(err) = parse(lonely) else {
                panic!("{lonely:?} was accepted alone")
            };
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{lonely:?}"
            );
        }
        let tls = ["--tls-listen", "[::]:8443", "--tls-certs", "/tmp/c"];
        let edge = |extra: &[&str]| {
            let Command::Serve(a) = parse(&[&tls[..], extra].concat()).unwrap().command;
            a.options().map(|o| o.edge)
        };
        assert_eq!(edge(&[]).unwrap().redirect_to_port, None);
        // Where a service's own redirect_https sends plain requests, with or without the flag.
        assert_eq!(edge(&[]).unwrap().https_port, Some(8443));
        assert_eq!(
            edge(&["--https-port", "443"]).unwrap().https_port,
            Some(443)
        );
        assert_eq!(
            edge(&["--redirect-https"]).unwrap().redirect_to_port,
            Some(8443)
        );
        assert_eq!(
            edge(&["--redirect-https", "--https-port", "443"])
                .unwrap()
                .redirect_to_port,
            Some(443)
        );
        let err = edge(&["--redirect-https", "--https-port", "0"]).unwrap_err();
        // Certificates: the flag's directory, else the state dir's, else nowhere (refused).
        let serve = |extra: &[&str]| {
            let Command::Serve(a) = parse(extra).unwrap().command;
            a
        };
        let alone = serve(&["--tls-listen", "127.0.0.1:8443"]);
        let refused = alone.options().unwrap_err().to_string();
        assert!(
            refused.contains("--tls-certs DIR or --state-dir"),
            "{refused}"
        );
        let with_state = serve(&["--tls-listen", ":8443", "--state-dir", "/var/lib/p"]);
        assert_eq!(
            with_state.certs_dir(),
            Some(PathBuf::from("/var/lib/p/certs"))
        );
        assert!(with_state.options().is_ok());
        assert_eq!(
            serve(&[&tls[..], &["--state-dir", "/var/lib/p"]].concat()).certs_dir(),
            Some(PathBuf::from("/tmp/c"))
        );
        assert_eq!(serve(&["--state-dir", "/var/lib/p"]).certs_dir(), None);
        assert!(err.to_string().contains("cannot be 0"), "{err}");
        let Command::Serve(mut a) = parse(&tls).unwrap().command;
        a.tls_listen = Some("no-port".into());
        a.redirect_https = true;
        let err = a.options().unwrap_err();
        assert!(err.to_string().contains("--https-port"), "{err}");
        // Any free port: fine to listen on, nothing to redirect to.
        let Command::Serve(mut a) = parse(&tls).unwrap().command;
        a.tls_listen = Some("127.0.0.1:0".into());
        assert_eq!(a.options().unwrap().edge.https_port, None);
        a.redirect_https = true;
        let err = a.options().unwrap_err();
        assert!(err.to_string().contains("--https-port"), "{err}");
    }

    #[test]
    fn acme_settings_are_checked() {
        let base = [
            "proxy",
            "serve",
            "--locator",
            "http://l",
            "--service",
            "svc",
            "--tls-listen",
            "127.0.0.1:8443",
            "--tls-certs",
            "/tmp/c",
        ];
        let acme = |extra: &[&str]| {
            let Command::Serve(a) = Cli::try_parse_from([&base[..], extra].concat())
                .unwrap()
                .command;
            a.acme()
        };
        let ok = acme(&[
            "--acme-directory",
            "https://ca.example/dir",
            "--acme-host",
            "App.example.com,b.example.com",
            "--acme-host",
            "app.example.com",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(ok.hosts, ["app.example.com", "b.example.com"]);
        assert_eq!(ok.check_every, Duration::from_secs(3600));
        for (bad, expected) in [
            ("*.example.com", "wildcard"),
            ("127.0.0.1", "IP address"),
            ("localhost", "two labels"),
            ("a..b", "two labels"),
            ("../x.y", "two labels"),
            ("a-.b", "two labels"),
        ] {
            let err = acme(&["--acme-directory", "https://ca/dir", "--acme-host", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{bad}: {err}");
        }
        let err = acme(&["--acme-directory", "http://ca/dir", "--acme-host", "a.b"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
        let err = acme(&[
            "--acme-directory",
            "https://ca/dir",
            "--acme-host",
            "a.b",
            "--acme-check-interval-s",
            "0",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("at least 1"), "{err}");
        // A directory without a host to order for is refused.
        let err = acme(&["--acme-directory", "https://ca/d"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no host to order for"), "{err}");
        let routes = acme(&["--acme-directory", "https://ca/d", "--acme-routes"])
            .unwrap()
            .unwrap();
        assert!(routes.from_routes && routes.hosts.is_empty());
    }

    #[test]
    fn several_services_each_once_and_a_default_among_them() {
        let parse = |extra: &[&str]| {
            let base = ["proxy", "serve", "--locator", "http://l"];
            let Command::Serve(a) = Cli::try_parse_from([&base[..], extra].concat())
                .unwrap()
                .command;
            a.scope()
        };
        assert_eq!(
            parse(&["--service", "shop,blog", "--service", "api"]).unwrap(),
            Scope::Named(vec!["shop".into(), "blog".into(), "api".into()])
        );
        // No --service: every service the locator knows, with any valid default.
        assert_eq!(parse(&[]).unwrap(), Scope::Discovered);
        assert_eq!(
            parse(&["--default-service", "blog"]).unwrap(),
            Scope::Discovered
        );
        let bad = parse(&["--default-service", "a/b"])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("--default-service a/b"), "{bad}");
        let twice = parse(&["--service", "shop,shop"]).unwrap_err().to_string();
        assert!(twice.contains("given twice"), "{twice}");
        let stray = parse(&["--service", "shop,blog", "--default-service", "api"])
            .unwrap_err()
            .to_string();
        assert!(stray.contains("not one of --service"), "{stray}");
        assert!(parse(&["--service", "shop,blog", "--default-service", "blog"]).is_ok());
    }

    #[test]
    fn log_format_is_global() {
        let minimal = ["--locator", "http://l", "--service", "svc"];
        for args in [
            [
                &["proxy", "--log-format", "json", "serve"][..],
                &minimal[..],
            ]
            .concat(),
            [
                &["proxy", "serve", "--log-format", "json"][..],
                &minimal[..],
            ]
            .concat(),
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.log_format, LogFormat::Json);
        }
        let bad = [&["proxy", "--log-format", "xml", "serve"][..], &minimal[..]].concat();
        let Err(err) = Cli::try_parse_from(bad) else {
            panic!("--log-format xml was accepted")
        };
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
    }
}
