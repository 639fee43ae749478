//! Record frames and segment headers: pure functions over bytes, shared by the writer, the
//! reader, recovery and the `quiver log` tools so that all four agree on one format.

/// `u32 len | u32 crc32c | u64 offset | i64 append_ms`, then `len` payload bytes. The top bit
/// of `len` says the payload is sealed (`[storage] encryption_key_file`); lengths are far
/// below it.
pub const FRAME_HEADER_BYTES: usize = 24;
/// `8 bytes magic | u64 base offset`.
pub const SEGMENT_HEADER_BYTES: usize = 16;
pub const SEGMENT_MAGIC: &[u8; 8] = b"QVRLOG01";
/// Largest payload one frame may carry. Ingest bodies are far smaller; the bound keeps a
/// corrupt length field from making recovery allocate gigabytes.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Set in a frame's length word when its payload is sealed.
const SEALED_FLAG: u32 = 1 << 31;
/// Largest record an append takes: what a frame holds, less what sealing may add.
pub const RECORD_BYTES_MAX: usize = FRAME_PAYLOAD_BYTES_MAX - quiver_fsutil::seal::OVERHEAD_BYTES;

/// What a sealed record is bound to: its partition and offset, so a sealed payload copied to
/// another place does not open (the CRC alone could be recomputed by whoever moved it).
pub fn seal_aad(partition: u32, offset: u64) -> [u8; 12] {
    let mut aad = [0u8; 12];
    aad[..4].copy_from_slice(&partition.to_le_bytes());
    aad[4..].copy_from_slice(&offset.to_le_bytes());
    aad
}

pub fn segment_header(base_offset: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..].copy_from_slice(&base_offset.to_le_bytes());
    h
}

pub fn parse_segment_header(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < SEGMENT_HEADER_BYTES || &bytes[..8] != SEGMENT_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(
        bytes[8..16].try_into().expect("8 bytes"),
    ))
}

/// The checksum covers the offset and time as well as the payload, so a frame copied to the
/// wrong place (or a stale frame left by a reused block) does not verify; for a sealed frame
/// it covers the flag too (a plain frame's checksum is what it always was).
fn checksum(offset: u64, append_ms: i64, sealed: bool, payload: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c(&offset.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &append_ms.to_le_bytes());
    if sealed {
        crc = crc32c::crc32c_append(crc, b"sealed");
    }
    crc32c::crc32c_append(crc, payload)
}

pub fn encode_frame(out: &mut Vec<u8>, offset: u64, append_ms: i64, sealed: bool, payload: &[u8]) {
    assert!(
        payload.len() <= FRAME_PAYLOAD_BYTES_MAX,
        "payload over FRAME_PAYLOAD_BYTES_MAX"
    );
    let len = payload.len() as u32 | if sealed { SEALED_FLAG } else { 0 };
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(offset, append_ms, sealed, payload).to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&append_ms.to_le_bytes());
    out.extend_from_slice(payload);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: usize,
    /// The payload is sealed (`quiver_fsutil::seal`, bound by [`seal_aad`]).
    pub sealed: bool,
    pub crc: u32,
    pub offset: u64,
    pub append_ms: i64,
}

impl FrameHeader {
    pub fn parse(bytes: &[u8; FRAME_HEADER_BYTES]) -> FrameHeader {
        let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4"));
        FrameHeader {
            len: (len & !SEALED_FLAG) as usize,
            sealed: len & SEALED_FLAG != 0,
            crc: u32::from_le_bytes(bytes[4..8].try_into().expect("4")),
            offset: u64::from_le_bytes(bytes[8..16].try_into().expect("8")),
            append_ms: i64::from_le_bytes(bytes[16..24].try_into().expect("8")),
        }
    }

    pub fn verify(&self, payload: &[u8]) -> bool {
        payload.len() == self.len
            && checksum(self.offset, self.append_ms, self.sealed, payload) == self.crc
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameProblem {
    /// The bytes end inside the frame: a torn write.
    Incomplete,
    /// Length over the bound, checksum mismatch, or an offset out of sequence.
    Corrupt(&'static str),
}

/// Checks the frame at the start of `bytes`, expected to carry `expected_offset`.
/// Returns the header and the frame's total length.
pub fn check_frame(
    bytes: &[u8],
    expected_offset: u64,
) -> Result<(FrameHeader, usize), FrameProblem> {
    let Some(head) = bytes.get(..FRAME_HEADER_BYTES) else {
        return Err(FrameProblem::Incomplete);
    };
    let header = FrameHeader::parse(head.try_into().expect("header bytes"));
    if header.len > FRAME_PAYLOAD_BYTES_MAX {
        return Err(FrameProblem::Corrupt("length over FRAME_PAYLOAD_BYTES_MAX"));
    }
    let total = FRAME_HEADER_BYTES + header.len;
    let Some(payload) = bytes.get(FRAME_HEADER_BYTES..total) else {
        return Err(FrameProblem::Incomplete);
    };
    if !header.verify(payload) {
        return Err(FrameProblem::Corrupt("checksum mismatch"));
    }
    if header.offset != expected_offset {
        return Err(FrameProblem::Corrupt("offset out of sequence"));
    }
    Ok((header, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frames_round_trip(offset in any::<u64>(), ms in any::<i64>(), sealed in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = Vec::new();
            encode_frame(&mut buf, offset, ms, sealed, &payload);
            let (h, total) = check_frame(&buf, offset).unwrap();
            prop_assert_eq!(total, buf.len());
            prop_assert_eq!((h.offset, h.append_ms, h.len, h.sealed), (offset, ms, payload.len(), sealed));
            for cut in 0..buf.len() {
                prop_assert_eq!(check_frame(&buf[..cut], offset).unwrap_err(), FrameProblem::Incomplete);
            }
        }

        #[test]
        fn any_flipped_bit_is_caught(payload in proptest::collection::vec(any::<u8>(), 1..64), sealed in any::<bool>(), bit in any::<proptest::sample::Index>()) {
            let mut buf = Vec::new();
            encode_frame(&mut buf, 7, 1, sealed, &payload);
            let bit = bit.index(buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(check_frame(&buf, 7).is_err());
        }
    }
}
