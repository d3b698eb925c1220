//! A manifest as a peer sends it (`GET /v1/objects/{key}/manifest`, JSON), and the read plan a
//! GET derives from it.
//!
//! Properties: a manifest that validates yields, for any byte range inside it, pieces that lie
//! inside their chunks and add up to exactly the range; read groups hold the same pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optimizer::manifest::Manifest;

/// The limits a pull checks a peer's manifest against (`optimizer::sync`): the largest chunk
/// and the default `--max-body-bytes`.
const MAX_CHUNK: u32 = optimizer::chunker::MAX_CHUNK as u32;
const MAX_SIZE: u64 = 1 << 30;

fuzz_target!(|input: (u64, u64, u16, &[u8])| {
    let (a, b, group, json) = input;
    let Ok(mut m) = serde_json::from_slice::<Manifest>(json) else {
        return;
    };
    // As a peer sends it: checked, never panicking, whatever it claims.
    let _ = m.validate(MAX_CHUNK, MAX_SIZE);
    // With the digest made right, the fuzzer reaches the length rules and the read plan
    // (a random digest would stop nearly every input at the digest check).
    m.digest = Manifest::digest_of(&m.chunks);
    if m.validate(MAX_CHUNK, MAX_SIZE).is_err() || m.size == 0 {
        return;
    }
    let start = a % m.size;
    let end = start + 1 + b % (m.size - start);
    let pieces = m.pieces(start, end);
    let mut total = 0u64;
    for &(i, off, len) in &pieces {
        let chunk = &m.chunks[i];
        assert!(
            off + len <= chunk.len as usize,
            "piece {i} {off}+{len} past its chunk"
        );
        total += len as u64;
    }
    assert_eq!(total, end - start, "pieces do not cover {start}..{end}");
    let groups = Manifest::read_groups(&m.chunks, start, end, usize::from(group).max(1));
    let flat: Vec<_> = groups.into_iter().flatten().collect();
    assert_eq!(flat, pieces);
});
