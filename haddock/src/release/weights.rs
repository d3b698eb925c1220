//! The arithmetic of a canary: which steps a release walks, and the weights of each step.
//!
//! Pure functions of the spec and the versions, kept apart from the run so that the numbers
//! every step writes to the locator are unit-tested without a locator.

use crate::spec::Spec;
use locator_wire::api::WeightsUpdate;
use std::collections::BTreeMap;
use std::time::Duration;

/// The weights for `percent` % of new sessions on `to` (the rest on `from`); zero shares are
/// left out (the locator only takes versions with ready instances).
pub fn weights_for(from: Option<&str>, to: &str, percent: u32) -> WeightsUpdate {
    let percent = percent.min(100);
    let mut weights = BTreeMap::new();
    match from {
        Some(from) if from != to && percent < 100 => {
            weights.insert(from.to_string(), u8::try_from(100 - percent).unwrap_or(100));
            if percent > 0 {
                weights.insert(to.to_string(), u8::try_from(percent).unwrap_or(0));
            }
        }
        _ => {
            weights.insert(to.to_string(), 100);
        }
    }
    let primary_version = (percent >= 100 || from.is_none_or(|f| f == to)).then(|| to.to_string());
    WeightsUpdate {
        weights,
        primary_version,
    }
}

/// The canary steps this release walks: all the spec's steps, or only the final 100 % when
/// there is no old version to split with.
pub fn steps_to_walk(spec: &Spec, from: Option<&str>) -> Vec<(u32, Duration)> {
    let all: Vec<(u32, Duration)> = spec
        .rollout
        .steps
        .iter()
        .map(|s| (s.weight, s.pause))
        .collect();
    match from {
        Some(_) => all,
        None => all.into_iter().filter(|(w, _)| *w >= 100).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        crate::spec::example()
    }

    #[test]
    fn canary_weights_split_new_sessions_and_promotion_sets_the_primary() {
        let w = weights_for(Some("1.4.1"), "1.4.2", 10);
        assert_eq!(w.weights.get("1.4.1"), Some(&90));
        assert_eq!(w.weights.get("1.4.2"), Some(&10));
        assert_eq!(w.primary_version, None);
        let w = weights_for(Some("1.4.1"), "1.4.2", 100);
        assert_eq!(w.weights.len(), 1);
        assert_eq!(w.weights.get("1.4.2"), Some(&100));
        assert_eq!(w.primary_version.as_deref(), Some("1.4.2"));
        let w = weights_for(Some("1.4.1"), "1.4.2", 0);
        assert_eq!(w.weights.len(), 1, "a zero share names no version");
        let first = weights_for(None, "1.0.0", 10);
        assert_eq!(first.weights.get("1.0.0"), Some(&100));
        assert_eq!(first.primary_version.as_deref(), Some("1.0.0"));
    }

    #[test]
    fn a_first_release_goes_straight_to_100() {
        let s = spec();
        assert_eq!(
            steps_to_walk(&s, Some("1"))
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            [10, 50, 100]
        );
        assert_eq!(
            steps_to_walk(&s, None)
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            [100]
        );
    }
}
