//! The one error type of the storage layer.
//!
//! Contract: every failure a caller can see is one of these variants, each with a sentence that
//! names the file, offset or limit involved. Failures that many waiters share (a failed commit)
//! are carried as text so they can be handed to each of them.

use std::io;

use crate::storage::format::Position;

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A configured limit is invalid or violates a relation with another one.
    #[error("invalid storage limit `{key}`: {reason}")]
    Limit {
        /// The offending key.
        key: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The record does not fit in `record_bytes_max`.
    #[error("record of {bytes} bytes exceeds record_bytes_max ({max})")]
    RecordTooLarge {
        /// Size of the record, header included.
        bytes: usize,
        /// The limit.
        max: u32,
    },
    /// The staging area of the next commit is full: wait with `Journal::wait_for_room`.
    #[error("journal backpressure: {staged} bytes already wait for the next commit (staged_bytes_max {max})")]
    Backpressure {
        /// Bytes staged.
        staged: u64,
        /// The limit.
        max: u64,
    },
    /// The disk is full. Nothing committed is lost; appends are refused until space returns
    /// (`Journal::reclaim` or `Journal::resume_after_no_space`).
    #[error("out of disk space: {0}")]
    NoSpace(String),
    /// The record's commit did not happen because an earlier commit failed; the record is not in
    /// the journal and never will be.
    #[error("commit abandoned: {0}")]
    Abandoned(String),
    /// An I/O error while opening or recovering.
    #[error("{op} {file}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        file: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A write or fdatasync failed: what is on the disk is unknown, so the journal refuses all
    /// further work until the shard restarts and recovers.
    #[error("journal stopped after an I/O failure (restart the shard to recover): {0}")]
    Failed(String),
    /// Recovery found damage that is not a torn tail: the shard must not start.
    #[error("journal corrupt: {file} at offset {offset}: {found}")]
    Corrupt {
        /// The segment file.
        file: String,
        /// Byte offset inside that file.
        offset: u64,
        /// What was found there.
        found: String,
    },
    /// Recovery found a segment file it must not use (foreign or damaged header, wrong shard,
    /// gap in segment numbers, unknown version).
    #[error("journal segment {file}: {problem}")]
    Segment {
        /// The file.
        file: String,
        /// The problem.
        problem: String,
    },
    /// No readable record at this position.
    #[error("no record at {position}: {why}")]
    NotFound {
        /// The position asked for.
        position: Position,
        /// Why.
        why: String,
    },
    /// The operation is not allowed on this segment now (reclaiming the segment being written).
    #[error("segment {segment}: {why}")]
    InUse {
        /// The segment number.
        segment: u32,
        /// Why.
        why: String,
    },
    /// The journal was closed.
    #[error("journal is closed")]
    Closed,
}

impl StorageError {
    /// An I/O error with the operation and file named.
    pub fn io(op: &'static str, file: impl Into<String>, source: io::Error) -> Self {
        StorageError::Io {
            op,
            file: file.into(),
            source,
        }
    }
}

/// Whether an I/O error means "the disk is full".
pub fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}
