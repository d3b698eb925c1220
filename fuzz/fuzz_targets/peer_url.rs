//! A pull's `from=` against the configured peers (`optimizer::peers::Peers::resolve`), the
//! server-side-request-forgery guard of #18.
//!
//! Property: a `from=` resolves only to a configured peer's base URL, and what it resolves to
//! is a plain http(s) base URL (no credentials, query or fragment) that resolves to itself;
//! neither the configuration nor the lookup panics.
//!
//! Input: UTF-8 text, the configured `--peer` on the first line and the `from=` after it (the
//! whole text is both when there is no line break), so that the seeds in
//! `fuzz/seeds/peer_url/` read as what they are.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optimizer::peers::Peers;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (configured, from) = text.split_once('\n').unwrap_or((text, text));
    let Ok(peers) = Peers::new(&[configured.to_owned()]) else {
        return;
    };
    let Ok(url) = peers.resolve(from) else {
        return;
    };
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("{from:?} resolved to {url:?}, which has no scheme"));
    assert!(
        scheme == "http" || scheme == "https",
        "{from:?} resolved to {url:?}"
    );
    let authority = rest.split('/').next().unwrap_or_default();
    assert!(
        !authority.contains('@') && !url.contains('?') && !url.contains('#') && !url.ends_with('/'),
        "{from:?} resolved to {url:?}, not a plain base URL"
    );
    assert_eq!(
        peers.resolve(configured).ok().as_deref(),
        Some(url.as_str()),
        "{from:?} resolved to {url:?}, which is not the configured {configured:?}"
    );
    assert_eq!(
        peers.resolve(&url).ok().as_deref(),
        Some(url.as_str()),
        "the base URL {from:?} resolved to does not resolve to itself"
    );
});
