//! What an anonymous client controls in a locator request before authentication and after it:
//! the path (route + parameters), the query string, and the JSON body of each write route.
//!
//! Properties: nothing panics; a resolved path names a known route template with one
//! parameter per `{…}` in it; a query yields at most one entry per `&`-separated pair; every accepted body re-encodes to JSON that decodes to itself.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use locator::api::{
    Control, NewRelease, RegisterInstance, ReleaseUpdate, ServiceSpec, SessionReport,
    StateChange, WeightsUpdate,
};
use locator::server::{parse_query, resolve, ROUTES};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    path: &'a str,
    query: &'a str,
    body: &'a [u8],
}

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(body: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(body) {
        let again: T = serde_json::from_slice(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(again, value);
    }
}

fuzz_target!(|input: Input<'_>| {
    if let Some((template, params)) = resolve(input.path) {
        assert!(ROUTES.iter().any(|r| r.1 == template), "{template} is no route");
        assert_eq!(params.len(), template.matches('{').count(), "{template} {params:?}");
    }
    let pairs = input.query.split('&').filter(|kv| !kv.is_empty()).count();
    assert!(parse_query(input.query).len() <= pairs);
    round_trip::<ServiceSpec>(input.body);
    round_trip::<WeightsUpdate>(input.body);
    round_trip::<RegisterInstance>(input.body);
    round_trip::<StateChange>(input.body);
    round_trip::<SessionReport>(input.body);
    round_trip::<NewRelease>(input.body);
    round_trip::<ReleaseUpdate>(input.body);
    round_trip::<Control>(input.body);
});
