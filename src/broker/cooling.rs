//! Which messages leave memory, and when: the payload cache's cooling rule.
//!
//! Contract: plain data on one shard. The shell notes the messages each request journals (as
//! runs of consecutive sequence numbers per queue: one name per run, not per message) and, once
//! their records are durable, asks this rule to cool them. Only durable records are cooled (a
//! cold entry must be readable back), so a failed commit cools nothing. A message delivered
//! meanwhile (outstanding, unacked) cools as a waiting one does: it counts against the same
//! budget, and should it come back (nack, its consumer gone) it is read back like any cold one.

use crate::broker::host::QueueHost;
use crate::mesh::types::Seq;

/// Messages journaled by one request, newest last.
#[derive(Debug, Default)]
pub struct Written {
    runs: Vec<(String, Seq, Seq)>,
}

impl Written {
    /// One message journaled into `targets` (queue, sequence number).
    pub fn note(&mut self, targets: &[(&str, Seq)]) {
        for &(queue, seq) in targets {
            match self.runs.last_mut() {
                Some((q, _, last)) if q == queue && *last + 1 == seq => *last = seq,
                _ => self.runs.push((queue.to_string(), seq, seq)),
            }
        }
    }

    pub fn clear(&mut self) {
        self.runs.clear();
    }

    /// Once their records are durable, the newest messages leave memory (payload, envelope and
    /// all: the queue keeps a cold reference to the record, no allocation) while journaled
    /// payloads hold more than their share of `cache_bytes_max`: the head of a backlog,
    /// delivered first, stays in memory; its tail waits on disk.
    pub fn cool_over_budget(&self, host: &mut QueueHost) {
        let cache = host.cache().clone();
        for (queue, first, last) in self.runs.iter().rev() {
            for seq in (*first..=*last).rev() {
                if !cache.over_journaled_share() {
                    return;
                }
                host.cool(queue, seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::stored::{Cache, MsgRef, Stored};
    use crate::mesh::types::{ConnRef, Declare};
    use crate::storage::Position;
    use bytes::Bytes;
    use std::rc::Rc;

    const A: ConnRef = ConnRef { shard: 0, conn: 1 };

    #[test]
    fn consecutive_messages_of_a_queue_are_one_run() {
        let mut w = Written::default();
        w.note(&[("a", 1)]);
        w.note(&[("a", 2), ("b", 7)]);
        w.note(&[("b", 8)]);
        w.note(&[("a", 3)]);
        assert_eq!(
            w.runs,
            vec![
                ("a".to_string(), 1, 2),
                ("b".to_string(), 7, 8),
                ("a".to_string(), 3, 3),
            ]
        );
        w.clear();
        assert!(w.runs.is_empty());
    }

    /// Four 10-byte journaled messages under a 40-byte budget (20 for journaled payloads): the
    /// two newest go cold, the head of the backlog stays in memory.
    #[test]
    fn the_newest_go_cold_until_the_journaled_share_fits() {
        let cache = Cache::new(40);
        let mut host = QueueHost::with_cache(0, cache.clone());
        let declare = Declare {
            name: "q".into(),
            durable: true,
            ..Default::default()
        };
        host.declare(A, declare, 0).unwrap();
        let mut w = Written::default();
        for i in 0..4u64 {
            let msg = Rc::new(Stored::new(
                Bytes::from(vec![0; 10]),
                String::new(),
                "q".into(),
                true,
                Some(&cache),
            ));
            msg.set_position(Position::new(1, i * 4096), 100, None);
            let seq = host.publish(A, "q", msg, None, 0).unwrap();
            w.note(&[("q", seq)]);
        }
        assert_eq!(cache.bytes(), 40);
        w.cool_over_budget(&mut host);
        assert_eq!(cache.bytes(), 20);
        let (first, _) = host.get(A, "q", false, 0).unwrap();
        assert!(matches!(first.unwrap().msg, MsgRef::Hot(_)));
    }

    /// Messages delivered before their commit (a consumer that holds them unacked) still leave
    /// memory once durable; redelivered, they come back cold, and their segment stays counted
    /// until they are acked.
    #[test]
    fn delivered_unacked_messages_go_cold_too() {
        let cache = Cache::new(40);
        let mut host = QueueHost::with_cache(0, cache.clone());
        let declare = Declare {
            name: "q".into(),
            durable: true,
            ..Default::default()
        };
        host.declare(A, declare, 0).unwrap();
        let holder = host.consume(A, "q", "c", 100, false, false).unwrap();
        let mut w = Written::default();
        for i in 0..4u64 {
            let msg = Rc::new(Stored::new(
                Bytes::from(vec![0; 10]),
                String::new(),
                "q".into(),
                true,
                Some(&cache),
            ));
            msg.set_position(Position::new(1, i * 4096), 100, Some(host.liveness()));
            let seq = host.publish(A, "q", msg, None, 0).unwrap();
            w.note(&[("q", seq)]);
        }
        let mut owed = Vec::new();
        host.take_deliveries(0, 100, &mut owed);
        assert_eq!(owed.len(), 4);
        drop(owed); // written to the connection
        assert_eq!(cache.bytes(), 40);
        w.cool_over_budget(&mut host);
        assert_eq!(cache.bytes(), 20, "two delivered messages left memory");
        assert_eq!(host.liveness().live_in(1), 4);
        host.connection_closed(A);
        host.consume(A, "q", "again", 100, false, false).unwrap();
        let mut owed = Vec::new();
        host.take_deliveries(0, 100, &mut owed);
        let cold: Vec<bool> = owed
            .iter()
            .map(|o| matches!(o.delivery.msg, MsgRef::Cold { .. }))
            .collect();
        assert_eq!(cold, vec![false, false, true, true]);
        let again = owed[3].delivery.holder;
        assert_ne!(again, holder);
        for o in &owed {
            host.settle(A, "q", again, o.delivery.seq, true, false)
                .unwrap();
        }
        drop(owed);
        assert_eq!((cache.bytes(), host.liveness().live_in(1)), (0, 0));
    }
}
