//! Benchmark: time from `haddock release` to 100 % on the new version with zero bake time,
//! split into container create+start, healthy, registered and weight applied.
//!
//! Real everything: the haddock binary, a locator process (embedded store), the Docker Engine,
//! the static test image. Run: `cargo bench --release -p haddock --bench release` (add
//! `-- N` for N releases; default 10). Figures go to docs/haddock.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;
use support::*;

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    test_images();
    let l = Locator::start();
    let service = unique_service("bench");
    let _guard = DockerGuard::new(&service);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), &service, &SpecOpts::default());
    let spec = spec.to_str().unwrap();
    let first = haddock(
        &["release", &service, "good-1", "--spec", spec, "--json"],
        Some(&l),
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));

    let keys = [
        "create_start",
        "healthy",
        "register",
        "weight_100",
        "tag_to_full",
    ];
    let mut figures: Vec<Vec<u64>> = vec![Vec::new(); keys.len() + 2];
    println!(
        "{:>3} {:>13} {:>8} {:>9} {:>11} {:>12} {:>10} {:>9}",
        "run",
        "create+start",
        "healthy",
        "register",
        "weight_100",
        "tag_to_full",
        "process",
        "total"
    );
    for i in 0..runs {
        let tag = if i % 2 == 0 { "good-2" } else { "good-1" };
        let t = Instant::now();
        let out = haddock(
            &["release", &service, tag, "--spec", spec, "--json"],
            Some(&l),
        );
        let total = t.elapsed().as_millis() as u64;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut row = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            let v = r["step_ms"][key]
                .as_u64()
                .unwrap_or_else(|| panic!("{key} missing in {r}"));
            figures[k].push(v);
            row.push(v);
        }
        figures[keys.len()].push(r["total_ms"].as_u64().unwrap());
        figures[keys.len() + 1].push(total);
        println!(
            "{:>3} {:>11}ms {:>6}ms {:>7}ms {:>9}ms {:>10}ms {:>8}ms {:>7}ms",
            i + 1,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            r["total_ms"],
            total
        );
    }
    let m: Vec<u64> = figures.iter_mut().map(|v| median(v)).collect();
    println!(
        "median over {runs} releases (zero bake): create+start {} ms, healthy {} ms, registered {} ms, \
         weight applied {} ms; release → 100 % {} ms; whole run incl. drain and removal {} ms (process {} ms)",
        m[0], m[1], m[2], m[3], m[4], m[5], m[6]
    );
}
