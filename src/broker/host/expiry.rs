//! The queue host's side of queue expiry (`expires_ms`): which queues are unused and when each
//! expires, their usage records for the journal, and deleting the ones whose time has come.
//!
//! Contract: part of `QueueHost` (same shard, same data). The rule and its journal records are
//! `broker::expiry`'s; here every queue with `expires_ms` keeps a `QueueExpiry`, and the host
//! keeps one sorted deadline set over the unused ones, so the expiry tick looks only at the
//! earliest deadlines (no pass over the shard's queues). A queue whose time has come goes as a
//! delete would: its messages with it, its deletion journaled if durable, its bindings dropped
//! (`take_removed`); it has no consumers, by definition. Usage records go to `usage` and are
//! journaled with the next group commit (`ops::collect_pushes`), no reply waiting for them; one
//! the journal refuses is logged (after a crash the queue may then expire by an older record's
//! time, never before `expires_ms` after a use whose record was durable).

use std::rc::Rc;

use super::QueueHost;
use crate::broker::catalog::CatalogRecord;
use crate::broker::expiry::{QueueExpiry, Record};
use crate::mesh::types::Declare;

/// How a queue was used (`QueueHost::used`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Use {
    /// Its first consumer attached.
    Consumed,
    /// Its consumers changed: if none is left, it is unused from now.
    ConsumersLeft,
    /// A `Get`, or a (non-passive) redeclare.
    Touched,
}

impl QueueHost {
    /// The expiry of a queue being declared, and its first usage record.
    pub(super) fn expiry_of(&mut self, d: &Declare, now_ms: u64) -> Option<QueueExpiry> {
        let expires_ms = d.arguments.expires_ms?;
        let (e, record) = QueueExpiry::declared(expires_ms, d.durable && !d.exclusive, now_ms);
        self.note_usage(&d.name, record);
        Some(e)
    }

    /// Puts a recovered durable queue's expiry back: its timer resumes from the journal's last
    /// usage record for it (`recorded`), so the time it was unused before the crash counts.
    pub fn restore_expiry(&mut self, name: &str, recorded: Option<Option<u64>>, now_ms: u64) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        let Some(expires_ms) = q.arguments.expires_ms else {
            return;
        };
        let e = QueueExpiry::restored(expires_ms, recorded, now_ms);
        if let Some(deadline) = e.deadline() {
            self.deadlines.insert((deadline, q.name.clone()));
        }
        q.expiry = Some(e);
    }

    /// Queue `name` was used at `now_ms`: its deadline moves (or goes, while it has consumers),
    /// and its usage record is noted if the journal must know.
    pub(super) fn used(&mut self, name: &str, how: Use, now_ms: u64) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        let Some(e) = q.expiry.as_mut() else {
            return;
        };
        let before = e.deadline();
        let record = match how {
            Use::Consumed => e.in_use(),
            Use::ConsumersLeft if q.consumers.is_empty() && before.is_none() => e.unused(now_ms),
            Use::ConsumersLeft => None,
            Use::Touched => e.touched(now_ms),
        };
        let after = e.deadline();
        if before != after {
            let key = q.name.clone();
            if let Some(d) = before {
                self.deadlines.remove(&(d, key.clone()));
            }
            if let Some(d) = after {
                self.deadlines.insert((d, key));
            }
        }
        self.note_usage(name, record);
    }

    fn note_usage(&mut self, name: &str, record: Record) {
        if let Some(unused_since_ms) = record {
            self.usage.push(CatalogRecord::QueueUsage {
                name: name.to_string(),
                unused_since_ms,
            });
        }
    }

    /// A queue going: its deadline with it, and its usage records not journaled yet (they
    /// would follow its deletion in the log, and speak for a queue declared again later).
    pub(super) fn forget_expiry(&mut self, name: &Rc<str>, expiry: Option<&QueueExpiry>) {
        if let Some(d) = expiry.and_then(QueueExpiry::deadline) {
            self.deadlines.remove(&(d, name.clone()));
        }
        if expiry.is_some() {
            self.usage.retain(
                |r| !matches!(r, CatalogRecord::QueueUsage { name: n, .. } if **n == **name),
            );
        }
    }

    /// Deletes every queue unused for its `expires_ms` by `now_ms`; returns how many.
    pub fn expire_queues(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some((deadline, name)) = self.deadlines.first().cloned() {
            if deadline > now_ms {
                break;
            }
            self.remove(&name, "expired (unused for its expires_ms)");
            n += 1;
        }
        n
    }

    /// Usage records noted since the last call, for the journal.
    pub fn take_usage(&mut self) -> Vec<CatalogRecord> {
        std::mem::take(&mut self.usage)
    }

    /// The usage record of every durable queue with `expires_ms`, for the re-statement before
    /// a reclaim: what the journal says now, so the segment that held it may go.
    pub(super) fn usage_restatement(&self, out: &mut Vec<CatalogRecord>) {
        for q in self.queues.values() {
            let Some(Some(unused_since_ms)) = q.expiry.as_ref().map(QueueExpiry::recorded) else {
                continue;
            };
            if q.durable && q.exclusive.is_none() {
                out.push(CatalogRecord::QueueUsage {
                    name: q.name.to_string(),
                    unused_since_ms,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::stored::Stored;
    use crate::mesh::types::ConnRef;
    use bytes::Bytes;
    use weir_protocol::wire::ErrorCode;

    const A: ConnRef = ConnRef { shard: 0, conn: 1 };

    fn expiring(h: &mut QueueHost, name: &str, expires_ms: u32, durable: bool, now: u64) {
        let mut d = Declare {
            name: name.into(),
            durable,
            ..Default::default()
        };
        d.arguments.expires_ms = Some(expires_ms);
        h.declare(A, d, now).unwrap();
    }

    fn exists(h: &mut QueueHost, name: &str) -> bool {
        h.info(A, name, 0).is_ok()
    }

    fn usage(h: &mut QueueHost) -> Vec<Option<u64>> {
        h.take_usage()
            .into_iter()
            .map(|r| match r {
                CatalogRecord::QueueUsage {
                    unused_since_ms, ..
                } => unused_since_ms,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_unused_queue_goes_when_its_time_is_up_with_its_messages_and_its_deletion_journaled() {
        let mut h = QueueHost::new(0);
        expiring(&mut h, "q", 1_000, true, 10_000);
        expiring(&mut h, "later", 5_000, false, 10_000);
        let m = Stored::new(
            Bytes::from_static(b"m"),
            String::new(),
            "q".into(),
            true,
            None,
        );
        h.publish(A, "q", Rc::new(m), None, 10_500).unwrap();
        assert_eq!(
            usage(&mut h),
            vec![Some(10_000)],
            "the transient one journals nothing"
        );
        assert_eq!(h.info(A, "q", 10_400).unwrap().expires_in_ms, Some(600));
        h.take_journal_work();
        assert_eq!(h.expire_queues(10_999), 0, "a publish is no use");
        assert_eq!(h.expire_queues(11_000), 1);
        assert!(!exists(&mut h, "q") && exists(&mut h, "later"));
        assert_eq!(h.take_removed(), vec!["q".to_string()]);
        let work = h.take_journal_work();
        assert_eq!(work.catalog, vec![CatalogRecord::DeleteQueue("q".into())]);
        assert_eq!(h.index_entries(), 0, "its message went with it");
        assert_eq!(h.expire_queues(15_000), 1);
        assert_eq!(h.queue_count(), 0);
    }

    #[test]
    fn consumers_keep_it_and_gets_and_redeclares_renew_it_but_passive_declares_do_not() {
        let mut h = QueueHost::new(0);
        expiring(&mut h, "q", 1_000, true, 0);
        usage(&mut h);
        let c = h.consume_at(A, "q", "c", 10, false, false, 0, 500).unwrap();
        assert_eq!(usage(&mut h), vec![None], "in use");
        assert_eq!(h.info(A, "q", 0).unwrap().expires_in_ms, None);
        assert_eq!(
            h.expire_queues(1_000_000),
            0,
            "never while a consumer is attached"
        );
        h.cancel_at(A, "q", c, 2_000_000).unwrap();
        assert_eq!(usage(&mut h), vec![Some(2_000_000)]);
        assert_eq!(h.expire_queues(2_000_999), 0);
        // A Get renews it (in memory at once, in the journal a lease step ahead).
        assert!(h.get(A, "q", false, 2_000_900).unwrap().0.is_none());
        assert_eq!(usage(&mut h), vec![Some(2_001_900)]);
        assert_eq!(h.expire_queues(2_001_899), 0);
        // So does a redeclare; a passive one does not.
        let mut d = Declare {
            name: "q".into(),
            durable: true,
            ..Default::default()
        };
        d.arguments.expires_ms = Some(1_000);
        h.declare(A, d.clone(), 2_001_800).unwrap();
        d.passive = true;
        h.declare(A, d, 2_002_500).unwrap();
        assert!(usage(&mut h).is_empty(), "within the recorded lease");
        assert_eq!(h.expire_queues(2_002_799), 0);
        assert_eq!(h.expire_queues(2_002_800), 1);
        assert_eq!(h.info(A, "q", 0).unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn a_closed_connection_leaves_it_unused_and_the_restatement_repeats_its_record() {
        let mut h = QueueHost::new(0);
        expiring(&mut h, "q", 1_000, true, 0);
        h.consume_at(A, "q", "c", 10, false, false, 0, 10).unwrap();
        h.connection_closed_at(A, 50_000);
        assert_eq!(usage(&mut h), vec![Some(0), None, Some(50_000)]);
        let restated: Vec<CatalogRecord> = h
            .restatement()
            .into_iter()
            .filter(|r| matches!(r, CatalogRecord::QueueUsage { .. }))
            .collect();
        let want = CatalogRecord::QueueUsage {
            name: "q".into(),
            unused_since_ms: Some(50_000),
        };
        assert_eq!(restated, vec![want]);
        assert_eq!(h.expire_queues(51_000), 1);

        // A queue that goes with its last consumer leaves no usage record behind its deletion.
        let mut d = Declare {
            name: "tmp".into(),
            durable: true,
            auto_delete: true,
            ..Default::default()
        };
        d.arguments.expires_ms = Some(1_000);
        h.declare(A, d, 60_000).unwrap();
        h.consume_at(A, "tmp", "c", 10, false, false, 0, 60_000)
            .unwrap();
        h.connection_closed_at(A, 61_000);
        assert!(h.take_usage().is_empty());
        assert!(!exists(&mut h, "tmp"));
    }
}
