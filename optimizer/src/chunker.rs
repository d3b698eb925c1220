//! Content-defined chunking of a byte stream (FastCDC 2020) and the stored form of a chunk.
//!
//! The stream arrives in arbitrary frames; `Chunker` buffers them and emits a chunk as soon as
//! its cut point can no longer change. A FastCDC cut only depends on the bytes between the
//! chunk start and `max` bytes later, so once `max` bytes past a chunk's start are buffered its
//! boundary is final: the output is identical to chunking the whole object at once.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::FastCDC;

use crate::error::{Error, Result};
use crate::manifest::ChunkHash;

/// Chunk size bounds in bytes (FastCDC requires `min <= avg <= max`; we also require even).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min: 4 * 1024,
            avg: 16 * 1024,
            max: 64 * 1024,
        }
    }
}

impl ChunkParams {
    /// Checks the bounds against FastCDC's limits before any data is chunked with them.
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ChunkParams { min, avg, max } = *self;
        let problem = if [min, avg, max].iter().any(|s| s % 2 != 0) {
            Some("chunk sizes must be even".to_owned())
        } else if !(min <= avg && avg <= max) {
            Some("chunk sizes must satisfy min <= avg <= max".to_owned())
        } else if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            || !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            || !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
        {
            Some(format!(
                "chunk sizes out of FastCDC's bounds: min {MINIMUM_MIN}..={MINIMUM_MAX}, \
                 avg {AVERAGE_MIN}..={AVERAGE_MAX}, max {MAXIMUM_MIN}..={MAXIMUM_MAX}"
            ))
        } else {
            None
        };
        match problem {
            Some(p) => Err(Error::BadRequest(format!("{p} (got {min}/{avg}/{max})"))),
            None => Ok(()),
        }
    }
}

/// Incremental content-defined chunker. Chunks are handed out as `Bytes` that share its
/// buffer: no allocation or copy per chunk, and a chunk can go to another thread as it is.
pub struct Chunker {
    params: ChunkParams,
    /// The bytes not cut yet. Cut chunks are split off its front and keep their part of the
    /// allocation alive, so a full buffer is replaced, not grown (see `push`).
    buf: BytesMut,
    /// Re-scanning the buffer costs up to `max` bytes per scan; scanning only when this much is
    /// buffered keeps that overhead small.
    scan_at: usize,
}

impl Chunker {
    pub fn new(params: ChunkParams) -> Self {
        let scan_at = (params.max as usize * 4).max(1 << 20);
        Chunker {
            params,
            buf: BytesMut::with_capacity(scan_at * 2),
            scan_at,
        }
    }

    /// Adds bytes; calls `each` with every chunk whose boundary is final, in order.
    pub fn push(&mut self, data: &[u8], mut each: impl FnMut(Bytes) -> Result<()>) -> Result<()> {
        if self.buf.capacity() - self.buf.len() < data.len() {
            // Out of room. Growing a buffer whose front is shared with chunks still in use
            // would copy it into a new allocation sized to fit only this frame. So what is
            // final is cut first, and a fresh buffer of the full size takes just the uncut
            // tail (less than `max` bytes): one such copy per `2 * scan_at` bytes. The old
            // buffer is freed with its last chunk.
            self.cut(false, &mut each)?;
            if self.buf.capacity() - self.buf.len() < data.len() {
                let mut fresh =
                    BytesMut::with_capacity((self.scan_at * 2).max(self.buf.len() + data.len()));
                fresh.extend_from_slice(&self.buf);
                self.buf = fresh;
            }
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.scan_at {
            self.cut(false, each)?;
        }
        Ok(())
    }

    /// Ends the stream: calls `each` with the remaining chunks.
    pub fn finish(mut self, each: impl FnMut(Bytes) -> Result<()>) -> Result<()> {
        self.cut(true, each)
    }

    fn cut(&mut self, eof: bool, mut each: impl FnMut(Bytes) -> Result<()>) -> Result<()> {
        let ChunkParams { min, avg, max } = self.params;
        let len = self.buf.len();
        // The cuts first: the chunks are then split off the buffer FastCDC reads.
        let cuts: Vec<usize> = FastCDC::new(&self.buf, min, avg, max)
            // Without `max` bytes after its start, a cut could still move: wait for more.
            .take_while(|c| eof || len - c.offset >= max as usize)
            .map(|c| c.length)
            .collect();
        for length in cuts {
            each(self.buf.split_to(length).freeze())?;
        }
        Ok(())
    }
}

/// Every chunk of `data` (tests and the benchmark's dedup comparison). The chunks share the
/// chunker's buffers: keeping one keeps its buffer, up to `2 * scan_at` bytes, alive.
pub fn chunks_of(data: &[u8], params: ChunkParams) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut c = Chunker::new(params);
    let mut keep = |chunk: Bytes| {
        out.push(chunk);
        Ok(())
    };
    // Collecting cannot fail.
    let _ = c.push(data, &mut keep);
    let _ = c.finish(&mut keep);
    out
}

/// Codec flag of a stored chunk: the first byte of its stored (and wire) form.
const RAW: u8 = 0;
const LZ4: u8 = 1;
/// Upper bound of a chunk's uncompressed size (FastCDC's largest `max`), so a hostile
/// length prefix cannot make us allocate gigabytes.
pub const MAX_CHUNK: usize = fastcdc::v2020::MAXIMUM_MAX as usize;

/// Encodes a chunk for storage: lz4 (length-prefixed) when that is smaller, else raw.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = encode_into(data, &mut out).len();
    out.truncate(len);
    out
}

/// Encodes a chunk into `buf` and returns its stored form, a prefix of `buf`. The buffer is
/// meant to be reused from chunk to chunk: it is grown (and zeroed) only when too small, so a
/// chunk costs no allocation and no zeroing (2.5 % of lz4's own time when each chunk had a
/// fresh zeroed buffer, measured on the benchmark's chunks).
pub fn encode_into<'a>(data: &[u8], buf: &'a mut Vec<u8>) -> &'a [u8] {
    // Compressed in place after the flag and lz4's size prefix: no second copy.
    let bound = 5 + lz4_flex::block::get_maximum_output_size(data.len());
    if buf.len() < bound {
        buf.resize(bound, 0);
    }
    buf[1..5].copy_from_slice(&(data.len() as u32).to_le_bytes());
    match lz4_flex::block::compress_into(data, &mut buf[5..bound]) {
        Ok(n) if 4 + n < data.len() => {
            buf[0] = LZ4;
            &buf[..5 + n]
        }
        // `bound` exceeds `1 + data.len()`, so the raw form fits too.
        _ => {
            buf[0] = RAW;
            buf[1..1 + data.len()].copy_from_slice(data);
            &buf[..1 + data.len()]
        }
    }
}

/// The uncompressed length a stored chunk decodes to, read from its header without decoding
/// (`None` if it has none). Trustworthy for stored chunks: every one was decoded and verified
/// when it was written.
pub fn decoded_len(stored: &[u8]) -> Option<usize> {
    match stored.split_first()? {
        (&RAW, rest) => Some(rest.len()),
        (&LZ4, rest) => Some(u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize),
        _ => None,
    }
}

/// Decodes a stored chunk without verifying it; the error says why it is undecodable.
pub fn decode_unverified(stored: &[u8]) -> std::result::Result<Bytes, String> {
    match stored.split_first() {
        // Bounded like the lz4 branch: a longer raw chunk could be uploaded, but no manifest
        // could ever list it (their lengths are checked against the same bound).
        Some((&RAW, rest)) if rest.len() > MAX_CHUNK => {
            Err("raw chunk longer than the largest chunk size".into())
        }
        Some((&RAW, rest)) => Ok(Bytes::copy_from_slice(rest)),
        Some((&LZ4, rest)) => {
            let (size, body) = rest.split_at_checked(4).ok_or("truncated lz4 header")?;
            let size = u32::from_le_bytes(size.try_into().expect("4 bytes")) as usize;
            if size > MAX_CHUNK {
                return Err("lz4 length prefix exceeds the largest chunk size".into());
            }
            // Into an uninitialised buffer of exactly `size` (zeroing it first showed as memset
            // in perf of a restore); longer output is an error, shorter is caught below.
            let buf = lz4_flex::block::decompress(body, size).map_err(|e| e.to_string())?;
            if buf.len() != size {
                return Err("lz4 data shorter than its length prefix".into());
            }
            Ok(buf.into())
        }
        Some((flag, _)) => Err(format!("unknown codec flag {flag}")),
        None => Err("empty".into()),
    }
}

/// Decodes a stored chunk and verifies it against `hash`. Any failure is `CorruptChunk`.
pub fn decode_verified(hash: &ChunkHash, stored: &[u8]) -> Result<Bytes> {
    let corrupt = |reason: String| Error::CorruptChunk {
        hash: hash.to_string(),
        reason,
    };
    let data = decode_unverified(stored).map_err(corrupt)?;
    if ChunkHash::of(&data) != *hash {
        return Err(corrupt("content does not match its hash".into()));
    }
    Ok(data)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_raw_chunk_longer_than_any_chunk_is_undecodable() {
        let mut stored = vec![RAW];
        stored.resize(1 + MAX_CHUNK, 7);
        assert_eq!(decode_unverified(&stored).unwrap().len(), MAX_CHUNK);
        stored.push(7);
        let err = decode_unverified(&stored).unwrap_err();
        assert!(err.contains("longer than the largest chunk"), "{err}");
    }

    /// Deterministic pseudo-random bytes (xorshift) so tests need no RNG crate.
    pub(crate) fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn chunk_in_frames(data: &[u8], frame: usize, params: ChunkParams) -> Vec<Bytes> {
        let mut c = Chunker::new(params);
        let mut out = Vec::new();
        let mut keep = |chunk: Bytes| {
            out.push(chunk);
            Ok(())
        };
        for f in data.chunks(frame) {
            c.push(f, &mut keep).unwrap();
        }
        c.finish(&mut keep).unwrap();
        out
    }

    #[test]
    fn streaming_equals_whole_buffer_chunking() {
        let data = noise(3 << 20, 7);
        let p = ChunkParams::default();
        let whole: Vec<usize> = FastCDC::new(&data, p.min, p.avg, p.max)
            .map(|c| c.length)
            .collect();
        for frame in [1000, 65_536, 1 << 20, 5 << 20] {
            let chunks = chunk_in_frames(&data, frame, p);
            let lens: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
            assert_eq!(lens, whole, "frame size {frame}");
            assert_eq!(chunks.concat(), data);
        }
    }

    /// A full buffer is replaced only after what is final was cut from it, so the fresh one
    /// starts from the uncut tail and is used to its end: 17 buffers for these 32 MiB. Copying
    /// the whole uncut content (up to `scan_at` bytes) into a fresh buffer before cutting, as
    /// this chunker first did, took 22.
    #[test]
    fn a_fresh_buffer_takes_only_the_uncut_tail() {
        let p = ChunkParams::default();
        let data = noise(32 << 20, 11);
        // Frames that do not divide the buffer, as a client's do not.
        let chunks = chunk_in_frames(&data, 60_000, p);
        assert_eq!(chunks.concat(), data);
        // Chunks cut from one buffer lie back to back in memory; a gap starts the next one.
        let buffers = 1 + chunks
            .windows(2)
            .filter(|w| w[0].as_ptr().wrapping_add(w[0].len()) != w[1].as_ptr())
            .count();
        // Each buffer but the last leaves unused less than a frame and hands on a tail under
        // `max`.
        let scan_at = Chunker::new(p).scan_at;
        let per_buffer = 2 * scan_at - 60_000 - p.max as usize;
        assert!(
            buffers <= data.len().div_ceil(per_buffer),
            "{buffers} buffers for {} MiB",
            data.len() >> 20
        );
    }

    #[test]
    fn sizes_respect_bounds() {
        let p = ChunkParams::default();
        let chunks = chunk_in_frames(&noise(2 << 20, 3), 4096, p);
        let (last, rest) = chunks.split_last().unwrap();
        assert!(rest
            .iter()
            .all(|c| c.len() >= p.min as usize && c.len() <= p.max as usize));
        assert!(last.len() <= p.max as usize);
        assert!(chunk_in_frames(&[], 10, p).is_empty());
    }

    #[test]
    fn a_reused_buffer_leaves_nothing_of_the_previous_chunk_in_the_next() {
        let mut buf = Vec::new();
        // Long then short, compressible then not: a stale tail or flag would show.
        let chunks = [
            b"abc".repeat(20_000),
            noise(60_000, 1),
            vec![7; 5_000],
            noise(4_100, 2),
        ];
        for (data, flag) in chunks.iter().zip([LZ4, RAW, LZ4, RAW]) {
            let stored = encode_into(data, &mut buf).to_vec();
            assert_eq!(stored[0], flag);
            assert_eq!(decoded_len(&stored), Some(data.len()));
            assert_eq!(decode_unverified(&stored).unwrap(), data[..]);
        }
    }

    #[test]
    fn params_validation() {
        ChunkParams::default().validate().unwrap();
        assert!(ChunkParams {
            min: 4097,
            avg: 16384,
            max: 65536
        }
        .validate()
        .is_err());
        assert!(ChunkParams {
            min: 65536,
            avg: 16384,
            max: 65536
        }
        .validate()
        .is_err());
        assert!(ChunkParams {
            min: 2,
            avg: 4,
            max: 8
        }
        .validate()
        .is_err());
    }

    #[test]
    fn codec_round_trip_and_corruption() {
        let compressible = b"abcabcabc".repeat(1000);
        let incompressible = noise(10_000, 1);
        for data in [&compressible[..], &incompressible[..]] {
            let h = ChunkHash::of(data);
            let stored = encode(data);
            assert_eq!(stored[0], if data == &compressible[..] { LZ4 } else { RAW });
            assert_eq!(&decode_verified(&h, &stored).unwrap()[..], data);
            let mut bad = stored.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0xff;
            let err = decode_verified(&h, &bad).unwrap_err();
            assert_eq!(err.code(), "corrupt_chunk");
        }
        let h = ChunkHash::of(b"");
        assert!(decode_verified(&h, &[LZ4, 0xff, 0xff, 0xff, 0x7f]).is_err());
        assert!(decode_verified(&h, &[9]).is_err());
        assert!(decode_verified(&h, &[]).is_err());
    }
}
