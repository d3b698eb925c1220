//! `Range` header → byte range of an object (`optimizer::manifest::parse_range`).
//!
//! Property: whatever the header, an accepted range lies inside the object and is not empty,
//! and the answer never panics (overflow checks are on in the fuzz profile).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, &str)| {
    let (size, header) = input;
    if let Ok(Some((start, end))) = optimizer::manifest::parse_range(header, size) {
        assert!(
            start < end,
            "empty range {start}..{end} accepted for {header:?}"
        );
        assert!(
            end <= size,
            "range {start}..{end} beyond size {size} for {header:?}"
        );
    }
});
