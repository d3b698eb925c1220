//! A manifest as a peer sends it (`GET /v1/objects/{key}/manifest`, JSON), and the read plan a
//! GET derives from it.
//!
//! Properties: a manifest that validates yields, for any byte range inside it, pieces that lie
//! inside their chunks and add up to exactly the range; read groups hold the same pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optimizer::manifest::Manifest;

fuzz_target!(|input: (u64, u64, u16, &[u8])| {
    let (a, b, group, json) = input;
    let Ok(m) = serde_json::from_slice::<Manifest>(json) else {
        return;
    };
    if m.validate().is_err() || m.size == 0 {
        return;
    }
    let start = a % m.size;
    let end = start + 1 + b % (m.size - start);
    let pieces = m.pieces(start, end);
    let mut total = 0u64;
    for &(i, off, len) in &pieces {
        let chunk = &m.chunks[i];
        assert!(off + len <= chunk.len as usize, "piece {i} {off}+{len} past its chunk");
        total += len as u64;
    }
    assert_eq!(total, end - start, "pieces do not cover {start}..{end}");
    let groups = Manifest::read_groups(&m.chunks, start, end, usize::from(group).max(1));
    let flat: Vec<_> = groups.into_iter().flatten().collect();
    assert_eq!(flat, pieces);
});
