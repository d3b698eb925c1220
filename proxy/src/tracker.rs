//! Live sessions and in-flight requests per instance: what tells haddock an instance is drained.
//!
//! A session is live while it has been seen within the idle TTL. Entries are keyed by the
//! session id's 64-bit hash (the id itself is in the user's cookie, we only need to count), in
//! a fixed number of mutex-guarded shards so that concurrent requests rarely contend.
//!
//! Memory is bounded by `capacity` (69 bytes per tracked session at a million, measured by
//! `memory_per_tracked_session` below). At the cap a shard drops its expired entries (at most
//! once per [`PURGE_INTERVAL_MS`], so that a flood cannot make every request scan the shard) and
//! otherwise **refuses the new session**; it never evicts a live one. A live session evicted
//! to make room would let its draining instance report zero sessions while its user is still
//! pinned there, and haddock would remove the instance under them: a flood of cookie-less
//! requests (each one a new session) could do that at will. A refused session is served
//! normally, only not counted; new sessions go to ready instances, so what is at stake is a
//! session started during the flood whose instance begins draining before the session idles
//! out. `touch` says when it refuses, the service counts it (`untracked_sessions`) and logs a
//! warning at most once a minute, so an operator can raise `--max-sessions`.
//!
//! Counting a session only once its cookie comes back (the other way to keep a flood out) was
//! not chosen: a user's first request, a login for instance, would then not hold their instance
//! through a drain that starts right after it, the very failure this bound is about.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

const SHARDS: usize = 16;

/// How often a full shard may be scanned for expired entries (the reporter's sweep also expires
/// every shard each second).
pub const PURGE_INTERVAL_MS: u64 = 1_000;

#[derive(Debug, Clone)]
struct Entry {
    instance: Arc<str>,
    last_seen_ms: u64,
}

#[derive(Debug, Default)]
struct Shard {
    sessions: HashMap<u64, Entry>,
    last_purge_ms: u64,
}

/// Whether `touch` counts the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touched {
    /// Already tracked (refreshed, possibly moved) or newly tracked.
    Tracked,
    /// A new session refused because the tracker is full of live sessions.
    Refused,
}

/// Sessions and in-flight counters of one proxy.
#[derive(Debug)]
pub struct Tracker {
    shards: Vec<Mutex<Shard>>,
    cap_per_shard: usize,
    in_flight: RwLock<HashMap<String, Arc<AtomicU64>>>,
    /// When a refusal was last logged (one warning a minute is enough to act on).
    last_full_warning_ms: AtomicU64,
    /// Woken when the counts change in a way the locator should hear about promptly.
    pub changed: Notify,
}

impl Tracker {
    pub fn new(capacity: usize) -> Self {
        Tracker {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            cap_per_shard: capacity.div_ceil(SHARDS).max(1),
            in_flight: RwLock::new(HashMap::new()),
            last_full_warning_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, Shard> {
        // The low bits pick the shard; the map hashes the whole key again.
        self.shards[(hash as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records that session `hash` was just served by `instance`; a new session is refused
    /// (not counted) when the tracker is full of live ones (see the module documentation).
    pub fn touch(&self, hash: u64, instance: &Arc<str>, now_ms: u64, idle_ttl_ms: u64) -> Touched {
        let mut shard = self.shard(hash);
        if let Some(e) = shard.sessions.get_mut(&hash) {
            e.last_seen_ms = now_ms;
            if *e.instance != **instance {
                e.instance = instance.clone();
                drop(shard);
                self.changed.notify_one();
            }
            return Touched::Tracked;
        }
        if shard.sessions.len() >= self.cap_per_shard {
            let purge_due = now_ms.saturating_sub(shard.last_purge_ms) >= PURGE_INTERVAL_MS;
            if purge_due {
                shard.last_purge_ms = now_ms;
                shard
                    .sessions
                    .retain(|_, e| now_ms.saturating_sub(e.last_seen_ms) <= idle_ttl_ms);
            }
            if shard.sessions.len() >= self.cap_per_shard {
                drop(shard);
                self.warn_full(now_ms);
                return Touched::Refused;
            }
        }
        shard.sessions.insert(
            hash,
            Entry {
                instance: instance.clone(),
                last_seen_ms: now_ms,
            },
        );
        drop(shard);
        self.changed.notify_one();
        Touched::Tracked
    }

    fn warn_full(&self, now_ms: u64) {
        let last = self.last_full_warning_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= 60_000
            && self
                .last_full_warning_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                capacity = self.cap_per_shard * SHARDS,
                "session tracker full of live sessions: new sessions are served but not \
                 counted (raise --max-sessions if this is real traffic)"
            );
        }
    }

    /// Drops sessions idle for longer than the TTL; returns how many went.
    pub fn sweep(&self, now_ms: u64, idle_ttl_ms: u64) -> usize {
        let mut removed = 0;
        for s in &self.shards {
            let s = &mut s.lock().unwrap_or_else(|e| e.into_inner()).sessions;
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
            for e in s
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sessions
                .values()
            {
                *out.entry(e.instance.clone()).or_default() += 1;
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).sessions.len())
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
    }

    #[test]
    fn a_flood_of_new_sessions_does_not_evict_a_live_one() {
        let ttl = 60_000;
        let t = Tracker::new(160);
        let draining: Arc<str> = "draining".into();
        let ready: Arc<str> = "ready".into();
        // A user pinned to an instance that is draining, seen at 0 …
        assert_eq!(t.touch(u64::MAX, &draining, 0, ttl), Touched::Tracked);
        // … then a flood of cookie-less requests, each a new session, far past the cap (and
        // past the purge interval, so full shards are scanned for expired entries too).
        let mut refused = 0;
        for i in 0..10_000u64 {
            if t.touch(i, &ready, 1 + i, ttl) == Touched::Refused {
                refused += 1;
            }
        }
        assert!(refused > 0);
        assert!(t.len() <= 160, "{}", t.len());
        // The live session still counts: its instance is not reported drained.
        assert_eq!(t.live_by_instance().get(&draining), Some(&1));
        // Known sessions are still refreshed and moved at the cap.
        assert_eq!(t.touch(u64::MAX, &ready, 20_000, ttl), Touched::Tracked);
        assert_eq!(t.live_by_instance().get(&draining), None);
        // Once the flood's sessions idle out, new sessions are counted again.
        let later = 10_000 + ttl + 1;
        assert_eq!(t.touch(424_242, &draining, later, ttl), Touched::Tracked);
    }

    /// Run with `--ignored --nocapture`: the resident memory a tracked session costs.
    #[test]
    #[ignore = "a measurement, not a check: it reads this process's RSS"]
    fn memory_per_tracked_session() {
        fn rss_bytes() -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        let n = 1_000_000u64;
        // Room to spare: the shards fill unevenly.
        let t = Tracker::new(2 * n as usize);
        let ids: Vec<Arc<str>> = (0..4).map(|i| Arc::from(format!("instance-{i}"))).collect();
        let before = rss_bytes();
        for i in 0..n {
            let hash = crate::session::splitmix64(i);
            t.touch(hash, &ids[(i % 4) as usize], 1, u64::MAX);
        }
        let after = rss_bytes();
        assert_eq!(t.len() as u64, n);
        println!(
            "{n} sessions: RSS +{} MiB, {} bytes per tracked session",
            (after - before) >> 20,
            (after - before) / n
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
