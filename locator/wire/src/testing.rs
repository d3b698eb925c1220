//! The one poller every crate's tests wait with (feature `test-util`): tests wait for a
//! condition, never for a fixed time.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// What one look at a condition found: done (with a value), or not yet (with, if the check
/// can say it, what it saw instead, for the failure message).
pub trait Attempt {
    type Value;
    fn settle(self) -> Result<Self::Value, Option<String>>;
}

impl<T> Attempt for Option<T> {
    type Value = T;
    fn settle(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl Attempt for bool {
    type Value = ();
    fn settle(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T, E: Display> Attempt for Result<T, E> {
    type Value = T;
    fn settle(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

/// The waiting of both pollers: the deadline, and a pause that starts at 2 ms and doubles up
/// to 100 ms (quick conditions are seen at once, slow ones cost little).
struct Patience {
    timeout: Duration,
    deadline: Instant,
    pause: Duration,
}

impl Patience {
    fn new(timeout: Duration) -> Patience {
        Patience {
            timeout,
            deadline: Instant::now() + timeout,
            pause: Duration::from_millis(2),
        }
    }

    /// How long to pause before the next look; panics naming `what` (and the last thing an
    /// `Err` said) once the deadline has passed.
    fn next(&mut self, what: &str, last: Option<String>) -> Duration {
        if Instant::now() > self.deadline {
            let timeout = self.timeout;
            match last {
                Some(seen) => {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
                }
                None => panic!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(Duration::from_millis(100));
        pause
    }
}

/// Polls `check` until it settles (`Some`, `true` or `Ok`), or panics after `timeout` naming
/// `what` and the last thing an `Err` said.
pub async fn eventually<A, F, Fut>(what: &str, timeout: Duration, mut check: F) -> A::Value
where
    A: Attempt,
    F: FnMut() -> Fut,
    Fut: Future<Output = A>,
{
    let mut patience = Patience::new(timeout);
    loop {
        match check().await.settle() {
            Ok(v) => return v,
            Err(last) => tokio::time::sleep(patience.next(what, last)).await,
        }
    }
}

/// [`eventually`] for synchronous tests (processes, files): `check` runs on this thread, and
/// may block on a runtime of its own.
pub fn eventually_blocking<A: Attempt>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> A,
) -> A::Value {
    let mut patience = Patience::new(timeout);
    loop {
        match check().settle() {
            Ok(v) => return v,
            Err(last) => std::thread::sleep(patience.next(what, last)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_returns_the_value_once_the_check_settles() {
        let mut n = 0;
        let v = eventually("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            std::future::ready((n >= 3).then_some(n))
        })
        .await;
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for never; last seen: still 7")]
    fn it_names_what_it_waited_for_and_what_it_saw() {
        eventually_blocking("never", Duration::from_millis(30), || {
            Err::<(), _>("still 7")
        });
    }
}
