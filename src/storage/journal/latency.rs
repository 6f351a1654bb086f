//! How long the journal's commits take: two HDR histograms per journal, a commit round's
//! latency (from the committer taking the round to its outcome: writes and the fdatasync) and
//! the fdatasync's alone, in µs.
//!
//! Contract: owned by the journal's state, on the shard thread; the committer records one
//! value in each per round (never per record), from the monotonic clock it reads three times a
//! round (its start, the fdatasync's start, its end: a plain `u64` of µs, so a round costs three
//! clock reads and two subtractions); the shard reads them for `Status`. Fixed size: values from 1 µs to `LATENCY_US_MAX` at two
//! significant digits, so each histogram holds a fixed array of counts (`latency_bytes`,
//! about 20 KiB) whatever the load; a longer round is recorded as `LATENCY_US_MAX`. No
//! faults: recording cannot fail.

use hdrhistogram::Histogram;

/// The largest latency told apart, µs (a minute): a round that takes longer is counted here.
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// The journal's latency histograms.
#[derive(Clone, Debug)]
pub struct Latencies {
    /// A commit round's writes and fdatasync.
    pub commit: Histogram<u64>,
    /// The round's fdatasync alone.
    pub fdatasync: Histogram<u64>,
    /// The exact sums of the values recorded in each, µs.
    pub commit_sum_us: u64,
    pub fdatasync_sum_us: u64,
    /// When the round in progress finished its fdatasync: the end of its commit latency too.
    synced_at_us: Option<u64>,
}

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies {
            commit: histogram(),
            fdatasync: histogram(),
            commit_sum_us: 0,
            fdatasync_sum_us: 0,
            synced_at_us: None,
        }
    }
}

fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: 1 <= low, high >= 2 * low, 2 significant digits.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 2).expect("valid histogram bounds")
}

impl Latencies {
    /// A round that started at `started_us` has its outcome: its commit latency ends at its
    /// fdatasync's end, or now if it failed before one.
    pub(super) fn record_commit(&mut self, started_us: u64) {
        let end = self.synced_at_us.take().unwrap_or_else(now_us);
        let us = end.saturating_sub(started_us);
        record(&mut self.commit, us);
        self.commit_sum_us = self.commit_sum_us.saturating_add(us);
    }

    /// The round's fdatasync, started at `started_us`, returned (either way).
    pub(super) fn record_fdatasync(&mut self, started_us: u64) {
        let end = now_us();
        self.synced_at_us = Some(end);
        let us = end.saturating_sub(started_us);
        record(&mut self.fdatasync, us);
        self.fdatasync_sum_us = self.fdatasync_sum_us.saturating_add(us);
    }
}

/// The monotonic clock in µs. Read directly rather than through `Instant`, whose `elapsed`
/// costs more than the read itself (benches/per_message: a commit per message there).
pub(super) fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call; CLOCK_MONOTONIC exists on every
    // Linux (the call cannot fail with these arguments).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, LATENCY_US_MAX));
}

/// Bytes one latency histogram's counts take: fixed by its bounds.
pub fn latency_bytes() -> usize {
    histogram().distinct_values() * std::mem::size_of::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_has_a_fixed_size_and_clamps_what_it_cannot_tell_apart() {
        let mut l = Latencies::default();
        let before = latency_bytes();
        assert!(before <= 32 << 10, "{before} bytes");
        // Started at boot (0): the longest latency there is, clamped.
        l.record_fdatasync(0);
        l.record_commit(0);
        // Starting in the future (a value out of order): clamped to the smallest.
        l.record_commit(u64::MAX);
        assert_eq!((l.commit.len(), l.fdatasync.len()), (2, 1));
        assert!(l.commit.max() >= LATENCY_US_MAX);
        assert_eq!(l.commit.min(), 1);
        assert_eq!(l.commit.distinct_values() * 8, before, "no growth");
    }

    #[test]
    fn a_commit_ends_where_its_fdatasync_ended() {
        let mut l = Latencies::default();
        let start = now_us();
        l.record_fdatasync(start);
        let synced = l.synced_at_us.expect("noted");
        assert!(synced >= start);
        l.record_commit(start.saturating_sub(1_500));
        assert_eq!(l.commit_sum_us, synced - start + 1_500);
        assert!(l.synced_at_us.is_none(), "taken by its round");
    }
}
