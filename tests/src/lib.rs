//! The end-to-end harness: helpers shared by the tests in `tests/tests/`, which run the real
//! Docker Engine, locator, proxy and optimizer containers.
//!
//! Start with [`stack`] (a locator, a proxy, a Docker network and volume for one test),
//! then [`load`] (many users with their own cookie jars) and [`scenario`] (the canary release
//! under load that the demo prints and the tests assert). Tests wait with [`eventually`],
//! never a bare sleep.

pub mod load;
pub mod scenario;
pub mod stack;

use std::time::{Duration, Instant};

/// Label put on every container, volume and network a test creates, so that cleanup (and a
/// human) can find leftovers: `docker ps -a --filter label=org.haddock.test`.
pub const TEST_LABEL: &str = "org.haddock.test";

/// Polls `check` until it returns `Some`, or fails the test after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn eventually_returns_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let got = eventually("third call", Duration::from_secs(5), || async {
            (calls.fetch_add(1, Ordering::SeqCst) >= 2).then_some(7)
        })
        .await;
        assert_eq!(got, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out")]
    async fn eventually_fails_with_what_it_waited_for() {
        eventually("never", Duration::from_millis(50), || async { None::<()> }).await;
    }
}
