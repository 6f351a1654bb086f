//! The journal: append, group commit, reads by position, reclaim and compaction.
//!
//! Contract: one `Journal` per shard, used only on that shard's thread (`Rc`, `RefCell`). It
//! owns the segment files of its directory, the staging buffers of the next commit, and the
//! durable watermark. [`Journal::run_committer`] is the one task that writes: the shard spawns
//! it next to the journal (`crate::rt::spawn_detached`); tests poll it with a plain `block_on`.
//!
//! Group commit. `append` encodes the record straight into the DMA buffer of the next commit
//! (the one copy of a message's bytes on the publish path) and returns its position at once.
//! The committer takes everything staged, writes it with one aligned write per chunk of at most
//! `commit_bytes_max` (the chunks of a commit are in flight together), fdatasyncs once, then
//! wakes every `commit` waiter. Appends made while that commit is in flight are staged for the
//! next one, so the window is exactly "while the disk is busy", bounded by `staged_bytes_max`;
//! there is no timer. Commits complete in order and the durable watermark only grows, so the
//! broker can release confirms in position order.
//!
//! Tail block: every commit starts on a fresh 4 KiB block and its last block is zero-padded.
//! A durable byte is never written again, so a torn write can only damage the commit that was in
//! flight (whose fdatasync never returned), never an acknowledged one; and every commit starts at
//! a block boundary, so recovery can look for later commits at block starts alone. The cost is
//! space, not bandwidth: rewriting the tail block would write the same number of blocks per
//! commit, padding leaves up to 4 KiB unused per commit (a lot at one 100-byte record per commit,
//! under 2% once commits carry 256 KiB).
//!
//! Segments. A commit never spans segments: a record that does not fit in the current segment
//! starts the next one, created (preallocated, header written and fdatasynced, directory synced)
//! by the committer before the first write into it. Each opening of the journal appends into a
//! fresh segment, and a failed commit abandons the rest of its segment; the next segment's header
//! records where the previous one's log ends, which is what lets recovery tell a torn tail from
//! corruption (see `recovery`).
//!
//! Faults: out of disk space fails the commit in progress and every staged record with
//! [`StorageError::NoSpace`] / [`StorageError::Abandoned`], refuses appends until space returns
//! ([`Journal::reclaim`] or [`Journal::resume_after_no_space`]), and keeps everything committed.
//! Any other write or fdatasync error stops the journal ([`StorageError::Failed`]): after a failed
//! fdatasync the contents of the disk are unknown, and only recovery can tell what is there.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use crate::storage::error::{is_no_space, StorageError};
use crate::storage::io::{join_all, IoBuf, SegmentDir, SegmentFile};
use crate::storage::limits::{JournalConfig, BLOCK_BYTES};
use crate::storage::record::{
    parse_record, seal_record, CommitRecord, MessageEnvelope, RecordKind, SettleRecord,
    COMMIT_RECORD_BYTES, RECORD_HEADER_BYTES,
};
use crate::storage::recovery::{recover, RecoveryReport};
use crate::storage::segment::{
    segment_file_name, Position, SegmentHeader, FIRST_COMMIT_OFFSET, FLAG_RECLAIMED,
    FORMAT_VERSION, NO_PREVIOUS,
};

const BLOCK: u64 = BLOCK_BYTES as u64;

fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

/// Identifies the commit that carries a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitId(pub u64);

/// What `append` returns: where the record is and which commit will make it durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Where the record starts.
    pub position: Position,
    /// Its encoded length (header included); a read with this hint takes one I/O.
    pub len: u32,
    /// The commit that carries it.
    pub commit: CommitId,
}

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

/// Counters for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Commits completed.
    pub commits: u64,
    /// Records made durable.
    pub records: u64,
    /// Bytes handed to writes (padding and commit records included).
    pub bytes_written: u64,
    /// fdatasync calls (commits plus segment creations).
    pub fdatasyncs: u64,
    /// Segments created.
    pub segments_created: u64,
}

struct Seg<F> {
    file: Rc<F>,
    header: SegmentHeader,
    /// Where its durable log ends (block-aligned): the next commit into it starts here, and the
    /// next segment's header seals it here.
    end: u64,
    reclaimed: bool,
}

struct StagedChunk<B> {
    segment: u32,
    start: u64,
    buf: B,
    /// Bytes used in `buf`, the reserved commit record included.
    used: usize,
    round: u64,
    records: u64,
}

/// Why a commit failed, kept so every waiter of that commit gets the same answer.
#[derive(Clone, Debug)]
enum RoundFailure {
    NoSpace(String),
    Abandoned(String),
    Failed(String),
}

impl RoundFailure {
    fn error(&self) -> StorageError {
        match self {
            RoundFailure::NoSpace(m) => StorageError::NoSpace(m.clone()),
            RoundFailure::Abandoned(m) => StorageError::Abandoned(m.clone()),
            RoundFailure::Failed(m) => StorageError::Failed(m.clone()),
        }
    }
}

struct State<D: SegmentDir> {
    segments: BTreeMap<u32, Seg<D::File>>,
    /// The segment new records go to, and where the next chunk would start in it.
    place_segment: u32,
    place_offset: u64,
    staged: VecDeque<StagedChunk<D::Buf>>,
    /// Record bytes staged (the byte bound of the commit window).
    staged_bytes: u64,
    /// The commit (round) that appends currently join, if it has not been taken yet.
    open_round: Option<u64>,
    next_round: u64,
    /// Every round below this one has finished, successfully or not.
    finished_below: u64,
    failed: BTreeMap<u64, RoundFailure>,
    next_commit_seq: u64,
    durable: Position,
    no_space: Option<String>,
    poisoned: Option<String>,
    closing: bool,
    closed: bool,
    committer: Option<Waker>,
    commit_waiters: Vec<Waker>,
    room_waiters: Vec<Waker>,
    close_waiters: Vec<Waker>,
    stats: JournalStats,
}

struct Inner<D: SegmentDir> {
    dir: D,
    config: JournalConfig,
    state: RefCell<State<D>>,
}

/// A shard's journal. Cloning shares it.
pub struct Journal<D: SegmentDir> {
    inner: Rc<Inner<D>>,
}

impl<D: SegmentDir> Clone for Journal<D> {
    fn clone(&self) -> Self {
        Journal {
            inner: self.inner.clone(),
        }
    }
}

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
    /// Recovers the journal in `dir` (see `recovery`), handing every record to `replay` in log
    /// order, and opens it for appends into a fresh segment.
    pub async fn open(
        dir: D,
        config: JournalConfig,
        mut replay: impl FnMut(Position, RecordKind, &[u8]),
    ) -> Result<(Journal<D>, RecoveryReport), StorageError> {
        config.limits.check()?;
        let rec = recover(&dir, config.shard_id, &config.limits, &mut replay).await?;
        let mut segments = BTreeMap::new();
        let mut durable = Position::default();
        let mut place_segment = 0;
        for s in rec.segments {
            if !s.header.reclaimed() {
                durable = Position::new(s.number, s.end);
            }
            place_segment = s.number + 1;
            segments.insert(
                s.number,
                Seg {
                    file: Rc::new(s.file),
                    reclaimed: s.header.reclaimed(),
                    header: s.header,
                    end: s.end,
                },
            );
        }
        let state = State {
            segments,
            place_segment,
            place_offset: FIRST_COMMIT_OFFSET,
            staged: VecDeque::new(),
            staged_bytes: 0,
            open_round: None,
            next_round: 0,
            finished_below: 0,
            failed: BTreeMap::new(),
            next_commit_seq: rec.next_commit_seq,
            durable,
            no_space: None,
            poisoned: None,
            closing: false,
            closed: false,
            committer: None,
            commit_waiters: Vec::new(),
            room_waiters: Vec::new(),
            close_waiters: Vec::new(),
            stats: JournalStats::default(),
        };
        let journal = Journal {
            inner: Rc::new(Inner {
                dir,
                config,
                state: RefCell::new(state),
            }),
        };
        Ok((journal, rec.report))
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.inner.config
    }

    /// Appends a message record: its routing envelope, then the message bytes as received.
    pub fn append_message(
        &self,
        envelope: &MessageEnvelope<'_>,
        message: &[u8],
    ) -> Result<Appended, StorageError> {
        let env_len = envelope.encoded_len();
        self.append_with(RecordKind::Message, env_len + message.len(), |out| {
            envelope.encode(&mut out[..env_len]);
            out[env_len..].copy_from_slice(message);
        })
    }

    /// Appends a settle record.
    pub fn append_settle(&self, settle: &SettleRecord<'_>) -> Result<Appended, StorageError> {
        self.append_with(RecordKind::Settle, settle.encoded_len(), |out| {
            settle.encode(out)
        })
    }

    /// Appends an opaque control record.
    pub fn append_control(&self, body: &[u8]) -> Result<Appended, StorageError> {
        self.append_with(RecordKind::Control, body.len(), |out| {
            out.copy_from_slice(body)
        })
    }

    /// Appends a record of `kind` whose body `fill` writes into the `body_len` bytes it is given.
    pub fn append_with(
        &self,
        kind: RecordKind,
        body_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Appended, StorageError> {
        assert!(
            kind != RecordKind::Commit,
            "commit records are the journal's own"
        );
        let limits = self.inner.config.limits;
        let rec_len = RECORD_HEADER_BYTES + body_len;
        let mut st = self.inner.state.borrow_mut();
        if let Some(why) = &st.poisoned {
            return Err(StorageError::Failed(why.clone()));
        }
        if st.closing {
            return Err(StorageError::Closed);
        }
        if let Some(why) = &st.no_space {
            return Err(StorageError::NoSpace(why.clone()));
        }
        if rec_len > limits.record_bytes_max as usize {
            return Err(StorageError::RecordTooLarge {
                bytes: rec_len,
                max: limits.record_bytes_max,
            });
        }
        if st.staged_bytes + rec_len as u64 > limits.staged_bytes_max {
            return Err(StorageError::Backpressure {
                staged: st.staged_bytes,
                max: limits.staged_bytes_max,
            });
        }
        let joins_open_chunk = match (st.staged.back(), st.open_round) {
            (Some(c), Some(r)) => c.round == r && c.used + rec_len <= c.buf.bytes().len(),
            _ => false,
        };
        if !joins_open_chunk {
            let segment_size = limits.segment_size_bytes_max;
            let mut segment = st.place_segment;
            let mut start = st.place_offset;
            if start + (COMMIT_RECORD_BYTES + rec_len) as u64 > segment_size {
                segment += 1;
                start = FIRST_COMMIT_OFFSET;
            }
            let same_round =
                st.open_round.is_some() && st.staged.back().is_some_and(|c| c.segment == segment);
            let round = if same_round {
                st.open_round.expect("checked")
            } else {
                let r = st.next_round;
                st.next_round += 1;
                st.open_round = Some(r);
                r
            };
            let cap = (limits.commit_bytes_max as u64).min(segment_size - start) as usize;
            assert!(cap.is_multiple_of(BLOCK_BYTES) && cap >= COMMIT_RECORD_BYTES + rec_len);
            let buf = self.inner.dir.alloc_buf(cap);
            st.staged.push_back(StagedChunk {
                segment,
                start,
                buf,
                used: COMMIT_RECORD_BYTES,
                round,
                records: 0,
            });
            st.place_segment = segment;
        }
        let chunk = st.staged.back_mut().expect("a chunk is open");
        let at = chunk.used;
        let out = &mut chunk.buf.bytes_mut()[at..at + rec_len];
        fill(&mut out[RECORD_HEADER_BYTES..]);
        seal_record(out, kind);
        chunk.used += rec_len;
        chunk.records += 1;
        let appended = Appended {
            position: Position::new(chunk.segment, chunk.start + at as u64),
            len: rec_len as u32,
            commit: CommitId(chunk.round),
        };
        st.place_offset = align_up(chunk.start + chunk.used as u64);
        st.staged_bytes += rec_len as u64;
        if let Some(w) = st.committer.take() {
            w.wake();
        }
        Ok(appended)
    }

    /// Waits until `bytes` more can be staged (the byte bound of the commit window).
    pub async fn wait_for_room(&self, bytes: usize) {
        poll_fn(|cx| {
            let mut st = self.inner.state.borrow_mut();
            let max = self.inner.config.limits.staged_bytes_max;
            if st.staged_bytes + bytes as u64 <= max || st.poisoned.is_some() || st.closing {
                Poll::Ready(())
            } else {
                st.room_waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves when the commit carrying `appended` is durable, or with why it never will be.
    pub async fn commit(&self, appended: &Appended) -> Result<(), StorageError> {
        let round = appended.commit.0;
        poll_fn(|cx| {
            let mut st = self.inner.state.borrow_mut();
            if round < st.finished_below {
                return Poll::Ready(match st.failed.get(&round) {
                    Some(f) => Err(f.error()),
                    None => Ok(()),
                });
            }
            if let Some(why) = &st.poisoned {
                return Poll::Ready(Err(StorageError::Failed(why.clone())));
            }
            st.commit_waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The durable watermark: every record before it whose commit succeeded is durable. It only
    /// grows, in append order.
    pub fn durable_position(&self) -> Position {
        self.inner.state.borrow().durable
    }

    /// Counters.
    pub fn stats(&self) -> JournalStats {
        self.inner.state.borrow().stats
    }

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

    fn active_segments(st: &State<D>) -> Vec<u32> {
        let mut v: Vec<u32> = st.staged.iter().map(|c| c.segment).collect();
        v.push(st.place_segment);
        v.extend(st.segments.keys().next_back().copied());
        v
    }

    /// Clears the out-of-space state after space was freed outside the journal, so that appends
    /// are taken again; the next commit tries the disk again.
    pub fn resume_after_no_space(&self) {
        self.inner.state.borrow_mut().no_space = None;
    }

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
            .read_at(start, (align_up(off + want) - start) as usize)
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
                .read_at(start, (align_up(off + total) - start) as usize)
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
        // Space came back: take appends again.
        self.inner.state.borrow_mut().no_space = None;
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
            dir.sync()
                .await
                .map_err(|e| StorageError::io("syncing directory of", dir.describe(&name), e))?;
            let mut st = self.inner.state.borrow_mut();
            st.segments.remove(&n);
            let active = Self::active_segments(&st);
            next = st
                .segments
                .iter()
                .next()
                .filter(|(k, s)| s.reclaimed && !active.contains(k))
                .map(|(&k, _)| k);
        }
        Ok(())
    }

    /// Commits what is staged, stops the committer, closes the segment files and refuses
    /// further work.
    pub async fn close(&self) {
        {
            let mut st = self.inner.state.borrow_mut();
            st.closing = true;
            if let Some(w) = st.committer.take() {
                w.wake();
            }
        }
        poll_fn(|cx| {
            let mut st = self.inner.state.borrow_mut();
            if st.closed {
                Poll::Ready(())
            } else {
                st.close_waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let segments = std::mem::take(&mut self.inner.state.borrow_mut().segments);
        for (n, seg) in segments {
            // A reader still holding the file keeps it open; it is closed when dropped.
            if let Ok(file) = Rc::try_unwrap(seg.file) {
                if let Err(e) = file.close().await {
                    tracing::warn!(segment = n, error = %e, "closing segment file failed");
                }
            }
        }
    }

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
            let result = self.write_commit(chunks).await;
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
                        s.end = align_up(end.offset());
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
        let abandoned =
            RoundFailure::Abandoned(format!("an earlier commit failed: {}", failure.error()));
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
            self.create_segment(segment).await?;
        }
        let (file, seg_end, seq) = {
            let st = self.inner.state.borrow();
            let s = &st.segments[&segment];
            (s.file.clone(), s.end, st.next_commit_seq)
        };
        let name = segment_file_name(segment);
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
            let padded = align_up(c.used as u64) as usize;
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
                        self.inner.dir.describe(&name)
                    )));
                }
                Err(e) => return Err(self.failure("writing", &name, e)),
            }
        }
        file.fdatasync()
            .await
            .map_err(|e| match self.failure("fdatasync of", &name, e) {
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
