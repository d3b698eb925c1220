//! What a locator sends its watchers and readers: `WatchEvent` lines of the watch stream and
//! the `Snapshot` document.
//!
//! Property: whatever decodes re-encodes to JSON that decodes to the same value (the wire form
//! cannot drift from the types), and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use locator::api::{Snapshot, WatchEvent};

fuzz_target!(|line: &[u8]| {
    if let Ok(event) = serde_json::from_slice::<WatchEvent>(line) {
        let again: WatchEvent =
            serde_json::from_slice(&serde_json::to_vec(&event).unwrap()).unwrap();
        assert_eq!(again, event);
    }
    if let Ok(snapshot) = serde_json::from_slice::<Snapshot>(line) {
        let again: Snapshot =
            serde_json::from_slice(&serde_json::to_vec(&snapshot).unwrap()).unwrap();
        assert_eq!(again, snapshot);
    }
});
