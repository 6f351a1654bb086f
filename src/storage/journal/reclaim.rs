//! The segment table as the broker sees it, and reclaim: deleting segments whose records are
//! no longer needed.
//!
//! Contract: runs on the shard thread, concurrently with the committer. It never touches a
//! segment that appends still go into (staged chunks, the placement segment, the newest one):
//! those are refused with `InUse`. It owns the removal of segment files and the tombstone header
//! rewrite; segment numbers stay consecutive so recovery can tell a missing segment from a
//! reclaimed one.
//!
//! Faults handled: a poisoned journal refuses reclaim (`Failed`); a failed remove, write, sync or
//! truncate is returned as `Io`. The tombstone header is rewritten in place inside the first
//! sector, so a torn rewrite leaves either the old or the new header whole. A successful reclaim
//! means space came back, so it clears the out-of-space state (a spent reserve still keeps
//! message records out until it is made again).

use super::{Journal, State};
use crate::storage::error::StorageError;
use crate::storage::format::{Position, BLOCK_BYTES, FLAG_RECLAIMED};
use crate::storage::io::{IoBuf, SegmentDir, SegmentFile};
use crate::storage::segment::segment_file_name;

const BLOCK: u64 = BLOCK_BYTES as u64;

/// A segment as the broker sees it, for reclaim decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Segment number.
    pub number: u32,
    /// First position of the segment.
    pub first: Position,
    /// Where its durable log ends.
    pub end: Position,
    /// Whether it was reclaimed (its data is gone).
    pub reclaimed: bool,
    /// Whether appends still go into it (it cannot be reclaimed).
    pub active: bool,
}

impl<D: SegmentDir + 'static> Journal<D> {
    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let st = self.inner.state.borrow();
        let active = Self::active_segments(&st);
        st.segments
            .iter()
            .map(|(&n, s)| SegmentInfo {
                number: n,
                first: Position::new(n, 0),
                end: Position::new(n, s.end),
                reclaimed: s.reclaimed,
                active: active.contains(&n),
            })
            .collect()
    }

    /// Bytes of disk the segment files hold: each one in use preallocated to its full size, a
    /// tombstone one block (the reserve file is not counted).
    pub fn disk_bytes(&self) -> u64 {
        let st = self.inner.state.borrow();
        let size = self.inner.config.limits.segment_size_bytes_max;
        st.segments
            .values()
            .map(|s| if s.reclaimed { BLOCK } else { size })
            .sum()
    }

    fn active_segments(st: &State<D>) -> Vec<u32> {
        let mut v: Vec<u32> = st.staged.iter().map(|c| c.segment).collect();
        v.push(st.place_segment);
        v.extend(st.segments.keys().next_back().copied());
        v
    }

    /// Deletes segment `number`, whose records the broker no longer needs: its messages are all
    /// settled, and its settle records only name messages of segments already reclaimed. The
    /// oldest segment is removed; a segment in the middle is turned into a tombstone (its header
    /// flagged reclaimed and fdatasynced, then the file cut to the header) so that the segment
    /// numbers stay consecutive; tombstones are removed once they are the oldest.
    pub async fn reclaim(&self, number: u32) -> Result<(), StorageError> {
        let (file, header, oldest) = {
            let st = self.inner.state.borrow();
            if let Some(why) = &st.poisoned {
                return Err(StorageError::Failed(why.clone()));
            }
            if Self::active_segments(&st).contains(&number) {
                return Err(StorageError::InUse {
                    segment: number,
                    why: "records are still appended to it".into(),
                });
            }
            let seg = st.segments.get(&number).ok_or(StorageError::InUse {
                segment: number,
                why: "no such segment".into(),
            })?;
            let oldest = st.segments.keys().next().copied() == Some(number);
            (seg.file.clone(), seg.header, oldest)
        };
        // Nothing in it is needed any more: its windows go now, before its bytes do.
        self.inner.read_ahead.borrow_mut().drop_segment(number);
        let dir = &self.inner.dir;
        let name = segment_file_name(number);
        let path = dir.describe(&name);
        if oldest {
            drop(file);
            self.remove_oldest(number).await?;
        } else {
            let mut h = header;
            h.flags |= FLAG_RECLAIMED;
            let mut buf = dir.alloc_buf(BLOCK_BYTES);
            buf.bytes_mut().fill(0);
            h.encode(buf.bytes_mut());
            // The header sits in the first sector; a torn rewrite leaves either header whole.
            let n = file
                .write_at(buf, 0)
                .await
                .map_err(|e| StorageError::io("writing tombstone header of", &path, e))?;
            assert_eq!(n, BLOCK_BYTES, "short tombstone write on {path}");
            file.fdatasync()
                .await
                .map_err(|e| StorageError::io("syncing", &path, e))?;
            file.truncate(BLOCK)
                .await
                .map_err(|e| StorageError::io("truncating", &path, e))?;
            let mut st = self.inner.state.borrow_mut();
            if let Some(s) = st.segments.get_mut(&number) {
                s.reclaimed = true;
                s.header = h;
                s.end = 0;
            }
        }
        // Space came back: take appends again (message records once the reserve, if spent, is
        // made again: `restore_reserve`).
        let mut st = self.inner.state.borrow_mut();
        st.no_space = None;
        st.stats.segments_reclaimed += 1;
        Ok(())
    }

    async fn remove_oldest(&self, number: u32) -> Result<(), StorageError> {
        let dir = &self.inner.dir;
        let mut next = Some(number);
        while let Some(n) = next {
            let name = segment_file_name(n);
            dir.remove(&name)
                .await
                .map_err(|e| StorageError::io("removing", dir.describe(&name), e))?;
            // Forgotten as soon as its file is gone, not after the directory sync: meanwhile no
            // status counts, and no read looks for, a file that is no longer there.
            next = {
                let mut st = self.inner.state.borrow_mut();
                st.segments.remove(&n);
                let active = Self::active_segments(&st);
                st.segments
                    .iter()
                    .next()
                    .filter(|(k, s)| s.reclaimed && !active.contains(k))
                    .map(|(&k, _)| k)
            };
            dir.sync()
                .await
                .map_err(|e| StorageError::io("syncing directory of", dir.describe(&name), e))?;
        }
        Ok(())
    }
}
