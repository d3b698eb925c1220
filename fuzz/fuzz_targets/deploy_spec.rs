//! A deploy spec (TOML) → validated spec (`haddock::spec::Spec::parse`).
//!
//! Properties: nothing panics; a refusal always says what is wrong, with a position of at least
//! 1:1; whatever is accepted keeps the rules a release relies on (a service name, a port, steps
//! that strictly increase and end at 100 %, a health path) — so no text slips past validation.
#![no_main]

use haddock::spec::{Spec, SpecError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match Spec::parse("fuzz.toml", text) {
        Ok(spec) => {
            assert!(!spec.service.name.is_empty());
            assert_ne!(spec.service.port, 0);
            assert!(spec.health.path.starts_with('/'));
            let weights: Vec<u32> = spec.rollout.steps.iter().map(|s| s.weight).collect();
            assert_eq!(weights.last(), Some(&100), "{weights:?}");
            assert!(weights.windows(2).all(|w| w[0] < w[1]), "{weights:?}");
        }
        Err(SpecError::Invalid(issues)) => {
            assert!(!issues.is_empty(), "refused without saying why");
            for issue in issues {
                assert!(issue.line >= 1 && issue.col >= 1, "{issue} has no position");
                assert!(!issue.message.is_empty(), "{issue:?} says nothing");
            }
        }
        Err(_) => {}
    }
});
