//! The certificates the HTTPS listener serves, picked per connection by the host name the
//! client asks for (SNI).
//!
//! A certificate directory holds pairs `NAME.crt` (PEM chain, leaf first) and `NAME.key` (PEM
//! private key). The hosts a pair serves are its leaf's DNS subject alternative names
//! (`*.example.com` covers one label, as browsers read it). The directory is read at start and
//! read again whenever a pair's files change (see [`CertificateWatcher`]): a certificate
//! renewed on disk, by hand or by the ACME client, is served from the next handshake on, with
//! no restart and no dropped connection.
//!
//! A pair that cannot be served — unreadable, not PEM, a key that does not match the
//! certificate, expired or not yet valid, no DNS name — is refused with one log line naming its
//! file and the reason, and the version of that pair loaded before, if any, stays in service:
//! a bad certificate written over a good one never takes a working host down.
//!
//! A client hello naming a host no certificate covers, or naming none (clients connecting by IP
//! address), fails its handshake with a TLS alert — unless a default host is configured, whose
//! certificate then answers hellos without a name (as Caddy's `default_sni`). Both are counted
//! (`haddock_proxy_tls_handshakes_refused_total{reason}`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// How often the directory is checked for changed files (a stat per file, no read).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Counters of the TLS front (exported on `/metrics`).
#[derive(Debug, Clone, Default)]
pub struct TlsCounters {
    /// Handshakes refused because the hello named no host and no default host is set.
    pub no_sni: Counter,
    /// Handshakes refused because no certificate covers the host the hello named.
    pub unknown_host: Counter,
    /// Certificate pairs being served.
    pub loaded: Gauge,
    /// Pairs refused when read (each change of a pair's files is counted once).
    pub refused: Counter,
    /// ACME orders that failed.
    pub acme_failures: Counter,
    /// Certificates obtained over ACME.
    pub acme_issued: Counter,
}

/// What a pair's files are now: for each, its inode (a file renamed into place is a new one),
/// change and modification times, and length. Times alone could miss a rewrite within the
/// file system's time granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    crt: FileStamp,
    key: FileStamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    changed: (i64, i64),
    modified: SystemTime,
    len: u64,
}

impl Stamp {
    fn of(crt: &Path, key: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let one = |p: &Path| -> std::io::Result<FileStamp> {
            let m = std::fs::metadata(p)?;
            Ok(FileStamp {
                inode: m.ino(),
                changed: (m.ctime(), m.ctime_nsec()),
                modified: m.modified()?,
                len: m.len(),
            })
        };
        Ok(Stamp {
            crt: one(crt)?,
            key: one(key)?,
        })
    }

    /// Whether either file changed in the last `window`: a pair being written (its key and
    /// certificate are two files, so there is a moment when one is new and the other old).
    fn recent(&self, window: Duration) -> bool {
        let newest = self.crt.modified.max(self.key.modified);
        SystemTime::now()
            .duration_since(newest)
            .map_or(true, |age| age < window)
    }
}

/// The start of the reason a pair whose key does not fit its certificate is refused with.
const KEY_MISMATCH: &str = "the key does not fit the certificate";

/// One certificate pair being served.
#[derive(Clone)]
struct Pair {
    stamp: Stamp,
    key: Arc<CertifiedKey>,
    /// The DNS names of the leaf, lower case (`*.example.com` for a wildcard).
    hosts: Vec<String>,
    /// The leaf's validity, in seconds since the Unix epoch.
    not_before: i64,
    not_after: i64,
}

/// What is being served: the pairs by file name, and the host index built from them.
#[derive(Default)]
struct Catalog {
    pairs: BTreeMap<String, Pair>,
    hosts: HashMap<String, Arc<CertifiedKey>>,
}

impl Catalog {
    fn new(pairs: BTreeMap<String, Pair>) -> Self {
        // A host two pairs cover goes to the one that expires last: the renewed certificate,
        // when the old one was left beside it under another name.
        let mut best: HashMap<String, (i64, Arc<CertifiedKey>)> = HashMap::new();
        for pair in pairs.values() {
            for host in &pair.hosts {
                match best.get(host) {
                    Some((not_after, _)) if *not_after >= pair.not_after => {}
                    _ => {
                        best.insert(host.clone(), (pair.not_after, pair.key.clone()));
                    }
                }
            }
        }
        let hosts = best.into_iter().map(|(h, (_, k))| (h, k)).collect();
        Catalog { pairs, hosts }
    }

    /// The certificate for `host` (lower case): an exact name, else a wildcard one label up.
    fn find(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(key) = self.hosts.get(host) {
            return Some(key.clone());
        }
        let (_, parent) = host.split_once('.')?;
        self.hosts.get(&format!("*.{parent}")).cloned()
    }
}

/// What one reading of the directory changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reload {
    /// Pairs loaded (new, or changed on disk), by file name.
    pub loaded: Vec<String>,
    /// Pairs refused, by file name, with the reason.
    pub refused: Vec<(String, String)>,
    /// Pairs whose files are gone.
    pub removed: Vec<String>,
}

/// The certificate directory and what is served from it; the TLS listener's certificate
/// resolver.
pub struct Certificates {
    dir: PathBuf,
    default_host: Option<String>,
    catalog: ArcSwap<Catalog>,
    /// The stamp of each pair last refused, so that a bad pair is reported once per change.
    refused: Mutex<HashMap<String, Stamp>>,
    counters: TlsCounters,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("dir", &self.dir)
            .field("default_host", &self.default_host)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    /// The certificates of `dir` (read by [`Certificates::reload`]; nothing is read here).
    pub fn new(dir: PathBuf, default_host: Option<String>, counters: TlsCounters) -> Self {
        Certificates {
            dir,
            default_host: default_host.map(|h| h.to_ascii_lowercase()),
            catalog: ArcSwap::from_pointee(Catalog::default()),
            refused: Mutex::new(HashMap::new()),
            counters,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hosts served, sorted (for logs, tests and the admin port).
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.catalog.load().hosts.keys().cloned().collect();
        hosts.sort();
        hosts
    }

    /// The validity (seconds since the epoch: from, until) of the certificate served for
    /// `host`.
    pub fn validity(&self, host: &str) -> Option<(i64, i64)> {
        let catalog = self.catalog.load();
        let key = catalog.find(&host.to_ascii_lowercase())?;
        catalog
            .pairs
            .values()
            .find(|p| Arc::ptr_eq(&p.key, &key))
            .map(|p| (p.not_before, p.not_after))
    }

    #[cfg(test)]
    fn not_after(&self, host: &str) -> Option<i64> {
        self.validity(host).map(|(_, until)| until)
    }

    /// Reads the directory again: pairs whose files changed are loaded (or refused, the
    /// previous version staying in service), pairs whose files are gone stop being served.
    /// An unreadable directory changes nothing.
    pub fn reload(&self) -> Reload {
        let mut outcome = Reload::default();
        let names = match pair_names(&self.dir) {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the certificate directory; serving what was loaded");
                return outcome;
            }
        };
        // Taken before reading the catalog: two reloads at once (the watcher's and the ACME
        // client's) run one after the other, each from what the other stored.
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.catalog.load();
        let mut pairs = BTreeMap::new();
        let now = unix_now();
        for name in names {
            let crt = self.dir.join(format!("{name}.crt"));
            let key = self.dir.join(format!("{name}.key"));
            let Ok(stamp) = Stamp::of(&crt, &key) else {
                // Gone between the listing and now, or being replaced: the previous version
                // stays until a listing no longer names the pair.
                if let Some(p) = current.pairs.get(&name) {
                    pairs.insert(name, p.clone());
                }
                continue;
            };
            let previous = current.pairs.get(&name);
            if previous.is_some_and(|p| p.stamp == stamp) {
                pairs.insert(name, previous.cloned().expect("checked"));
                continue;
            }
            if refused.get(&name) == Some(&stamp) {
                if let Some(p) = previous {
                    pairs.insert(name, p.clone());
                }
                continue;
            }
            match load_pair(&crt, &key, stamp, now) {
                Ok(pair) => {
                    tracing::info!(file = %crt.display(), hosts = ?pair.hosts, not_after = %format_unix(pair.not_after), "certificate loaded");
                    refused.remove(&name);
                    outcome.loaded.push(name.clone());
                    pairs.insert(name, pair);
                }
                Err(reason)
                    if reason.starts_with(KEY_MISMATCH) && stamp.recent(2 * RELOAD_INTERVAL) =>
                {
                    // Probably half-way through a renewal (new key, old certificate, or the
                    // reverse): not a refusal yet; the next pass reads the pair again.
                    tracing::debug!(file = %crt.display(), "pair being written; read again later");
                    if let Some(p) = previous {
                        pairs.insert(name, p.clone());
                    }
                }
                Err(reason) => {
                    tracing::error!(file = %crt.display(), %reason, kept_previous = previous.is_some(), "certificate refused");
                    self.counters.refused.inc();
                    refused.insert(name.clone(), stamp);
                    outcome.refused.push((name.clone(), reason));
                    if let Some(p) = previous {
                        pairs.insert(name, p.clone());
                    }
                }
            }
        }
        for name in current.pairs.keys() {
            if !pairs.contains_key(name) {
                tracing::info!(file = %self.dir.join(format!("{name}.crt")).display(), "certificate removed");
                outcome.removed.push(name.clone());
            }
        }
        if outcome.loaded.is_empty() && outcome.removed.is_empty() {
            return outcome;
        }
        self.counters.loaded.set(pairs.len() as i64);
        self.catalog.store(Arc::new(Catalog::new(pairs)));
        outcome
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let catalog = self.catalog.load();
        let found = match hello.server_name() {
            Some(name) => {
                let found = catalog.find(&name.to_ascii_lowercase());
                if found.is_none() {
                    self.counters.unknown_host.inc();
                }
                found
            }
            None => {
                let found = self.default_host.as_deref().and_then(|h| catalog.find(h));
                if found.is_none() {
                    self.counters.no_sni.inc();
                }
                found
            }
        };
        // No certificate: rustls ends the handshake with an alert, which is the clear outcome
        // a client asking for a host we do not serve should get (not some other host's name).
        found
    }
}

/// The names `NAME` of the directory's `NAME.crt` files that have a `NAME.key` beside them.
fn pair_names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "crt") && path.with_extension("key").is_file() {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Reads and checks one pair (its files as of `stamp`): the key for rustls, the leaf's DNS
/// names and validity.
fn load_pair(crt: &Path, key: &Path, stamp: Stamp, now: i64) -> Result<Pair, String> {
    let chain = CertificateDer::pem_file_iter(crt)
        .map_err(|e| format!("cannot read the certificate: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file is not PEM: {e}"))?;
    let leaf = chain
        .first()
        .ok_or("the certificate file holds no certificate")?;
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let (hosts, not_before, not_after) = leaf_facts(leaf)?;
    if now < not_before {
        return Err(format!(
            "the certificate is not valid before {}",
            format_unix(not_before)
        ));
    }
    if now >= not_after {
        return Err(format!(
            "the certificate expired at {}",
            format_unix(not_after)
        ));
    }
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, private, &provider)
        .map_err(|e| format!("{KEY_MISMATCH}: {e}"))?;
    Ok(Pair {
        stamp,
        key: Arc::new(certified),
        hosts,
        not_before,
        not_after,
    })
}

/// The leaf's DNS names (lower case) and validity (seconds since the epoch).
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64, i64), String> {
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("the certificate is not X.509: {e}"))?;
    let mut hosts = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                hosts.push(dns.to_ascii_lowercase());
            }
        }
    }
    if hosts.is_empty() {
        return Err("the certificate names no DNS host (subject alternative name)".into());
    }
    let validity = cert.validity();
    Ok((
        hosts,
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn format_unix(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Reads the certificate directory again every [`RELOAD_INTERVAL`] (a background service).
#[derive(Debug)]
pub struct CertificateWatcher {
    certificates: Arc<Certificates>,
}

impl CertificateWatcher {
    pub fn new(certificates: Arc<Certificates>) -> Self {
        CertificateWatcher { certificates }
    }
}

#[async_trait]
impl BackgroundService for CertificateWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let certificates = self.certificates.clone();
                    // File reads and key parsing are blocking work.
                    let _ = tokio::task::spawn_blocking(move || certificates.reload()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed pair for `hosts`, valid from `from` to `until` (seconds from now).
    fn pair(hosts: &[&str], from: i64, until: i64) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a pair as a deploy finished a minute ago would have (each file renamed in).
    fn write(dir: &Path, name: &str, (crt, key): &(String, String)) {
        write_now(dir, name, "key", key);
        write_now(dir, name, "crt", crt);
        let a_minute_ago = SystemTime::now() - Duration::from_secs(60);
        for ext in ["key", "crt"] {
            std::fs::File::options()
                .write(true)
                .open(dir.join(format!("{name}.{ext}")))
                .unwrap()
                .set_modified(a_minute_ago)
                .unwrap();
        }
    }

    fn write_now(dir: &Path, name: &str, ext: &str, body: &str) {
        let tmp = dir.join(format!(".{name}.{ext}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).unwrap();
    }

    fn store(dir: &Path, default_host: Option<&str>) -> Certificates {
        Certificates::new(
            dir.to_path_buf(),
            default_host.map(str::to_string),
            TlsCounters::default(),
        )
    }

    #[test]
    fn pairs_are_indexed_by_their_dns_names_and_wildcards_cover_one_label() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "app", &pair(&["App.Example.com"], -60, 3600));
        write(
            dir.path(),
            "wild",
            &pair(&["*.apps.example.com"], -60, 3600),
        );
        let certs = store(dir.path(), None);
        let r = certs.reload();
        assert_eq!(r.loaded, ["app", "wild"]);
        assert!(r.refused.is_empty(), "{r:?}");
        let catalog = certs.catalog.load();
        assert!(catalog.find("app.example.com").is_some());
        assert!(catalog.find("a.apps.example.com").is_some());
        assert!(catalog.find("a.b.apps.example.com").is_none());
        assert!(catalog.find("apps.example.com").is_none());
        assert!(catalog.find("other.example.com").is_none());
        // Nothing changed on disk: nothing is read again.
        assert_eq!(certs.reload(), Reload::default());
    }

    #[test]
    fn bad_pairs_are_refused_with_a_reason_and_the_previous_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let good = pair(&["app.example.com"], -60, 3600);
        write(dir.path(), "app", &good);
        let certs = store(dir.path(), None);
        assert_eq!(certs.reload().loaded, ["app"]);
        let served = certs.not_after("app.example.com").unwrap();

        let other = pair(&["app.example.com"], -60, 7200);
        let cases: Vec<((String, String), &str)> = vec![
            (pair(&["app.example.com"], -7200, -60), "expired"),
            (pair(&["app.example.com"], 3600, 7200), "not valid before"),
            ((good.0.clone(), other.1.clone()), "does not fit"),
            (("not pem".into(), good.1.clone()), "holds no certificate"),
            (
                (good.0.clone(), "no key here".into()),
                "cannot read a private key",
            ),
        ];
        for (files, expected) in cases {
            write(dir.path(), "app", &files);
            let r = certs.reload();
            assert!(r.loaded.is_empty(), "{expected}: {r:?}");
            assert_eq!(r.refused.len(), 1, "{expected}: {r:?}");
            assert!(r.refused[0].1.contains(expected), "{expected}: {r:?}");
            // Reported once per change, and the good certificate is still served.
            assert_eq!(certs.reload(), Reload::default());
            assert_eq!(certs.not_after("app.example.com"), Some(served));
        }
        // A renewal is picked up, and a pair whose files go stops being served.
        write(dir.path(), "app", &other);
        assert_eq!(certs.reload().loaded, ["app"]);
        assert!(certs.not_after("app.example.com").unwrap() > served);
        std::fs::remove_file(dir.path().join("app.crt")).unwrap();
        assert_eq!(certs.reload().removed, ["app"]);
        assert!(certs.hosts().is_empty());
    }

    #[test]
    fn a_pair_half_way_through_a_renewal_is_not_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "app", &pair(&["app.example.com"], -60, 3600));
        let certs = store(dir.path(), None);
        assert_eq!(certs.reload().loaded, ["app"]);
        let served = certs.not_after("app.example.com").unwrap();
        let (crt, key) = pair(&["app.example.com"], -60, 7200);
        // The new key is in, the certificate not yet: nothing refused, the old pair served.
        write_now(dir.path(), "app", "key", &key);
        assert_eq!(certs.reload(), Reload::default());
        assert_eq!(certs.not_after("app.example.com"), Some(served));
        write_now(dir.path(), "app", "crt", &crt);
        assert_eq!(certs.reload().loaded, ["app"]);
        assert!(certs.not_after("app.example.com").unwrap() > served);
    }

    #[test]
    fn a_pair_with_no_dns_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ip", &pair(&["127.0.0.1"], -60, 3600));
        let r = store(dir.path(), None).reload();
        assert!(r.refused[0].1.contains("names no DNS host"), "{r:?}");
    }

    #[test]
    fn a_host_two_pairs_cover_gets_the_one_that_expires_last() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a-new", &pair(&["app.example.com"], -60, 7200));
        write(dir.path(), "b-old", &pair(&["app.example.com"], -60, 3600));
        let certs = store(dir.path(), None);
        certs.reload();
        let expected = unix_now() + 7200;
        let got = certs.not_after("app.example.com").unwrap();
        assert!((got - expected).abs() <= 5, "{got} vs {expected}");
    }
}
