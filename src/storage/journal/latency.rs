//! How long the journal's commits take: two HDR histograms per journal, a commit round's
//! latency (from the committer taking the round to its outcome: writes and the fdatasync) and
//! the fdatasync's alone, in µs.
//!
//! Contract: owned by the journal's state, on the shard thread; the committer records one
//! value in each per round (never per record), from the clock it reads around the round; the
//! shard reads them for `Status`. Fixed size: values from 1 µs to `LATENCY_US_MAX` at two
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
}

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies {
            commit: histogram(),
            fdatasync: histogram(),
            commit_sum_us: 0,
            fdatasync_sum_us: 0,
        }
    }
}

fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: 1 <= low, high >= 2 * low, 2 significant digits.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 2).expect("valid histogram bounds")
}

impl Latencies {
    pub(super) fn record_commit(&mut self, us: u64) {
        record(&mut self.commit, us);
        self.commit_sum_us = self.commit_sum_us.saturating_add(us);
    }

    pub(super) fn record_fdatasync(&mut self, us: u64) {
        record(&mut self.fdatasync, us);
        self.fdatasync_sum_us = self.fdatasync_sum_us.saturating_add(us);
    }
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
        l.record_commit(0);
        l.record_commit(u64::MAX);
        l.record_fdatasync(1_500);
        assert_eq!(l.commit.len(), 2);
        assert!(l.commit.max() >= LATENCY_US_MAX);
        assert_eq!(l.commit.distinct_values() * 8, before, "no growth");
        assert!(l.fdatasync.value_at_quantile(0.5).abs_diff(1_500) <= 15);
    }
}
