//! Reading a durable record back by its position, through the read-ahead windows
//! (`read_ahead`), and relocation (the copy compaction makes).
//!
//! Contract: runs on the shard thread, concurrently with the committer; it only reads bytes
//! below a segment's durable end, which the committer never writes again, so it needs no
//! coordination beyond a look at the segment table. It owns the read-ahead windows (bounded in
//! bytes, dropped with their segment at reclaim) and the read buffer it hands back inside a
//! [`ReadRecord`].
//!
//! Faults handled: a position outside the durable log, in a reclaimed or unknown segment, or on
//! a commit record is `NotFound`; a length running past the durable end or a record failing its
//! checksum is `Corrupt` (checked after every read); a failed read is `Io`.

use std::rc::Rc;

use super::read_ahead::ReadAheadStats;
use super::{Appended, Journal};
use crate::storage::error::StorageError;
use crate::storage::format::{
    align_up_to_block, Position, BLOCK_BYTES, FIRST_COMMIT_OFFSET, RECORD_HEADER_BYTES,
};
use crate::storage::io::{SegmentDir, SegmentFile};
use crate::storage::record::{parse_record, RecordKind};
use crate::storage::segment::segment_file_name;

const BLOCK: u64 = BLOCK_BYTES as u64;

/// A record read back from a segment; the body is a view into the read buffer (a read-ahead
/// window's, shared: copy what outlives the record, so an evicted window's memory is freed).
pub struct ReadRecord<B> {
    buf: Rc<B>,
    body_start: usize,
    body_end: usize,
    /// The record's kind.
    pub kind: RecordKind,
}

impl<B: std::ops::Deref<Target = [u8]>> ReadRecord<B> {
    /// The record body (for a message: envelope and message bytes).
    pub fn body(&self) -> &[u8] {
        &self.buf[self.body_start..self.body_end]
    }
}

impl<D: SegmentDir + 'static> Journal<D> {
    /// Reads the durable record at `position`. With `len` (from [`Appended::len`]) one aligned
    /// direct read takes it, or none when a read-ahead window holds it; without, the record's
    /// header is looked for first. With read-ahead on (`set_read_ahead_bytes_max`), a read that
    /// misses takes a window from the record's block (never past the segment's durable end) and
    /// keeps it, so the records after it come from memory.
    pub async fn read(
        &self,
        position: Position,
        len: Option<u32>,
    ) -> Result<ReadRecord<<D::File as SegmentFile>::ReadBuf>, StorageError> {
        let not_found = |why: String| StorageError::NotFound { position, why };
        let (file, end) = {
            let st = self.inner.state.borrow();
            let seg = st
                .segments
                .get(&position.segment())
                .ok_or_else(|| not_found("no such segment".into()))?;
            if seg.reclaimed {
                return Err(not_found("segment was reclaimed".into()));
            }
            (seg.file.clone(), seg.end)
        };
        let off = position.offset();
        if off < FIRST_COMMIT_OFFSET || off + RECORD_HEADER_BYTES as u64 > end {
            return Err(not_found(format!(
                "not in the durable log (which ends at {end})"
            )));
        }
        let path = || {
            self.inner
                .dir
                .describe(&segment_file_name(position.segment()))
        };
        let want = len.map_or(RECORD_HEADER_BYTES as u64, |l| l as u64);
        let found = self
            .inner
            .read_ahead
            .borrow()
            .find(position.segment(), off, want);
        if let Some((buf, at)) = found {
            let record = self.record_in(position, buf, at, end, &path)?;
            if let Some(record) = record {
                self.inner.read_ahead.borrow_mut().count_record();
                return Ok(record);
            }
        }
        let start = off / BLOCK * BLOCK;
        let window = self.inner.read_ahead.borrow().window_bytes();
        let record_end = align_up_to_block(off + want);
        // A window's worth, never past the durable end (block-aligned), and at least the record.
        let read_end = record_end.max((start + window).min(end / BLOCK * BLOCK));
        let mut buf = Rc::new(
            self.read_blocks(&file, start, read_end - start, &path)
                .await?,
        );
        let at = (off - start) as usize;
        if buf.len() < at + RECORD_HEADER_BYTES {
            return Err(not_found(format!("file {} ends before it", path())));
        }
        let record = match self.record_in(position, buf.clone(), at, end, &path)? {
            Some(r) => r,
            None => {
                // The record runs past what was read (no length was given): read it whole.
                let body_len =
                    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as u64;
                let total = RECORD_HEADER_BYTES as u64 + body_len;
                let len = align_up_to_block(off + total) - start;
                buf = Rc::new(self.read_blocks(&file, start, len, &path).await?);
                self.record_in(position, buf.clone(), at, end, &path)?
                    .ok_or_else(|| not_found(format!("file {} ends before it", path())))?
            }
        };
        let mut ra = self.inner.read_ahead.borrow_mut();
        ra.count_record();
        // Only durable bytes are kept: a window never reaches past the end it was read below.
        if start + buf.len() as u64 <= end {
            ra.keep(position.segment(), start, buf);
        }
        Ok(record)
    }

    /// One aligned read of `len` bytes at `start`, counted.
    async fn read_blocks(
        &self,
        file: &<D as SegmentDir>::File,
        start: u64,
        len: u64,
        path: &impl Fn() -> String,
    ) -> Result<<D::File as SegmentFile>::ReadBuf, StorageError> {
        self.inner.read_ahead.borrow_mut().count_read();
        file.read_at(start, len as usize)
            .await
            .map_err(|e| StorageError::io("reading", path(), e))
    }

    /// The record at `at` in `buf` (read at the block of `position`), checked; `None` if `buf`
    /// ends before the record does.
    #[allow(clippy::type_complexity)]
    fn record_in(
        &self,
        position: Position,
        buf: Rc<<D::File as SegmentFile>::ReadBuf>,
        at: usize,
        end: u64,
        path: &impl Fn() -> String,
    ) -> Result<Option<ReadRecord<<D::File as SegmentFile>::ReadBuf>>, StorageError> {
        let off = position.offset();
        let body_len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as u64;
        let total = RECORD_HEADER_BYTES as u64 + body_len;
        if off + total > end {
            return Err(StorageError::Corrupt {
                file: path(),
                offset: off,
                found: format!(
                    "record length {body_len} runs past the durable end {end} (not a record start?)"
                ),
            });
        }
        if buf.len() < at + total as usize {
            return Ok(None);
        }
        // Check after read: the bytes must be the record that was written.
        let (kind, body_len) = match parse_record(&buf[at..], total as usize) {
            Ok(r) if r.kind != RecordKind::Commit => (r.kind, r.body.len()),
            Ok(_) => {
                return Err(StorageError::NotFound {
                    position,
                    why: "a commit record, not a broker record".into(),
                })
            }
            Err(f) => {
                return Err(StorageError::Corrupt {
                    file: path(),
                    offset: off,
                    found: f.to_string(),
                })
            }
        };
        Ok(Some(ReadRecord {
            buf,
            body_start: at + RECORD_HEADER_BYTES,
            body_end: at + RECORD_HEADER_BYTES + body_len,
            kind,
        }))
    }

    /// Sets the bytes of read-ahead windows this journal keeps (0, the default: none, every read
    /// takes just its record). The broker gives it `read_ahead_bytes_max`.
    pub fn set_read_ahead_bytes_max(&self, bytes_max: u64) {
        self.inner.read_ahead.borrow_mut().set_bytes_max(bytes_max);
    }

    /// Bytes of read-ahead windows kept now.
    pub fn read_ahead_bytes(&self) -> u64 {
        self.inner.read_ahead.borrow().bytes()
    }

    /// Reads by position so far: records handed back and the disk reads they took.
    pub fn read_back_stats(&self) -> ReadAheadStats {
        self.inner.read_ahead.borrow().stats()
    }

    /// Compaction: copies the record at `position` to the head of the log, unchanged, and
    /// returns where the copy is. Once the copy's commit is durable the broker points its index
    /// at the copy; the old segment can be reclaimed when nothing else in it is live. A message
    /// copy names the same queue sequence numbers, so recovery that meets both keeps one.
    pub async fn relocate(&self, position: Position) -> Result<Appended, StorageError> {
        let rec = self.read(position, None).await?;
        let body = rec.body();
        self.append_with(rec.kind, body.len(), |out| out.copy_from_slice(body))
    }
}
