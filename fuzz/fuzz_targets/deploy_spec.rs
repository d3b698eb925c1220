//! A deploy spec (TOML) → validated spec (`haddock::spec::Spec::parse`).
//!
//! Property: every refusal points at a real place in the text (line and column inside it, or
//! the file as a whole), so `haddock check` can always show the user where.
#![no_main]

use haddock::spec::{Spec, SpecError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(SpecError::Invalid(issues)) = Spec::parse("fuzz.toml", text) {
        assert!(!issues.is_empty(), "refused without saying why");
        let lines = text.lines().count().max(1);
        for issue in issues {
            assert!(issue.line <= lines + 1, "{issue} points past the last line ({lines})");
        }
    }
});
