//! The sticky-session token: what the cookie (or the `X-Haddock-Session` header) carries.
//!
//! A token names a session and the instance it is pinned to, with the time it was issued and
//! last refreshed. It is **sealed**: encrypted and authenticated with XChaCha20-Poly1305 under a
//! key derived (HKDF-SHA256) from the cookie key, with the service name as associated data. So a
//! user can neither read which version or instance serves them (a canary is not advertised to
//! whoever looks at their cookies) nor change it. The proxy never trusts a token as an address:
//! the instance id is looked up in the routing table, and a token that fails to open (tampered,
//! sealed under an unknown key, minted for another service), whose last-seen time is older than
//! the idle TTL, or further in the future than [`MAX_CLOCK_SKEW_MS`], simply starts a new session.
//!
//! Wire format (cookie-safe characters only): `v2.<hex(nonce ‖ ciphertext ‖ tag)>`, 24-byte
//! random nonce (XChaCha's nonces are long enough to be drawn at random for every token without
//! a collision worry), plaintext `session id (16) ‖ issued ms (u64 LE) ‖ last seen ms (u64 LE) ‖
//! instance id length (u16 LE) ‖ instance id ‖ version`. The version rides along so that a
//! session whose instance is gone from the routing table can still move to another instance of
//! *its* version.
//!
//! Transition: tokens of the previous format, `v1.<id>.<instance hex>.<version hex>.<issued>.
//! <last seen>.<HMAC-SHA256>` (signed, readable), are still accepted when their MAC verifies
//! under either key, and the service re-issues them sealed on their first use
//! ([`is_legacy`]). Rejecting them would log every user out (and move every session) on the
//! proxy upgrade that brings sealing; accepting them reveals nothing the user does not already
//! hold and lets nobody forge one. Drop the v1 branch one idle TTL after every proxy runs v2.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::error::ProxyError;
use crate::opened_tokens;

type HmacSha256 = Hmac<Sha256>;

/// Format tag of sealed tokens.
const FORMAT: &str = "v2";
/// Format tag of the signed-only tokens accepted during the transition.
const LEGACY_FORMAT: &str = "v1";
/// HKDF `info` of the sealing key: a key used for nothing else than this token format.
const SEAL_INFO: &[u8] = b"haddock proxy session token v2 xchacha20poly1305";
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
/// Session id, issued ms, last seen ms, instance id length.
const FIXED_PLAINTEXT: usize = 16 + 8 + 8 + 2;

/// How far in the future a token's last-seen time may be: proxies sharing a cookie key run on
/// different hosts whose clocks drift apart (NTP keeps them well within this). Beyond it a
/// token is refused, else a token stamped far ahead would never expire.
pub const MAX_CLOCK_SKEW_MS: u64 = 60_000;

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
    /// Well-formed but opens (or, for a legacy token, verifies) under neither key: tampered,
    /// foreign key or other service.
    BadSignature,
    /// Valid but idle for longer than the session TTL.
    Expired,
    /// Valid but last seen further in the future than [`MAX_CLOCK_SKEW_MS`].
    FromTheFuture,
}

impl Rejected {
    /// The `reason` label of the rejected-tokens metric.
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::BadSignature => "bad_signature",
            Rejected::Expired => "expired",
            Rejected::FromTheFuture => "from_the_future",
        }
    }
}

/// Whether a token that was accepted is in the legacy (signed, readable) format and should be
/// re-issued sealed.
pub fn is_legacy(value: &str) -> bool {
    value.starts_with("v1.")
}

/// One cookie key: the sealing cipher derived from it, and the HMAC that verifies legacy tokens.
#[derive(Clone)]
struct Key {
    seal: XChaCha20Poly1305,
    legacy_mac: HmacSha256,
}

impl Key {
    fn new(material: &[u8]) -> Result<Self, ProxyError> {
        if material.len() < MIN_KEY_BYTES {
            return Err(ProxyError::CookieKey(format!(
                "a cookie key must be at least {MIN_KEY_BYTES} bytes, got {}",
                material.len()
            )));
        }
        let mut seal_key = [0u8; 32];
        Hkdf::<Sha256>::new(None, material)
            .expand(SEAL_INFO, &mut seal_key)
            .map_err(|e| ProxyError::CookieKey(e.to_string()))?;
        Ok(Key {
            seal: XChaCha20Poly1305::new(&seal_key.into()),
            legacy_mac: <HmacSha256 as Mac>::new_from_slice(material)
                .map_err(|e| ProxyError::CookieKey(e.to_string()))?,
        })
    }

    fn open(&self, service: &str, nonce: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let aad = aad(service);
        self.seal
            .decrypt(
                nonce.into(),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .ok()
    }

    fn legacy_verifies(&self, service: &str, body: &str, tag: &[u8]) -> bool {
        let mut mac = self.legacy_mac.clone();
        mac.update(service.as_bytes());
        mac.update(b"\n");
        mac.update(body.as_bytes());
        // `verify_slice` compares in constant time.
        mac.verify_slice(tag).is_ok()
    }
}

/// Associated data of a sealed token: the format and the service, so that a token minted for
/// one service does not open for another.
fn aad(service: &str) -> Vec<u8> {
    [FORMAT.as_bytes(), b"\n", service.as_bytes()].concat()
}

/// The cookie keys: tokens are sealed with `primary` and opened under either key, so that a key
/// can be rotated without logging every user out (deploy the new key as primary with the old
/// one as `previous`, then drop `previous` after one TTL).
#[derive(Clone)]
pub struct CookieKeys {
    primary: Key,
    previous: Option<Key>,
    /// Unique per set of keys made (clones share it): what the tokens opened under them are
    /// remembered by ([`crate::opened_tokens`]), so that other keys never find them.
    id: u64,
}

/// The next [`CookieKeys::id`].
static NEXT_KEYS_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl std::fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("CookieKeys")
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// Keys shorter than this are refused: a short key can be brute-forced offline from any cookie
/// a user holds.
pub const MIN_KEY_BYTES: usize = 16;

impl CookieKeys {
    pub fn new(primary: &[u8], previous: Option<&[u8]>) -> Result<Self, ProxyError> {
        Ok(CookieKeys {
            primary: Key::new(primary)?,
            previous: previous.map(Key::new).transpose()?,
            id: NEXT_KEYS_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// A random key, for a proxy started without one (sessions then do not survive a restart,
    /// which `serve` warns about).
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        CookieKeys::new(&key, None).expect("32 bytes is a valid key")
    }

    fn keys(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.primary).chain(self.previous.as_ref())
    }

    /// Seals a token for `service` with the primary key.
    pub fn encode(&self, service: &str, token: &SessionToken) -> String {
        let (instance, version) = (token.instance.as_bytes(), token.version.as_bytes());
        // Instance ids are short names; one longer than a u16 cannot come from the locator's
        // validated registrations, and is cut rather than allowed to corrupt the layout.
        let instance = &instance[..instance.len().min(usize::from(u16::MAX))];
        let mut plain = Vec::with_capacity(FIXED_PLAINTEXT + instance.len() + version.len());
        plain.extend_from_slice(&token.id.0);
        plain.extend_from_slice(&token.issued_ms.to_le_bytes());
        plain.extend_from_slice(&token.last_seen_ms.to_le_bytes());
        plain.extend_from_slice(&(instance.len() as u16).to_le_bytes());
        plain.extend_from_slice(instance);
        plain.extend_from_slice(version);
        let mut nonce = [0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = aad(service);
        let sealed = self
            .primary
            .seal
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 seals any message below 256 GiB");
        let mut out = String::with_capacity(3 + 2 * (NONCE_BYTES + sealed.len()));
        out.push_str(FORMAT);
        out.push('.');
        out.push_str(&hex::encode(nonce));
        out.push_str(&hex::encode(sealed));
        out
    }

    /// Opens and decodes a token minted for `service`; `now_ms` and `idle_ttl_ms` decide expiry.
    pub fn decode(
        &self,
        service: &str,
        value: &str,
        now_ms: u64,
        idle_ttl_ms: u64,
    ) -> Result<SessionToken, Rejected> {
        let token = match value.split_once('.') {
            Some((FORMAT, rest)) => match opened_tokens::get(self.id, service, value) {
                Some(token) => token,
                None => {
                    let token = self.open(service, rest)?;
                    opened_tokens::put(self.id, service, value, &token);
                    token
                }
            },
            Some((LEGACY_FORMAT, _)) => self.verify_legacy(service, value)?,
            _ => return Err(Rejected::Malformed),
        };
        if token.last_seen_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(Rejected::FromTheFuture);
        }
        if now_ms.saturating_sub(token.last_seen_ms) > idle_ttl_ms {
            return Err(Rejected::Expired);
        }
        Ok(token)
    }

    fn open(&self, service: &str, hex_body: &str) -> Result<SessionToken, Rejected> {
        // Into a buffer of the right size: `hex::decode` collects through an iterator that
        // cannot size it, ~5 k instructions per token where this takes a fraction.
        if hex_body.len() % 2 != 0 {
            return Err(Rejected::Malformed);
        }
        let mut bytes = vec![0u8; hex_body.len() / 2];
        hex::decode_to_slice(hex_body, &mut bytes).map_err(|_| Rejected::Malformed)?;
        if bytes.len() < NONCE_BYTES + TAG_BYTES + FIXED_PLAINTEXT {
            return Err(Rejected::Malformed);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
        let plain = self
            .keys()
            .find_map(|k| k.open(service, nonce, sealed))
            .ok_or(Rejected::BadSignature)?;
        // Only a holder of the key can have sealed this, so a layout error is a bug of ours
        // (or another format under the same tag), not an attack: refused all the same.
        let u64_at = |i: usize| u64::from_le_bytes(plain[i..i + 8].try_into().unwrap_or_default());
        let id: [u8; 16] = plain[..16].try_into().map_err(|_| Rejected::Malformed)?;
        let instance_len = usize::from(u16::from_le_bytes([plain[32], plain[33]]));
        let rest = &plain[FIXED_PLAINTEXT..];
        if rest.len() < instance_len {
            return Err(Rejected::Malformed);
        }
        let (instance, version) = rest.split_at(instance_len);
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| Rejected::Malformed);
        Ok(SessionToken {
            id: SessionId(id),
            instance: text(instance)?,
            version: text(version)?,
            issued_ms: u64_at(16),
            last_seen_ms: u64_at(24),
        })
    }

    /// The transition path: a signed-only `v1` token (see the module documentation).
    fn verify_legacy(&self, service: &str, value: &str) -> Result<SessionToken, Rejected> {
        let (body, tag_hex) = value.rsplit_once('.').ok_or(Rejected::Malformed)?;
        let tag = hex::decode(tag_hex).map_err(|_| Rejected::Malformed)?;
        if !self.keys().any(|k| k.legacy_verifies(service, body, &tag)) {
            return Err(Rejected::BadSignature);
        }
        let mut parts = body.split('.');
        if parts.next() != Some(LEGACY_FORMAT) {
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
        let last_seen_ms = next()?.parse().map_err(|_| Rejected::Malformed)?;
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

    /// A token in the previous, signed-only format, as proxies before sealing issued them.
    fn encode_v1(key: &str, service: &str, t: &SessionToken) -> String {
        let body = format!(
            "v1.{}.{}.{}.{}.{}",
            hex::encode(t.id.0),
            hex::encode(t.instance.as_bytes()),
            hex::encode(t.version.as_bytes()),
            t.issued_ms,
            t.last_seen_ms
        );
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(service.as_bytes());
        mac.update(b"\n");
        mac.update(body.as_bytes());
        format!("{body}.{}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn round_trips_and_is_cookie_safe() {
        let k = keys("0123456789abcdef-primary");
        let t = token();
        let v = k.encode("svc", &t);
        assert!(v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
        assert_eq!(k.decode("svc", &v, 2_500, 1_000), Ok(t));
        assert!(!is_legacy(&v));
    }

    /// A token opened once is remembered by this thread for its keys and service only:
    /// other keys, another service, a later expiry and a value that did not open all get
    /// the full check.
    #[test]
    fn a_remembered_token_is_found_only_for_its_keys_and_service_and_still_expires() {
        let k = keys("0123456789abcdef-primary");
        let t = token();
        let v = k.encode("svc", &t);
        assert_eq!(opened_tokens::get(k.id, "svc", &v), None);
        assert_eq!(k.decode("svc", &v, 2_500, 1_000), Ok(t.clone()));
        assert_eq!(opened_tokens::get(k.id, "svc", &v), Some(t.clone()));
        assert_eq!(k.clone().decode("svc", &v, 2_500, 1_000), Ok(t.clone()));
        // The same key material made again is other keys: nothing remembered is shared.
        let again = keys("0123456789abcdef-primary");
        assert_eq!(opened_tokens::get(again.id, "svc", &v), None);
        assert_eq!(again.decode("svc", &v, 2_500, 1_000), Ok(t.clone()));
        let other = keys("another-key-0123456789");
        assert_eq!(
            other.decode("svc", &v, 2_500, 1_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(
            k.decode("other-svc", &v, 2_500, 1_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(k.decode("svc", &v, 3_001, 1_000), Err(Rejected::Expired));
        let mut tampered = v.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(
            k.decode("svc", &tampered, 2_500, 1_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(opened_tokens::get(k.id, "svc", &tampered), None);
        assert_eq!(
            k.decode("svc", "v2.abc", 2_500, 1_000),
            Err(Rejected::Malformed)
        );
    }

    #[test]
    fn the_token_does_not_show_the_version_or_the_instance() {
        let k = keys("0123456789abcdef-primary");
        let t = token();
        let v = k.encode("svc", &t);
        for clear in [
            t.instance.clone(),
            t.version.clone(),
            hex::encode(&t.instance),
            hex::encode(&t.version),
            hex::encode(t.id.0),
        ] {
            assert!(!v.contains(&clear), "{clear} in {v}");
        }
        // A fresh nonce per token: the same session sealed twice looks unrelated.
        assert_ne!(k.encode("svc", &t), v);
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
        // Cut or extended tokens are refused too.
        assert!(k.decode("svc", &v[..v.len() - 2], 2_000, 1_000).is_err());
        assert!(k.decode("svc", &format!("{v}00"), 2_000, 1_000).is_err());
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
    fn rotation_accepts_the_previous_key_and_seals_with_the_new_one() {
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
    fn legacy_signed_tokens_are_accepted_under_either_key_during_the_transition() {
        let t = token();
        let v1 = encode_v1("the-old-key-0123456", "svc", &t);
        assert!(is_legacy(&v1));
        let rotated =
            CookieKeys::new(b"the-new-key-0123456", Some(b"the-old-key-0123456")).unwrap();
        assert_eq!(rotated.decode("svc", &v1, 2_000, 1_000), Ok(t.clone()));
        // Still authenticated: re-pointed at another instance, foreign or expired, refused.
        let forged = v1.replacen(
            &hex::encode("optimizer-1.4.2-a"),
            &hex::encode("optimizer-1.4.2-b"),
            1,
        );
        assert_ne!(forged, v1);
        assert_eq!(
            rotated.decode("svc", &forged, 2_000, 1_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(
            keys("another-key-of-16-bytes").decode("svc", &v1, 2_000, 1_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(
            rotated.decode("svc", &v1, 3_001, 1_000),
            Err(Rejected::Expired)
        );
    }

    #[test]
    fn idle_sessions_expire() {
        let k = keys("0123456789abcdef-primary");
        let v = k.encode("svc", &token());
        assert!(k.decode("svc", &v, 3_000, 1_000).is_ok());
        assert_eq!(k.decode("svc", &v, 3_001, 1_000), Err(Rejected::Expired));
    }

    #[test]
    fn a_token_from_the_future_is_refused_beyond_the_clock_skew() {
        let k = keys("0123456789abcdef-primary");
        let mut t = token();
        t.last_seen_ms = 1_000_000;
        let v = k.encode("svc", &t);
        // Within the skew (another proxy's clock a little ahead): accepted.
        let now = t.last_seen_ms - MAX_CLOCK_SKEW_MS;
        assert_eq!(k.decode("svc", &v, now, 1_000), Ok(t.clone()));
        // Beyond it the token would never expire: refused, whatever the TTL.
        assert_eq!(
            k.decode("svc", &v, now - 1, u64::MAX),
            Err(Rejected::FromTheFuture)
        );
        let far = SessionToken {
            last_seen_ms: u64::MAX,
            ..t
        };
        assert_eq!(
            k.decode("svc", &k.encode("svc", &far), now, 1_000),
            Err(Rejected::FromTheFuture)
        );
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(CookieKeys::new(b"short", None).is_err());
        assert!(CookieKeys::new(b"0123456789abcdef", Some(b"short")).is_err());
    }
}
