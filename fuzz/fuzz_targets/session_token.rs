//! The sticky-session token a client sends back in its cookie (`CookieKeys::decode`).
//!
//! Properties: nothing a client sends panics the proxy; a forged token is never accepted and an altered
//! one never says anything but what was minted; a minted token decodes to exactly what it
//! carried unless it expired.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use proxy::session::{CookieKeys, SessionId, SessionToken};

const NOW_MS: u64 = 1_790_000_000_000;
const TTL_MS: u64 = 30 * 60 * 1000;

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    /// Whatever a client puts in the cookie.
    Raw(&'a str),
    /// A token the proxy minted, possibly with one byte flipped.
    Minted {
        id: [u8; 16],
        instance: String,
        version: String,
        issued_ms: u64,
        last_seen_ms: u64,
        flip: Option<(u16, u8)>,
    },
}

fn keys() -> CookieKeys {
    CookieKeys::new(
        b"fuzzing-primary-key-32-bytes....",
        Some(b"fuzzing-previous-key-32-bytes..."),
    )
    .unwrap()
}

fuzz_target!(|input: Input<'_>| {
    let keys = keys();
    match input {
        Input::Raw(value) => {
            // A random string cannot carry a valid MAC; anything accepted would be a forgery.
            assert!(
                keys.decode("svc", value, NOW_MS, TTL_MS).is_err(),
                "accepted {value:?}"
            );
        }
        Input::Minted {
            id,
            instance,
            version,
            issued_ms,
            last_seen_ms,
            flip,
        } => {
            if instance.len() > usize::from(u16::MAX) {
                return; // cut by `encode` on purpose: instance ids are short names
            }
            let token = SessionToken {
                id: SessionId(id),
                instance,
                version,
                issued_ms,
                last_seen_ms,
            };
            let mut value = keys.encode("svc", &token).into_bytes();
            let flipped = match flip {
                Some((at, bits)) if bits != 0 => {
                    let at = usize::from(at) % value.len();
                    value[at] ^= bits;
                    true
                }
                _ => false,
            };
            let Ok(value) = String::from_utf8(value) else {
                return;
            };
            let decoded = keys.decode("svc", &value, NOW_MS, TTL_MS);
            match decoded {
                // An encoding may have two spellings (hex case): an altered token may be
                // accepted only if it still says exactly what was minted.
                Ok(back) => assert_eq!(back, token, "altered={flipped}: {value:?}"),
                Err(_) => {}
            }
            assert!(
                keys.decode("other", &value, NOW_MS, TTL_MS).is_err(),
                "token crossed services"
            );
        }
    }
});
