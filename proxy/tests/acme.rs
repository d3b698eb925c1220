//! Automatic certificates against a real ACME server (Debian's pebble): obtained, renewed when
//! due, left alone when not, shared by two proxies through one certificate directory, and a CA
//! that cannot be reached leaving what is served in service.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::pebble::Pebble;
use common::pki::Pki;
use common::*;
use locator_wire::api::InstanceState::*;

/// Not a test: the body of the upstream processes the other tests start (see `common`).
#[test]
fn upstream_process() {
    if let Ok(id) = std::env::var("HADDOCK_TEST_UPSTREAM") {
        upstream_main(id);
    }
}

const HOSTS: [&str; 5] = [
    "app.test",
    "renew.test",
    "kept.test",
    "b.test",
    "later.test",
];

/// A client trusting only `root`, with the test hosts resolving to the HTTPS port `tls`.
fn client(root: reqwest::Certificate, tls: u16) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .tls_info(true)
        .timeout(Duration::from_secs(10));
    for host in HOSTS {
        b = b.resolve(host, ([127, 0, 0, 1], tls).into());
    }
    b.build().unwrap()
}

/// The certificate an HTTPS request to `host` was answered with, if the client trusts it.
async fn served(http: &reqwest::Client, host: &str, tls: u16) -> Option<Vec<u8>> {
    let resp = http
        .get(format!("https://{host}:{tls}/"))
        .send()
        .await
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec)
}

async fn metric(proxy: &Proxy, name: &str) -> f64 {
    proxy.metric(&format!("haddock_proxy_{name} ")).await
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Starts a proxy with HTTPS on `tls` and ACME for `hosts`, on the certificate directory
/// `certs`.
#[allow(clippy::too_many_arguments)]
fn acme_proxy(
    plain: u16,
    tls: u16,
    locator: &str,
    state: &Path,
    certs: &Path,
    pebble: &Pebble,
    hosts: &str,
    extra: &[&str],
) -> Proxy {
    let tls_listen = format!("127.0.0.1:{tls}");
    let mut args = vec![
        "--tls-listen",
        &tls_listen,
        "--tls-certs",
        certs.to_str().unwrap(),
        "--acme-directory",
        &pebble.directory,
        "--acme-ca-root",
        pebble.ca_root.to_str().unwrap(),
        "--acme-host",
        hosts,
        "--acme-email",
        "ops@example.com",
    ];
    args.extend_from_slice(extra);
    Proxy::spawn_on(plain, free_port(), locator, state, &args)
}

/// One instance of the test service behind the locator stub, and pebble validating
/// challenges on the plain port it returns (the first proxy's), with an empty certificate
/// directory.
async fn one_service_and_a_ca() -> (Upstream, LocatorStub, u16, Pebble, tempfile::TempDir) {
    let a = Upstream::start("a");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready)],
    ))
    .await;
    let pebble = Pebble::start().await;
    (
        a,
        stub,
        pebble.http_port,
        pebble,
        tempfile::tempdir().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_obtained_renewed_and_shared_over_acme() {
    let (_a, stub, plain, pebble, certs) = one_service_and_a_ca().await;
    // Certificates from another CA: renew.test's has a twelfth of its life left (due),
    // kept.test's almost all of it (not due).
    let other = Pki::new();
    other.issue(certs.path(), "renew.test", &["renew.test"], -3300, 300);
    let kept = other.issue(certs.path(), "kept.test", &["kept.test"], -60, 3600);

    let (state_a, tls_a) = (tempfile::tempdir().unwrap(), free_port());
    // The first proxy also redirects plain HTTP: challenges must be answered, not redirected.
    let proxy_a = acme_proxy(
        plain,
        tls_a,
        &stub.url,
        state_a.path(),
        certs.path(),
        &pebble,
        "app.test,renew.test,kept.test",
        &["--redirect-https"],
    );
    proxy_a.wait_revision(1).await;
    let root = pebble.issuing_root().await;
    let http_a = client(root.clone(), tls_a);
    for host in ["app.test", "renew.test"] {
        eventually(
            &format!("{host} served with a certificate from the ACME CA"),
            Duration::from_secs(60),
            || async { served(&http_a, host, tls_a).await.is_some() },
        )
        .await;
    }
    // Renewed: the other CA's client no longer trusts what renew.test serves.
    let http_other = client(other.root(), tls_a);
    assert_eq!(served(&http_other, "renew.test", tls_a).await, None);
    // Not due: left alone (pebble's root does not trust it; the other CA's does).
    assert_eq!(served(&http_other, "kept.test", tls_a).await, Some(kept));
    assert_eq!(
        metric(&proxy_a, "tls_acme_certificates_issued_total").await,
        2.0
    );
    assert_eq!(metric(&proxy_a, "tls_acme_orders_failed_total").await, 0.0);
    // The keys and the account key are private to the proxy's user.
    assert_eq!(mode(&certs.path().join("app.test.key")), 0o600);
    let accounts: Vec<_> = std::fs::read_dir(certs.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("acme-account-"))
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(mode(&certs.path().join(&accounts[0])), 0o600);

    // A second proxy on the same directory orders b.test. Pebble asks the first proxy for the
    // challenge, which answers it from the shared directory; both then serve the certificate,
    // and the account is the one already stored.
    let (state_b, tls_b) = (tempfile::tempdir().unwrap(), free_port());
    let proxy_b = acme_proxy(
        free_port(),
        tls_b,
        &stub.url,
        state_b.path(),
        certs.path(),
        &pebble,
        "b.test",
        &[],
    );
    proxy_b.wait_revision(1).await;
    let http_b = client(root.clone(), tls_b);
    eventually(
        "b.test served by the proxy that ordered it",
        Duration::from_secs(60),
        || async { served(&http_b, "b.test", tls_b).await.is_some() },
    )
    .await;
    eventually(
        "b.test served by the other proxy on the directory",
        Duration::from_secs(10),
        || async {
            let by_b = served(&http_b, "b.test", tls_b).await;
            by_b.is_some() && served(&http_a, "b.test", tls_a).await == by_b
        },
    )
    .await;
    assert_eq!(
        metric(&proxy_b, "tls_acme_certificates_issued_total").await,
        1.0
    );
    assert_eq!(
        metric(&proxy_a, "tls_acme_certificates_issued_total").await,
        2.0
    );
    let accounts = std::fs::read_dir(certs.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("acme-account-")
        })
        .count();
    assert_eq!(accounts, 1);
    // No challenge answer is left behind.
    let pending = std::fs::read_dir(certs.path().join("acme-challenges"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pending, 0, "{}", pebble.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_falls_due_while_the_proxy_runs_is_renewed() {
    let (_a, stub, plain, pebble, certs) = one_service_and_a_ca().await;
    // 180 s of life, 90 s left: due (under a third left) some 30 s from now, not at start.
    let other = Pki::new();
    let old = other.issue(certs.path(), "later.test", &["later.test"], -90, 90);
    let (state, tls) = (tempfile::tempdir().unwrap(), free_port());
    let proxy = acme_proxy(
        plain,
        tls,
        &stub.url,
        state.path(),
        certs.path(),
        &pebble,
        "later.test",
        &["--acme-check-interval-s", "1"],
    );
    proxy.wait_revision(1).await;
    let http_other = client(other.root(), tls);
    eventually(
        "the file's certificate served at start",
        Duration::from_secs(20),
        || async { served(&http_other, "later.test", tls).await.as_ref() == Some(&old) },
    )
    .await;
    assert_eq!(
        metric(&proxy, "tls_acme_certificates_issued_total").await,
        0.0,
        "ordered at start, before it was due"
    );
    let http_acme = client(pebble.issuing_root().await, tls);
    eventually(
        "later.test renewed by the ACME CA once due",
        Duration::from_secs(60),
        || async { served(&http_acme, "later.test", tls).await.is_some() },
    )
    .await;
    assert_eq!(
        metric(&proxy, "tls_acme_certificates_issued_total").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_of_the_carried_services_routes_get_certificates() {
    let a = Upstream::start("a");
    let mut routed = service(&[("1", 100)], "1", 60_000);
    routed.routes = locator_wire::api::Routes {
        hosts: vec!["app.test".into(), "*.wild.test".into()],
        path_prefix: None,
        // Its plain requests are redirected; the CA's challenges must still be answered.
        redirect_https: true,
        ..Default::default()
    };
    let stub = LocatorStub::start(snapshot(routed, vec![a.instance("1", Ready)])).await;
    let pebble = Pebble::start().await;
    let plain = pebble.http_port;
    let (certs, state, tls) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        free_port(),
    );
    let tls_listen = format!("127.0.0.1:{tls}");
    let proxy = Proxy::spawn_on(
        plain,
        free_port(),
        &stub.url,
        state.path(),
        &[
            "--tls-listen",
            &tls_listen,
            "--tls-certs",
            certs.path().to_str().unwrap(),
            "--acme-directory",
            &pebble.directory,
            "--acme-ca-root",
            pebble.ca_root.to_str().unwrap(),
            "--acme-routes",
        ],
    );
    proxy.wait_revision(1).await;
    let http = client(pebble.issuing_root().await, tls);
    eventually(
        "app.test, named by the service's routes, served with an ACME certificate",
        Duration::from_secs(60),
        || async { served(&http, "app.test", tls).await.is_some() },
    )
    .await;
    // The wildcard, which HTTP-01 cannot prove, was never ordered.
    assert_eq!(
        metric(&proxy, "tls_acme_certificates_issued_total").await,
        1.0
    );
    assert_eq!(metric(&proxy, "tls_acme_orders_failed_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_is_retried_and_what_is_served_stays() {
    let a = Upstream::start("a");
    let stub = LocatorStub::start(snapshot(
        service(&[("1", 100)], "1", 60_000),
        vec![a.instance("1", Ready)],
    ))
    .await;
    let certs = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let served_before = pki.issue(certs.path(), "app.test", &["app.test"], -3300, 300);
    let state = tempfile::tempdir().unwrap();
    let tls = free_port();
    let tls_listen = format!("127.0.0.1:{tls}");
    let proxy = Proxy::spawn(
        &stub.url,
        state.path(),
        &[
            "--tls-listen",
            &tls_listen,
            "--tls-certs",
            certs.path().to_str().unwrap(),
            "--acme-directory",
            &format!("https://127.0.0.1:{}/dir", free_port()),
            "--acme-host",
            "app.test",
            "--acme-check-interval-s",
            "1",
        ],
    );
    proxy.wait_revision(1).await;
    eventually(
        "the failed order retried",
        Duration::from_secs(20),
        || async { metric(&proxy, "tls_acme_orders_failed_total").await >= 2.0 },
    )
    .await;
    // The next attempt's time is kept where every proxy on the directory reads it.
    let book = std::fs::read_to_string(certs.path().join("acme-retry.json")).unwrap();
    assert!(book.contains("app.test"), "{book}");
    let http = client(pki.root(), tls);
    assert_eq!(served(&http, "app.test", tls).await, Some(served_before));
    assert_eq!(
        metric(&proxy, "tls_acme_certificates_issued_total").await,
        0.0
    );
}

#[test]
fn bad_acme_flags_stop_the_proxy_with_a_clear_error() {
    let certs = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args([
            "serve",
            "--locator",
            "http://127.0.0.1:1",
            "--service",
            "svc",
        ])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .args(["--tls-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--tls-certs", certs.path().to_str().unwrap()])
        .args(["--acme-directory", "https://ca.example/dir"])
        .args(["--acme-host", "*.example.com"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wildcard"), "{stderr}");
}
