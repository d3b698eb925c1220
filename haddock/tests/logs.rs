//! `haddock logs` against the real Docker Engine: the lines of every instance, merged by time.

mod support;

use std::io::BufRead;
use support::*;

#[test]
fn logs_merge_every_instance_by_time_and_name_each_line() {
    let scene = Scene::on_good_1_with(
        "logs",
        &SpecOpts {
            instances: 2,
            ..Default::default()
        },
    );
    let (l, service, guard, spec) = scene.parts();
    let spec = spec.to_str().unwrap();
    let names: Vec<String> = guard.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let out = haddock(&["logs", service, "--spec", spec, "--json"], Some(l));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for name in &names {
        let start = lines
            .iter()
            .find(|v| {
                v["instance"] == name.as_str()
                    && v["line"].as_str().unwrap().contains("testsvc starting")
            })
            .unwrap_or_else(|| panic!("no start line of {name}: {lines:#?}"));
        assert_eq!(start["version"], "good-1");
        assert_eq!(start["stream"], "stderr");
        assert_eq!(start["host"], "unix:///var/run/docker.sock");
    }
    let times: Vec<std::time::SystemTime> = lines
        .iter()
        .map(|v| humantime::parse_rfc3339(v["time"].as_str().unwrap()).unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "not in time order: {lines:#?}"
    );

    // The terminal form: TIME HOST/INSTANCE/VERSION | LINE.
    let out = haddock(&["logs", service, "--spec", spec, "--tail", "1"], Some(l));
    let human = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(human.lines().count(), 2, "one line of each: {human}");
    assert!(
        human.contains(&format!(
            "unix:///var/run/docker.sock/{}/good-1 | ",
            names[0]
        )),
        "{human}"
    );

    // Bad input changes nothing and says why.
    let none = haddock(
        &["logs", service, "--spec", spec, "--version", "good-9"],
        Some(l),
    );
    assert_eq!(none.status.code(), Some(2), "{}", text(&none));
    assert!(text(&none).contains("no container of"), "{}", text(&none));
    let bad = haddock(
        &["logs", service, "--spec", spec, "--since", "yesterday"],
        Some(l),
    );
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));

    // --follow prints what is there, then keeps going until killed.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_haddock"))
        .args(["logs", service, "--spec", spec, "--follow"])
        .current_dir(repo_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = 0;
    let mut line = String::new();
    while seen < 2 && reader.read_line(&mut line).unwrap() > 0 {
        seen += usize::from(line.contains("testsvc starting"));
        line.clear();
    }
    assert_eq!(seen, 2);
    assert!(
        child.try_wait().unwrap().is_none(),
        "--follow ended by itself"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
