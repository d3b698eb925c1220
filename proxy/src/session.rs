//! The sticky-session token: what the cookie (or the `X-Haddock-Session` header) carries.
//!
//! A token names a session and the instance it is pinned to, with the time it was issued and
//! last refreshed, all covered by an HMAC-SHA256 over the service name. The proxy never trusts a
//! token as an address: the instance id is looked up in the routing table, and a token that
//! fails verification (tampered, signed by an unknown key, minted for another service) or whose
//! last-seen time is older than the idle TTL simply starts a new session.
//!
//! Wire format (cookie-safe characters only):
//! `v1.<session id: 32 hex>.<instance id: hex>.<version: hex>.<issued ms>.<last seen ms>.<mac>`.
//! The version rides along so that a session whose instance is gone from the routing table can
//! still move to another instance of *its* version.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::error::ProxyError;

type HmacSha256 = Hmac<Sha256>;

/// Version tag of the token format, so that a future format can be told apart.
const FORMAT: &str = "v1";

/// A random 128-bit session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut bytes);
        SessionId(bytes)
    }

    /// A well-mixed 64-bit hash: drives the version split and keys the tracker.
    ///
    /// The id is already random, but mixing keeps the split uniform even if a client replays a
    /// hand-made id through a valid token of its own.
    pub fn hash64(&self) -> u64 {
        let lo = u64::from_le_bytes(self.0[..8].try_into().unwrap_or_default());
        let hi = u64::from_le_bytes(self.0[8..].try_into().unwrap_or_default());
        splitmix64(lo ^ splitmix64(hi))
    }
}

/// The finaliser of SplitMix64: a cheap bijective mixer with good avalanche.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A decoded, verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionToken {
    pub id: SessionId,
    pub instance: String,
    pub version: String,
    pub issued_ms: u64,
    pub last_seen_ms: u64,
}

/// Why a token was not accepted (all of these lead to a new session; the reason feeds metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not in the token format at all.
    Malformed,
    /// Well-formed but the MAC matches neither key (tampered, foreign key or other service).
    BadSignature,
    /// Valid but idle for longer than the session TTL.
    Expired,
}

/// The HMAC keys: tokens are signed with `primary` and accepted under either key, so that a key
/// can be rotated without logging every user out (deploy the new key as primary with the old
/// one as `previous`, then drop `previous` after one TTL).
#[derive(Clone)]
pub struct CookieKeys {
    primary: HmacSha256,
    previous: Option<HmacSha256>,
}

impl std::fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("CookieKeys")
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// Keys shorter than this are refused: a short HMAC key can be brute-forced offline from any
/// cookie a user holds.
pub const MIN_KEY_BYTES: usize = 16;

impl CookieKeys {
    pub fn new(primary: &[u8], previous: Option<&[u8]>) -> Result<Self, ProxyError> {
        let make = |k: &[u8]| {
            if k.len() < MIN_KEY_BYTES {
                return Err(ProxyError::CookieKey(format!(
                    "a cookie key must be at least {MIN_KEY_BYTES} bytes, got {}",
                    k.len()
                )));
            }
            HmacSha256::new_from_slice(k).map_err(|e| ProxyError::CookieKey(e.to_string()))
        };
        Ok(CookieKeys {
            primary: make(primary)?,
            previous: previous.map(make).transpose()?,
        })
    }

    /// A random key, for a proxy started without one (sessions then do not survive a restart,
    /// which `serve` warns about).
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        CookieKeys::new(&key, None).expect("32 bytes is a valid key")
    }

    fn mac(key: &HmacSha256, service: &str, body: &str) -> HmacSha256 {
        let mut mac = key.clone();
        mac.update(service.as_bytes());
        mac.update(b"\n");
        mac.update(body.as_bytes());
        mac
    }

    /// Encodes and signs a token for `service` with the primary key.
    pub fn encode(&self, service: &str, token: &SessionToken) -> String {
        let body = format!(
            "{FORMAT}.{}.{}.{}.{}.{}",
            hex::encode(token.id.0),
            hex::encode(token.instance.as_bytes()),
            hex::encode(token.version.as_bytes()),
            token.issued_ms,
            token.last_seen_ms
        );
        let tag = Self::mac(&self.primary, service, &body)
            .finalize()
            .into_bytes();
        format!("{body}.{}", hex::encode(tag))
    }

    /// Verifies and decodes a token minted for `service`; `now_ms` and `idle_ttl_ms` decide expiry.
    pub fn decode(
        &self,
        service: &str,
        value: &str,
        now_ms: u64,
        idle_ttl_ms: u64,
    ) -> Result<SessionToken, Rejected> {
        let (body, tag_hex) = value.rsplit_once('.').ok_or(Rejected::Malformed)?;
        let tag = hex::decode(tag_hex).map_err(|_| Rejected::Malformed)?;
        // `verify_slice` compares in constant time.
        let ok = Self::mac(&self.primary, service, body)
            .verify_slice(&tag)
            .is_ok()
            || self
                .previous
                .as_ref()
                .is_some_and(|k| Self::mac(k, service, body).verify_slice(&tag).is_ok());
        if !ok {
            return Err(Rejected::BadSignature);
        }
        let mut parts = body.split('.');
        if parts.next() != Some(FORMAT) {
            return Err(Rejected::Malformed);
        }
        let mut next = || parts.next().ok_or(Rejected::Malformed);
        let id: [u8; 16] = hex::decode(next()?)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(Rejected::Malformed)?;
        let mut text = || {
            hex::decode(next()?)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or(Rejected::Malformed)
        };
        let instance = text()?;
        let version = text()?;
        let issued_ms = next()?.parse().map_err(|_| Rejected::Malformed)?;
        let last_seen_ms: u64 = next()?.parse().map_err(|_| Rejected::Malformed)?;
        if now_ms.saturating_sub(last_seen_ms) > idle_ttl_ms {
            return Err(Rejected::Expired);
        }
        Ok(SessionToken {
            id: SessionId(id),
            instance,
            version,
            issued_ms,
            last_seen_ms,
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &str) -> CookieKeys {
        CookieKeys::new(k.as_bytes(), None).unwrap()
    }

    fn token() -> SessionToken {
        SessionToken {
            id: SessionId::random(),
            instance: "optimizer-1.4.2-a".into(),
            version: "1.4.2".into(),
            issued_ms: 1_000,
            last_seen_ms: 2_000,
        }
    }

    #[test]
    fn round_trips_and_is_cookie_safe() {
        let k = keys("0123456789abcdef-primary");
        let t = token();
        let v = k.encode("svc", &t);
        assert!(v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
        assert_eq!(k.decode("svc", &v, 2_500, 1_000), Ok(t));
    }

    #[test]
    fn tampering_any_byte_is_rejected() {
        let k = keys("0123456789abcdef-primary");
        let v = k.encode("svc", &token());
        for i in 0..v.len() {
            let mut bytes = v.clone().into_bytes();
            bytes[i] = if bytes[i] == b'1' { b'2' } else { b'1' };
            let tampered = String::from_utf8(bytes).unwrap();
            if tampered == v {
                continue;
            }
            assert!(
                k.decode("svc", &tampered, 2_000, 1_000).is_err(),
                "byte {i}"
            );
        }
        // Pointing the session at another instance is the attack that matters.
        let forged = v.replacen(
            &hex::encode("optimizer-1.4.2-a"),
            &hex::encode("optimizer-1.4.2-b"),
            1,
        );
        assert_eq!(
            k.decode("svc", &forged, 2_000, 1_000),
            Err(Rejected::BadSignature)
        );
    }

    #[test]
    fn foreign_key_and_other_service_are_rejected() {
        let v = keys("0123456789abcdef-primary").encode("svc", &token());
        assert_eq!(
            keys("another-key-of-16-bytes").decode("svc", &v, 2_000, 1_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(
            keys("0123456789abcdef-primary").decode("other", &v, 2_000, 1_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(
            keys("0123456789abcdef-primary").decode("svc", "garbage", 0, 1),
            Err(Rejected::Malformed)
        );
    }

    #[test]
    fn rotation_accepts_the_previous_key_and_signs_with_the_new_one() {
        let old = keys("the-old-key-0123456");
        let rotated =
            CookieKeys::new(b"the-new-key-0123456", Some(b"the-old-key-0123456")).unwrap();
        let t = token();
        let old_cookie = old.encode("svc", &t);
        assert_eq!(
            rotated.decode("svc", &old_cookie, 2_000, 1_000),
            Ok(t.clone())
        );
        let new_cookie = rotated.encode("svc", &t);
        assert_eq!(
            old.decode("svc", &new_cookie, 2_000, 1_000),
            Err(Rejected::BadSignature)
        );
        // Once the old key is dropped, its cookies are foreign.
        let after = keys("the-new-key-0123456");
        assert!(after.decode("svc", &old_cookie, 2_000, 1_000).is_err());
    }

    #[test]
    fn idle_sessions_expire() {
        let k = keys("0123456789abcdef-primary");
        let v = k.encode("svc", &token());
        assert!(k.decode("svc", &v, 3_000, 1_000).is_ok());
        assert_eq!(k.decode("svc", &v, 3_001, 1_000), Err(Rejected::Expired));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(CookieKeys::new(b"short", None).is_err());
        assert!(CookieKeys::new(b"0123456789abcdef", Some(b"short")).is_err());
    }
}
