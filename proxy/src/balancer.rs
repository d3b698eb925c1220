//! Pure choice functions: which version a new session gets, and which instance of a version.
//!
//! The version is chosen on a hash of the session id, not per request, so that "10 %" means
//! 10 % of users and a user sees one version for the whole session.

use crate::session::splitmix64;

/// Picks a version from `(version, weight)` pairs for a session with hash `hash`.
///
/// Weights need not sum to 100 (versions without ready instances are left out by the caller);
/// the session's bucket is taken modulo their sum. `None` when every weight is zero.
pub fn choose_version<V>(hash: u64, weights: &[(V, u32)]) -> Option<&V> {
    let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut bucket = hash % total;
    for (v, w) in weights {
        let w = u64::from(*w);
        if bucket < w {
            return Some(v);
        }
        bucket -= w;
    }
    None
}

/// Picks one of `n` candidates for a session, independently of the version choice (another
/// mix of the hash, so that the canary's 10 % are spread over all of its instances).
pub fn choose_index(hash: u64, n: usize) -> Option<usize> {
    (n > 0).then(|| (splitmix64(hash ^ 0x5EED_1A57_0F1C_E5E5) % n as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionId;

    #[test]
    fn split_holds_within_two_percent_over_ten_thousand_sessions() {
        for canary in [1u32, 10, 25, 50, 90] {
            let weights = [("1.4.1", 100 - canary), ("1.4.2", canary)];
            let n = 10_000;
            let hits = (0..n)
                .filter(|_| {
                    choose_version(SessionId::random().hash64(), &weights) == Some(&"1.4.2")
                })
                .count();
            let share = hits as f64 * 100.0 / n as f64;
            assert!(
                (share - f64::from(canary)).abs() <= 2.0,
                "{canary} % asked, {share} % got"
            );
        }
    }

    #[test]
    fn a_session_keeps_its_version_when_weights_do_not_move_its_bucket() {
        let weights = [("old", 90), ("new", 10)];
        let h = SessionId::random().hash64();
        let first = choose_version(h, &weights);
        assert!((0..100).all(|_| choose_version(h, &weights) == first));
    }

    #[test]
    fn zero_weights_choose_nothing_and_full_weight_chooses_it() {
        assert_eq!(choose_version::<&str>(5, &[]), None);
        assert_eq!(choose_version(5, &[("a", 0)]), None);
        assert_eq!(choose_version(5, &[("a", 0), ("b", 100)]), Some(&"b"));
        assert_eq!(choose_index(5, 0), None);
        assert!(choose_index(5, 3).unwrap() < 3);
    }

    #[test]
    fn instances_of_a_version_share_its_sessions() {
        let mut counts = [0usize; 4];
        for _ in 0..4_000 {
            counts[choose_index(SessionId::random().hash64(), 4).unwrap()] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
