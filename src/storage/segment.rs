//! Segment file names and the segment header.
//!
//! Contract: pure encoding and decoding; no I/O, any thread. A segment file is named by the
//! position of its first byte (see [`crate::storage::format`]), in hex, so names sort in log
//! order. Faults handled: a header block that is zero, cut short, foreign or fails its checksum
//! is reported as a [`HeaderFault`]; what to do about it is recovery's decision.
//!
//! The header fills block 0 of every segment (the rest of the block is zero):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `WEIRJRNL` |
//! | 8..12 | format version (1) |
//! | 12..16 | shard id |
//! | 16..20 | segment number |
//! | 20..24 | flags (bit 0: reclaimed, the records were all settled and the data dropped) |
//! | 24..32 | segment size in bytes at creation |
//! | 32..40 | end of the previous segment's log (offset in it), `u64::MAX` for the first segment |
//! | 40..48 | sequence number of this segment's first commit |
//! | 48..52 | crc32 of bytes 0..48 |

use std::fmt;

use crate::storage::format::BLOCK_BYTES;
use crate::storage::format::{Position, FLAG_RECLAIMED, HEADER_BYTES, SEGMENT_MAGIC};

/// Name of the journal's disk reserve (`journal::reserve`): not a segment; recovery passes it
/// over without reporting it.
pub const RESERVE_FILE_NAME: &str = "reserve";

/// The file name of segment `number`: the hex position of its first byte.
pub fn segment_file_name(number: u32) -> String {
    format!("{:016x}.seg", Position::new(number, 0).0)
}

/// The segment number a file name denotes, if it is a segment name.
pub fn parse_segment_file_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let pos = Position(u64::from_str_radix(hex, 16).ok()?);
    (pos.offset() == 0).then_some(pos.segment())
}

/// The header of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// On-disk format version.
    pub version: u32,
    /// Owning shard.
    pub shard_id: u32,
    /// Segment number (its name says the same).
    pub number: u32,
    /// Flags (`FLAG_RECLAIMED`).
    pub flags: u32,
    /// Size the file was created with.
    pub segment_size: u64,
    /// Where the previous segment's log ends: the seal that makes every byte before it in that
    /// segment part of the log, and every byte after it garbage of an abandoned commit.
    pub prev_end: u64,
    /// Sequence number of the first commit of this segment.
    pub first_commit_seq: u64,
}

/// Why a header block was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderFault {
    /// Every byte of the header block is zero: the segment was created but its header never
    /// became durable.
    Zero,
    /// Fewer bytes than a header: the file was cut.
    Short(usize),
    /// Something else than our magic.
    Foreign([u8; 8]),
    /// Our magic but a checksum mismatch.
    Checksum { stored: u32, computed: u32 },
}

impl fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderFault::Zero => write!(f, "header block is all zeros"),
            HeaderFault::Short(n) => write!(f, "file holds {n} bytes, fewer than a header"),
            HeaderFault::Foreign(m) => write!(f, "magic {m:02x?} is not {SEGMENT_MAGIC:02x?}"),
            HeaderFault::Checksum { stored, computed } => write!(
                f,
                "header checksum {stored:#010x} does not match its contents ({computed:#010x})"
            ),
        }
    }
}

impl SegmentHeader {
    /// Encodes into the start of a zeroed header block.
    pub fn encode(&self, block: &mut [u8]) {
        assert!(block.len() >= HEADER_BYTES);
        block[0..8].copy_from_slice(&SEGMENT_MAGIC);
        block[8..12].copy_from_slice(&self.version.to_le_bytes());
        block[12..16].copy_from_slice(&self.shard_id.to_le_bytes());
        block[16..20].copy_from_slice(&self.number.to_le_bytes());
        block[20..24].copy_from_slice(&self.flags.to_le_bytes());
        block[24..32].copy_from_slice(&self.segment_size.to_le_bytes());
        block[32..40].copy_from_slice(&self.prev_end.to_le_bytes());
        block[40..48].copy_from_slice(&self.first_commit_seq.to_le_bytes());
        let crc = crc32fast::hash(&block[0..48]);
        block[48..52].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a header block, or says why it is not one.
    pub fn decode(block: &[u8]) -> Result<SegmentHeader, HeaderFault> {
        if block.len() < HEADER_BYTES {
            if block.iter().all(|&b| b == 0) {
                return Err(HeaderFault::Zero);
            }
            return Err(HeaderFault::Short(block.len()));
        }
        if block.iter().take(BLOCK_BYTES).all(|&b| b == 0) {
            return Err(HeaderFault::Zero);
        }
        let magic: [u8; 8] = block[0..8].try_into().expect("8 bytes");
        if magic != SEGMENT_MAGIC {
            return Err(HeaderFault::Foreign(magic));
        }
        let u32_at = |i: usize| u32::from_le_bytes(block[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(block[i..i + 8].try_into().expect("8 bytes"));
        let stored = u32_at(48);
        let computed = crc32fast::hash(&block[0..48]);
        if stored != computed {
            return Err(HeaderFault::Checksum { stored, computed });
        }
        Ok(SegmentHeader {
            version: u32_at(8),
            shard_id: u32_at(12),
            number: u32_at(16),
            flags: u32_at(20),
            segment_size: u64_at(24),
            prev_end: u64_at(32),
            first_commit_seq: u64_at(40),
        })
    }

    /// Whether the segment was reclaimed.
    pub fn reclaimed(&self) -> bool {
        self.flags & FLAG_RECLAIMED != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::format::{FORMAT_VERSION, SEGMENT_NUMBER_MAX};

    #[test]
    fn names_round_trip_and_sort_in_log_order() {
        for n in [0, 1, 15, 16, 4095, SEGMENT_NUMBER_MAX] {
            assert_eq!(parse_segment_file_name(&segment_file_name(n)), Some(n));
        }
        assert!(segment_file_name(9) < segment_file_name(10));
        assert_eq!(parse_segment_file_name("0000010000000001.seg"), None);
        assert_eq!(parse_segment_file_name("notes.txt"), None);
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = SegmentHeader {
            version: FORMAT_VERSION,
            shard_id: 3,
            number: 7,
            flags: 0,
            segment_size: 1 << 20,
            prev_end: 12288,
            first_commit_seq: 99,
        };
        let mut block = vec![0u8; BLOCK_BYTES];
        h.encode(&mut block);
        assert_eq!(SegmentHeader::decode(&block), Ok(h));
        block[17] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&block),
            Err(HeaderFault::Checksum { .. })
        ));
        assert_eq!(
            SegmentHeader::decode(&[0u8; BLOCK_BYTES]),
            Err(HeaderFault::Zero)
        );
        assert!(matches!(
            SegmentHeader::decode(
                b"PK\x03\x04 not a segment at all, but long enough to be one......"
            ),
            Err(HeaderFault::Foreign(_))
        ));
    }
}
