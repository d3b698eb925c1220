//! End to end: a volume declared inline in the spec, with a size, created by haddock on the
//! real Docker Engine and filled by the optimizer until the size says no.
//!
//! Needs the image `haddock/optimizer:1.0.0` (`ci/test.sh` builds it).

use std::process::Command;
use std::time::Duration;

use e2e::stack::{Stack, StackOptions};
use rand::RngCore;

/// Removes the test's own volume (haddock made it, so the stack does not know it) when the test
/// ends, also when it fails. Declared before the stack so that it drops after the stack's
/// containers are gone.
struct VolumeGuard(String);

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f", &self.0])
            .output();
    }
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs")
}

/// `haddock volume VERB SERVICE ARGS… --spec SPEC`: exit code, stdout, stderr.
fn volume_verb(stack: &Stack, verb: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["volume", verb, &stack.service];
    all.extend_from_slice(args);
    stack.haddock_with_spec(&all)
}

/// Rewrites the stack's spec: the cache is volume `name` with `extra` keys, under a 512 MiB cap
/// (a tmpfs is memory: its pages count against the container's cap).
fn declare(stack: &Stack, name: &str, extra: &str) {
    let text = std::fs::read_to_string(&stack.spec_path).unwrap();
    let line = format!("{{ name = \"{}\", mount = \"/cache\" }}", stack.volume);
    assert!(text.contains(&line), "the stack's spec mounts {line}");
    let text = text
        .replace(
            &line,
            &format!("{{ name = \"{name}\", mount = \"/cache\"{extra} }}"),
        )
        .replace("memory = \"256MiB\"", "memory = \"512MiB\"");
    std::fs::write(&stack.spec_path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sized_volume_is_created_by_haddock_and_a_full_one_is_a_clean_507() {
    let name = format!("sized-{}", rand::random::<u32>() % 100_000);
    let _volume = VolumeGuard(name.clone());
    let stack = Stack::start(
        "sized",
        StackOptions {
            start_deadline: Duration::from_secs(20),
            ..StackOptions::default()
        },
    )
    .await;
    declare(&stack, &name, ", size = \"64MiB\"");
    assert!(
        !docker(&["volume", "inspect", &name]).status.success(),
        "the volume exists before the release"
    );

    let (code, _, out) = tokio::task::block_in_place(|| stack.release("1.0.0"));
    assert_eq!(code, Some(0), "release: {out}");
    assert!(
        out.contains(&format!("volume {name} (local, tmpfs of")),
        "the release does not report the volume it made: {out}"
    );
    // Made as the spec says, and labelled as haddock's.
    let inspect = docker(&[
        "volume",
        "inspect",
        "-f",
        "{{.Driver}} {{index .Options \"type\"}} {{index .Options \"o\"}} {{index .Labels \"org.haddock.managed-by\"}}",
        &name,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        format!("local tmpfs size={} haddock", 64u64 << 20)
    );

    // Fill it through the proxy with incompressible objects until the size says no.
    let http = reqwest::Client::new();
    let mut stored: Vec<(String, Vec<u8>)> = Vec::new();
    let mut refusal = None;
    for i in 0..200 {
        let mut body = vec![0u8; 1 << 20];
        rand::thread_rng().fill_bytes(&mut body);
        let key = format!("fill-{i}");
        let resp = http
            .put(format!("{}/v1/objects/{key}", stack.proxy_url))
            .bearer_auth(&stack.write_token)
            .body(body.clone())
            .send()
            .await
            .expect("the proxy answers");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            stored.push((key, body));
            continue;
        }
        refusal = Some((status, text));
        break;
    }
    let (status, text) = refusal.expect("200 MiB went into a 64 MiB volume");
    eprintln!(
        "{} objects of 1 MiB stored in the 64 MiB volume, then {status}: {text}",
        stored.len()
    );
    assert_eq!(status.as_u16(), 507, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON error body");
    assert_eq!(v["error"]["code"], "storage_full", "{v}");
    assert!(stored.len() >= 8, "only {} MiB fit in 64 MiB", stored.len());
    // Nothing stored before is lost or corrupted: every object reads back byte for byte.
    for (key, body) in &stored {
        let resp = http
            .get(format!("{}/v1/objects/{key}", stack.proxy_url))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{key}: {}", resp.status());
        assert!(resp.bytes().await.unwrap() == body[..], "{key} changed");
    }

    // `volume ls` shows the size and who mounts it.
    let (code, out, err) = volume_verb(&stack, "ls", &["--json"]);
    assert_eq!(code, Some(0), "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = &rows[0];
    assert_eq!(row["name"], name.as_str(), "{rows}");
    assert_eq!(row["size"], 64u64 << 20, "{rows}");
    assert_eq!(row["managed_by_haddock"], true, "{rows}");
    assert_eq!(
        row["mounted_by"].as_array().map(Vec::len),
        Some(1),
        "{rows}"
    );
    assert_eq!(row["drift"].as_array().map(Vec::len), Some(0), "{rows}");

    // Bad input changes nothing: a volume the spec does not name, a mounted one.
    let (code, _, err) = volume_verb(&stack, "rm", &["someone-elses-data"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a volume of"), "{err}");
    let (code, _, err) = volume_verb(&stack, "rm", &[&name]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("mounted by"), "{err}");
    assert!(docker(&["volume", "inspect", &name]).status.success());

    // A spec whose size differs from the volume's is refused before anything changes.
    declare_size(&stack, &name, "64MiB", "32MiB");
    let (code, _, out) = tokio::task::block_in_place(|| stack.release("1.1.0"));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("not what the spec declares"), "{out}");
    assert!(
        stack.containers(Some("1.1.0")).is_empty(),
        "a refused release started containers"
    );

    // Once nothing mounts it, `volume rm` removes it.
    for id in stack.containers(None) {
        assert!(docker(&["rm", "-f", &id]).status.success());
    }
    let (code, out, err) = volume_verb(&stack, "rm", &[&name]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(
        !docker(&["volume", "inspect", &name]).status.success(),
        "volume {name} is still there"
    );
}

fn declare_size(stack: &Stack, name: &str, from: &str, to: &str) {
    let text = std::fs::read_to_string(&stack.spec_path).unwrap();
    let old = format!("{{ name = \"{name}\", mount = \"/cache\", size = \"{from}\" }}");
    assert!(text.contains(&old), "{old}");
    let new = old.replace(from, to);
    std::fs::write(&stack.spec_path, text.replace(&old, &new)).unwrap();
}
