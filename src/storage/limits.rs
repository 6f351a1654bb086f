//! Every bound of the storage layer, in one place, each with its reason.
//!
//! Contract: plain values, any thread, checked once by [`StorageLimits::check`] when a journal
//! opens; a violated relation is reported with the offending key, never discovered later as a
//! failed write. The facts of the format the limits are checked against (block size, record and
//! commit record sizes, the largest segment a position addresses) live in
//! [`crate::storage::format`].

use crate::storage::error::StorageError;
use crate::storage::format::BLOCK_BYTES;
use crate::storage::format::{COMMIT_RECORD_BYTES, RECORD_HEADER_BYTES, SEGMENT_OFFSET_MAX};

/// Bounds of one journal. Relations between them are asserted by [`StorageLimits::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageLimits {
    /// Size of one segment file, preallocated at creation. Bounds the unit of reclaim (a segment
    /// is deleted whole), the scan of the last segment at recovery, and how much one slow message
    /// can pin before compaction moves it.
    pub segment_size_bytes_max: u64,
    /// Largest record, header included. A record never spans segments or commit chunks, so this
    /// bounds the staging buffer a record needs and the read a lookup issues.
    pub record_bytes_max: u32,
    /// Largest single write of a commit (one chunk). Bounds the DMA buffer of a chunk and the time
    /// one write holds the disk: about 0.5 ms at this disk's ~2 GiB/s for 1 MiB writes, which is
    /// where its bandwidth saturates (shared/notes/platform.md §3a).
    pub commit_bytes_max: u32,
    /// Bytes that may wait for the next commit while one is in flight. Beyond it `append` refuses
    /// with backpressure: this is the byte bound on the group-commit window and on staging memory.
    /// Staging buffers are DMA buffers: an executor whose DMA pool (`rt` io_memory) holds less
    /// than twice this (the staged batch and the one in flight) falls back to heap-allocated
    /// aligned buffers, which is correct but costs page faults.
    pub staged_bytes_max: u64,
    /// Size of the sequential reads of recovery. Larger reads reach the disk's bandwidth; it must
    /// hold a whole commit chunk so that a chunk is validated from one buffer.
    pub read_window_bytes: u32,
    /// Disk kept back for the records that free disk (`reserve`, a preallocated file in the
    /// journal's directory; 0: none). On a full disk, message records are refused but settle and
    /// control records (acks, nacks, purges, deletes, reclaim's restatement of the catalog) may
    /// spend it to create the segment they need: without it a full disk refuses the very acks
    /// and restatement that reclaim needs, and the broker stays full. At least one segment (a
    /// segment is created whole); the default is two: one for the restatement and a burst of
    /// settle records, one more while reclaim catches up.
    pub reserve_bytes: u64,
}

impl StorageLimits {
    /// Defaults sized for this class of machine: 1 MiB writes saturate the disk, 64 MiB segments
    /// keep a last-segment scan under ~50 ms.
    pub const DEFAULT: StorageLimits = StorageLimits {
        segment_size_bytes_max: 64 << 20,
        record_bytes_max: (1 << 20) - BLOCK_BYTES as u32,
        commit_bytes_max: 1 << 20,
        staged_bytes_max: 8 << 20,
        read_window_bytes: 2 << 20,
        reserve_bytes: 2 * (64 << 20),
    };

    /// Checks every relation; the error names the offending key and why.
    pub fn check(&self) -> Result<(), StorageError> {
        let block = BLOCK_BYTES as u64;
        let bad = |key: &'static str, reason: String| Err(StorageError::Limit { key, reason });
        if !(self.commit_bytes_max as u64).is_multiple_of(block) || self.commit_bytes_max == 0 {
            return bad(
                "commit_bytes_max",
                format!(
                    "{} is not a positive multiple of {block}",
                    self.commit_bytes_max
                ),
            );
        }
        let chunk_need =
            self.record_bytes_max as u64 + COMMIT_RECORD_BYTES as u64 + RECORD_HEADER_BYTES as u64;
        if (self.record_bytes_max as usize) < RECORD_HEADER_BYTES + 1
            || chunk_need > self.commit_bytes_max as u64
        {
            return bad(
                "record_bytes_max",
                format!(
                    "{} must leave room for the commit record inside one commit chunk \
                     (commit_bytes_max {})",
                    self.record_bytes_max, self.commit_bytes_max
                ),
            );
        }
        if !self.segment_size_bytes_max.is_multiple_of(block)
            || self.segment_size_bytes_max < block + self.commit_bytes_max as u64
        {
            return bad(
                "segment_size_bytes_max",
                format!(
                    "{} must be a multiple of {block} holding the header block and one full \
                     commit chunk (commit_bytes_max {})",
                    self.segment_size_bytes_max, self.commit_bytes_max
                ),
            );
        }
        if self.segment_size_bytes_max > SEGMENT_OFFSET_MAX {
            return bad(
                "segment_size_bytes_max",
                format!(
                    "{} exceeds the {} bytes a position can address inside a segment",
                    self.segment_size_bytes_max, SEGMENT_OFFSET_MAX
                ),
            );
        }
        if self.staged_bytes_max < self.commit_bytes_max as u64 {
            return bad(
                "staged_bytes_max",
                format!(
                    "{} is below commit_bytes_max {}: a full chunk could never be staged",
                    self.staged_bytes_max, self.commit_bytes_max
                ),
            );
        }
        if !(self.read_window_bytes as u64).is_multiple_of(block)
            || self.read_window_bytes < self.commit_bytes_max + BLOCK_BYTES as u32
        {
            return bad(
                "read_window_bytes",
                format!(
                    "{} must be a multiple of {block} holding a whole commit chunk plus a block \
                     (commit_bytes_max {})",
                    self.read_window_bytes, self.commit_bytes_max
                ),
            );
        }
        if self.reserve_bytes != 0
            && (self.reserve_bytes < self.segment_size_bytes_max
                || !self.reserve_bytes.is_multiple_of(block))
        {
            return bad(
                "reserve_bytes",
                format!(
                    "{} must be 0 or a multiple of {block} holding one whole segment \
                     (segment_size_bytes_max {}): a smaller reserve can never make room for one",
                    self.reserve_bytes, self.segment_size_bytes_max
                ),
            );
        }
        Ok(())
    }
}

impl Default for StorageLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a journal is opened with.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The shard that owns the journal; written in every segment header so that a directory
    /// handed to the wrong shard is refused instead of replayed.
    pub shard_id: u32,
    /// The bounds.
    pub limits: StorageLimits,
}
