//! `cargo bench --workspace --bench optimizer`: prints the figures of docs/optimizer.md (not a timed test).

fn main() -> Result<(), optimizer::Error> {
    let size_mib = std::env::var("OPTIMIZER_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let report = optimizer::bench::run(&optimizer::bench::BenchConfig {
        params: optimizer::chunker::ChunkParams::default(),
        size_mib,
        block_cache_bytes: 64 << 20,
    })?;
    println!("{report}");
    Ok(())
}
