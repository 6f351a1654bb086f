//! Reading a durable record back by its position, and relocation (the copy compaction makes).
//!
//! Contract: runs on the shard thread, concurrently with the committer; it only reads bytes
//! below a segment's durable end, which the committer never writes again, so it needs no
//! coordination beyond a look at the segment table. It owns nothing but the read buffer it hands
//! back inside a [`ReadRecord`].
//!
//! Faults handled: a position outside the durable log, in a reclaimed or unknown segment, or on
//! a commit record is `NotFound`; a length running past the durable end or a record failing its
//! checksum is `Corrupt` (checked after every read); a failed read is `Io`.

use super::{Appended, Journal};
use crate::storage::error::StorageError;
use crate::storage::format::{
    align_up_to_block, Position, BLOCK_BYTES, FIRST_COMMIT_OFFSET, RECORD_HEADER_BYTES,
};
use crate::storage::io::{SegmentDir, SegmentFile};
use crate::storage::record::{parse_record, RecordKind};
use crate::storage::segment::segment_file_name;

const BLOCK: u64 = BLOCK_BYTES as u64;

/// A record read back from a segment; the body is a view into the read buffer.
pub struct ReadRecord<B> {
    buf: B,
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
    /// Reads the durable record at `position`. With `len` (from [`Appended::len`]) it takes one
    /// aligned direct read; without, it reads the header's block first.
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
        let path = self
            .inner
            .dir
            .describe(&segment_file_name(position.segment()));
        let start = off / BLOCK * BLOCK;
        let want = len.map_or(RECORD_HEADER_BYTES as u64, |l| l as u64);
        let mut buf = file
            .read_at(start, (align_up_to_block(off + want) - start) as usize)
            .await
            .map_err(|e| StorageError::io("reading", &path, e))?;
        let at = (off - start) as usize;
        if buf.len() < at + RECORD_HEADER_BYTES {
            return Err(not_found(format!("file {path} ends before it")));
        }
        let body_len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as u64;
        let total = RECORD_HEADER_BYTES as u64 + body_len;
        if off + total > end {
            return Err(StorageError::Corrupt {
                file: path,
                offset: off,
                found: format!(
                    "record length {body_len} runs past the durable end {end} (not a record start?)"
                ),
            });
        }
        if buf.len() < at + total as usize {
            buf = file
                .read_at(start, (align_up_to_block(off + total) - start) as usize)
                .await
                .map_err(|e| StorageError::io("reading", &path, e))?;
        }
        // Check after read: the bytes must be the record that was written.
        let (kind, body_len) = match parse_record(&buf[at..], total as usize) {
            Ok(r) if r.kind != RecordKind::Commit => (r.kind, r.body.len()),
            Ok(_) => return Err(not_found("a commit record, not a broker record".into())),
            Err(f) => {
                return Err(StorageError::Corrupt {
                    file: path,
                    offset: off,
                    found: f.to_string(),
                })
            }
        };
        Ok(ReadRecord {
            buf,
            body_start: at + RECORD_HEADER_BYTES,
            body_end: at + RECORD_HEADER_BYTES + body_len,
            kind,
        })
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
