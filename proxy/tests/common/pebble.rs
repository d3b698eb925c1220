//! A real ACME server: Debian's `pebble` (Let's Encrypt's test CA), with `pebble-challtestsrv`
//! as its DNS server answering every name with 127.0.0.1, so that the CA validates HTTP-01
//! challenges against the proxy under test. Both run from a temp dir and are killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::{eventually, free_port};

/// One pebble at a time in a test binary: each binds five ports picked free a moment before,
/// and two starting together took a port the other had just given a proxy under test.
static TURN: OnceLock<Arc<tokio::sync::Mutex<()>>> = OnceLock::new();

pub struct Pebble {
    /// The port of 127.0.0.1 pebble validates HTTP-01 challenges on: the plain listener of
    /// the proxy under test goes there.
    pub http_port: u16,
    /// The ACME directory URL.
    pub directory: String,
    /// The root that signed pebble's own HTTPS certificate (`--acme-ca-root`).
    pub ca_root: PathBuf,
    management: u16,
    ca_pem: String,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
    /// Released after the children are killed (fields drop after `Drop::drop`).
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Pebble {
    /// Waits for its turn, then starts pebble validating HTTP-01 challenges on a free port of
    /// 127.0.0.1 (`http_port`: where the proxy's plain listener must be) and waits until its
    /// directory answers. Panics with instructions when pebble is not installed: the test must
    /// fail, never skip.
    pub async fn start() -> Pebble {
        let turn = TURN
            .get_or_init(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
            .lock_owned()
            .await;
        let http_port = free_port();
        for bin in ["/usr/bin/pebble", "/usr/bin/pebble-challtestsrv"] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} not found: `apt-get install -y pebble` (ci/setup.sh does)"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        // Pebble's own HTTPS certificate, from a CA of ours (Debian ships no test certs).
        let ca = super::pki::Pki::new();
        ca.issue(dir.path(), "pebble", &["localhost", "127.0.0.1"], -60, 3600);
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca.ca.pem()).unwrap();

        let (acme, management, dns, dns_management) =
            (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": path("pebble.crt"),
                "privateKey": path("pebble.key"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        std::fs::write(path("pebble.json"), config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(path(name)).unwrap();
        let dns_server = Command::new("/usr/bin/pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv starts");
        let pebble = Command::new("/usr/bin/pebble")
            .arg("-config")
            .arg(path("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // No random waits before validating, and no nonces refused on purpose (a client
            // retrying them is pebble's test, not ours).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble starts");
        let pebble = Pebble {
            http_port,
            directory: format!("https://127.0.0.1:{acme}/dir"),
            ca_root: path("ca.pem"),
            management,
            ca_pem: ca.ca.pem(),
            children: vec![dns_server, pebble],
            _dir: dir,
            _turn: turn,
        };
        let http = pebble.client();
        let url = pebble.directory.clone();
        eventually("pebble's directory", Duration::from_secs(20), || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        pebble
    }

    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    /// The root of the certificates pebble issues (a new one every time pebble starts).
    pub async fn issuing_root(&self) -> reqwest::Certificate {
        let pem = self
            .client()
            .get(format!("https://127.0.0.1:{}/roots/0", self.management))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()
    }

    /// Pebble's log (what it validated and issued), for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
