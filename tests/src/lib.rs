//! The end-to-end harness: helpers shared by the tests in `tests/tests/`, which run the real
//! Docker Engine, locator, proxy and optimizer containers.
//!
//! Start with [`stack`] (a locator, a proxy, a Docker network and volume for one test),
//! then [`load`] (many users with their own cookie jars) and [`scenario`] (the canary release
//! under load that the demo prints and the tests assert). A stack may span [`testhosts`]:
//! extra Docker engines in their own network namespaces. Tests wait with [`eventually`],
//! never a bare sleep.

pub mod load;
pub mod prometheus;
pub mod scenario;
pub mod stack;
pub mod testhosts;

/// The same poller as the locator's, proxy's and haddock's tests use.
pub use locator::testing::eventually;

/// Label put on every container, volume and network a test creates, so that cleanup (and a
/// human) can find leftovers: `docker ps -a --filter label=org.haddock.test`.
pub const TEST_LABEL: &str = "org.haddock.test";
