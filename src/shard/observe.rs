//! The shard's part of observation: its status beyond the queue host's (connections, the mesh,
//! the journal's disk and latencies, its sessions' tally).
//!
//! Contract: runs in the worker, on the shard's thread, when a `Status` op is executed; reads
//! what the shard already keeps (no counting of its own). The latency histograms are reported
//! with the fixed cumulative bucket bounds `LATENCY_BUCKETS_US` (Prometheus `le`), a last
//! bucket `u64::MAX` (`+Inf`) holding every value. No faults: reading cannot fail.

use hdrhistogram::Histogram;

use super::ShardState;
use crate::mesh::types::{HistogramSnapshot, ShardStatus};

/// Upper bounds of the latency buckets, µs: 50 µs to 1 s, about three per decade.
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

impl ShardState {
    /// Fills in the shard's own figures of `st` (the host filled in its queues').
    pub(super) fn observe(&self, st: &mut ShardStatus) {
        st.confirms = self.tally.confirms();
        st.limit_hits = self.tally.limit_hits();
        st.mesh_outgoing_bytes = self.mesh.outgoing_bytes() as u64;
        st.work_bytes = self.work_bytes.get() as u64;
        st.journal_disk_bytes = self.journal.disk_bytes();
        st.journal_segments_reclaimed = self.journal.stats().segments_reclaimed;
        let l = self.journal.latencies();
        st.histograms = vec![
            snapshot("journal.commit_latency_us", &l.commit, l.commit_sum_us),
            snapshot(
                "journal.fdatasync_latency_us",
                &l.fdatasync,
                l.fdatasync_sum_us,
            ),
        ];
    }
}

/// One histogram as `Status` carries it.
pub fn snapshot(name: &'static str, h: &Histogram<u64>, sum: u64) -> HistogramSnapshot {
    let count = h.len();
    let mut buckets: Vec<(u64, u64)> = LATENCY_BUCKETS_US
        .iter()
        .map(|&le| (le, h.count_between(0, le)))
        .collect();
    buckets.push((u64::MAX, count));
    let quantile = |q: f64| {
        if count == 0 {
            0
        } else {
            h.value_at_quantile(q)
        }
    };
    HistogramSnapshot {
        name,
        count,
        sum,
        buckets,
        p50: quantile(0.5),
        p99: quantile(0.99),
        p999: quantile(0.999),
        max: if count == 0 { 0 } else { h.max() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_at_the_count() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).unwrap();
        for v in [10, 60, 60, 700, 3_000, 2_000_000] {
            h.record(v).unwrap();
        }
        let s = snapshot("journal.commit_latency_us", &h, 2_003_830);
        assert_eq!(s.count, 6);
        let counts: Vec<u64> = s.buckets.iter().map(|b| b.1).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(s.buckets[0], (50, 1));
        assert_eq!(s.buckets[1], (100, 3));
        assert_eq!(s.buckets[LATENCY_BUCKETS_US.len() - 1], (1_000_000, 5));
        assert_eq!(s.buckets.last(), Some(&(u64::MAX, 6)));
        assert!(s.max >= 2_000_000 && s.p50 >= 60 && s.p50 < 800, "{s:?}");
        let empty = snapshot("x", &Histogram::<u64>::new(2).unwrap(), 0);
        assert_eq!((empty.count, empty.p99, empty.max), (0, 0, 0));
    }
}
