//! The session tokens a proxy thread opened lately, so that a user's next request with the
//! same cookie is not decrypted again.
//!
//! A browser sends the same cookie with every request until the proxy refreshes it (a few
//! times per idle TTL, see `service`), and opening it (hex, XChaCha20-Poly1305, the fields)
//! was ~14 % of the instructions of a whole proxied request (callgrind, `proxy/bench/hooks.sh`'s
//! request). Opening is a pure function of the keys, the service and the cookie's value, so
//! the token remembered for exactly those three is the token opening would give; expiry is not
//! part of it and is checked on every request by the caller.
//!
//! One table per thread (the plain-HTTP shards are one thread each), direct-mapped: no lock, a
//! fixed size, and a collision simply forgets the older token. Only tokens that opened are
//! kept, so whatever a client sends that does not open costs the full check every time.

use std::cell::RefCell;
use std::hash::BuildHasher;

use crate::session::SessionToken;

/// Tokens kept per thread: ~300 KiB when full. More concurrent sessions than this on one
/// thread only lower the share of requests that find theirs.
const SLOTS: usize = 1024;

struct Opened {
    /// [`crate::session::CookieKeys::id`] of the keys it opened under.
    keys: u64,
    service: Box<str>,
    value: Box<str>,
    token: SessionToken,
}

/// One thread's table of opened tokens.
struct OpenedTokens {
    /// Randomly keyed per thread: which slot a cookie lands in is not for a client to choose.
    hasher: std::collections::hash_map::RandomState,
    slots: Vec<Option<Opened>>,
}

impl OpenedTokens {
    fn new() -> Self {
        OpenedTokens {
            hasher: Default::default(),
            slots: (0..SLOTS).map(|_| None).collect(),
        }
    }

    fn slot(&self, keys: u64, service: &str, value: &str) -> usize {
        (self.hasher.hash_one((keys, service, value)) % SLOTS as u64) as usize
    }
}

thread_local! {
    static OPENED: RefCell<OpenedTokens> = RefCell::new(OpenedTokens::new());
}

/// The token this thread last opened from `value` under `keys` for `service`, if it kept it.
pub(crate) fn get(keys: u64, service: &str, value: &str) -> Option<SessionToken> {
    OPENED.with_borrow(|t| {
        let o = t.slots[t.slot(keys, service, value)].as_ref()?;
        (o.keys == keys && *o.service == *service && *o.value == *value).then(|| o.token.clone())
    })
}

/// Remembers that `value` opened under `keys` for `service` as `token`.
pub(crate) fn put(keys: u64, service: &str, value: &str, token: &SessionToken) {
    OPENED.with_borrow_mut(|t| {
        let i = t.slot(keys, service, value);
        t.slots[i] = Some(Opened {
            keys,
            service: service.into(),
            value: value.into(),
            token: token.clone(),
        });
    });
}
