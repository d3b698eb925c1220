//! Object manifests: the ordered list of chunks an object is made of, plus the names they are
//! stored and addressed by (object keys, chunk hashes).
//!
//! A manifest is what `GET /v1/objects/{key}/manifest` returns and what a peer pulls; it is
//! stored as the same JSON, so the wire form and the stored form cannot drift apart.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The BLAKE3 hash of a chunk's uncompressed bytes: its identity in the store and on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes uncompressed chunk data.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

impl FromStr for ChunkHash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut out = [0u8; 32];
        // Lowercase only, so that one hash has exactly one spelling in URLs and logs.
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::InvalidHash(s.to_owned()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| Error::InvalidHash(s.to_owned()))?;
        Ok(ChunkHash(out))
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One chunk of an object, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: ChunkHash,
    /// Uncompressed length in bytes.
    pub len: u32,
}

/// What an object is made of.
///
/// `format` and `content_type` are format 2 (see [`crate::format`]): a build with the
/// `format-v1` feature neither writes nor reads them, exactly as the optimizers before them,
/// and ignores them in what a newer version wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Total length of the object in bytes.
    pub size: u64,
    /// The object's digest, hex (see [`Manifest::digest_of`]); also its ETag.
    pub digest: String,
    pub chunks: Vec<ChunkRef>,
    /// The format the manifest was written in; absent, so 1, in format 1.
    #[cfg_attr(not(feature = "format-v1"), serde(default = "format_1"))]
    #[cfg_attr(feature = "format-v1", serde(skip, default = "format_1"))]
    pub format: u32,
    /// The `Content-Type` the object was stored with (checked by [`content_type`]).
    #[cfg_attr(
        not(feature = "format-v1"),
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    #[cfg_attr(feature = "format-v1", serde(skip))]
    pub content_type: Option<String>,
}

fn format_1() -> u32 {
    1
}

/// The longest `Content-Type` an object is stored with.
pub const MAX_CONTENT_TYPE: usize = 256;

/// The `Content-Type` to store with an object: `None` when absent; refused when longer than
/// [`MAX_CONTENT_TYPE`] or not printable ASCII (it goes back into response headers).
pub fn content_type(value: Option<&[u8]>) -> Result<Option<String>> {
    let Some(v) = value else { return Ok(None) };
    if v.is_empty() || v.len() > MAX_CONTENT_TYPE || v.iter().any(|b| !(b' '..=b'~').contains(b)) {
        return Err(Error::InvalidContentType(format!(
            "{:?}: use 1..={MAX_CONTENT_TYPE} printable ASCII characters",
            String::from_utf8_lossy(&v[..v.len().min(64)])
        )));
    }
    Ok(Some(String::from_utf8_lossy(v).into_owned()))
}

/// Key-derivation context of object digests: a BLAKE3 mode of their own, so that an object
/// digest can never equal the plain BLAKE3 hash of some content.
const DIGEST_CONTEXT: &str = "haddock optimizer 2026-11 object digest v1";

impl Manifest {
    /// The manifest of an object made of `chunks`, in this build's format.
    pub fn new(chunks: Vec<ChunkRef>, content_type: Option<String>) -> Manifest {
        Manifest {
            size: chunks.iter().map(|c| u64::from(c.len)).sum(),
            digest: Manifest::digest_of(&chunks),
            chunks,
            format: crate::format::FORMAT,
            content_type,
        }
    }

    /// The digest of an object made of `chunks`: BLAKE3 (key-derivation mode) over every chunk's
    /// length and hash, in order — a hash list, like a Merkle root of one level. Each chunk
    /// hash is BLAKE3 of the chunk's bytes, so this pins the content down as surely as hashing
    /// the bytes again would, for 36 bytes hashed per chunk instead of a second BLAKE3 pass over
    /// every byte ingested (dropping that pass made ingesting stored data ~15 % faster).
    /// Objects stored by versions before 2026-11 keep the plain BLAKE3 digest they were given.
    pub fn digest_of(chunks: &[ChunkRef]) -> String {
        let mut h = blake3::Hasher::new_derive_key(DIGEST_CONTEXT);
        for c in chunks {
            h.update(&c.len.to_le_bytes());
            h.update(&c.hash.0);
        }
        h.finalize().to_hex().to_string()
    }

    /// The quoted strong ETag of the object.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.digest)
    }

    /// The pieces of chunks covering bytes `start..end` of the object, as
    /// `(chunk index, offset within the chunk, length)`.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<(usize, usize, usize)> {
        Self::pieces_of(&self.chunks, start, end)
    }

    /// `pieces` over a bare chunk list.
    pub fn pieces_of(chunks: &[ChunkRef], start: u64, end: u64) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            let c_end = pos + u64::from(c.len);
            if c_end > start && pos < end {
                let from = start.max(pos) - pos;
                let to = end.min(c_end) - pos;
                out.push((i, from as usize, (to - from) as usize));
            }
            if c_end >= end {
                break;
            }
            pos = c_end;
        }
        out
    }

    /// `pieces_of` bytes `start..end`, cut into groups of about `group_bytes` each: the unit in
    /// which a GET reads its object (one batched lookup per group).
    pub fn read_groups(
        chunks: &[ChunkRef],
        start: u64,
        end: u64,
        group_bytes: usize,
    ) -> Vec<Vec<(usize, usize, usize)>> {
        let mut groups: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new()];
        let mut in_group = 0;
        for piece in Self::pieces_of(chunks, start, end) {
            if in_group >= group_bytes {
                groups.push(Vec::new());
                in_group = 0;
            }
            in_group += piece.2;
            groups.last_mut().expect("never empty").push(piece);
        }
        groups
    }

    /// Checks a manifest received from a peer before anything of it is stored: every chunk
    /// length is within 1..=`max_chunk`, one hash always has one length, the lengths add up to
    /// the size, the size is within `max_size` (the limit of a PUT), and the digest is the one
    /// its chunk list derives. A peer is not trusted: a length longer than its chunk used to
    /// make GET panic, a shorter one silently truncated the object.
    pub fn validate(&self, max_chunk: u32, max_size: u64) -> Result<()> {
        let bad = |why: String| Err(Error::BadRequest(format!("manifest: {why}")));
        let mut sum = 0u64;
        let mut lens: std::collections::HashMap<ChunkHash, u32> = Default::default();
        for c in &self.chunks {
            if c.len == 0 || c.len > max_chunk {
                return bad(format!(
                    "chunk {} has length {}, outside 1..={max_chunk}",
                    c.hash, c.len
                ));
            }
            if *lens.entry(c.hash).or_insert(c.len) != c.len {
                return bad(format!("chunk {} listed with two lengths", c.hash));
            }
            sum = sum.saturating_add(u64::from(c.len));
        }
        if sum != self.size {
            return bad(format!(
                "chunk lengths add up to {sum}, not the size {}",
                self.size
            ));
        }
        if self.size > max_size {
            return Err(Error::TooLarge { limit: max_size });
        }
        if self.digest != Self::digest_of(&self.chunks) {
            return bad("the digest is not the one of its chunk list".into());
        }
        Ok(())
    }
}

/// Checks an object key. Keys are one path segment so that `/v1/objects/{key}/manifest` is
/// never ambiguous, and restricted to characters that need no percent-encoding.
pub fn validate_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidKey(key.to_owned()))
    }
}

/// A single byte range resolved against an object size: `start..end` (end exclusive).
/// Returns `Ok(None)` for headers we do not honour (multiple ranges, other units), which
/// RFC 9110 allows to be answered with the whole object.
///
/// Positions are digits only and saturate at `u64::MAX` (a client may write a last position
/// beyond any size, e.g. `bytes=0-18446744073709551615`); RFC 9110 §14.1.2: a last position
/// past the end means the end, a first position at or past the end is unsatisfiable (416).
pub fn parse_range(header: &str, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let unsatisfiable = || Error::RangeNotSatisfiable { size };
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        // Suffix range: the last n bytes.
        let n = position(b).ok_or_else(unsatisfiable)?;
        if n == 0 {
            return Err(unsatisfiable());
        }
        (size.saturating_sub(n), size)
    } else {
        let start = position(a).ok_or_else(unsatisfiable)?;
        let end = if b.is_empty() {
            size
        } else {
            let last = position(b).ok_or_else(unsatisfiable)?;
            if last < start {
                return Err(unsatisfiable());
            }
            last.saturating_add(1).min(size)
        };
        (start, end)
    };
    if range.0 >= size {
        return Err(unsatisfiable());
    }
    Ok(Some(range))
}

/// A byte position of a range: ASCII digits only (`u64::from_str` would also take `+5`),
/// saturating at `u64::MAX`, where any object ends anyway.
fn position(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_of_other_formats_are_read_and_their_unknown_fields_ignored() {
        let v1: Manifest = serde_json::from_str(r#"{"size":0,"digest":"d","chunks":[]}"#).unwrap();
        assert_eq!((v1.format, v1.content_type.as_deref()), (1, None));
        let later: Manifest = serde_json::from_str(
            r#"{"size":0,"digest":"d","chunks":[],"format":3,"content_type":"text/csv","tier":"cold"}"#,
        )
        .unwrap();
        assert_eq!(later.size, 0);
        if crate::format::FORMAT >= 2 {
            assert_eq!(
                (later.format, later.content_type.as_deref()),
                (3, Some("text/csv"))
            );
            let json = serde_json::to_value(Manifest::new(Vec::new(), Some("a/b".into()))).unwrap();
            assert_eq!(
                (json["format"].as_u64(), json["content_type"].as_str()),
                (Some(2), Some("a/b"))
            );
        } else {
            // Format 1 neither reads nor writes them: its manifests are those of before.
            assert_eq!((later.format, later.content_type.as_deref()), (1, None));
            let json =
                serde_json::to_string(&Manifest::new(Vec::new(), Some("a/b".into()))).unwrap();
            assert!(
                !json.contains("format") && !json.contains("content_type"),
                "{json}"
            );
        }
    }

    #[test]
    fn content_types_are_bounded_printable_ascii() {
        assert_eq!(content_type(None).unwrap(), None);
        assert_eq!(
            content_type(Some(b"text/plain; charset=utf-8"))
                .unwrap()
                .as_deref(),
            Some("text/plain; charset=utf-8")
        );
        for bad in [
            &b""[..],
            b"a\x01b",
            "é".as_bytes(),
            &[b'a'; MAX_CONTENT_TYPE + 1],
        ] {
            assert!(content_type(Some(bad)).is_err(), "{bad:?}");
        }
    }

    fn manifest(lens: &[u32]) -> Manifest {
        Manifest {
            size: lens.iter().map(|&l| u64::from(l)).sum(),
            digest: String::new(),
            chunks: lens
                .iter()
                .map(|&len| ChunkRef {
                    hash: ChunkHash::of(&len.to_le_bytes()),
                    len,
                })
                .collect(),
            format: crate::format::FORMAT,
            content_type: None,
        }
    }

    #[test]
    fn hash_round_trips_and_rejects_garbage() {
        let h = ChunkHash::of(b"hello");
        assert_eq!(h.to_string().parse::<ChunkHash>().unwrap(), h);
        assert!("abc".parse::<ChunkHash>().is_err());
        assert!(h.to_string().to_uppercase().parse::<ChunkHash>().is_err());
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<ChunkHash>(&json).unwrap(), h);
    }

    #[test]
    fn digest_covers_every_hash_length_and_the_order() {
        let m = manifest(&[10, 20, 30]);
        let d = Manifest::digest_of(&m.chunks);
        assert_eq!(d.len(), 64);
        assert_eq!(d, Manifest::digest_of(&m.chunks.clone()), "deterministic");
        let mut swapped = m.chunks.clone();
        swapped.swap(0, 1);
        let mut longer = m.chunks.clone();
        longer[2].len += 1;
        let mut other = m.chunks.clone();
        other[1].hash = ChunkHash::of(b"other");
        for changed in [&swapped[..], &longer[..], &other[..], &m.chunks[..2], &[]] {
            assert_ne!(Manifest::digest_of(changed), d);
        }
        // Not the plain hash of anything the chunk list spells out.
        let mut bytes = Vec::new();
        for c in &m.chunks {
            bytes.extend_from_slice(&c.len.to_le_bytes());
            bytes.extend_from_slice(&c.hash.0);
        }
        assert_ne!(blake3::hash(&bytes).to_hex().to_string(), d);
    }

    #[test]
    fn keys() {
        for good in ["a", "release-1.2_x", &"k".repeat(256)] {
            validate_key(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"k".repeat(257)] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pieces_cover_ranges() {
        let m = manifest(&[10, 10, 10]);
        assert_eq!(m.pieces(0, 30), vec![(0, 0, 10), (1, 0, 10), (2, 0, 10)]);
        assert_eq!(m.pieces(5, 15), vec![(0, 5, 5), (1, 0, 5)]);
        assert_eq!(m.pieces(10, 20), vec![(1, 0, 10)]);
        assert_eq!(m.pieces(29, 30), vec![(2, 9, 1)]);
        let mut checked = m.clone();
        checked.digest = Manifest::digest_of(&checked.chunks);
        checked.validate(10, 30).unwrap();
        let groups = Manifest::read_groups(&m.chunks, 5, 30, 15);
        assert_eq!(groups, vec![vec![(0, 5, 5), (1, 0, 10)], vec![(2, 0, 10)]]);
        assert_eq!(Manifest::read_groups(&m.chunks, 0, 0, 15), vec![vec![]]);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), Some((50, 100)));
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range("items=1-2", 100).unwrap(), None);
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=5-1", 100).is_err());
        assert!(parse_range("bytes=x-1", 100).is_err());
    }

    #[test]
    fn huge_range_ends_clamp_and_never_wrap() {
        let max = u64::MAX.to_string();
        assert_eq!(
            parse_range(&format!("bytes=0-{max}"), 100).unwrap(),
            Some((0, 100))
        );
        assert_eq!(
            parse_range(&format!("bytes=5-{max}"), 100).unwrap(),
            Some((5, 100))
        );
        // Past u64 itself: still the end of the object.
        assert_eq!(
            parse_range("bytes=5-99999999999999999999999", 100).unwrap(),
            Some((5, 100))
        );
        assert_eq!(
            parse_range(&format!("bytes=-{max}"), 100).unwrap(),
            Some((0, 100))
        );
        assert_eq!(
            parse_range(&format!("bytes={max}-{max}"), 100)
                .unwrap_err()
                .status(),
            http::StatusCode::RANGE_NOT_SATISFIABLE
        );
        assert_eq!(parse_range("bytes=0-0", u64::MAX).unwrap(), Some((0, 1)));
        for bad in [
            "bytes=+5-9",
            "bytes=5-+9",
            "bytes=-+3",
            "bytes=0-",
            "bytes=-1",
        ] {
            // Sign characters are not digits; anything on an empty object is unsatisfiable.
            let size = if bad.ends_with('-') || bad.ends_with("-1") {
                0
            } else {
                100
            };
            assert!(parse_range(bad, size).is_err(), "{bad}");
        }
    }

    #[test]
    fn peer_manifests_are_checked() {
        let good = {
            let mut m = manifest(&[10, 20]);
            m.digest = Manifest::digest_of(&m.chunks);
            m
        };
        good.validate(20, 30).unwrap();
        let lie = |f: &dyn Fn(&mut Manifest)| {
            let mut m = good.clone();
            f(&mut m);
            m.validate(20, 1000)
        };
        let longer = lie(&|m| {
            m.chunks[0].len = 11;
            m.size = 31;
            m.digest = Manifest::digest_of(&m.chunks);
        });
        assert!(
            longer.is_ok(),
            "lengths alone cannot tell; fetching checks each chunk"
        );
        type Lie = Box<dyn Fn(&mut Manifest)>;
        let lies: Vec<(&str, Lie)> = vec![
            (
                "zero length",
                Box::new(|m| {
                    m.chunks.push(ChunkRef {
                        hash: ChunkHash::of(b"z"),
                        len: 0,
                    });
                    m.digest = Manifest::digest_of(&m.chunks);
                }),
            ),
            (
                "over max chunk",
                Box::new(|m| {
                    m.chunks[1].len = 21;
                    m.size = 31;
                    m.digest = Manifest::digest_of(&m.chunks);
                }),
            ),
            ("sum differs", Box::new(|m| m.size = 29)),
            ("digest differs", Box::new(|m| m.digest = "00".repeat(32))),
            (
                "one hash, two lengths",
                Box::new(|m| {
                    let first = m.chunks[0].clone();
                    m.chunks.push(ChunkRef { len: 5, ..first });
                    m.size += 5;
                    m.digest = Manifest::digest_of(&m.chunks);
                }),
            ),
        ];
        for (what, f) in &lies {
            assert!(lie(f.as_ref()).is_err(), "{what}");
        }
        assert_eq!(good.validate(20, 29).unwrap_err().code(), "body_too_large");
    }
}
