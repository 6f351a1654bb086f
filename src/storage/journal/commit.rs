//! The committer: the one task that writes, and group commit.
//!
//! Contract: runs on the shard thread as one task per journal ([`Journal::run_committer`]),
//! spawned by the shard next to the journal. It takes the staged chunks of one round, writes
//! them, fdatasyncs once, moves the durable watermark and wakes the round's waiters. It owns
//! every write to a segment file's log and the creation of segments; appenders only stage.
//!
//! Group commit. `append` encodes the record straight into the DMA buffer of the next commit
//! (the one copy of a message's bytes on the publish path) and returns its position at once.
//! The committer takes everything staged, writes it with one aligned write per chunk of at most
//! `commit_bytes_max` (the chunks of a commit are in flight together), fdatasyncs once, then
//! wakes every `commit` waiter. Appends made while that commit is in flight are staged for the
//! next one, so the window is exactly "while the disk is busy", bounded by `staged_bytes_max`;
//! there is no timer. Commits complete in order and the durable watermark only grows, so the
//! broker can release confirms in position order. Each round's latency, and its fdatasync's, is
//! recorded once per round (`latency`: the clock is read around the round, never per record).
//!
//! Tail block: every commit starts on a fresh 4 KiB block and its last block is zero-padded.
//! A durable byte is never written again, so a torn write can only damage the commit that was in
//! flight (whose fdatasync never returned), never an acknowledged one; and every commit starts at
//! a block boundary, so recovery can look for later commits at block starts alone. The cost is
//! space, not bandwidth: rewriting the tail block would write the same number of blocks per
//! commit, padding leaves up to 4 KiB unused per commit (a lot at one 100-byte record per commit,
//! under 2% once commits carry 256 KiB).
//!
//! Faults handled: a full disk (an error or a short O_DIRECT write) fails the round with
//! `NoSpace` and abandons what was staged after it (failed with `NoSpace` too); any other write error, and every failed
//! fdatasync, poisons the journal (`Failed`). A segment whose creation ran out of space is
//! removed again so the next try starts clean; if its commit holds no message record, the
//! disk reserve is spent and the creation tried once more (`reserve`).

use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use super::{latency, Journal, RoundFailure, Seg, StagedChunk, State};
use crate::storage::error::is_no_space;
use crate::storage::format::{
    align_up_to_block, Position, BLOCK_BYTES, COMMIT_RECORD_BYTES, FIRST_COMMIT_OFFSET,
    FORMAT_VERSION, NO_PREVIOUS,
};
use crate::storage::io::{join_all, IoBuf, SegmentDir, SegmentFile};
use crate::storage::record::CommitRecord;
use crate::storage::segment::{segment_file_name, SegmentHeader};

const BLOCK: u64 = BLOCK_BYTES as u64;

/// Returns `Pending` once, waking itself: the task goes to the back of the run queue.
async fn yield_once() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

fn wake_all(ws: &mut Vec<Waker>) {
    for w in ws.drain(..) {
        w.wake();
    }
}

impl<D: SegmentDir + 'static> Journal<D> {
    /// The committer: the one task that writes. Runs until [`Journal::close`].
    pub async fn run_committer(self) {
        loop {
            // Let the appenders that the last commit just confirmed run before taking the next
            // batch: they append again at once, and joining this batch instead of the one after
            // it doubles the batch of closed-loop appenders. A yield, not a timer: it costs
            // nothing when nobody is runnable.
            yield_once().await;
            let round = poll_fn(|cx| {
                let mut st = self.inner.state.borrow_mut();
                if st.poisoned.is_some() {
                    return Poll::Ready(None);
                }
                if let Some(c) = st.staged.front() {
                    return Poll::Ready(Some(c.round));
                }
                if st.closing {
                    return Poll::Ready(None);
                }
                st.committer = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            let Some(round) = round else { break };
            let chunks: Vec<StagedChunk<D::Buf>> = {
                let mut st = self.inner.state.borrow_mut();
                let mut v = Vec::new();
                while st.staged.front().is_some_and(|c| c.round == round) {
                    let c = st.staged.pop_front().expect("checked");
                    st.staged_bytes -= (c.used - COMMIT_RECORD_BYTES) as u64;
                    v.push(c);
                }
                if st.open_round == Some(round) {
                    st.open_round = None;
                }
                wake_all(&mut st.room_waiters);
                v
            };
            let records: u64 = chunks.iter().map(|c| c.records).sum();
            let segment = chunks[0].segment;
            // Per round, never per record: the clock read at its start, its fdatasync's start
            // and end (`latency`).
            let started = latency::now_us();
            let result = self.write_commit(chunks).await;
            self.inner.latencies.borrow_mut().record_commit(started);
            let mut st = self.inner.state.borrow_mut();
            match result {
                Ok((end, bytes)) => {
                    st.durable = end;
                    st.next_commit_seq += 1;
                    st.stats.commits += 1;
                    st.stats.records += records;
                    st.stats.bytes_written += bytes;
                    st.stats.fdatasyncs += 1;
                    if let Some(s) = st.segments.get_mut(&segment) {
                        s.end = align_up_to_block(end.offset());
                    }
                    st.finished_below = round + 1;
                }
                Err(failure) => self.fail_round(&mut st, round, segment, failure),
            }
            wake_all(&mut st.commit_waiters);
        }
        let mut st = self.inner.state.borrow_mut();
        st.closed = true;
        wake_all(&mut st.close_waiters);
        wake_all(&mut st.commit_waiters);
        wake_all(&mut st.room_waiters);
    }

    /// Records a failed commit, abandons everything staged after it (it was placed after the
    /// failed bytes), and moves appends to a fresh segment so nothing is ever written after
    /// bytes whose fate is unknown. When the failure was creating that fresh segment, the next
    /// try creates it again and hands out the same positions again: a position names a record
    /// only once its commit succeeded. Failed commits are remembered (a few bytes each, only on
    /// failure) so that a late `commit` call on one still gets its error.
    fn fail_round(&self, st: &mut State<D>, round: u64, segment: u32, failure: RoundFailure) {
        tracing::error!(round, segment, ?failure, "journal commit failed");
        st.failed.insert(round, failure.clone());
        // What was staged after a commit that ran out of space failed for a full disk too, and
        // is told so (a client hears `DiskFull`, not a storage failure).
        let why = format!("an earlier commit failed: {}", failure.error());
        let abandoned = match &failure {
            RoundFailure::NoSpace(_) => RoundFailure::NoSpace(why),
            RoundFailure::Abandoned(_) | RoundFailure::Failed(_) => RoundFailure::Abandoned(why),
        };
        for c in st.staged.drain(..) {
            st.failed
                .entry(c.round)
                .or_insert_with(|| abandoned.clone());
        }
        st.staged_bytes = 0;
        st.open_round = None;
        st.finished_below = st.next_round;
        match &failure {
            RoundFailure::NoSpace(why) => st.no_space = Some(why.clone()),
            RoundFailure::Failed(why) | RoundFailure::Abandoned(why) => {
                st.poisoned = Some(why.clone())
            }
        }
        if st.segments.contains_key(&segment) {
            st.place_segment = segment + 1;
        } else {
            st.place_segment = segment;
        }
        st.place_offset = FIRST_COMMIT_OFFSET;
        wake_all(&mut st.room_waiters);
    }

    fn failure(&self, op: &str, name: &str, e: std::io::Error) -> RoundFailure {
        let msg = format!("{op} {}: {e}", self.inner.dir.describe(name));
        if is_no_space(&e) {
            RoundFailure::NoSpace(msg)
        } else {
            RoundFailure::Failed(msg)
        }
    }

    /// Writes one commit: its chunks (one segment), then one fdatasync. Returns the end of its
    /// last record and the bytes written.
    async fn write_commit(
        &self,
        chunks: Vec<StagedChunk<D::Buf>>,
    ) -> Result<(Position, u64), RoundFailure> {
        let segment = chunks[0].segment;
        let segment_size = self.inner.config.limits.segment_size_bytes_max;
        let exists = self.inner.state.borrow().segments.contains_key(&segment);
        if !exists {
            let has_messages = chunks.iter().any(|c| c.messages > 0);
            match self.create_segment(segment).await {
                // A full disk: a commit of records that free disk may spend the reserve.
                Err(RoundFailure::NoSpace(why)) => {
                    if !self.spend_reserve(has_messages, &why).await {
                        return Err(RoundFailure::NoSpace(why));
                    }
                    self.create_segment(segment).await?;
                }
                other => other?,
            }
        }
        let (file, seg_end, seq) = {
            let st = self.inner.state.borrow();
            let s = &st.segments[&segment];
            (s.file.clone(), s.end, st.next_commit_seq)
        };
        // Named only on the error paths: a `format!` per commit is a measurable share of a
        // one-message commit (benches/per_message).
        let name = || segment_file_name(segment);
        let count = chunks.len();
        assert!(count <= u16::MAX as usize);
        // Check before write: chunks are contiguous, block-aligned, start where the durable log
        // ends, and stay inside the segment.
        assert_eq!(
            chunks[0].start, seg_end,
            "commit does not start at the log's end"
        );
        let mut expect_start = seg_end;
        let mut end = Position::default();
        let mut bytes = 0u64;
        let mut writes = Vec::with_capacity(count);
        for (i, mut c) in chunks.into_iter().enumerate() {
            assert_eq!(c.segment, segment);
            assert_eq!(c.start, expect_start, "commit chunks are not contiguous");
            assert!(c.used > COMMIT_RECORD_BYTES && c.used <= c.buf.bytes().len());
            CommitRecord {
                commit_seq: seq,
                segment,
                chunk_index: i as u16,
                chunk_count: count as u16,
                batch_bytes: (c.used - COMMIT_RECORD_BYTES) as u32,
            }
            .encode(c.buf.bytes_mut());
            let padded = align_up_to_block(c.used as u64) as usize;
            c.buf.bytes_mut()[c.used..padded].fill(0);
            c.buf.truncate(padded);
            assert!(c.start % BLOCK == 0 && c.start + padded as u64 <= segment_size);
            end = Position::new(segment, c.start + c.used as u64);
            expect_start = c.start + padded as u64;
            bytes += padded as u64;
            let f = file.clone();
            writes.push(async move { (padded, f.write_at(c.buf, c.start).await) });
        }
        for (want, r) in join_all(writes).await {
            match r {
                Ok(n) if n == want => {}
                Ok(n) => {
                    // O_DIRECT writes come back short when the device fills up mid-write.
                    return Err(RoundFailure::NoSpace(format!(
                        "short write of {n} of {want} bytes to {}",
                        self.inner.dir.describe(&name())
                    )));
                }
                Err(e) => return Err(self.failure("writing", &name(), e)),
            }
        }
        let syncing = latency::now_us();
        let synced = file.fdatasync().await;
        self.inner.latencies.borrow_mut().record_fdatasync(syncing);
        synced.map_err(|e| match self.failure("fdatasync of", &name(), e) {
            // After a failed fdatasync nothing about the file can be trusted.
            RoundFailure::NoSpace(m) => RoundFailure::Failed(m),
            other => other,
        })?;
        Ok((end, bytes))
    }

    /// Creates segment `number`: preallocated, header written and fdatasynced, name synced.
    async fn create_segment(&self, number: u32) -> Result<(), RoundFailure> {
        let dir = &self.inner.dir;
        let limits = &self.inner.config.limits;
        let name = segment_file_name(number);
        let (prev_end, first_commit_seq) = {
            let st = self.inner.state.borrow();
            let prev = number
                .checked_sub(1)
                .and_then(|p| st.segments.get(&p))
                .map_or(NO_PREVIOUS, |s| s.end);
            (prev, st.next_commit_seq)
        };
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            shard_id: self.inner.config.shard_id,
            number,
            flags: 0,
            segment_size: limits.segment_size_bytes_max,
            prev_end,
            first_commit_seq,
        };
        let file = dir
            .create(&name)
            .await
            .map_err(|e| self.failure("creating", &name, e))?;
        let result = async {
            file.preallocate(limits.segment_size_bytes_max)
                .await
                .map_err(|e| self.failure("preallocating", &name, e))?;
            let mut buf = dir.alloc_buf(BLOCK_BYTES);
            buf.bytes_mut().fill(0);
            header.encode(buf.bytes_mut());
            file.write_at(buf, 0)
                .await
                .map_err(|e| self.failure("writing header of", &name, e))?;
            file.fdatasync()
                .await
                .map_err(|e| self.failure("fdatasync of", &name, e))?;
            dir.sync()
                .await
                .map_err(|e| self.failure("syncing directory for", &name, e))
        }
        .await;
        if let Err(f) = result {
            if let RoundFailure::NoSpace(_) = f {
                // Leave no half-made segment behind: the next try creates it again.
                drop(file);
                let _ = dir.remove(&name).await;
                let _ = dir.sync().await;
            }
            return Err(f);
        }
        let mut st = self.inner.state.borrow_mut();
        st.stats.segments_created += 1;
        st.stats.fdatasyncs += 1;
        st.segments.insert(
            number,
            Seg {
                file: Rc::new(file),
                header,
                end: FIRST_COMMIT_OFFSET,
                reclaimed: false,
            },
        );
        Ok(())
    }
}
