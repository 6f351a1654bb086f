//! Read-ahead for reads by position: a few large aligned windows of durable log, kept so that
//! the records after the one asked for are served from memory.
//!
//! Contract: one per journal, on the shard thread, behind the journal's read path (`read`). A
//! read whose record lies wholly inside a kept window is answered from it; otherwise the journal
//! reads a window (`window_bytes`, from the record's block, never past its segment's durable end)
//! and keeps it here. A cold backlog is read back in the order it was written, so one read
//! serves the hundreds of records that follow in the window, instead of one read per record.
//!
//! Why a window stays valid: below a segment's durable end the committer never writes again
//! (tail block: pad, never rewrite), so the bytes of a window are the log's until the segment is
//! reclaimed, and the journal drops a segment's windows when it reclaims it (it also never looks
//! here for a position of a reclaimed segment). Every record served from a window is checked
//! by its CRC as after a disk read.
//!
//! Bounded in bytes: the windows kept hold at most `bytes_max` (the oldest goes first); a window
//! larger than the bound is used for its read and not kept. Evicting a window frees its buffer
//! as soon as the record handed out last from it is dropped: readers copy what they keep.
//! `bytes_max` 0 turns it off (each read takes just its record, as before read-ahead).

use std::collections::VecDeque;
use std::ops::Deref;
use std::rc::Rc;

use crate::storage::format::BLOCK_BYTES;

/// The largest window: 1 MiB reads are where this disk's O_DIRECT bandwidth saturates
/// (shared/notes/platform.md §3a), and a window of that size holds about 900 records of 1 KiB.
pub const WINDOW_BYTES_MAX: u64 = 1 << 20;

const BLOCK: u64 = BLOCK_BYTES as u64;

struct Window<B> {
    segment: u32,
    /// Where the window starts in its segment (block-aligned).
    start: u64,
    buf: Rc<B>,
}

impl<B: Deref<Target = [u8]>> Window<B> {
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }
}

/// The windows a journal keeps, and its read-back counters.
pub struct ReadAhead<B> {
    windows: VecDeque<Window<B>>,
    bytes: u64,
    bytes_max: u64,
    stats: ReadAheadStats,
}

/// Read-back counters: records served, and the disk reads they took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadAheadStats {
    /// Disk reads issued by reads by position.
    pub reads: u64,
    /// Records handed back by reads by position (from a window or from their own read).
    pub records: u64,
}

impl<B: Deref<Target = [u8]>> ReadAhead<B> {
    /// Keeps at most `bytes_max` bytes of windows (0: none).
    pub fn new(bytes_max: u64) -> ReadAhead<B> {
        ReadAhead {
            windows: VecDeque::new(),
            bytes: 0,
            bytes_max,
            stats: ReadAheadStats::default(),
        }
    }

    /// Changes the bound, evicting the oldest windows past it.
    pub fn set_bytes_max(&mut self, bytes_max: u64) {
        self.bytes_max = bytes_max;
        self.evict_to(bytes_max);
    }

    /// How much a read that misses takes: a window, or 0 (just the record) when read-ahead is
    /// off. Block-aligned, at most the bound.
    pub fn window_bytes(&self) -> u64 {
        WINDOW_BYTES_MAX.min(self.bytes_max) / BLOCK * BLOCK
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The counters.
    pub fn stats(&self) -> ReadAheadStats {
        self.stats
    }

    /// A kept window holding `[offset, offset + len)` of `segment`, and where `offset` is in it.
    /// The newest window first: a backlog read in order hits the last one kept.
    pub fn find(&self, segment: u32, offset: u64, len: u64) -> Option<(Rc<B>, usize)> {
        self.windows
            .iter()
            .rev()
            .find(|w| w.segment == segment && w.start <= offset && offset + len <= w.end())
            .map(|w| (w.buf.clone(), (offset - w.start) as usize))
    }

    /// Keeps a window of `segment` read at `start`, if it fits the bound; windows it covers go.
    pub fn keep(&mut self, segment: u32, start: u64, buf: Rc<B>) {
        let len = buf.len() as u64;
        if len == 0 || len > self.bytes_max {
            return;
        }
        let end = start + len;
        let mut freed = 0;
        self.windows.retain(|w| {
            let covered = w.segment == segment && start <= w.start && w.end() <= end;
            if covered {
                freed += w.buf.len() as u64;
            }
            !covered
        });
        self.bytes -= freed;
        self.evict_to(self.bytes_max - len);
        self.bytes += len;
        self.windows.push_back(Window {
            segment,
            start,
            buf,
        });
    }

    /// Drops every window of `segment` (it is being reclaimed).
    pub fn drop_segment(&mut self, segment: u32) {
        let mut freed = 0;
        self.windows.retain(|w| {
            if w.segment == segment {
                freed += w.buf.len() as u64;
            }
            w.segment != segment
        });
        self.bytes -= freed;
    }

    /// Counts a disk read.
    pub fn count_read(&mut self) {
        self.stats.reads += 1;
    }

    /// Counts a record handed back.
    pub fn count_record(&mut self) {
        self.stats.records += 1;
    }

    fn evict_to(&mut self, max: u64) {
        while self.bytes > max {
            let w = self.windows.pop_front().expect("bytes are in windows");
            self.bytes -= w.buf.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(len: usize) -> Rc<Vec<u8>> {
        Rc::new(vec![0; len])
    }

    #[test]
    fn a_record_inside_a_window_is_found_and_one_past_it_is_not() {
        let mut ra = ReadAhead::new(1 << 20);
        ra.keep(3, 8192, buf(16384));
        let (_, at) = ra.find(3, 9000, 100).expect("inside");
        assert_eq!(at, 9000 - 8192);
        assert!(ra.find(3, 8192 + 16384 - 50, 100).is_none(), "runs past");
        assert!(ra.find(3, 4096, 100).is_none(), "before");
        assert!(ra.find(4, 9000, 100).is_none(), "another segment");
    }

    #[test]
    fn the_oldest_window_goes_first_when_the_bytes_are_spent() {
        let mut ra = ReadAhead::new(3 * 4096);
        ra.keep(1, 0, buf(4096));
        ra.keep(1, 4096, buf(4096));
        ra.keep(1, 8192, buf(4096));
        assert_eq!(ra.bytes(), 3 * 4096);
        ra.keep(1, 12288, buf(8192));
        assert_eq!(ra.bytes(), 3 * 4096);
        assert!(ra.find(1, 0, 10).is_none() && ra.find(1, 4096, 10).is_none());
        assert!(ra.find(1, 8192, 10).is_some() && ra.find(1, 12288, 10).is_some());
        // Larger than the whole bound: used by its reader, never kept.
        ra.keep(2, 0, buf(4 * 4096));
        assert!(ra.find(2, 0, 10).is_none());
        assert_eq!(ra.bytes(), 3 * 4096);
    }

    #[test]
    fn an_evicted_window_frees_its_buffer_once_its_reader_is_done() {
        let mut ra = ReadAhead::new(4096);
        let first = buf(4096);
        ra.keep(1, 0, first.clone());
        let (held, _) = ra.find(1, 0, 10).unwrap();
        ra.keep(1, 4096, buf(4096));
        assert_eq!(
            Rc::strong_count(&first),
            2,
            "the reader's and ours, not the cache's"
        );
        drop(held);
        assert_eq!(Rc::strong_count(&first), 1);
    }

    #[test]
    fn a_reclaimed_segment_loses_its_windows_and_a_covered_window_is_replaced() {
        let mut ra = ReadAhead::new(1 << 20);
        ra.keep(1, 0, buf(8192));
        ra.keep(2, 0, buf(8192));
        ra.keep(2, 0, buf(16384));
        assert_eq!(
            ra.bytes(),
            8192 + 16384,
            "the smaller window of 2 was covered"
        );
        ra.drop_segment(1);
        assert!(ra.find(1, 0, 10).is_none());
        assert_eq!(ra.bytes(), 16384);
        ra.set_bytes_max(0);
        assert_eq!((ra.bytes(), ra.window_bytes()), (0, 0));
    }

    #[test]
    fn a_window_is_block_aligned_and_at_most_a_mebibyte() {
        assert_eq!(ReadAhead::<Vec<u8>>::new(4 << 20).window_bytes(), 1 << 20);
        assert_eq!(ReadAhead::<Vec<u8>>::new(10_000).window_bytes(), 8192);
    }
}
