//! Live sessions and in-flight requests per instance: what tells haddock an instance is drained.
//!
//! A session is live while it has been seen within the idle TTL. Entries are keyed by the
//! session id's 64-bit hash (the id itself is in the user's cookie, we only need to count), in
//! a fixed number of mutex-guarded shards so that concurrent requests rarely contend. Memory is
//! bounded by `capacity`: at the cap a shard first drops expired entries, then its oldest one,
//! so a flood of cookie-less clients cannot grow the proxy without limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

const SHARDS: usize = 16;

#[derive(Debug, Clone)]
struct Entry {
    instance: Arc<str>,
    last_seen_ms: u64,
}

/// Sessions and in-flight counters of one proxy.
#[derive(Debug)]
pub struct Tracker {
    shards: Vec<Mutex<HashMap<u64, Entry>>>,
    cap_per_shard: usize,
    in_flight: RwLock<HashMap<String, Arc<AtomicU64>>>,
    /// Woken when the counts change in a way the locator should hear about promptly.
    pub changed: Notify,
}

impl Tracker {
    pub fn new(capacity: usize) -> Self {
        Tracker {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            cap_per_shard: capacity.div_ceil(SHARDS).max(1),
            in_flight: RwLock::new(HashMap::new()),
            changed: Notify::new(),
        }
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // The low bits pick the shard; the map hashes the whole key again.
        self.shards[(hash as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records that session `hash` was just served by `instance`.
    pub fn touch(&self, hash: u64, instance: &Arc<str>, now_ms: u64, idle_ttl_ms: u64) {
        let mut shard = self.shard(hash);
        if let Some(e) = shard.get_mut(&hash) {
            e.last_seen_ms = now_ms;
            if *e.instance != **instance {
                e.instance = instance.clone();
                drop(shard);
                self.changed.notify_one();
            }
            return;
        }
        if shard.len() >= self.cap_per_shard {
            shard.retain(|_, e| now_ms.saturating_sub(e.last_seen_ms) <= idle_ttl_ms);
            if shard.len() >= self.cap_per_shard {
                if let Some(oldest) = shard
                    .iter()
                    .min_by_key(|(_, e)| e.last_seen_ms)
                    .map(|(k, _)| *k)
                {
                    shard.remove(&oldest);
                }
            }
        }
        shard.insert(
            hash,
            Entry {
                instance: instance.clone(),
                last_seen_ms: now_ms,
            },
        );
        drop(shard);
        self.changed.notify_one();
    }

    /// Drops sessions idle for longer than the TTL; returns how many went.
    pub fn sweep(&self, now_ms: u64, idle_ttl_ms: u64) -> usize {
        let mut removed = 0;
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            let before = s.len();
            s.retain(|_, e| now_ms.saturating_sub(e.last_seen_ms) <= idle_ttl_ms);
            removed += before - s.len();
        }
        if removed > 0 {
            self.changed.notify_one();
        }
        removed
    }

    /// Live sessions per instance id.
    pub fn live_by_instance(&self) -> HashMap<Arc<str>, u64> {
        let mut out: HashMap<Arc<str>, u64> = HashMap::new();
        for s in &self.shards {
            for e in s.lock().unwrap_or_else(|e| e.into_inner()).values() {
                *out.entry(e.instance.clone()).or_default() += 1;
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The in-flight counter of one instance (shared by every routing table that names it).
    pub fn in_flight_counter(&self, instance: &str) -> Arc<AtomicU64> {
        if let Some(c) = self
            .in_flight
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(instance)
        {
            return c.clone();
        }
        self.in_flight
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(instance.to_string())
            .or_default()
            .clone()
    }

    pub fn in_flight(&self, instance: &str) -> u64 {
        self.in_flight
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(instance)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// Holds one in-flight slot; dropping it (request finished, or retried elsewhere) releases it.
#[derive(Debug)]
pub struct InFlight {
    counter: Arc<AtomicU64>,
}

impl InFlight {
    pub fn enter(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight {
            counter: counter.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sessions_per_instance_and_expires_idle_ones() {
        let t = Tracker::new(1000);
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        t.touch(1, &a, 0, 100);
        t.touch(2, &a, 50, 100);
        t.touch(3, &b, 60, 100);
        t.touch(1, &a, 90, 100); // refreshes, does not add
        assert_eq!(t.live_by_instance()[&a], 2);
        assert_eq!(t.sweep(160, 100), 1); // session 2, last seen at 50
        assert_eq!(t.live_by_instance()[&a], 1);
        assert_eq!(t.sweep(1_000, 100), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn a_moved_session_counts_on_its_new_instance() {
        let t = Tracker::new(1000);
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        t.touch(7, &a, 0, 100);
        t.touch(7, &b, 1, 100);
        let live = t.live_by_instance();
        assert_eq!(live.get(&a), None);
        assert_eq!(live[&b], 1);
    }

    #[test]
    fn memory_is_bounded_by_the_capacity() {
        let t = Tracker::new(160);
        let a: Arc<str> = "a".into();
        for i in 0..10_000u64 {
            t.touch(i, &a, i, u64::MAX);
        }
        assert!(t.len() <= 160, "{}", t.len());
        // The newest sessions are the ones kept.
        assert_eq!(
            t.shard(9_999).get(&9_999).map(|e| e.last_seen_ms),
            Some(9_999)
        );
    }

    #[test]
    fn in_flight_guards_release_on_drop() {
        let t = Tracker::new(10);
        let c = t.in_flight_counter("a");
        let g1 = InFlight::enter(&c);
        let g2 = InFlight::enter(&t.in_flight_counter("a"));
        assert_eq!(t.in_flight("a"), 2);
        drop(g1);
        drop(g2);
        assert_eq!(t.in_flight("a"), 0);
    }
}
