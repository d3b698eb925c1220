//! `haddock check` as a user runs it: the real binary, real files, exit codes and output.

use std::path::Path;
use std::process::Command;

fn haddock(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_haddock"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("haddock runs")
}

#[test]
fn the_example_spec_checks_ok() {
    let out = haddock(&["check", "deploy-specs/optimizer.toml"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn a_broken_spec_exits_2_with_every_error_positioned() {
    let good = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy-specs/optimizer.toml"),
    )
    .unwrap();
    let bad = good.replacen("weight = 50", "weight = 150", 1).replacen(
        "idle_ttl = \"20s\"",
        "idle_ttl = \"0s\"",
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, &bad).unwrap();
    let out = haddock(&["check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing on stdout for a bad spec");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = bad
        .lines()
        .position(|l| l.contains("weight = 150"))
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!(
            "bad.toml:{line}:14: rollout.steps[1].weight: 150 is not a percentage (0..=100)"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("sessions.idle_ttl: must be longer than 0s"),
        "{stderr}"
    );
}

#[test]
fn a_missing_file_is_bad_input() {
    let out = haddock(&["check", "deploy-specs/nope.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read spec deploy-specs/nope.toml")
    );
}

#[test]
fn an_unknown_log_format_exits_2_naming_the_choices() {
    let out = haddock(&[
        "--log-format",
        "xml",
        "check",
        "deploy-specs/optimizer.toml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("xml") && err.contains("json") && err.contains("pretty"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing checked: {:?}", out.stdout);
}
