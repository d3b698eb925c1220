//! The dashboard in a real headless browser (Debian's chromium + chromedriver, over WebDriver).
//!
//! Starts the real `locator` binary, sets up a service with two versions and a shifting
//! release through the typed client, then checks in chromium that the page shows the release,
//! follows a weight change live (no reload), and that its pause button takes effect. Missing
//! browser binaries fail the test with the command that installs them: a dashboard test that
//! skips itself tests nothing.

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use locator::api::*;
use locator::client::Client;
use locator::testing::eventually;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const DEPLOY: &str = "deploy-token-for-the-dashboard-test";
const READ: &str = "read-token-for-the-dashboard-test";
const PROXY: &str = "proxy-token-for-the-dashboard-test";
const PATIENCE: Duration = Duration::from_secs(20);

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// The first of `names` found on PATH or at one of Debian's locations.
fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push("/usr/bin".into());
    dirs.push("/usr/lib/chromium".into());
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

fn require(names: &[&str]) -> PathBuf {
    find_binary(names).unwrap_or_else(|| {
        panic!(
            "{} not found: the dashboard test drives a real headless browser.\n\
             Install Debian's packages: apt-get install -y chromium chromium-driver \
             (ci/setup.sh does this). This test never skips.",
            names.join(" / ")
        )
    })
}

/// Text of the first element matching `css`, read inside the page (`None`: no such element).
async fn text(browser: &Browser, css: &str) -> Option<String> {
    let v = browser
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![css.into()],
        )
        .await
        .ok()?;
    v.as_str().map(|s| s.trim().to_string())
}

async fn text_is(browser: &Browser, css: &str, want: &str) -> Result<(), String> {
    match text(browser, css).await {
        Some(t) if t == want => Ok(()),
        other => Err(format!(
            "{css} = {other:?}; page error: {:?}",
            text(browser, "#error").await
        )),
    }
}

fn start_locator(dir: &Path, port: u16) -> Killed {
    let tokens = dir.join("tokens.toml");
    std::fs::write(
        &tokens,
        // The deploy token is named: every change it makes is recorded as `alice`.
        format!(
            "read = [\"{READ}\"]\nproxy = [\"{PROXY}\"]\n\
             [[token]]\nname = \"alice\"\nrole = \"deploy\"\nsecret = \"{DEPLOY}\"\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("locator.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_locator"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--tokens")
        .arg(&tokens)
        // The instances here are fake and never heartbeat: keep them ready for the whole test.
        .args(["--heartbeat-ttl", "1h"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the locator binary");
    Killed(child)
}

fn start_chromedriver(port: u16) -> Killed {
    let driver = require(&["chromedriver"]);
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    Killed(child)
}

async fn open_browser(driver_port: u16) -> Browser {
    let chromium = require(&["chromium", "chromium-browser", "google-chrome"]);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            // --no-sandbox: the tests run as root, where chromium's sandbox refuses to start.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1024"],
        }),
    );
    let url = format!("http://127.0.0.1:{driver_port}");
    eventually("chromedriver to start a browser session", PATIENCE, || {
        let caps = caps.clone();
        let url = url.clone();
        async move {
            ClientBuilder::new(HttpConnector::new())
                .capabilities(caps)
                .connect(&url)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// A service `shop` with ready instances of 1.0 and 2.0 and a release 1.0 → 2.0 at `shifting`.
async fn set_up(client: &Client) -> Release {
    client
        .put_service(
            "shop",
            &ServiceSpec {
                sessions: SessionSettings {
                    cookie_name: "haddock_shop".into(),
                    idle_ttl_ms: 60_000,
                    max_drain_ms: 60_000,
                },
                routes: Default::default(),
            },
        )
        .await
        .unwrap();
    for (id, version, port) in [("shop-a", "1.0", 9001), ("shop-b", "2.0", 9002)] {
        client
            .register(&RegisterInstance {
                id: id.into(),
                service: "shop".into(),
                version: version.into(),
                address: format!("127.0.0.1:{port}"),
                docker_host: String::new(),
                container_id: String::new(),
                labels: BTreeMap::new(),
                state: InstanceState::Ready,
            })
            .await
            .unwrap();
    }
    set_weights(client, 100, 0).await;
    let release = client
        .create_release(&NewRelease {
            service: "shop".into(),
            from_version: Some("1.0".into()),
            to_version: "2.0".into(),
            image: "shop:2.0".into(),
            who: "dashboard-test".into(),
        })
        .await
        .unwrap();
    let mut release = release;
    for state in [
        ReleaseState::Starting,
        ReleaseState::WaitingHealthy,
        ReleaseState::Registered,
        ReleaseState::Shifting,
    ] {
        release = client
            .update_release(
                &release.id,
                &ReleaseUpdate {
                    state: Some(state),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let status = ReleaseStatus {
        bake: Some(BakeStatus {
            weight: 10,
            pause_ms: 120_000,
            started_at_ms: now,
            until_ms: Some(now + 120_000),
            remaining_ms: 120_000,
        }),
        analysis: Some(serde_json::json!({
            "verdict": "pass", "requests": 250, "ratio_5xx": 0.0, "p99_ms": 12.5,
            "old_ratio_5xx": 0.004, "old_p99_ms": 11.0 })),
        ..Default::default()
    };
    client
        .update_release(
            &release.id,
            &ReleaseUpdate {
                step: Some(1),
                status: Some(status),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

async fn set_weights(client: &Client, old: u8, new: u8) {
    let mut weights = BTreeMap::from([("1.0".to_string(), old)]);
    if new > 0 {
        weights.insert("2.0".to_string(), new);
    }
    client
        .set_weights(
            "shop",
            &WeightsUpdate {
                weights,
                primary_version: None,
            },
            None,
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_a_release_live_and_its_buttons_work() {
    // Fail before starting anything when the browser is missing.
    require(&["chromedriver"]);
    require(&["chromium", "chromium-browser", "google-chrome"]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _locator = start_locator(dir.path(), port);
    let base = format!("http://127.0.0.1:{port}");
    let client = Client::new(&base, Some(DEPLOY.into()));
    eventually("the locator to answer", PATIENCE, || async {
        client.services().await.map_err(|e| e.to_string())
    })
    .await;
    let release = set_up(&client).await;
    set_weights(&client, 90, 10).await;

    let driver_port = free_port();
    let _driver = start_chromedriver(driver_port);
    let browser = open_browser(driver_port).await;
    let outcome = drive(&browser, &client, &base, &release).await;
    let _ = browser.close().await;
    if let Err(e) = outcome {
        let log = std::fs::read_to_string(dir.path().join("locator.log")).unwrap_or_default();
        panic!("{e}\n--- locator log ---\n{log}");
    }
}

async fn drive(
    browser: &Browser,
    client: &Client,
    base: &str,
    release: &Release,
) -> Result<(), fantoccini::error::CmdError> {
    // The page is served without a token and asks for one.
    browser.goto(&format!("{base}/")).await?;
    assert_eq!(browser.title().await?, "Haddock locator");
    let input = browser.find(Locator::Css("#token")).await?;
    input.send_keys(DEPLOY).await?;
    browser
        .find(Locator::Css("#connect"))
        .await?
        .click()
        .await?;

    // It shows the running release and the instances with their versions' weights.
    let rel = format!("[data-release=\"{}\"]", release.id);
    eventually("the release to show as shifting", PATIENCE, || async {
        text_is(browser, &format!("{rel} dd[data-field=state]"), "shifting").await
    })
    .await;
    eventually("shop-b at 10 %", PATIENCE, || async {
        text_is(
            browser,
            "[data-instance=shop-b] [data-field=weight]",
            "10 %",
        )
        .await
    })
    .await;
    text_is(
        browser,
        "[data-instance=shop-a] [data-field=weight]",
        "90 %",
    )
    .await
    .unwrap();
    // An in-place limits change (`haddock update`) shows with its service, live.
    client
        .record_limits(
            "shop",
            &NewLimitsChange {
                who: "alice".into(),
                instances: vec![InstanceLimits {
                    id: "shop-a".into(),
                    memory_from: Some(256 << 20),
                    memory_to: Some(384 << 20),
                    nano_cpus_from: None,
                    nano_cpus_to: None,
                }],
            },
        )
        .await
        .expect("a limits change is recorded");
    eventually("the limits change to show", PATIENCE, || async {
        let t = text(browser, "[data-service=shop] [data-field=limits]")
            .await
            .unwrap_or_default();
        if t.contains("by alice") && t.contains("shop-a: memory 256 MiB → 384 MiB") {
            Ok(())
        } else {
            Err(format!("limits line: {t:?}"))
        }
    })
    .await;
    // So does a deploy lock, and its release. The body's `bob` is only a claim: the lock is
    // recorded under the token's name.
    let lock = NewLock {
        who: "bob".into(),
        message: "freeze for the audit".into(),
    };
    client.lock("shop", &lock).await.expect("the lock is taken");
    eventually("the lock to show", PATIENCE, || async {
        let t = text(browser, "[data-service=shop] [data-field=lock]")
            .await
            .unwrap_or_default();
        if t.contains("by alice: freeze for the audit") {
            Ok(())
        } else {
            Err(format!("lock line: {t:?}"))
        }
    })
    .await;
    client.unlock("shop").await.expect("the lock is released");
    eventually("the lock to go", PATIENCE, || async {
        match text(browser, "[data-service=shop] [data-field=lock]").await {
            None => Ok(()),
            Some(t) => Err(format!("lock line still there: {t:?}")),
        }
    })
    .await;
    let bake = text(browser, "[data-field=bake]").await.unwrap_or_default();
    assert!(
        bake.contains("Baking at 10 %") && bake.contains("left"),
        "{bake}"
    );
    let analysis = text(browser, "[data-field=analysis]")
        .await
        .unwrap_or_default();
    assert!(
        analysis.contains("pass") && analysis.contains("12.5 ms"),
        "{analysis}"
    );
    eventually("the release in the history", PATIENCE, || async {
        text(browser, &format!("[data-history=\"{}\"]", release.id))
            .await
            .ok_or_else(|| "no history row".to_string())
    })
    .await;
    eventually("the deploy role to be recognised", PATIENCE, || async {
        text_is(browser, "#role", "deploy: controls enabled").await
    })
    .await;

    // A weight change reaches the page through the watch stream, without a reload: a marker
    // set on `window` survives only if the page was not reloaded.
    browser
        .execute("window.__noReload = 42; return null;", vec![])
        .await?;
    set_weights(client, 75, 25).await;
    eventually("shop-b at 25 % without reload", PATIENCE, || async {
        text_is(
            browser,
            "[data-instance=shop-b] [data-field=weight]",
            "25 %",
        )
        .await
    })
    .await;
    text_is(
        browser,
        "[data-instance=shop-a] [data-field=weight]",
        "75 %",
    )
    .await
    .unwrap();
    let marker = browser.execute("return window.__noReload;", vec![]).await?;
    assert_eq!(marker, serde_json::json!(42), "the page was reloaded");

    // Pressing pause pauses the release in the locator, and the page shows it.
    let pause = browser
        .find(Locator::Css(&format!("{rel} button[data-control=pause]")))
        .await?;
    assert!(
        pause.is_enabled().await?,
        "pause is disabled for a deploy token"
    );
    pause.click().await?;
    eventually(
        "the locator to hold the release paused",
        PATIENCE,
        || async {
            match client.release(&release.id).await {
                Ok(r) if r.paused => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eventually("the page to show it paused", PATIENCE, || async {
        text_is(browser, &format!("{rel} dd[data-field=paused]"), "yes").await
    })
    .await;
    // The pause is recorded under the name of the token that pressed it, and the page says
    // who.
    eventually("the page to say who paused it", PATIENCE, || async {
        match text(browser, &format!("{rel} dd[data-field=operators]")).await {
            Some(t) if t.starts_with("pause by alice ") => Ok(()),
            other => Err(format!("operators = {other:?}")),
        }
    })
    .await;
    let resume = browser
        .find(Locator::Css(&format!("{rel} button[data-control=resume]")))
        .await?;
    assert!(
        resume.is_enabled().await?,
        "resume stays disabled on a paused release"
    );

    // A read token sees everything but gets no buttons.
    browser.find(Locator::Css("#forget")).await?.click().await?;
    browser
        .find(Locator::Css("#token"))
        .await?
        .send_keys(READ)
        .await?;
    browser
        .find(Locator::Css("#connect"))
        .await?
        .click()
        .await?;
    eventually("the read-only role to be recognised", PATIENCE, || async {
        text_is(browser, "#role", "read-only").await
    })
    .await;
    let buttons = browser
        .execute(
            "return [...document.querySelectorAll(arguments[0] + ' button[data-control]')]\
             .map(b => b.disabled);",
            vec![rel.clone().into()],
        )
        .await?;
    assert_eq!(buttons, serde_json::json!([true, true, true, true]));
    Ok(())
}
