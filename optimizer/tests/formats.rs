//! On-disk formats (docs/optimizer.md, "Formats"): the volume's marker, the manifests' format 2
//! fields, and a volume of an incompatible format refused before anything on it is touched.
//! Real `optimizer serve` processes. (That a format-1 optimizer reads what this one writes, and
//! back, is proven end to end: the test image 1.0.0 is a format-1 build, see tests/tests.)

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{cache_dir, client, error_code, Instance, TOKEN};

/// Every file under `dir` with its length and modification time, sorted.
fn listing(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.push((
                e.path().display().to_string(),
                meta.len(),
                meta.modified().unwrap(),
            ));
        }
    }
    out.sort();
    out
}

/// The `Content-Type` a GET of `key` is answered with.
async fn served_type(url: &str, key: &str) -> String {
    let got = client()
        .get(format!("{url}/v1/objects/{key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200, "GET {key}");
    got.headers()["content-type"].to_str().unwrap().to_owned()
}

#[test]
fn a_volume_of_an_incompatible_format_is_refused_before_it_is_touched() {
    let (_dir, cache) = cache_dir();
    std::fs::create_dir_all(cache.join("db")).unwrap();
    std::fs::write(cache.join("db/CURRENT"), "MANIFEST-000001\n").unwrap();
    std::fs::write(
        cache.join("format.json"),
        r#"{"format": 9, "readable_by": 9}"#,
    )
    .unwrap();
    let before = listing(&cache);
    let out = Command::new(env!("CARGO_BIN_EXE_optimizer"))
        .args(["serve", "--listen", "127.0.0.1:0", "--instance-id", "new"])
        .arg("--cache")
        .arg(&cache)
        .env("OPTIMIZER_WRITE_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(
        stderr.contains("on-disk format 9")
            && stderr.contains("format 9 or later")
            && stderr.contains("Nothing was changed"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "it listened first"
    );
    assert_eq!(listing(&cache), before, "the volume was touched");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_writer_records_its_format_and_objects_keep_their_content_type() {
    let (_dir, cache) = cache_dir();
    let a = Instance::start(&cache, "a", &[]);
    a.wait_ready(Some("writer")).await;
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("format.json")).unwrap()).unwrap();
    assert_eq!(marker, serde_json::json!({"format": 2, "readable_by": 1}));

    let put = |key: &str, ct: Option<reqwest::header::HeaderValue>| {
        let mut req = client()
            .put(format!("{}/v1/objects/{key}", a.url))
            .body(vec![b'x'; 5000]);
        if let Some(ct) = ct {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        req.send()
    };
    let typed = put("typed", Some("text/plain; charset=utf-8".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(typed.status(), 200);
    assert_eq!(
        served_type(&a.url, "typed").await,
        "text/plain; charset=utf-8"
    );
    let manifest: serde_json::Value = client()
        .get(format!("{}/v1/objects/typed/manifest", a.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(manifest["format"], 2);
    assert_eq!(manifest["content_type"], "text/plain; charset=utf-8");

    // Untyped objects are served as bytes, and their manifests carry no content type.
    put("plain", None).await.unwrap();
    assert_eq!(
        served_type(&a.url, "plain").await,
        "application/octet-stream"
    );

    // A content type that cannot be stored is refused, and nothing is stored.
    for bad in [
        reqwest::header::HeaderValue::from_str(&format!("text/{}", "x".repeat(300))).unwrap(),
        reqwest::header::HeaderValue::from_bytes(b"text/\xe9t\xe9").unwrap(),
    ] {
        let resp = put("bad-type", Some(bad)).await.unwrap();
        let (status, code, body) = error_code(resp).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_content_type"),
            "{body}"
        );
        assert_eq!(a.get("bad-type").await, None);
    }

    // A restart keeps both (the marker is not rewritten when nothing changes).
    let mut a = a;
    assert!(a.terminate().success());
    let modified = std::fs::metadata(cache.join("format.json"))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let b = Instance::start(&cache, "b", &[]);
    b.wait_ready(Some("writer")).await;
    assert_eq!(
        served_type(&b.url, "typed").await,
        "text/plain; charset=utf-8"
    );
    assert_eq!(
        std::fs::metadata(cache.join("format.json"))
            .unwrap()
            .modified()
            .unwrap(),
        modified
    );
}
