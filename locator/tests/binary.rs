//! The real `locator` binary: kill -9 loses no acknowledged write; first start creates a token.

use locator::api::{ServiceSpec, SessionSettings};
use locator::client::Client;
use locator::testing::{eventually, free_port};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn start(data_dir: &Path, port: u16, tokens: Option<&Path>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_locator"));
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(data_dir)
    .env_remove("LOCATOR_DEPLOY_TOKENS")
    .env_remove("LOCATOR_READ_TOKENS")
    .env_remove("LOCATOR_PROXY_TOKENS")
    .env_remove("LOCATOR_DATABASE_URL")
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(t) = tokens {
        cmd.arg("--tokens").arg(t);
    }
    cmd.spawn().expect("start the locator binary")
}

async fn ready(url: &str) {
    eventually("the locator to answer /healthz", WAIT, || async {
        let r = reqwest::get(format!("{url}/healthz")).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

fn spec(n: u64) -> ServiceSpec {
    ServiceSpec {
        sessions: SessionSettings {
            cookie_name: "c".into(),
            idle_ttl_ms: n,
            max_drain_ms: 1,
        },
        routes: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, "deploy = [\"d\"]\n").unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = start(&data, port, Some(&tokens));
    ready(&url).await;
    let client = Client::new(&url, Some("d".into()));

    // Four writers, each bumping its own service; each remembers its last acknowledged value.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, stop) = (client.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = 0u64;
            for n in 1.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match client.put_service(&format!("w{w}"), &spec(n)).await {
                    Ok(s) => {
                        assert_eq!(s.sessions.idle_ttl_ms, n);
                        acked = n;
                    }
                    Err(_) => break, // the process is gone
                }
            }
            acked
        }));
    }
    eventually("some writes to be acknowledged", WAIT, || async {
        let snap = client.snapshot().await.ok()?;
        (snap.revision >= 200).then_some(())
    })
    .await;
    child.kill().unwrap(); // SIGKILL while writes are in flight
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.unwrap());
    }

    let mut child = start(&data, port, Some(&tokens));
    ready(&url).await;
    for (w, last) in acked.iter().enumerate() {
        let s = client.service(&format!("w{w}")).await.unwrap();
        assert!(
            s.sessions.idle_ttl_ms >= *last,
            "w{w}: acknowledged {last}, recovered {}",
            s.sessions.idle_ttl_ms
        );
    }
    // And it keeps working after recovery.
    client.put_service("after", &spec(1)).await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_without_tokens_creates_a_deploy_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = start(&data, port, None);
    ready(&url).await;
    let path = data.join("deploy.token");
    let token = std::fs::read_to_string(&path).unwrap().trim().to_string();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let anonymous = Client::new(&url, None);
    assert_eq!(
        anonymous.services().await.unwrap_err().code(),
        Some("unauthorized")
    );
    let client = Client::new(&url, Some(token));
    client.put_service("svc", &spec(5)).await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Two replicas on one PostgreSQL database, a client that knows both: kill -9 the one in use
/// and the next write goes to the other at once, and a broken watch resumes there from its
/// last revision without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_two_replicas_moves_to_the_survivor_and_its_watch_resumes() {
    use futures_util::StreamExt;
    use locator::api::Change;
    let pg = tokio::task::spawn_blocking(locator::testing::Postgres::start)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, "deploy = [\"failover-deploy-token\"]\n").unwrap();
    let mut replicas = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_locator"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--tokens")
            .arg(&tokens)
            .args(["--database-url", &pg.url()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        ready(&url).await;
        replicas.push(child);
        urls.push(url);
    }
    let client = Client::new(&urls.join(","), Some("failover-deploy-token".into()));
    assert_eq!(client.base_url(), urls[0]);
    let first = client.put_service("svc", &spec(1000)).await.unwrap();
    let mut watch = Box::pin(client.watch(Some(first.revision)).await.unwrap());

    // The replica in use dies.
    replicas[0].kill().unwrap();
    replicas[0].wait().unwrap();
    let second = client.put_service("svc", &spec(2000)).await.unwrap();
    assert_eq!(client.base_url(), urls[1], "the client did not move");
    assert!(second.revision > first.revision);

    // The stream from the dead replica ends; resumed from the last revision it had, on the
    // survivor, it gets exactly the write made meanwhile.
    while let Some(Ok(_)) = tokio::time::timeout(WAIT, watch.next()).await.unwrap() {}
    let mut resumed = Box::pin(client.watch(Some(first.revision)).await.unwrap());
    let event = tokio::time::timeout(WAIT, resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.revision, second.revision);
    assert!(matches!(&event.change, Change::Service(s) if s.sessions.idle_ttl_ms == 2000));

    // A client whose first replica is the dead one starts on the survivor too.
    let late = Client::new(&urls.join(","), Some("failover-deploy-token".into()));
    assert_eq!(
        late.service("svc").await.unwrap().sessions.idle_ttl_ms,
        2000
    );
    assert_eq!(late.base_url(), urls[1]);
    for mut r in replicas {
        let _ = r.kill();
        let _ = r.wait();
    }
}
