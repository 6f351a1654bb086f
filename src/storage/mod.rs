//! The journal: a shard's durable, append-only log of records, kept in segment files.
//!
//! Contract: everything here runs on the one shard thread that owns the journal (`Rc`,
//! `RefCell`, no locks). It owns the journal directory of that shard: its segment files, the
//! staging buffers of the next commit and the durable watermark. It reaches the disk only through
//! the seam in [`io`] (a directory of segment files with aligned direct I/O), implemented by the
//! glommio DMA files of `crate::rt::fs` in the broker and by the crash-simulating [`fault`] layer in
//! tests, so the logic here is plain futures and never names a runtime.
//!
//! Faults handled: torn and partial writes at the tail (cut off at recovery), corruption anywhere
//! else (refused with the file, offset and finding), out of disk space (publishes refused, nothing
//! committed lost, work resumes once space returns), failed writes or fdatasync (the journal stops
//! taking work; the shard must restart and recover, because after a failed fdatasync nobody can
//! say what is on the disk).
//!
//! Modules, each importing only from the ones listed above it (no cycles):
//! - [`format`]: the facts of the on-disk format (block, sector, header and record sizes, the
//!   encoding of a [`Position`]); depends on nothing else here.
//! - [`io`]: the file seam.
//! - [`error`]: the one error enum of the storage layer.
//! - [`limits`]: every storage bound, with its reason and its relations checked in one place.
//! - [`record`]: the record framing (`length | crc32 | kind | body`) and the record bodies.
//! - [`segment`]: segment names and the segment header.
//! - [`fault`]: an in-memory directory that loses what was not synced, tears writes and runs out
//!   of space on command, for tests.
//! - [`recovery`]: the recovery decision table and the scan that applies it.
//! - [`journal`]: append, group commit, reads, reclaim and compaction.

pub mod error;
pub mod fault;
pub mod format;
pub mod io;
pub mod journal;
pub mod limits;
pub mod record;
pub mod recovery;
pub mod segment;

pub use error::StorageError;
pub use format::{Position, BLOCK_BYTES, SECTOR_BYTES};
pub use journal::{Appended, CommitId, Journal, ReadAheadStats, ReadRecord, SegmentInfo};
pub use limits::{JournalConfig, StorageLimits};
pub use record::{
    MessageEnvelope, ProducerStamp, RecordKind, RetryEntry, RetryRecord, SettleReason,
    SettleRecord, Target,
};
pub use recovery::{RecoveryReport, TailCut};
