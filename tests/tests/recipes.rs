//! The CI recipes of `ci/recipes/` run as their pipelines would run them: each recipe's
//! `haddock` command line, taken from the file, with the variables the CI system would set,
//! through bash, against a local stack. A recipe that drifts from the CLI (a renamed flag, a
//! verb that changed, output that is not the JSON the recipe archives) fails here.
//!
//! What is not run: the image build step (`ci/build-images.sh`, which `ci/test.sh` has just
//! run) and the CI systems' own YAML/Groovy. The service name `optimizer` in each command is
//! the stack's own service name, and `HADDOCK_LOCATOR`/`HADDOCK_TOKEN` are the stack's (the
//! recipes take them from CI variables and secrets).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::stack::{bin_dir, repo_root, Stack, StackOptions};

/// The `haddock …` command lines of a recipe, as its shell step would run them.
fn haddock_lines(recipe: &str) -> Vec<String> {
    recipe
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            // Jenkins: sh(script: '…', returnStatus: true)
            if let Some((_, rest)) = l.split_once("script: '") {
                return rest.split_once('\'').map(|(cmd, _)| cmd.to_string());
            }
            let l = l.strip_prefix("- ").unwrap_or(l);
            l.starts_with("haddock ").then(|| l.to_string())
        })
        .filter(|l| l.starts_with("haddock "))
        .collect()
}

/// Runs `line` with bash in `dir` as the CI system would (its variables in `vars`), with the
/// release binaries first on PATH.
fn run_step(stack: &Stack, dir: &Path, line: &str, vars: &[(&str, &str)]) -> std::process::Output {
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", line])
        .current_dir(dir)
        .env("PATH", path)
        .env("HADDOCK_LOCATOR", &stack.locator_url)
        .env("HADDOCK_TOKEN", &stack.deploy_token);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    tokio::task::block_in_place(|| cmd.output().expect("bash runs"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_ci_recipe_releases_through_the_cli_as_written() {
    let opts = StackOptions {
        steps: vec![50, 100],
        step_pause: Duration::from_secs(1),
        session_ttl: Duration::from_secs(1),
        ..StackOptions::default()
    };
    let stack = Stack::start("recipes", opts).await;
    let (code, _, out) = tokio::task::block_in_place(|| stack.release("1.0.0"));
    assert_eq!(code, Some(0), "1.0.0: {out}");

    // The working directory of a pipeline: a checkout with the spec where haddock looks for
    // it by default (deploy-specs/SERVICE.toml).
    let checkout = tempfile::tempdir().unwrap();
    std::fs::create_dir(checkout.path().join("deploy-specs")).unwrap();
    std::fs::copy(
        &stack.spec_path,
        checkout
            .path()
            .join(format!("deploy-specs/{}.toml", stack.service)),
    )
    .unwrap();

    // Each recipe in turn releases the version the other one is not on.
    let recipes: [(&str, &[(&str, &str)]); 4] = [
        ("github-actions.yml", &[("GITHUB_REF_NAME", "v1.1.0")]),
        ("gitlab-ci.yml", &[("CI_COMMIT_TAG", "1.0.0")]),
        ("Jenkinsfile", &[("TAG_NAME", "1.1.0")]),
        ("bamboo-specs.yaml", &[("bamboo_deploy_release", "1.0.0")]),
    ];
    for (file, vars) in recipes {
        let text = std::fs::read_to_string(repo_root().join("ci/recipes").join(file)).unwrap();
        let lines = haddock_lines(&text);
        assert_eq!(
            lines.len(),
            1,
            "{file}: one haddock step expected: {lines:?}"
        );
        let line = lines[0].replacen(
            "haddock release optimizer ",
            &format!("haddock release {} ", stack.service),
            1,
        );
        assert_ne!(
            line, lines[0],
            "{file}: the step does not release the optimizer"
        );
        let _ = std::fs::remove_file(checkout.path().join("release.json"));
        let out = run_step(&stack, checkout.path(), &line, vars);
        let why = format!(
            "{file}: `{line}`\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{why}");
        let archived = std::fs::read_to_string(checkout.path().join("release.json"))
            .unwrap_or_else(|e| panic!("{file}: no release.json ({e}): {why}"));
        let report: serde_json::Value = serde_json::from_str(archived.trim())
            .unwrap_or_else(|e| panic!("{file}: release.json is not one JSON object ({e}): {why}"));
        let want = vars[0].1.trim_start_matches('v');
        assert_eq!(report["outcome"], "released", "{why}");
        assert_eq!(report["to_version"], want, "{why}");
        assert_eq!(report["exit_code"], 0, "{why}");
        assert_eq!(
            stack.weights().await.unwrap().get(want),
            Some(&100),
            "{file}: {want} is not at 100 %"
        );
    }
}

#[test]
fn the_recipe_parser_finds_the_steps_and_nothing_else() {
    let jenkins = "def code = sh(script: 'haddock release optimizer \"$TAG_NAME\" --json > release.json', returnStatus: true)";
    assert_eq!(
        haddock_lines(jenkins),
        ["haddock release optimizer \"$TAG_NAME\" --json > release.json"]
    );
    let yaml = "  script:\n    - bash ci/build-images.sh x\n    - haddock release optimizer \"$X\" --json | tee release.json\n    # haddock in a comment\n";
    assert_eq!(
        haddock_lines(yaml),
        ["haddock release optimizer \"$X\" --json | tee release.json"]
    );
}

/// `ci/build-images.sh` checks its arguments before it builds or tags anything.
#[test]
fn build_images_refuses_bad_arguments_before_building() {
    for (args, expect) in [
        (
            &["--format", "3", "1.0.0"][..],
            "unknown optimizer format: 3",
        ),
        (
            &["--component", "proxy", "--format", "1", "1.0.0"][..],
            "only exist for the optimizer",
        ),
        (
            &["--component", "router", "1"][..],
            "unknown component: router",
        ),
        (&["1.0/../x"][..], "invalid version tag"),
        (&["--failpoints"][..], "usage:"),
    ] {
        let out = Command::new("bash")
            .arg(repo_root().join("ci/build-images.sh"))
            .args(args)
            .output()
            .expect("bash runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}
