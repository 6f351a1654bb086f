//! The shard's part of observation: its status beyond the queue host's (connections, the mesh,
//! the journal's disk and latencies, its sessions' tally), and its page of the connection
//! listing.
//!
//! Contract: runs in the worker, on the shard's thread, when a `Status` or `ListConnections` op
//! is executed; reads what the shard already keeps (no counting of its own). A connection whose
//! session is borrowed at that moment (never, as the worker runs between connection turns;
//! `try_borrow` says so rather than assuming it) is listed with its session's facts empty. The latency histograms are reported
//! with the fixed cumulative bucket bounds `LATENCY_BUCKETS_US` (Prometheus `le`), a last
//! bucket `u64::MAX` (`+Inf`) holding every value. No faults: reading cannot fail.

use hdrhistogram::Histogram;
use weir_protocol::wire;

use super::ShardState;
use crate::mesh::types::{HistogramSnapshot, ShardStatus};
use crate::net::session::SessionFacts;

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

    /// At most `limit` of this shard's connections with an id above `after`, in id order.
    pub(super) fn list_connections(
        &self,
        after: Option<u64>,
        limit: usize,
        now_ms: u64,
    ) -> Vec<wire::ConnectionInfoT> {
        let connections = self.connections.borrow();
        let mut ids: Vec<u64> = connections
            .keys()
            .copied()
            .filter(|id| after.is_none_or(|a| *id > a))
            .collect();
        ids.sort_unstable();
        ids.truncate(limit);
        ids.into_iter()
            .filter_map(|id| {
                let entry = connections.get(&id)?;
                let facts = entry
                    .session
                    .try_borrow()
                    .map(|s| s.facts())
                    .unwrap_or_else(|_| SessionFacts::default());
                let mut c = wire::ConnectionInfoT::default();
                c.id = id;
                c.shard = self.id;
                c.peer = Some(entry.peer.clone());
                c.client_name = facts.client_name;
                c.connected_ms = now_ms.saturating_sub(facts.accepted_ms);
                c.consumers = facts.consumers;
                c.deliveries_unacked = facts.deliveries_unacked;
                c.publishes_unconfirmed = facts.publishes_unconfirmed;
                c.outbox_bytes = entry.outbox.try_borrow().map_or(0, |o| o.len() as u64);
                c.bytes_received = entry.bytes_received.get();
                c.bytes_sent = entry.bytes_sent.get();
                Some(c)
            })
            .collect()
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
