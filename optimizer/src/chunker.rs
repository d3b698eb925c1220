//! Content-defined chunking of a byte stream (FastCDC 2020) and the stored form of a chunk.
//!
//! The stream arrives in arbitrary frames; `Chunker` buffers them and emits a chunk as soon as
//! its cut point can no longer change. A FastCDC cut only depends on the bytes between the
//! chunk start and `max` bytes later, so once `max` bytes past a chunk's start are buffered its
//! boundary is final: the output is identical to chunking the whole object at once.

use bytes::Bytes;
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

/// Incremental content-defined chunker. Chunks are handed out as slices of its one buffer,
/// which is reused for the whole stream: no allocation or copy per chunk.
pub struct Chunker {
    params: ChunkParams,
    buf: Vec<u8>,
    /// Re-scanning the buffer costs up to `max` bytes per scan; scanning only when this much is
    /// buffered keeps that overhead small.
    scan_at: usize,
}

impl Chunker {
    pub fn new(params: ChunkParams) -> Self {
        let scan_at = (params.max as usize * 4).max(1 << 20);
        Chunker {
            params,
            buf: Vec::with_capacity(scan_at * 2),
            scan_at,
        }
    }

    /// Adds bytes; calls `each` with every chunk whose boundary is final, in order.
    pub fn push(&mut self, data: &[u8], each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.scan_at {
            self.cut(false, each)?;
        }
        Ok(())
    }

    /// Ends the stream: calls `each` with the remaining chunks.
    pub fn finish(mut self, each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.cut(true, each)
    }

    fn cut(&mut self, eof: bool, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let ChunkParams { min, avg, max } = self.params;
        let len = self.buf.len();
        let mut consumed = 0;
        for c in FastCDC::new(&self.buf, min, avg, max) {
            // Without `max` bytes after its start, a cut could still move: wait for more.
            if !eof && len - c.offset < max as usize {
                break;
            }
            each(&self.buf[c.offset..c.offset + c.length])?;
            consumed = c.offset + c.length;
        }
        // Keeps the allocation; moves the uncut tail (less than `max` bytes) to the front.
        self.buf.drain(..consumed);
        Ok(())
    }
}

/// Every chunk of `data` as owned buffers (tests and the benchmark's dedup comparison).
pub fn chunks_of(data: &[u8], params: ChunkParams) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut c = Chunker::new(params);
    let mut keep = |chunk: &[u8]| {
        out.push(Bytes::copy_from_slice(chunk));
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
    // One buffer, compressed in place after the flag and lz4's size prefix: no second copy.
    let mut out = vec![0u8; 5 + lz4_flex::block::get_maximum_output_size(data.len())];
    out[1..5].copy_from_slice(&(data.len() as u32).to_le_bytes());
    match lz4_flex::block::compress_into(data, &mut out[5..]) {
        Ok(n) if 4 + n < data.len() => {
            out[0] = LZ4;
            out.truncate(5 + n);
        }
        _ => {
            out.clear();
            out.push(RAW);
            out.extend_from_slice(data);
        }
    }
    out
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
        let mut keep = |chunk: &[u8]| {
            out.push(Bytes::copy_from_slice(chunk));
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
