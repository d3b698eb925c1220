//! A chunk in stored form as a peer or a client uploads it (`check_upload`, the chunk codec).
//!
//! Properties: decoding never panics nor allocates past the largest chunk; whatever decodes
//! re-encodes to something that decodes to the same bytes; an upload is accepted only under
//! the hash of the bytes it decodes to.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optimizer::chunker;
use optimizer::manifest::ChunkHash;
use optimizer::store::check_upload;

fuzz_target!(|stored: &[u8]| {
    let Ok(data) = chunker::decode_unverified(stored) else {
        // Undecodable: an upload of it must be refused too, under any hash.
        assert!(check_upload(&ChunkHash([0; 32]), stored).is_err());
        return;
    };
    let again = chunker::decode_unverified(&chunker::encode(&data)).expect("own encoding decodes");
    assert_eq!(again, data);
    let hash = ChunkHash::of(&data);
    assert_eq!(
        check_upload(&hash, stored).expect("right hash accepted"),
        data
    );
    let mut wrong = hash;
    wrong.0[0] ^= 1;
    assert!(check_upload(&wrong, stored).is_err());
});
