//! Rebuilding a shard's queues from its journal: declarations, messages, settlements, replayed
//! in log order.
//!
//! Contract: pure, no I/O; fed by the journal's replay on the shard's thread before the shard
//! serves anything. The rules, in log order:
//!
//! | record                     | effect                                                         |
//! |----------------------------|----------------------------------------------------------------|
//! | catalog: declare queue     | the queue exists (empty, or kept as it is if already declared) |
//! | catalog: delete queue      | the queue and every message in it are gone                      |
//! | message, target (q, seq)   | message seq is in q (a compaction copy replaces it), even if q  |
//! |                            | is not declared yet: after reclaim a queue's messages can come  |
//! |                            | before its re-stated declaration                                |
//! | settle (q, ranges)         | those seqs of q are gone                                        |
//! | retry (q, seq, due, counts)| if seq of q is live: its newest retry state (waiting until due, |
//! |                            | failures and deliveries so far); otherwise skipped (settled)    |
//! | end of log, q undeclared   | q and its messages are dropped (it was deleted before a reclaim)|
//! | catalog: queue seq (q, n)  | q's next sequence number is at least n (re-stated at reclaim)   |
//! | catalog: queue usage (q, u)| q's expiry resumes from u (in use, or unused since T): the last |
//! |                            | one stands; none: counted from the recovery (`broker::expiry`) |
//! | any record, any q          | q's next sequence number moves past every seq it names          |
//! | a body that does not parse | the shard refuses to start, naming the record                   |
//! | message with a producer    | the producer's window (`broker::producers`) holds its sequence  |
//! | stamp (p, s)               | (kept even if its queues are gone: a re-send is still a dup)    |
//! | catalog: producer window   | merged into the producer's window (re-stated before reclaim)    |
//! | catalog: exchange, binding | applied to the control plane's table (shard 0 only writes them);|
//! |                            | one that no longer applies (a bind to an exchange whose        |
//! |                            | declaration was reclaimed) is skipped: the re-statement written |
//! |                            | before every reclaim, later in the log, holds the whole state   |
//!
//! The two sequence rules keep numbers from being reused: a settle record naming seq n must
//! never match a later message that happens to get n.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::broker::catalog::CatalogRecord;
use crate::broker::host::QueueHost;
use crate::broker::producers::{ProducerLimits, ProducerTable};
use crate::broker::routing::RoutingTable;
use crate::broker::stored::{Cache, MsgRef};
use crate::mesh::types::Declare;
use crate::mesh::types::Seq;
use crate::storage::format::RECORD_HEADER_BYTES;
use crate::storage::{
    MessageEnvelope, Position, RecordKind, RetryEntry, RetryRecord, SettleRecord,
};

struct RebuiltQueue {
    /// `None` until the log declares it: a queue's messages can precede its (re-stated)
    /// declaration once reclaim has removed the segment with the original one.
    declare: Option<Declare>,
    /// Where each live message's record is: (position, record length, message length), its
    /// delivery time if it was published delayed, and its priority (so a priority queue orders
    /// its cold backlog without reading it back). No allocation per message, and nothing
    /// counted until the queue is restored.
    messages: BTreeMap<Seq, (Position, u32, u32, Option<u64>, u8)>,
    /// The newest retry state of each live message that has one (`Retry` records): only for
    /// messages that failed, so no cost for the rest of the backlog.
    retries: BTreeMap<Seq, RetryEntry>,
    next_seq: Seq,
    /// The last usage record (`expires_ms`): `Some(None)` in use, `Some(Some(t))` unused since t.
    usage: Option<Option<u64>>,
}

impl RebuiltQueue {
    fn undeclared() -> RebuiltQueue {
        RebuiltQueue {
            declare: None,
            messages: BTreeMap::new(),
            retries: BTreeMap::new(),
            next_seq: 0,
            usage: None,
        }
    }
}

#[derive(Default)]
pub struct Rebuild {
    queues: BTreeMap<String, RebuiltQueue>,

    /// The control plane's durable exchanges and bindings (shard 0's journal only).
    routing: RoutingTable,
    /// Idempotent producers' windows, from message stamps and re-statements.
    producers: ProducerTable,
    /// The first record that could not be understood.
    first_error: Option<String>,
    records: u64,
}

impl Rebuild {
    pub fn new() -> Rebuild {
        Rebuild::default()
    }

    /// A rebuild whose producer windows have `window` sequences (`producer_window_max`).
    pub fn with_producer_window(window: u64) -> Rebuild {
        Rebuild {
            producers: ProducerTable::new(ProducerLimits {
                window,
                producers_max: usize::MAX,
                idle_expiry_ms: u64::MAX,
            }),
            ..Rebuild::default()
        }
    }

    /// The producers the log holds, each used `now_ms` (a restart counts as a use).
    pub fn take_producers(&mut self, now_ms: u64) -> ProducerTable {
        let mut producers = std::mem::take(&mut self.producers);
        producers.recovered(now_ms);
        producers
    }

    /// Applies one replayed record. The first record that cannot be understood is kept and
    /// reported by `finish`.
    pub fn apply(&mut self, position: Position, kind: RecordKind, body: &[u8]) {
        self.records += 1;
        if self.first_error.is_some() {
            return;
        }
        if let Err(e) = self.apply_inner(position, kind, body) {
            self.first_error = Some(format!("record {} ({kind:?}): {e}", self.records));
        }
    }

    fn apply_inner(
        &mut self,
        position: Position,
        kind: RecordKind,
        body: &[u8],
    ) -> Result<(), String> {
        match kind {
            RecordKind::Control => match CatalogRecord::decode(body)? {
                CatalogRecord::DeclareQueue(d) => {
                    let q = self
                        .queues
                        .entry(d.name.clone())
                        .or_insert_with(RebuiltQueue::undeclared);
                    // A re-statement repeats a declaration: the first one stands.
                    q.declare.get_or_insert(d);
                }
                CatalogRecord::DeleteQueue(name) => {
                    self.queues.remove(&name);
                }
                CatalogRecord::QueueSeq { name, next_seq } => {
                    let q = self
                        .queues
                        .entry(name)
                        .or_insert_with(RebuiltQueue::undeclared);
                    q.next_seq = q.next_seq.max(next_seq);
                }
                CatalogRecord::QueueUsage {
                    name,
                    unused_since_ms,
                } => {
                    let q = self
                        .queues
                        .entry(name)
                        .or_insert_with(RebuiltQueue::undeclared);
                    q.usage = Some(unused_since_ms);
                }
                // Refusals are the "no longer applies" row of the table: skipped.
                CatalogRecord::DeclareExchange(e) => {
                    let _ = self.routing.declare_exchange(e);
                }
                CatalogRecord::DeleteExchange(name) => {
                    let _ = self.routing.delete_exchange(&name, false);
                }
                CatalogRecord::Bind(b) => {
                    let _ = self.routing.bind(b);
                }
                CatalogRecord::Unbind(b) => {
                    let _ = self.routing.unbind(&b);
                }
                CatalogRecord::Producer(p) => self.producers.restore_state(&p),
            },
            RecordKind::Message => {
                let (envelope, stamp, message) =
                    MessageEnvelope::decode_stamped(body).map_err(|e| e.to_string())?;
                if let Some(stamp) = stamp {
                    self.producers
                        .restore_stamp(stamp.producer_id, stamp.sequence);
                }
                // The payload stays in the journal: recovery costs memory per message, not per
                // byte of backlog; deliveries read payloads back.
                let record_len = (RECORD_HEADER_BYTES + body.len()) as u32;
                let (deliver_at, priority) = message_fields(message);
                for t in &envelope.targets {
                    let queue =
                        std::str::from_utf8(t.queue).map_err(|_| "queue name is not UTF-8")?;
                    let q = self
                        .queues
                        .entry(queue.to_string())
                        .or_insert_with(RebuiltQueue::undeclared);
                    {
                        q.messages.insert(
                            t.queue_seq,
                            (
                                position,
                                record_len,
                                message.len() as u32,
                                deliver_at,
                                priority,
                            ),
                        );
                        q.next_seq = q.next_seq.max(t.queue_seq + 1);
                    }
                }
            }
            RecordKind::Settle => {
                let settle = SettleRecord::decode(body).map_err(|e| e.to_string())?;
                let queue =
                    std::str::from_utf8(settle.queue).map_err(|_| "queue name is not UTF-8")?;
                let q = self
                    .queues
                    .entry(queue.to_string())
                    .or_insert_with(RebuiltQueue::undeclared);
                {
                    for &(first, last) in &settle.ranges {
                        if first > last {
                            return Err(format!("settle range {first}..={last} is reversed"));
                        }
                        let gone: Vec<Seq> =
                            q.messages.range(first..=last).map(|(s, _)| *s).collect();
                        for s in gone {
                            q.messages.remove(&s);
                            q.retries.remove(&s);
                        }
                        q.next_seq = q.next_seq.max(last.saturating_add(1));
                    }
                }
            }
            RecordKind::Retry => {
                let retry = RetryRecord::decode(body).map_err(|e| e.to_string())?;
                let queue =
                    std::str::from_utf8(retry.queue).map_err(|_| "queue name is not UTF-8")?;
                let q = self
                    .queues
                    .entry(queue.to_string())
                    .or_insert_with(RebuiltQueue::undeclared);
                for e in retry.entries {
                    // A record is newer than its message's, so a message it names that is not
                    // here was settled already: nothing to keep.
                    if q.messages.contains_key(&e.seq) {
                        q.retries.insert(e.seq, e);
                    }
                    q.next_seq = q.next_seq.max(e.seq.saturating_add(1));
                }
            }
            RecordKind::Commit => {}
        }
        Ok(())
    }

    /// The durable exchanges and bindings the log holds (empty but for shard 0).
    pub fn take_routing(&mut self) -> RoutingTable {
        std::mem::take(&mut self.routing)
    }

    /// The queues, or the first record that could not be understood.
    pub fn finish(
        self,
        shard: u16,
        cache: Rc<Cache>,
        now_ms: u64,
    ) -> Result<(QueueHost, RebuildSummary), String> {
        if let Some(e) = self.first_error {
            return Err(e);
        }
        let mut host = QueueHost::with_cache(shard, cache);
        let mut summary = RebuildSummary {
            records: self.records,
            queues: 0,
            messages: 0,
        };
        // Records of a queue the log never declared (it was deleted, and its deletion is in a
        // reclaimed segment with everything before it) are dropped here.
        for (_, q) in self.queues {
            let Some(declare) = q.declare else { continue };
            let (name, usage) = (declare.name.clone(), q.usage);
            summary.queues += 1;
            summary.messages += q.messages.len() as u64;
            let mut retries = q.retries;
            let messages = q.messages.into_iter().map(
                move |(seq, (position, record_len, len, deliver_at, priority))| {
                    (
                        seq,
                        len,
                        MsgRef::Cold {
                            position,
                            record_len,
                        },
                        deliver_at,
                        priority,
                        retries.remove(&seq),
                    )
                },
            );
            host.restore_queue(declare, q.next_seq, messages, now_ms);
            host.restore_expiry(&name, usage, now_ms);
        }
        // The restored queues' declarations are already in the journal.
        host.take_journal_work();
        Ok((host, summary))
    }
}

/// A durable queue as replay left it, for a tool that rewrites the journal (`weir data
/// reshard`): what `Rebuild::finish` would restore, without a host.
pub struct LiveQueue {
    pub declare: Declare,
    pub next_seq: Seq,
    /// The last usage record (`expires_ms`): `Some(None)` in use, `Some(Some(t))` unused since t.
    pub usage: Option<Option<u64>>,
    /// Every live message in queue order: (seq, its record's position, the record's length).
    pub messages: Vec<(Seq, Position, u32)>,
    /// The newest retry state of the live messages that have one.
    pub retries: Vec<RetryEntry>,
}

impl Rebuild {
    /// The durable queues the log holds, by the same rules `finish` restores them (a queue
    /// never declared is dropped), in name order; or the first record that could not be
    /// understood. Take the routing table and the producers first.
    pub fn into_live(self) -> Result<impl Iterator<Item = LiveQueue>, String> {
        if let Some(e) = self.first_error {
            return Err(e);
        }
        Ok(self.queues.into_values().filter_map(|q| {
            let declare = q.declare?;
            Some(LiveQueue {
                declare,
                next_seq: q.next_seq,
                usage: q.usage,
                messages: q
                    .messages
                    .into_iter()
                    .map(|(seq, (position, record_len, ..))| (seq, position, record_len))
                    .collect(),
                retries: q.retries.into_values().collect(),
            })
        }))
    }
}

/// A message's delivery time (if it was published delayed) and priority, read from its bytes.
/// They were verified at ingress with the broker's limits, which may be wider than the
/// defaults: verified again here within the codec's own hard bounds, not read unchecked (a
/// recovery pays well under a microsecond per message for it, once for both fields). Bytes that
/// do not verify (never written by this broker) read as delivered now, priority 0.
fn message_fields(message: &[u8]) -> (Option<u64>, u8) {
    let opts = flatbuffers::VerifierOptions {
        max_depth: 64,
        max_tables: 1 << 20,
        max_apparent_size: 1 << 31,
        ignore_missing_null_terminator: false,
    };
    let Ok(m) = flatbuffers::root_with_opts::<weir_protocol::wire::Message>(&opts, message) else {
        return (None, 0);
    };
    let deliver_at = m.deliver_at_ms().filter(|t| *t > 0).map(|t| t as u64);
    (deliver_at, m.priority())
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuildSummary {
    pub records: u64,
    pub queues: u64,
    pub messages: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::types::ConnRef;
    use crate::storage::{SettleReason, Target};

    fn declare(name: &str) -> Vec<u8> {
        CatalogRecord::DeclareQueue(Declare {
            name: name.into(),
            durable: true,
            ..Default::default()
        })
        .encode()
    }

    fn message(queue: &str, seq: Seq, body: &[u8]) -> Vec<u8> {
        let env = MessageEnvelope {
            deaths: &[],
            exchange: b"",
            routing_key: queue.as_bytes(),
            targets: vec![Target {
                queue: queue.as_bytes(),
                queue_seq: seq,
            }],
        };
        let mut out = vec![0; env.encoded_len() + body.len()];
        env.encode(&mut out[..env.encoded_len()]);
        out[env.encoded_len()..].copy_from_slice(body);
        out
    }

    fn settle(queue: &str, first: u64, last: u64) -> Vec<u8> {
        let s = SettleRecord {
            queue: queue.as_bytes(),
            reason: SettleReason::Acked,
            ranges: vec![(first, last)],
        };
        let mut out = vec![0; s.encoded_len()];
        s.encode(&mut out);
        out
    }

    #[test]
    fn settled_messages_stay_gone_and_sequence_numbers_are_not_reused() {
        let mut r = Rebuild::new();
        r.apply(Position::new(0, 4096), RecordKind::Control, &declare("q"));
        for seq in 0..5 {
            r.apply(
                Position::new(0, 4096),
                RecordKind::Message,
                &message("q", seq, format!("m{seq}").as_bytes()),
            );
        }
        r.apply(
            Position::new(0, 4096),
            RecordKind::Settle,
            &settle("q", 0, 1),
        );
        r.apply(
            Position::new(0, 4096),
            RecordKind::Settle,
            &settle("q", 9, 9),
        ); // a settle past the last message
        r.apply(
            Position::new(0, 4096),
            RecordKind::Message,
            &message("q", 2, b"m2"),
        ); // a compaction copy
        let (mut host, summary) = r.finish(0, Cache::new(u64::MAX), 0).unwrap();
        assert_eq!((summary.queues, summary.messages), (1, 3));
        let a = ConnRef { shard: 0, conn: 1 };
        let info = host.info(a, "q", 0).unwrap();
        assert_eq!(info.messages_ready, 3);
        let seq = host
            .publish(
                a,
                "q",
                Rc::new(crate::broker::stored::Stored::new(
                    bytes::Bytes::new(),
                    String::new(),
                    "q".into(),
                    true,
                    None,
                )),
                None,
                0,
            )
            .unwrap();
        assert_eq!(seq, 10, "a new message reused a settled sequence number");
    }

    #[test]
    fn a_deleted_queue_and_its_messages_do_not_come_back() {
        let mut r = Rebuild::new();
        r.apply(
            Position::new(0, 4096),
            RecordKind::Control,
            &declare("gone"),
        );
        r.apply(
            Position::new(0, 4096),
            RecordKind::Message,
            &message("gone", 0, b"x"),
        );
        r.apply(
            Position::new(0, 4096),
            RecordKind::Control,
            &CatalogRecord::DeleteQueue("gone".into()).encode(),
        );
        r.apply(
            Position::new(0, 4096),
            RecordKind::Message,
            &message("gone", 1, b"y"),
        );
        let (mut host, summary) = r.finish(0, Cache::new(u64::MAX), 0).unwrap();
        assert_eq!(summary.queues, 0);
        assert!(host.info(ConnRef { shard: 0, conn: 1 }, "gone", 0).is_err());
    }

    #[test]
    fn queue_expiry_resumes_from_the_last_usage_record_and_a_redeclared_queue_starts_afresh() {
        let expiring = |name: &str| {
            let mut d = Declare {
                name: name.into(),
                durable: true,
                ..Default::default()
            };
            d.arguments.expires_ms = Some(10_000);
            CatalogRecord::DeclareQueue(d).encode()
        };
        let usage = |name: &str, unused_since_ms| {
            CatalogRecord::QueueUsage {
                name: name.into(),
                unused_since_ms,
            }
            .encode()
        };
        let at = Position::new(0, 4096);
        let mut r = Rebuild::new();
        r.apply(at, RecordKind::Control, &expiring("idle"));
        r.apply(at, RecordKind::Control, &usage("idle", Some(1_000)));
        r.apply(at, RecordKind::Control, &usage("idle", Some(3_000)));
        r.apply(at, RecordKind::Control, &expiring("busy"));
        r.apply(at, RecordKind::Control, &usage("busy", Some(1_000)));
        r.apply(at, RecordKind::Control, &usage("busy", None));
        r.apply(at, RecordKind::Control, &expiring("again"));
        r.apply(at, RecordKind::Control, &usage("again", Some(1_000)));
        r.apply(
            at,
            RecordKind::Control,
            &CatalogRecord::DeleteQueue("again".into()).encode(),
        );
        r.apply(at, RecordKind::Control, &expiring("again"));
        let (mut host, _) = r.finish(0, Cache::new(u64::MAX), 5_000).unwrap();
        let a = ConnRef { shard: 0, conn: 1 };
        let left = |host: &mut QueueHost, q: &str| host.info(a, q, 5_000).unwrap().expires_in_ms;
        assert_eq!(
            left(&mut host, "idle"),
            Some(8_000),
            "the last record stands"
        );
        assert_eq!(left(&mut host, "busy"), Some(10_000), "in use at the crash");
        assert_eq!(
            left(&mut host, "again"),
            Some(10_000),
            "no record of the new one"
        );
        assert_eq!(host.expire_queues(12_999), 0);
        assert_eq!(host.expire_queues(13_000), 1);
    }

    #[test]
    fn a_record_that_does_not_parse_refuses_the_rebuild() {
        let mut r = Rebuild::new();
        r.apply(Position::new(0, 4096), RecordKind::Control, &declare("q"));
        r.apply(Position::new(0, 4096), RecordKind::Control, &[7, 1, 2]);
        let err = r.finish(0, Cache::new(u64::MAX), 0).err().unwrap();
        assert!(err.contains("record 2 (Control)"), "{err}");
    }

    fn retry(queue: &str, seq: Seq, due_ms: u64, failures: u32) -> Vec<u8> {
        let r = RetryRecord {
            queue: queue.as_bytes(),
            entries: vec![RetryEntry {
                seq,
                due_ms,
                failures,
                delivery_count: failures,
            }],
        };
        let mut out = vec![0; r.encoded_len()];
        r.encode(&mut out);
        out
    }

    #[test]
    fn a_retry_record_keeps_its_message_waiting_until_due_with_its_failures() {
        let mut declare_retrying = Declare {
            name: "q".into(),
            durable: true,
            ..Default::default()
        };
        declare_retrying.arguments.retry_delays_ms = Some(vec![100, 100, 100]);
        let mut r = Rebuild::new();
        let at = Position::new(0, 4096);
        r.apply(
            at,
            RecordKind::Control,
            &CatalogRecord::DeclareQueue(declare_retrying).encode(),
        );
        for seq in 0..4 {
            r.apply(at, RecordKind::Message, &message("q", seq, b"m"));
        }
        // 0: retried twice, the newest record due later; 1: its retry is past; 2: settled after
        // its retry; 3: never failed.
        r.apply(at, RecordKind::Retry, &retry("q", 0, 5_000, 1));
        r.apply(at, RecordKind::Retry, &retry("q", 0, 9_000, 2));
        r.apply(at, RecordKind::Retry, &retry("q", 1, 500, 1));
        r.apply(at, RecordKind::Retry, &retry("q", 2, 9_000, 1));
        r.apply(at, RecordKind::Settle, &settle("q", 2, 2));
        r.apply(at, RecordKind::Retry, &retry("q", 7, 9_000, 1)); // settled long ago
        let (mut host, summary) = r.finish(0, Cache::new(u64::MAX), 1_000).unwrap();
        assert_eq!(summary.messages, 3);
        let a = ConnRef { shard: 0, conn: 1 };
        let info = host.info(a, "q", 1_000).unwrap();
        assert_eq!(
            (
                info.messages_ready,
                info.messages_delayed,
                info.messages_retrying
            ),
            (2, 1, 1)
        );
        assert_eq!(host.next_due(), Some(9_000));
        // Not before its due time; then back with its failures counted on: one more failure
        // takes it to the last delay, the one after exhausts the policy.
        let holder = host.consume(a, "q", "c", 10, false, false).unwrap();
        let seqs = |h: &mut QueueHost, now| {
            let mut out = Vec::new();
            h.take_deliveries(now, 100, &mut out);
            out.iter().map(|o| o.delivery.seq).collect::<Vec<_>>()
        };
        assert_eq!(seqs(&mut host, 8_999), vec![1, 3]);
        host.expire(9_000);
        assert_eq!(seqs(&mut host, 9_000), vec![0]);
        host.fail(a, "q", holder, 0, None, 9_000).unwrap();
        host.expire(9_100);
        assert_eq!(seqs(&mut host, 9_100), Vec::<u64>::new());
        host.expire(9_101);
        assert_eq!(seqs(&mut host, 9_101), vec![0]);
        assert_eq!(
            host.fail(a, "q", holder, 0, None, 9_101).unwrap(),
            crate::broker::queue::RetryDecision::Exhausted
        );
    }

    #[test]
    fn messages_before_a_restated_declaration_are_kept() {
        // After reclaim removed the segment with the original declaration, the log starts with
        // messages, and the re-stated declaration follows them.
        let mut r = Rebuild::new();
        r.apply(
            Position::new(1, 4096),
            RecordKind::Message,
            &message("q", 7, b"early"),
        );
        r.apply(Position::new(1, 8192), RecordKind::Control, &declare("q"));
        r.apply(
            Position::new(1, 8192),
            RecordKind::Control,
            &CatalogRecord::QueueSeq {
                name: "q".into(),
                next_seq: 8,
            }
            .encode(),
        );
        r.apply(
            Position::new(1, 12288),
            RecordKind::Message,
            &message("q", 8, b"late"),
        );
        let (host, summary) = r.finish(0, Cache::new(u64::MAX), 0).unwrap();
        assert_eq!((summary.queues, summary.messages), (1, 2));
        assert_eq!(host.liveness().live_in(1), 2);
    }

    /// A `Message` flatbuffer of `priority`, as a producer sends it.
    fn prioritized(priority: u8) -> Vec<u8> {
        let mut m = weir_protocol::wire::MessageT::default();
        (m.priority, m.persistent) = (priority, true);
        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let root = m.pack(&mut fbb);
        fbb.finish(root, None);
        fbb.finished_data().to_vec()
    }

    #[test]
    fn a_priority_queue_orders_its_cold_backlog_by_the_priorities_its_records_hold() {
        let mut d = Declare {
            name: "p".into(),
            durable: true,
            ..Default::default()
        };
        d.arguments.priority_max = 4;
        let mut r = Rebuild::new();
        r.apply(
            Position::new(0, 4096),
            RecordKind::Control,
            &CatalogRecord::DeclareQueue(d).encode(),
        );
        // 9 is capped at the queue's 4.
        for (seq, priority) in [(0, 0), (1, 4), (2, 1), (3, 9), (4, 0), (5, 1)] {
            r.apply(
                Position::new(0, 4096 * (seq + 2)),
                RecordKind::Message,
                &message("p", seq, &prioritized(priority)),
            );
        }
        let (mut host, _) = r.finish(0, Cache::new(u64::MAX), 0).unwrap();
        let a = ConnRef { shard: 0, conn: 1 };
        let order: Vec<Seq> =
            std::iter::from_fn(|| host.get(a, "p", true, 0).unwrap().0.map(|d| d.seq)).collect();
        assert_eq!(order, [1, 3, 2, 5, 0, 4]);
    }
}
