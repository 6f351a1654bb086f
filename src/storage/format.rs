//! The facts of the on-disk format: block and sector sizes, record and header sizes, and the
//! encoding of a [`Position`].
//!
//! Contract: constants and pure arithmetic, no I/O, usable from any thread. This module depends
//! on nothing else in `storage`, so that every other storage module (limits, error, segment,
//! record, recovery, journal, fault) can name the format without importing each other. Changing
//! any value here changes what is on the disk: it needs a new [`FORMAT_VERSION`].
//!
//! A position is `segment number << 40 | offset`, so positions grow with append order across
//! segments and decode without a lookup.

use std::fmt;

/// The unit of every write, read and file offset the journal issues. The disk's physical block
/// is 4096 bytes (its logical block is 512), so 4 KiB writes never make the device read-modify-write
/// and are valid O_DIRECT I/O on either.
pub const BLOCK_BYTES: usize = 4096;

/// The unit a torn write is assumed to respect: after a crash each 512-byte sector holds either
/// its old or its new contents. Only the segment-header rewrite of reclaim relies on it (the header
/// fits in the first sector); the log itself never rewrites a durable byte.
pub const SECTOR_BYTES: usize = 512;

/// `v` rounded up to the next block boundary: where the commit after bytes ending at `v` starts.
pub fn align_up_to_block(v: u64) -> u64 {
    let block = BLOCK_BYTES as u64;
    v.div_ceil(block) * block
}

/// Bytes of a record's `length u32 | crc32 u32 | kind u8` header.
pub const RECORD_HEADER_BYTES: usize = 9;
/// Bytes of a commit record's body.
pub const COMMIT_BODY_BYTES: usize = 24;
/// Bytes of a whole commit record, the one that opens every commit chunk.
pub const COMMIT_RECORD_BYTES: usize = RECORD_HEADER_BYTES + COMMIT_BODY_BYTES;

/// First bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WEIRJRNL";
/// The on-disk format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Segment header flag: the segment was reclaimed; its data is gone and must not be read.
pub const FLAG_RECLAIMED: u32 = 1;
/// Encoded size of the segment header fields (the header block is zero after them).
pub const HEADER_BYTES: usize = 52;
/// Offset of the first commit in a segment: the header owns block 0.
pub const FIRST_COMMIT_OFFSET: u64 = BLOCK_BYTES as u64;
/// `prev_end` of the first segment of a journal.
pub const NO_PREVIOUS: u64 = u64::MAX;

/// Bits of a position that address a byte inside a segment.
pub const SEGMENT_OFFSET_BITS: u32 = 40;
/// Largest segment a position can address.
pub const SEGMENT_OFFSET_MAX: u64 = 1 << SEGMENT_OFFSET_BITS;
/// Largest segment number (positions are 64 bits).
pub const SEGMENT_NUMBER_MAX: u32 = (1 << (64 - SEGMENT_OFFSET_BITS)) - 1;

// The segment header must fit in the first sector: reclaim rewrites it in place and relies on a
// torn write leaving either header whole.
const _: () = assert!(HEADER_BYTES <= SECTOR_BYTES && SECTOR_BYTES <= BLOCK_BYTES);

/// Where a record starts in the journal. Ordered like the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position(pub u64);

impl Position {
    /// The position of byte `offset` of segment `segment`.
    pub fn new(segment: u32, offset: u64) -> Position {
        assert!(
            segment <= SEGMENT_NUMBER_MAX,
            "segment number {segment} out of range"
        );
        assert!(
            offset < SEGMENT_OFFSET_MAX,
            "segment offset {offset} out of range"
        );
        Position(((segment as u64) << SEGMENT_OFFSET_BITS) | offset)
    }
    /// The segment number.
    pub fn segment(self) -> u32 {
        (self.0 >> SEGMENT_OFFSET_BITS) as u32
    }
    /// The byte offset inside the segment file.
    pub fn offset(self) -> u64 {
        self.0 & (SEGMENT_OFFSET_MAX - 1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment(), self.offset())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_order_like_the_log() {
        let p = Position::new(SEGMENT_NUMBER_MAX, SEGMENT_OFFSET_MAX - 1);
        assert_eq!(p.segment(), SEGMENT_NUMBER_MAX);
        assert_eq!(p.offset(), SEGMENT_OFFSET_MAX - 1);
        assert!(Position::new(1, 0) > Position::new(0, SEGMENT_OFFSET_MAX - 1));
        assert_eq!(Position::new(3, 4096).to_string(), "3:4096");
    }

    #[test]
    fn block_alignment_rounds_up_only_off_boundaries() {
        assert_eq!(align_up_to_block(0), 0);
        assert_eq!(align_up_to_block(1), BLOCK_BYTES as u64);
        assert_eq!(align_up_to_block(BLOCK_BYTES as u64), BLOCK_BYTES as u64);
        assert_eq!(
            align_up_to_block(BLOCK_BYTES as u64 + 1),
            2 * BLOCK_BYTES as u64
        );
    }
}
