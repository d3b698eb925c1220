//! Automatic certificates over ACME (RFC 8555, HTTP-01 challenges), as Caddy and kamal-proxy
//! get them: for each host named with `--acme-host`, a certificate is ordered when none is
//! served or when less than a third of the served one's lifetime is left (Let's Encrypt's 90
//! days: renewed at 30 left), and written into the certificate directory as `HOST.crt` /
//! `HOST.key`, where [`crate::certificates`] picks it up as it does any renewed file.
//!
//! **Shared by several proxies through the certificate directory** (one volume every proxy
//! mounts): the account (`acme-account-<id>.json`, one per ACME directory URL), the
//! certificates, and the pending challenge answers (`acme-challenges/<token>`) all live there.
//! The CA validates a challenge by asking any proxy the host's name resolves to, so every proxy
//! answers challenges from that directory, whether it ordered the certificate or not. Ordering
//! is serialised by an exclusive lock on `.acme.lock`: a proxy that finds it held skips the
//! round, and one that takes it reads the directory again first, so a certificate another proxy
//! just renewed is not ordered twice.
//!
//! A failed order (CA unreachable, challenge refused) is logged with the host and the CA's
//! problem, counted, and retried with a doubling pause (1 minute to the check interval); the
//! certificate already served stays in service meanwhile.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};

use crate::certificates::{unix_now, Certificates};
use crate::config::not_an_acme_host;
use crate::error::ProxyError;
use crate::files::write_atomically;
use crate::services::Services;

/// The folder of pending challenge answers, inside the certificate directory.
pub const CHALLENGE_DIR: &str = "acme-challenges";

/// How often the routes' hosts are looked at with `--acme-routes`.
const ROUTES_CHECK: Duration = Duration::from_secs(5);

/// The first pause after a failed order; it doubles up to the check interval.
const FIRST_RETRY: Duration = Duration::from_secs(60);

/// The answers to pending HTTP-01 challenges, one file per token (shared by every proxy on the
/// certificate directory).
#[derive(Debug, Clone)]
pub struct Challenges {
    dir: PathBuf,
}

impl Challenges {
    /// The challenges of the certificate directory `certs`.
    pub fn new(certs: &Path) -> Self {
        Challenges {
            dir: certs.join(CHALLENGE_DIR),
        }
    }

    /// The key authorization to answer for `token`, if a challenge with it is pending. A token
    /// is base64url (RFC 8555 §8.3); anything else is never looked up, so a request path cannot
    /// name another file.
    pub async fn answer(&self, token: &str) -> Option<String> {
        if !valid_token(token) {
            return None;
        }
        tokio::fs::read_to_string(self.dir.join(token)).await.ok()
    }

    /// Stores the answer for `token`; a token that is not base64url (a CA misbehaving) is
    /// refused, so that it cannot name a file outside the folder.
    fn put(&self, token: &str, key_authorization: &str) -> std::io::Result<()> {
        if !valid_token(token) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the CA sent a challenge token that is not base64url: {token:?}"),
            ));
        }
        std::fs::create_dir_all(&self.dir)?;
        write_atomically(&self.dir.join(token), key_authorization.as_bytes(), 0o644)
    }

    fn remove(&self, token: &str) {
        let _ = std::fs::remove_file(self.dir.join(token));
    }
}

/// A challenge token as RFC 8555 §8.1 has it: base64url, here at most 256 characters.
fn valid_token(token: &str) -> bool {
    (1..=256).contains(&token.len())
        && token
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// When each host may be ordered again after a failed order, shared by every proxy on the
/// directory (`acme-retry.json`, read and written under the directory lock): N proxies retrying
/// on their own clocks would make N times the failed validations, and a CA limits those
/// (Let's Encrypt: 5 per host and hour).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct RetryBook {
    hosts: BTreeMap<String, Retry>,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Retry {
    /// Not before this time (seconds since the epoch).
    next: i64,
    /// The pause that led to it; the next failure doubles it.
    pause_s: u64,
}

const RETRY_FILE: &str = "acme-retry.json";

impl RetryBook {
    /// The book of `dir`; a missing or unreadable one is empty (the worst case is one early
    /// retry).
    fn load(dir: &Path) -> Self {
        std::fs::read(dir.join(RETRY_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, dir: &Path) {
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        if let Err(e) = write_atomically(&dir.join(RETRY_FILE), &json, 0o644) {
            tracing::warn!(error = %e, "cannot write the ACME retry times");
        }
    }

    fn may_order(&self, host: &str, now: i64) -> bool {
        self.hosts.get(host).is_none_or(|r| r.next <= now)
    }

    /// Records a failure of `host`: the next attempt waits twice the last pause (the first
    /// one [`FIRST_RETRY`]), at most `longest`.
    fn failed(&mut self, host: &str, now: i64, longest: Duration) {
        let pause_s = self
            .hosts
            .get(host)
            .map_or(FIRST_RETRY.as_secs(), |r| r.pause_s.saturating_mul(2))
            .min(longest.as_secs())
            .max(1);
        self.hosts.insert(
            host.to_string(),
            Retry {
                next: now + pause_s as i64,
                pause_s,
            },
        );
    }
}

/// What `proxy serve --acme-*` asks for.
#[derive(Debug, Clone)]
pub struct AcmeOptions {
    /// The ACME directory URL (Let's Encrypt's, or a private CA's).
    pub directory: String,
    /// Hosts to keep a certificate for (no wildcards: HTTP-01 cannot prove them).
    pub hosts: Vec<String>,
    /// Also the hosts the carried services' routes name (`--acme-routes`).
    pub from_routes: bool,
    /// Contact address given to the CA (`mailto:` added).
    pub email: Option<String>,
    /// A PEM root to trust for the ACME server's own HTTPS (a private or test CA).
    pub ca_root: Option<PathBuf>,
    /// How often certificates are checked for renewal.
    pub check_every: Duration,
}

/// Keeps the certificates of [`AcmeOptions::hosts`] valid (a background service).
pub struct AcmeClient {
    options: AcmeOptions,
    services: Arc<Services>,
    certificates: Arc<Certificates>,
    challenges: Challenges,
    failures: Counter,
    issued: Counter,
}

impl std::fmt::Debug for AcmeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeClient")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl AcmeClient {
    pub fn new(
        options: AcmeOptions,
        services: Arc<Services>,
        certificates: Arc<Certificates>,
        failures: Counter,
        issued: Counter,
    ) -> Self {
        let challenges = Challenges::new(certificates.dir());
        AcmeClient {
            options,
            services,
            certificates,
            challenges,
            failures,
            issued,
        }
    }

    /// The hosts to keep a certificate for now: the configured ones, and with `--acme-routes`
    /// those the carried services' routes name (wildcards and anything HTTP-01 cannot prove
    /// left out).
    fn hosts(&self) -> Vec<String> {
        let mut hosts = self.options.hosts.clone();
        if self.options.from_routes {
            for host in self.services.route_hosts() {
                if not_an_acme_host(&host).is_none() && !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
        }
        hosts
    }

    /// Whether `host` needs a certificate: none served, or under a third of its lifetime left.
    fn due(&self, host: &str) -> bool {
        match self.certificates.validity(host) {
            None => true,
            Some((not_before, not_after)) => {
                let lifetime = (not_after - not_before).max(0);
                not_after - unix_now() < lifetime / 3
            }
        }
    }

    /// One round: every due host ordered, under the directory's lock. `Ok(false)` when another
    /// proxy holds the lock.
    async fn round(&self) -> Result<bool, ProxyError> {
        let hosts = self.hosts();
        if !hosts.iter().any(|h| self.due(h)) {
            return Ok(true);
        }
        let Some(_lock) = DirLock::try_take(self.certificates.dir())? else {
            tracing::info!("another proxy is ordering certificates; checking again later");
            return Ok(false);
        };
        // What the proxy that held the lock before may have written.
        let certificates = self.certificates.clone();
        let _ = tokio::task::spawn_blocking(move || certificates.reload()).await;
        let dir = self.certificates.dir().to_path_buf();
        let mut book = RetryBook::load(&dir);
        let now = unix_now();
        let due: Vec<String> = hosts
            .into_iter()
            .filter(|h| self.due(h) && book.may_order(h, now))
            .collect();
        if due.is_empty() {
            return Ok(true);
        }
        let account = match self.account().await {
            Ok(account) => account,
            Err(e) => {
                self.failures.inc();
                tracing::error!(error = %e, "no ACME account; the certificates served stay");
                for host in &due {
                    book.failed(host, now, self.options.check_every);
                }
                book.save(&dir);
                return Err(e);
            }
        };
        let mut first_error = None;
        for host in due {
            match self.order(&account, &host).await {
                Ok(()) => {
                    self.issued.inc();
                    book.hosts.remove(&host);
                }
                Err(e) => {
                    self.failures.inc();
                    book.failed(&host, unix_now(), self.options.check_every);
                    tracing::error!(%host, error = %e, "ACME order failed; the certificate served (if any) stays");
                    first_error.get_or_insert(e);
                }
            }
        }
        book.save(&dir);
        let certificates = self.certificates.clone();
        let _ = tokio::task::spawn_blocking(move || certificates.reload()).await;
        match first_error {
            Some(e) => Err(e),
            None => Ok(true),
        }
    }

    /// The ACME account: the stored one for this directory URL, else a new one (stored).
    async fn account(&self) -> Result<Account, ProxyError> {
        let err = |what: &str, e: &dyn std::fmt::Display| ProxyError::Acme {
            host: "-".into(),
            message: format!("{what}: {e}"),
        };
        let path = self.account_path();
        let builder = || match &self.options.ca_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        if let Ok(stored) = std::fs::read(&path) {
            let credentials: AccountCredentials = serde_json::from_slice(&stored).map_err(|e| {
                err(
                    &format!("the account file {} is corrupt", path.display()),
                    &e,
                )
            })?;
            return builder()
                .map_err(|e| err("ACME client", &e))?
                .from_credentials(credentials)
                .await
                .map_err(|e| err("restoring the ACME account", &e));
        }
        let contact = self.options.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()
            .map_err(|e| err("ACME client", &e))?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.options.directory.clone(),
                None,
            )
            .await
            .map_err(|e| err("creating the ACME account", &e))?;
        let json = serde_json::to_vec_pretty(&credentials).map_err(|e| err("account", &e))?;
        // The account key signs every order: readable by this user only.
        write_atomically(&path, &json, 0o600)
            .map_err(|e| err(&format!("writing {}", path.display()), &e))?;
        tracing::info!(file = %path.display(), directory = %self.options.directory, "ACME account created");
        Ok(account)
    }

    fn account_path(&self) -> PathBuf {
        let id = hex::encode(&Sha256::digest(self.options.directory.as_bytes())[..6]);
        self.certificates
            .dir()
            .join(format!("acme-account-{id}.json"))
    }

    /// Orders a certificate for `host` and writes it into the directory.
    async fn order(&self, account: &Account, host: &str) -> Result<(), ProxyError> {
        let err = |e: &dyn std::fmt::Display| ProxyError::Acme {
            host: host.to_string(),
            message: e.to_string(),
        };
        tracing::info!(%host, directory = %self.options.directory, "ordering a certificate");
        let identifiers = [Identifier::Dns(host.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| err(&e))?;
        let mut tokens = Vec::new();
        let mut authorizations = order.authorizations();
        let mut outcome = Ok(());
        while let Some(authz) = authorizations.next().await {
            let mut authz = match authz {
                Ok(a) => a,
                Err(e) => {
                    outcome = Err(err(&e));
                    break;
                }
            };
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let Some(mut challenge) = authz.challenge(ChallengeType::Http01) else {
                outcome = Err(err(&"the CA offers no http-01 challenge for this host"));
                break;
            };
            let key_authorization = challenge.key_authorization();
            if let Err(e) = self
                .challenges
                .put(&challenge.token, key_authorization.as_str())
            {
                outcome = Err(err(&format!("writing the challenge answer: {e}")));
                break;
            }
            tokens.push(challenge.token.clone());
            if let Err(e) = challenge.set_ready().await {
                outcome = Err(err(&e));
                break;
            }
        }
        let result = match outcome {
            Ok(()) => self.finish(&mut order, host).await,
            Err(e) => Err(e),
        };
        for token in tokens {
            self.challenges.remove(&token);
        }
        result
    }

    async fn finish(&self, order: &mut instant_acme::Order, host: &str) -> Result<(), ProxyError> {
        let err = |e: &dyn std::fmt::Display| ProxyError::Acme {
            host: host.to_string(),
            message: e.to_string(),
        };
        let retries = RetryPolicy::default();
        let status = order.poll_ready(&retries).await.map_err(|e| err(&e))?;
        if status != OrderStatus::Ready {
            let problem = order
                .state()
                .error
                .as_ref()
                .map(|p| format!(": {p}"))
                .unwrap_or_default();
            return Err(err(&format!("the order ended {status:?}{problem}")));
        }
        let key_pem = order.finalize().await.map_err(|e| err(&e))?;
        let chain_pem = order
            .poll_certificate(&retries)
            .await
            .map_err(|e| err(&e))?;
        let dir = self.certificates.dir();
        // The key first: the pair is read when the certificate changes, and a new certificate
        // beside the old key would be refused (it does not fit) until the key arrives.
        write_atomically(&dir.join(format!("{host}.key")), key_pem.as_bytes(), 0o600)
            .map_err(|e| err(&format!("writing the key: {e}")))?;
        write_atomically(
            &dir.join(format!("{host}.crt")),
            chain_pem.as_bytes(),
            0o644,
        )
        .map_err(|e| err(&format!("writing the certificate: {e}")))?;
        tracing::info!(%host, "certificate issued");
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for AcmeClient {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut retry = FIRST_RETRY.min(self.options.check_every);
        // Routes change with the locator's snapshot: a new host is looked at within seconds
        // (a round with nothing due reads no file and asks the CA nothing).
        let every = if self.options.from_routes {
            self.options.check_every.min(ROUTES_CHECK)
        } else {
            self.options.check_every
        };
        loop {
            let pause = match self.round().await {
                Ok(true) => {
                    retry = FIRST_RETRY.min(self.options.check_every);
                    every
                }
                // The lock holder is ordering: look again soon.
                Ok(false) => Duration::from_secs(5),
                Err(_) => {
                    let pause = retry;
                    retry = (retry * 2).min(self.options.check_every);
                    pause
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The exclusive lock on the directory's `.acme.lock` (released when dropped).
struct DirLock {
    _lock: nix::fcntl::Flock<File>,
}

impl DirLock {
    fn try_take(dir: &Path) -> Result<Option<DirLock>, ProxyError> {
        let path = dir.join(".acme.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ProxyError::Acme {
                host: "-".into(),
                message: format!("opening {}: {e}", path.display()),
            })?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(DirLock { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(ProxyError::Acme {
                host: "-".into(),
                message: format!("locking {}: {e}", path.display()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn challenge_answers_are_found_only_by_a_valid_token() {
        let dir = tempfile::tempdir().unwrap();
        let challenges = Challenges::new(dir.path());
        challenges.put("tok_en-1", "tok_en-1.thumb").unwrap();
        std::fs::write(dir.path().join("secret"), "no").unwrap();
        assert_eq!(
            challenges.answer("tok_en-1").await.as_deref(),
            Some("tok_en-1.thumb")
        );
        for bad in ["", "../secret", "..", "a/b", "tok en", &"a".repeat(257)] {
            assert_eq!(challenges.answer(bad).await, None, "{bad:?}");
        }
        challenges.remove("tok_en-1");
        assert_eq!(challenges.answer("tok_en-1").await, None);
    }

    #[test]
    fn a_bad_token_from_the_ca_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let challenges = Challenges::new(dir.path());
        let err = challenges.put("../../escape", "x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn failed_hosts_wait_a_doubling_pause_shared_through_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = RetryBook::load(dir.path());
        assert!(book.may_order("a.test", 1_000));
        let longest = Duration::from_secs(3600);
        book.failed("a.test", 1_000, longest);
        book.save(dir.path());
        // Another proxy reads the same book.
        let mut other = RetryBook::load(dir.path());
        assert!(!other.may_order("a.test", 1_059));
        assert!(other.may_order("a.test", 1_060));
        assert!(other.may_order("b.test", 1_000));
        other.failed("a.test", 1_060, longest);
        assert_eq!(other.hosts["a.test"].next, 1_060 + 120);
        for _ in 0..10 {
            other.failed("a.test", 0, longest);
        }
        assert_eq!(other.hosts["a.test"].pause_s, 3600);
        // A corrupt book is an empty one.
        std::fs::write(dir.path().join(RETRY_FILE), "{").unwrap();
        assert!(RetryBook::load(dir.path()).hosts.is_empty());
    }

    #[test]
    fn only_one_proxy_at_a_time_holds_the_directory_lock() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::try_take(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(DirLock::try_take(dir.path()).unwrap().is_none());
        drop(first);
        assert!(DirLock::try_take(dir.path()).unwrap().is_some());
    }
}
