//! Command-line interface (`proxy serve …`). The flags named in the issue are stable:
//! `--listen --admin --locator --service --token --state-dir`, plus the cookie keys.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use locator_wire::logging::LogFormat;

use crate::error::ProxyError;
use crate::router::Options;
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
    /// The service whose traffic this proxy carries (a name the locator accepts: 1 to 63
    /// letters, digits and -_.:+).
    #[arg(long, value_parser = service_name)]
    pub service: String,
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
    /// Worker threads of the proxy service.
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

    pub fn options(&self) -> Result<Options, ProxyError> {
        if self.threads == 0 {
            return Err(ProxyError::Config("--threads must be at least 1".into()));
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
            ..Options::default()
        })
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
        assert_eq!(a.service, "svc");
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
