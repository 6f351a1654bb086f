//! Recovery: the scan of a journal directory at open, and the decision table it applies.
//!
//! Contract: runs once, on the shard thread, before the journal takes any append. It reads every
//! segment sequentially (reads of `read_window_bytes`), hands every valid record to the replay
//! callback in log order, and either returns where the log ends or refuses with an error that
//! names the file, the offset and what was found there. It never truncates a file and never
//! writes a record; the only change it may make to the directory is removing the last segment
//! when its creation was interrupted before its header became durable (row S2: such a file holds
//! no record, because records are written only after the header is synced).
//!
//! Two invariants of the writer make every row decidable:
//! - Each opening of a journal appends into a fresh segment, and a failed commit abandons the
//!   rest of its segment. The next segment's header records where the previous segment's log
//!   ends (`prev_end`), so every segment but the last is *sealed*: every byte before its end must
//!   be valid log, and whatever follows it is garbage of an abandoned commit.
//! - Only one commit is in flight, and commit `n + 1` is written only after commit `n`'s
//!   fdatasync returned. So in the last segment a damaged or missing chunk can be a torn write
//!   only if no chunk of a *later* commit follows it anywhere in the segment.
//!
//! # Segment rows (checked first, per file)
//!
//! | row | finding | decision |
//! |---|---|---|
//! | S1 | header valid: our magic, version, shard and the number its name says | use it |
//! | S2 | header zero, short, foreign or bad checksum; **last** segment; no commit record anywhere in the file | interrupted creation: remove the file |
//! | S3 | header zero, short, foreign or bad checksum, otherwise | refuse: names file and what the header holds |
//! | S4 | unknown format version | refuse |
//! | S5 | header names another shard | refuse |
//! | S6 | header number differs from the file name | refuse |
//! | S7 | segment numbers not consecutive | refuse: names the two files around the gap |
//! | S8 | header flagged reclaimed | skip its data (all of it was settled) |
//! | S9 | first commit sequence differs from the one the previous segment ends with | refuse |
//! | S10 | a file name that is not a segment name | ignore it (reported) |
//! | S11 | the disk reserve (`reserve`) | not a segment: left to the journal (`journal::reserve`) |
//!
//! # Commit rows (at each commit boundary inside a segment)
//!
//! | row | finding at the boundary | segment | a later commit follows | decision |
//! |---|---|---|---|---|
//! | C1 | a valid chunk: commit record with the expected sequence, every record's crc valid | any | – | accept, replay its records |
//! | C2 | the boundary is the sealed end | sealed | – | end of this segment |
//! | C3 | zeros or end of file | sealed | – | refuse: hole before the sealed end |
//! | C4 | zeros or end of file | last | no | end of the log |
//! | C5 | zeros or end of file | last | yes | refuse: hole inside the log |
//! | C6 | damaged: bad crc, bad length, wrong kind or sequence, truncated chunk | sealed | – | refuse: corruption |
//! | C7 | damaged | last | yes | refuse: corruption (bad checksum followed by valid commits) |
//! | C8 | damaged | last | no | torn tail: cut at the start of the torn commit (all its chunks), report what was cut |
//!
//! C8 drops only the last commit, whose fdatasync cannot have returned if it is torn. The one
//! case it cannot tell apart is bit rot inside the last commit after it was acknowledged: that
//! looks exactly like a torn write and is cut, reported through [`TailCut`] and a warning, never
//! silently.

use std::fmt;

use crate::storage::error::StorageError;
use crate::storage::format::{
    align_up_to_block, Position, BLOCK_BYTES, COMMIT_RECORD_BYTES, FIRST_COMMIT_OFFSET,
    FORMAT_VERSION,
};
use crate::storage::io::{SegmentDir, SegmentFile};
use crate::storage::limits::StorageLimits;
use crate::storage::record::{parse_record, CommitRecord, RecordFault, RecordKind};
use crate::storage::segment::{
    parse_segment_file_name, segment_file_name, HeaderFault, SegmentHeader, RESERVE_FILE_NAME,
};

/// What the scan found at a commit boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// A valid chunk with the expected commit sequence.
    Commit,
    /// Zeros or the end of the file.
    Zero,
    /// Anything else; the offset of the damage and what is there.
    Damaged {
        /// Byte offset of the damaged record in the file.
        offset: u64,
        /// What was found.
        what: String,
    },
}

/// Whether the segment is sealed (a later segment records its end) or the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// A later segment exists.
    Sealed,
    /// The last segment.
    Last,
}

/// What to do at a commit boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// C1.
    Accept,
    /// C4.
    EndOfLog,
    /// C8.
    CutTornTail,
    /// C3, C5, C6, C7.
    Refuse,
}

/// The commit rows of the table, one match arm per row.
pub fn decide(finding: &Finding, place: Place, later_commit: bool) -> Decision {
    match (finding, place, later_commit) {
        (Finding::Commit, _, _) => Decision::Accept, // C1
        (Finding::Zero, Place::Sealed, _) => Decision::Refuse, // C3
        (Finding::Zero, Place::Last, false) => Decision::EndOfLog, // C4
        (Finding::Zero, Place::Last, true) => Decision::Refuse, // C5
        (Finding::Damaged { .. }, Place::Sealed, _) => Decision::Refuse, // C6
        (Finding::Damaged { .. }, Place::Last, true) => Decision::Refuse, // C7
        (Finding::Damaged { .. }, Place::Last, false) => Decision::CutTornTail, // C8
    }
}

/// What the segment rows decide for one file's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentDecision {
    /// S1.
    Use,
    /// S2.
    RemoveInterrupted,
    /// S3 to S6.
    Refuse(String),
    /// S8.
    SkipReclaimed,
}

/// The segment rows S1 to S6 and S8, one match arm per row.
pub fn decide_segment(
    header: &Result<SegmentHeader, HeaderFault>,
    expected_number: u32,
    shard_id: u32,
    is_last: bool,
    holds_commit_records: bool,
) -> SegmentDecision {
    match header {
        Err(fault) if is_last && !holds_commit_records => {
            let _ = fault;
            SegmentDecision::RemoveInterrupted // S2
        }
        Err(fault) => SegmentDecision::Refuse(format!("unusable segment header: {fault}")), // S3
        Ok(h) if h.version != FORMAT_VERSION => SegmentDecision::Refuse(format!(
            "format version {} is not the supported {FORMAT_VERSION}",
            h.version
        )), // S4
        Ok(h) if h.shard_id != shard_id => SegmentDecision::Refuse(format!(
            "segment belongs to shard {}, not to shard {shard_id}",
            h.shard_id
        )), // S5
        Ok(h) if h.number != expected_number => SegmentDecision::Refuse(format!(
            "header says segment {} but the file name says {expected_number}",
            h.number
        )), // S6
        Ok(h) if h.reclaimed() => SegmentDecision::SkipReclaimed,                           // S8
        Ok(_) => SegmentDecision::Use,                                                      // S1
    }
}

/// A torn tail that recovery cut off (row C8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailCut {
    /// The segment file.
    pub file: String,
    /// Where the log now ends in it.
    pub offset: u64,
    /// What was found there.
    pub found: String,
}

impl fmt::Display for TailCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cut at offset {}: {}",
            self.file, self.offset, self.found
        )
    }
}

/// What recovery did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in use (reclaimed ones included).
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Bytes of segments read.
    pub bytes_read: u64,
    /// The torn tail cut off, if any.
    pub cut: Option<TailCut>,
    /// The last segment removed because its creation was interrupted (row S2), if any.
    pub removed_interrupted: Option<String>,
    /// Files that are not segments (row S10).
    pub ignored_files: Vec<String>,
}

/// One segment as recovery leaves it.
pub(crate) struct RecoveredSegment<F> {
    pub number: u32,
    pub file: F,
    pub header: SegmentHeader,
    /// Where its log ends (0 for a reclaimed segment).
    pub end: u64,
}

pub(crate) struct Recovered<F> {
    pub segments: Vec<RecoveredSegment<F>>,
    pub next_commit_seq: u64,
    pub report: RecoveryReport,
}

/// Sequential, block-aligned reads over one file, keeping one window of it.
struct Window<'f, F: SegmentFile> {
    file: &'f F,
    window_bytes: usize,
    start: u64,
    buf: Option<F::ReadBuf>,
    requested: usize,
    bytes_read: u64,
}

impl<'f, F: SegmentFile> Window<'f, F> {
    fn new(file: &'f F, window_bytes: usize) -> Self {
        Window {
            file,
            window_bytes,
            start: 0,
            buf: None,
            requested: 0,
            bytes_read: 0,
        }
    }

    /// Bytes `[pos, pos + len)`, fewer where the file ends.
    async fn get(&mut self, pos: u64, len: usize) -> std::io::Result<&[u8]> {
        let end = pos + len as u64;
        let covered = match &self.buf {
            Some(b) => {
                let have_end = self.start + b.len() as u64;
                let at_eof = b.len() < self.requested;
                pos >= self.start && (end <= have_end || at_eof)
            }
            None => false,
        };
        if !covered {
            let block = BLOCK_BYTES as u64;
            let start = pos / block * block;
            let need = (end - start).div_ceil(block) * block;
            let n = (need as usize).max(self.window_bytes);
            let b = self.file.read_at(start, n).await?;
            self.bytes_read += b.len() as u64;
            self.start = start;
            self.requested = n;
            self.buf = Some(b);
        }
        let b = self.buf.as_ref().expect("window was just filled");
        let from = ((pos - self.start) as usize).min(b.len());
        let to = ((end - self.start) as usize).min(b.len());
        Ok(&b[from..to])
    }
}

/// The commit sequence expected at the next boundary.
#[derive(Clone, Copy, Debug)]
struct Expect {
    seq: u64,
    /// `Some((index, count))` while inside a multi-chunk commit.
    chunk: Option<(u16, u16)>,
}

struct Chunk {
    commit: CommitRecord,
    /// Bytes of commit record plus records.
    bytes: usize,
}

async fn classify<F: SegmentFile>(
    win: &mut Window<'_, F>,
    pos: u64,
    expect: Expect,
    segment: u32,
    segment_size: u64,
    limits: &StorageLimits,
) -> std::io::Result<(Finding, Option<Chunk>)> {
    let damaged = |offset: u64, what: String| Ok((Finding::Damaged { offset, what }, None));
    let head = win.get(pos, COMMIT_RECORD_BYTES).await?;
    if head.iter().all(|&b| b == 0) {
        return Ok((Finding::Zero, None));
    }
    let rec = match parse_record(head, COMMIT_RECORD_BYTES) {
        Ok(r) => r,
        Err(RecordFault::Zero) => return Ok((Finding::Zero, None)),
        Err(f) => return damaged(pos, format!("commit record: {f}")),
    };
    let commit = match (rec.kind, CommitRecord::decode(rec.body)) {
        (RecordKind::Commit, Some(c)) => c,
        (kind, _) => return damaged(pos, format!("a {kind:?} record where a commit starts")),
    };
    if commit.segment != segment {
        return damaged(
            pos,
            format!("commit record written for segment {}", commit.segment),
        );
    }
    let (want_index, want_count) = match expect.chunk {
        Some((i, n)) => (i, Some(n)),
        None => (0, None),
    };
    if commit.commit_seq != expect.seq
        || commit.chunk_index != want_index
        || want_count.is_some_and(|n| n != commit.chunk_count)
        || commit.chunk_count == 0
        || commit.chunk_index >= commit.chunk_count
    {
        return damaged(
            pos,
            format!(
                "commit {} chunk {}/{} where commit {} chunk {want_index} was expected",
                commit.commit_seq, commit.chunk_index, commit.chunk_count, expect.seq
            ),
        );
    }
    let bytes = COMMIT_RECORD_BYTES + commit.batch_bytes as usize;
    if bytes > limits.commit_bytes_max as usize || pos + bytes as u64 > segment_size {
        return damaged(
            pos,
            format!("commit chunk of {} bytes overruns its bounds", bytes),
        );
    }
    let chunk = win.get(pos, bytes).await?;
    if chunk.len() < bytes {
        return damaged(
            pos + chunk.len() as u64,
            format!("commit chunk of {bytes} bytes cut after {}", chunk.len()),
        );
    }
    let mut off = COMMIT_RECORD_BYTES;
    while off < bytes {
        let max = (bytes - off).min(limits.record_bytes_max as usize);
        match parse_record(&chunk[off..bytes], max) {
            Ok(r) if r.kind == RecordKind::Commit => {
                return damaged(pos + off as u64, "a commit record inside a chunk".into())
            }
            Ok(r) => off += r.encoded_len(),
            Err(f) => return damaged(pos + off as u64, format!("record: {f}")),
        }
    }
    Ok((Finding::Commit, Some(Chunk { commit, bytes })))
}

/// Whether a valid commit record of a commit after `failing_seq` starts at any block from `from`
/// to the end of the file.
async fn later_commit<F: SegmentFile>(
    win: &mut Window<'_, F>,
    from: u64,
    file_len: u64,
    segment: u32,
    failing_seq: u64,
) -> std::io::Result<bool> {
    let block = BLOCK_BYTES as u64;
    let mut b = align_up_to_block(from);
    while b < file_len {
        let head = win.get(b, COMMIT_RECORD_BYTES).await?;
        if let Ok(r) = parse_record(head, COMMIT_RECORD_BYTES) {
            if let (RecordKind::Commit, Some(c)) = (r.kind, CommitRecord::decode(r.body)) {
                if c.segment == segment && c.commit_seq > failing_seq {
                    return Ok(true);
                }
            }
        }
        b += block;
    }
    Ok(false)
}

/// Whether any block of the file starts with a valid commit record (row S2's condition).
async fn holds_commit_records<F: SegmentFile>(
    file: &F,
    file_len: u64,
    limits: &StorageLimits,
) -> std::io::Result<bool> {
    let mut win = Window::new(file, limits.read_window_bytes as usize);
    let block = BLOCK_BYTES as u64;
    let mut b = 0;
    while b < file_len {
        let head = win.get(b, COMMIT_RECORD_BYTES).await?;
        if let Ok(r) = parse_record(head, COMMIT_RECORD_BYTES) {
            if r.kind == RecordKind::Commit {
                return Ok(true);
            }
        }
        b += block;
    }
    Ok(false)
}

/// Scans the directory, replays every valid record, and says where the log ends.
pub(crate) async fn recover<D: SegmentDir>(
    dir: &D,
    shard_id: u32,
    limits: &StorageLimits,
    replay: &mut dyn FnMut(Position, RecordKind, &[u8]),
) -> Result<Recovered<D::File>, StorageError> {
    let mut report = RecoveryReport::default();
    let names = dir
        .list()
        .await
        .map_err(|e| StorageError::io("listing", dir.describe(""), e))?;
    let mut numbers = Vec::new();
    for name in names {
        match parse_segment_file_name(&name) {
            Some(n) => numbers.push(n),
            None if name == RESERVE_FILE_NAME => {} // S11: the journal's, checked after recovery
            None => report.ignored_files.push(name), // S10
        }
    }
    numbers.sort_unstable();
    for w in numbers.windows(2) {
        if w[1] != w[0] + 1 {
            // S7
            return Err(StorageError::Segment {
                file: dir.describe(&segment_file_name(w[1])),
                problem: format!(
                    "gap in segment numbers: segment {} follows segment {} ({}); segments {}..{} are missing",
                    w[1],
                    w[0],
                    dir.describe(&segment_file_name(w[0])),
                    w[0] + 1,
                    w[1] - 1
                ),
            });
        }
    }

    // Headers first: a segment's end is recorded in the next segment's header.
    let mut opened: Vec<(u32, D::File, SegmentHeader, u64)> = Vec::new();
    let count = numbers.len();
    for (i, &number) in numbers.iter().enumerate() {
        let name = segment_file_name(number);
        let path = dir.describe(&name);
        let file = dir
            .open(&name)
            .await
            .map_err(|e| StorageError::io("opening", &path, e))?;
        let file_len = file
            .size()
            .await
            .map_err(|e| StorageError::io("sizing", &path, e))?;
        let block = file
            .read_at(0, BLOCK_BYTES)
            .await
            .map_err(|e| StorageError::io("reading header of", &path, e))?;
        report.bytes_read += block.len() as u64;
        let header = SegmentHeader::decode(&block);
        let is_last = i + 1 == count;
        let holds = if header.is_err() && is_last {
            holds_commit_records(&file, file_len, limits)
                .await
                .map_err(|e| StorageError::io("scanning", &path, e))?
        } else {
            false
        };
        match decide_segment(&header, number, shard_id, is_last, holds) {
            SegmentDecision::Use | SegmentDecision::SkipReclaimed => {
                let h = header.expect("decided usable");
                opened.push((number, file, h, file_len));
            }
            SegmentDecision::RemoveInterrupted => {
                drop(file);
                dir.remove(&name)
                    .await
                    .map_err(|e| StorageError::io("removing interrupted segment", &path, e))?;
                dir.sync()
                    .await
                    .map_err(|e| StorageError::io("syncing directory of", &path, e))?;
                tracing::warn!(file = %path, "removed a segment whose creation was interrupted");
                report.removed_interrupted = Some(path);
            }
            SegmentDecision::Refuse(problem) => {
                return Err(StorageError::Segment {
                    file: path,
                    problem,
                });
            }
        }
    }

    let mut segments = Vec::new();
    let mut next_seq: Option<u64> = None;
    let seals: Vec<Option<u64>> = (0..opened.len())
        .map(|i| opened.get(i + 1).map(|o| o.2.prev_end))
        .collect();
    for ((number, file, header, file_len), sealed_end) in opened.into_iter().zip(seals) {
        let path = dir.describe(&segment_file_name(number));
        if let Some(seq) = next_seq {
            if header.first_commit_seq != seq && !header.reclaimed() {
                // S9
                return Err(StorageError::Segment {
                    file: path,
                    problem: format!(
                        "first commit sequence {} does not follow the previous segment's last ({})",
                        header.first_commit_seq,
                        seq.wrapping_sub(1)
                    ),
                });
            }
        }
        if header.reclaimed() {
            next_seq = None;
            segments.push(RecoveredSegment {
                number,
                file,
                header,
                end: 0,
            });
            continue;
        }
        let place = if sealed_end.is_some() {
            Place::Sealed
        } else {
            Place::Last
        };
        let mut win = Window::new(&file, limits.read_window_bytes as usize);
        let mut pos = FIRST_COMMIT_OFFSET;
        let mut expect = Expect {
            seq: header.first_commit_seq,
            chunk: None,
        };
        let mut commit_start = pos;
        let mut pending: Vec<(Position, RecordKind, Vec<u8>)> = Vec::new();
        let io_err = |e| StorageError::io("reading", path.clone(), e);
        let corrupt = |offset: u64, found: String| StorageError::Corrupt {
            file: path.clone(),
            offset,
            found,
        };
        loop {
            if let Some(end) = sealed_end {
                if pos == end {
                    // C2
                    if let Some((i, n)) = expect.chunk {
                        return Err(corrupt(
                            pos,
                            format!(
                                "sealed end falls inside commit {} (chunk {i} of {n} missing)",
                                expect.seq
                            ),
                        ));
                    }
                    break;
                }
                if pos > end {
                    return Err(corrupt(
                        end,
                        format!("the next segment seals this one at {end}, inside a commit chunk that ends at {pos}"),
                    ));
                }
            }
            let (finding, chunk) =
                classify(&mut win, pos, expect, number, header.segment_size, limits)
                    .await
                    .map_err(io_err)?;
            // A multi-chunk commit that stops early is a torn commit, not a clean end.
            let finding = match (finding, expect.chunk) {
                (Finding::Zero, Some((i, n))) => Finding::Damaged {
                    offset: pos,
                    what: format!("commit {} stops before chunk {i} of {n}", expect.seq),
                },
                (f, _) => f,
            };
            let later = match (&finding, place) {
                (Finding::Commit, _) | (_, Place::Sealed) => false,
                _ => later_commit(&mut win, pos + 1, file_len, number, expect.seq)
                    .await
                    .map_err(io_err)?,
            };
            match decide(&finding, place, later) {
                Decision::Accept => {
                    let chunk = chunk.expect("an accepted finding carries its chunk");
                    let c = chunk.commit;
                    if c.chunk_index == 0 {
                        commit_start = pos;
                    }
                    let bytes = win.get(pos, chunk.bytes).await.map_err(io_err)?;
                    let mut off = COMMIT_RECORD_BYTES;
                    while off < chunk.bytes {
                        let r = parse_record(&bytes[off..chunk.bytes], chunk.bytes - off)
                            .expect("validated by classify");
                        let at = Position::new(number, pos + off as u64);
                        if c.chunk_count == 1 {
                            replay(at, r.kind, r.body);
                            report.records += 1;
                        } else {
                            // A commit is all or nothing: hold the chunks of a multi-chunk
                            // commit until its last chunk is seen.
                            pending.push((at, r.kind, r.body.to_vec()));
                        }
                        off += r.encoded_len();
                    }
                    expect = if c.chunk_index + 1 < c.chunk_count {
                        Expect {
                            seq: c.commit_seq,
                            chunk: Some((c.chunk_index + 1, c.chunk_count)),
                        }
                    } else {
                        for (at, kind, body) in pending.drain(..) {
                            replay(at, kind, &body);
                            report.records += 1;
                        }
                        Expect {
                            seq: c.commit_seq + 1,
                            chunk: None,
                        }
                    };
                    pos = align_up_to_block(pos + chunk.bytes as u64);
                }
                Decision::EndOfLog => {
                    assert!(
                        pending.is_empty(),
                        "a clean end inside a commit is a torn one"
                    );
                    break;
                }
                Decision::CutTornTail => {
                    let what = match &finding {
                        Finding::Damaged { offset, what } => format!("{what} (at offset {offset})"),
                        other => format!("{other:?}"),
                    };
                    // The whole torn commit goes, its earlier chunks included.
                    if expect.chunk.is_some() {
                        pos = commit_start;
                        pending.clear();
                    }
                    tracing::warn!(file = %path, offset = pos, found = %what,
                        "journal tail torn: the last, unacknowledged commit was cut off");
                    report.cut = Some(TailCut {
                        file: path.clone(),
                        offset: pos,
                        found: what,
                    });
                    expect = Expect {
                        seq: expect.seq,
                        chunk: None,
                    };
                    break;
                }
                Decision::Refuse => {
                    return Err(match finding {
                        Finding::Damaged { offset, what } if later => corrupt(
                            offset,
                            format!("{what}, followed by valid commits of later sequence numbers"),
                        ),
                        Finding::Damaged { offset, what } => {
                            corrupt(offset, format!("{what}, before the segment's sealed end"))
                        }
                        _ if later => corrupt(
                            pos,
                            "zeros where a commit should start, followed by valid commits".into(),
                        ),
                        _ => corrupt(
                            pos,
                            format!(
                                "zeros or end of file before the segment's sealed end {}",
                                sealed_end.unwrap_or(0)
                            ),
                        ),
                    });
                }
            }
        }
        report.bytes_read += win.bytes_read;
        next_seq = Some(expect.seq);
        segments.push(RecoveredSegment {
            number,
            file,
            header,
            end: pos,
        });
    }
    report.segments = segments.len();
    let next_commit_seq = match (next_seq, segments.last()) {
        (Some(s), _) => s,
        (None, Some(last)) => last.header.first_commit_seq,
        (None, None) => 0,
    };
    Ok(Recovered {
        segments,
        next_commit_seq,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_commit_row_is_reachable_and_decides_as_documented() {
        let d = |what: &str| Finding::Damaged {
            offset: 0,
            what: what.into(),
        };
        let rows = [
            (Finding::Commit, Place::Last, false, Decision::Accept),
            (Finding::Commit, Place::Sealed, false, Decision::Accept),
            (Finding::Zero, Place::Sealed, false, Decision::Refuse),
            (Finding::Zero, Place::Last, false, Decision::EndOfLog),
            (Finding::Zero, Place::Last, true, Decision::Refuse),
            (d("crc"), Place::Sealed, false, Decision::Refuse),
            (d("crc"), Place::Last, true, Decision::Refuse),
            (d("crc"), Place::Last, false, Decision::CutTornTail),
        ];
        for (f, p, later, want) in rows {
            assert_eq!(decide(&f, p, later), want, "{f:?} {p:?} later={later}");
        }
    }

    #[test]
    fn every_segment_row_decides_as_documented() {
        use crate::storage::format::FLAG_RECLAIMED;
        let good = SegmentHeader {
            version: FORMAT_VERSION,
            shard_id: 3,
            number: 5,
            flags: 0,
            segment_size: 1 << 20,
            prev_end: 8192,
            first_commit_seq: 9,
        };
        let d = |h: Result<SegmentHeader, HeaderFault>, last: bool, holds: bool| {
            decide_segment(&h, 5, 3, last, holds)
        };
        assert_eq!(d(Ok(good), true, true), SegmentDecision::Use); // S1
        assert_eq!(
            d(Err(HeaderFault::Zero), true, false),
            SegmentDecision::RemoveInterrupted
        ); // S2
        assert!(matches!(
            d(Err(HeaderFault::Zero), true, true),
            SegmentDecision::Refuse(_)
        )); // S3
        assert!(matches!(
            d(Err(HeaderFault::Zero), false, false),
            SegmentDecision::Refuse(_)
        )); // S3
        let v = SegmentHeader { version: 2, ..good };
        assert!(
            matches!(d(Ok(v), false, false), SegmentDecision::Refuse(m) if m.contains("version"))
        ); // S4
        let s = SegmentHeader {
            shard_id: 4,
            ..good
        };
        assert!(
            matches!(d(Ok(s), false, false), SegmentDecision::Refuse(m) if m.contains("shard 4"))
        ); // S5
        let n = SegmentHeader { number: 6, ..good };
        assert!(
            matches!(d(Ok(n), false, false), SegmentDecision::Refuse(m) if m.contains("says 5"))
        ); // S6
        let r = SegmentHeader {
            flags: FLAG_RECLAIMED,
            ..good
        };
        assert_eq!(d(Ok(r), false, false), SegmentDecision::SkipReclaimed); // S8
    }
}
