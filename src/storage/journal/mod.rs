//! The journal: a shard's append-only log, its group commit, reads by position, reclaim and
//! compaction.
//!
//! Contract: one `Journal` per shard, used only on that shard's thread (`Rc`, `RefCell`). It
//! owns the segment files of its directory, the staging buffers of the next commit, and the
//! durable watermark. [`Journal::run_committer`] is the one task that writes: the shard spawns
//! it next to the journal (`crate::rt::spawn_detached`); tests poll it with a plain `block_on`.
//!
//! This file holds the shared state, opening, appending (staging into the next commit), waiting
//! for a commit, and closing. The rest is split by what it does:
//! - [`commit`]: the committer task, group commit, segment creation and commit failures;
//! - [`read`]: reading a durable record back by position, and relocation (compaction);
//! - [`read_ahead`]: the windows of durable log that reads by position are served from;
//! - [`reclaim`]: the segment list, reclaim and tombstones;
//! - [`reserve`]: the disk reserve, spent by the records that free disk and made again after.
//!
//! Segments. A commit never spans segments: a record that does not fit in the current segment
//! starts the next one, created (preallocated, header written and fdatasynced, directory synced)
//! by the committer before the first write into it. Each opening of the journal appends into a
//! fresh segment, and a failed commit abandons the rest of its segment; the next segment's header
//! records where the previous one's log ends, which is what lets recovery tell a torn tail from
//! corruption (see `recovery`).
//!
//! Faults: out of disk space fails the commit in progress and every staged record with
//! [`StorageError::NoSpace`] (the records staged after it too: a full disk is what they are told),
//! refuses appends until space returns
//! ([`Journal::reclaim`] or [`Journal::resume_after_no_space`]), and keeps everything committed.
//! With a reserve (`reserve_bytes`), only message records are refused meanwhile: settle and
//! control records are taken, and the commit that needs a new segment for them may spend the
//! reserve ([`reserve`]), so acks and reclaim's restatement still become durable and reclaim can
//! free the disk; message records are taken again once the reserve is whole again.
//! Any other write or fdatasync error stops the journal ([`StorageError::Failed`]): after a failed
//! fdatasync the contents of the disk are unknown, and only recovery can tell what is there.

mod commit;
mod latency;
mod read;
mod read_ahead;
mod reclaim;
mod reserve;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use crate::storage::error::StorageError;
use crate::storage::format::{
    align_up_to_block, Position, BLOCK_BYTES, COMMIT_RECORD_BYTES, FIRST_COMMIT_OFFSET,
    RECORD_HEADER_BYTES,
};
use crate::storage::io::{IoBuf, SegmentDir, SegmentFile};
use crate::storage::limits::JournalConfig;
use crate::storage::record::{
    seal_record, MessageEnvelope, ProducerStamp, RecordKind, RetryRecord, SettleRecord,
};
use crate::storage::recovery::{recover, RecoveryReport};
use crate::storage::segment::SegmentHeader;

pub use latency::{latency_bytes, Latencies, LATENCY_US_MAX};
pub use read::ReadRecord;
pub use read_ahead::{ReadAheadStats, WINDOW_BYTES_MAX as READ_AHEAD_WINDOW_BYTES_MAX};
pub use reclaim::SegmentInfo;

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
    /// Segments reclaimed (deleted, or made tombstones).
    pub segments_reclaimed: u64,
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
    /// Message records among them: a commit with none may spend the reserve.
    messages: u64,
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
    reserve: Reserve,
    poisoned: Option<String>,
    closing: bool,
    closed: bool,
    committer: Option<Waker>,
    commit_waiters: Vec<Waker>,
    room_waiters: Vec<Waker>,
    close_waiters: Vec<Waker>,
    stats: JournalStats,
}

/// Where the disk reserve stands (see [`reserve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reserve {
    /// `reserve_bytes` is 0: a full disk refuses every append, as without a reserve.
    Off,
    /// The file is there, whole: a commit of settle and control records may spend it.
    Present,
    /// Spent, or never made: message records are refused until it is made again.
    Missing,
    /// Being made again (by the reclaim timer's task): nobody spends it meanwhile.
    Making,
}

struct Inner<D: SegmentDir> {
    dir: D,
    config: JournalConfig,
    state: RefCell<State<D>>,
    /// Windows of durable log kept for reads by position (`read`), off until the owner sets a
    /// bound.
    read_ahead: RefCell<read_ahead::ReadAhead<<D::File as SegmentFile>::ReadBuf>>,
    /// Commit and fdatasync latencies, one value each per round (`latency`).
    latencies: RefCell<Latencies>,
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
            reserve: if config.limits.reserve_bytes == 0 {
                Reserve::Off
            } else {
                Reserve::Missing
            },
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
                read_ahead: RefCell::new(read_ahead::ReadAhead::new(0)),
                latencies: RefCell::new(Latencies::default()),
            }),
        };
        journal.open_reserve().await;
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
        self.append_message_stamped(envelope, None, message)
    }

    /// Appends a message record with an idempotent producer's stamp after its envelope (or
    /// none): the record itself remembers (producer, sequence), so replay rebuilds the producer
    /// windows with no record of their own.
    pub fn append_message_stamped(
        &self,
        envelope: &MessageEnvelope<'_>,
        stamp: Option<ProducerStamp>,
        message: &[u8],
    ) -> Result<Appended, StorageError> {
        let env_len = envelope.encoded_len_stamped(stamp);
        self.append_with(RecordKind::Message, env_len + message.len(), |out| {
            envelope.encode_stamped(&mut out[..env_len], stamp);
            out[env_len..].copy_from_slice(message);
        })
    }

    /// Appends a settle record.
    pub fn append_settle(&self, settle: &SettleRecord<'_>) -> Result<Appended, StorageError> {
        self.append_with(RecordKind::Settle, settle.encoded_len(), |out| {
            settle.encode(out)
        })
    }

    /// Appends a retry record.
    pub fn append_retry(&self, retry: &RetryRecord<'_>) -> Result<Appended, StorageError> {
        self.append_with(RecordKind::Retry, retry.encoded_len(), |out| {
            retry.encode(out)
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
        if kind == RecordKind::Message {
            if matches!(st.reserve, Reserve::Missing | Reserve::Making) {
                return Err(StorageError::NoSpace(format!(
                    "the disk reserve ({} bytes) is spent: message records wait until reclaim \
                     frees room to make it again",
                    limits.reserve_bytes
                )));
            }
            if let Some(why) = &st.no_space {
                return Err(StorageError::NoSpace(why.clone()));
            }
        } else if let Some(why) = &st.no_space {
            // Records that free disk go on while a reserve can be spent for them.
            if st.reserve == Reserve::Off {
                return Err(StorageError::NoSpace(why.clone()));
            }
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
                messages: 0,
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
        chunk.messages += u64::from(kind == RecordKind::Message);
        let appended = Appended {
            position: Position::new(chunk.segment, chunk.start + at as u64),
            len: rec_len as u32,
            commit: CommitId(chunk.round),
        };
        st.place_offset = align_up_to_block(chunk.start + chunk.used as u64);
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
        self.commit_round(appended.commit).await
    }

    /// Resolves when commit `commit` is durable, or with why it never will be; at once for one
    /// that has finished (every commit before a finished one has finished too).
    pub async fn commit_round(&self, commit: CommitId) -> Result<(), StorageError> {
        let round = commit.0;
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

    /// Whether commit `commit` has finished (made durable, or failed), so that
    /// [`Journal::commit_round`] answers it without waiting.
    pub fn round_finished(&self, commit: CommitId) -> bool {
        let st = self.inner.state.borrow();
        commit.0 < st.finished_below || st.poisoned.is_some()
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

    /// The commit and fdatasync latencies recorded so far (for `Status`).
    pub fn latencies(&self) -> std::cell::Ref<'_, Latencies> {
        self.inner.latencies.borrow()
    }

    /// Clears the out-of-space state after space was freed outside the journal, so that appends
    /// are taken again; the next commit tries the disk again. A spent disk reserve still keeps
    /// message records out until [`Journal::restore_reserve`] has made it again.
    pub fn resume_after_no_space(&self) {
        self.inner.state.borrow_mut().no_space = None;
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
}
