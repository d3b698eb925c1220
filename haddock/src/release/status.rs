//! What the release record's `status` shows while a haddock drives it: the bake (weight, pause,
//! when it ends), the latest analysis verdict, what a manual rollout waits for. The driver
//! lease beside them is the locator's to record (see `lease`).
//!
//! The run and its bake write parts of it; the lease task publishes the whole of it with every
//! renewal. [`Status`] is the handle they share, so that neither needs the other to write.

use locator_wire::api::ReleaseStatus;
use std::sync::{Arc, Mutex};

/// A shared, cheaply cloned handle on the release's typed status.
#[derive(Debug, Clone, Default)]
pub(super) struct Status(Arc<Mutex<ReleaseStatus>>);

impl Status {
    /// Changes part of the status (the next lease renewal publishes it).
    pub(super) fn update(&self, change: impl FnOnce(&mut ReleaseStatus)) {
        change(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The whole status as it is now, to publish.
    pub(super) fn snapshot(&self) -> ReleaseStatus {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
