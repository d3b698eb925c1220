//! What an anonymous client controls in a locator request before authentication and after it:
//! the path (route + parameters), the query string, and the JSON body of each write route.
//!
//! Properties: nothing panics; a resolved path names a known route template with one
//! parameter per `{…}` in it, and the same values sent fully percent-encoded resolve the same;
//! every query pair decodes the same when re-encoded; every accepted body re-encodes to JSON that decodes to itself.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use locator::api::{
    Control, NewRelease, RegisterInstance, ReleaseUpdate, ServiceSpec, SessionReport, StateChange,
    WeightsUpdate,
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

/// Every byte as `%XX`: the path a client would send for these parameters.
fn encoded(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

fuzz_target!(|input: Input<'_>| {
    if let Some((template, params)) = resolve(input.path) {
        assert!(
            ROUTES.iter().any(|r| r.1 == template),
            "{template} is no route"
        );
        assert_eq!(
            params.len(),
            template.matches('{').count(),
            "{template} {params:?}"
        );
        // The same parameters sent fully encoded name the same route with the same values:
        // decoding is exact, and an escape can never turn into a path separator or literal.
        let mut values = params.iter();
        let rebuilt: Vec<String> = template
            .split('/')
            .map(|seg| match seg.starts_with('{') {
                true => encoded(values.next().unwrap()),
                false => seg.to_string(),
            })
            .collect();
        assert_eq!(resolve(&rebuilt.join("/")), Some((template, params)));
    }
    // Query values decode exactly the same way.
    for (k, v) in parse_query(input.query) {
        let again = parse_query(&format!("{}={}", encoded(&k), encoded(&v)));
        assert_eq!(again.into_iter().collect::<Vec<_>>(), vec![(k, v)]);
    }
    round_trip::<ServiceSpec>(input.body);
    round_trip::<WeightsUpdate>(input.body);
    round_trip::<RegisterInstance>(input.body);
    round_trip::<StateChange>(input.body);
    round_trip::<SessionReport>(input.body);
    round_trip::<NewRelease>(input.body);
    round_trip::<ReleaseUpdate>(input.body);
    round_trip::<Control>(input.body);
});
