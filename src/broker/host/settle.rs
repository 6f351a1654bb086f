//! The queue host's settle accounting: acks and nacks, and the books of every message that leaves
//! a queue, however it leaves.
//!
//! Contract: part of `QueueHost` (same shard, same data). Every `Settled` a queue hands back goes
//! through `note_settled`, which journals the settle of a journaled message, counts a drop, or
//! queues a dead letter for the shard to publish; a cold message's journal segment stays counted
//! live (`Liveness`) until nothing refers to its record, so reclaim never takes a record still
//! needed. Faults handled: an ack or nack for a delivery that is not outstanding for its owner is
//! refused (`UnknownDeliveryTag`), nothing changes.

use std::rc::Rc;

use weir_protocol::wire::ErrorCode;

use super::QueueHost;
use crate::broker::catalog::CatalogRecord;
use crate::broker::queue::Settled;
use crate::broker::stored::{Liveness, MsgRef};
use crate::mesh::types::{ConnRef, Refusal};
use crate::mesh::types::{HolderId, Seq};
use crate::storage::SettleReason;

/// A message its queue dead-lettered (rejected without requeue, expired, pushed out by overflow,
/// past `max_deliveries`): the shard publishes it to `exchange` with `routing_key` (the queue's
/// `dead_letter_routing_key`, or `None` for the message's own key). A cold message's segment is
/// still counted live: the shard reads the record back, then releases it (`release_dead_letter`).
#[derive(Debug)]
pub struct DeadLetter {
    pub queue: Rc<str>,
    pub exchange: String,
    pub routing_key: Option<String>,
    pub msg: MsgRef,
}

/// What the host asks the shard to write to the journal.
#[derive(Debug, Default)]
pub struct JournalWork {
    pub catalog: Vec<CatalogRecord>,
    /// Settled (queue, seq, reason) of journaled messages, in the order they were settled.
    pub settles: Vec<(Rc<str>, Seq, SettleReason)>,
}

impl QueueHost {
    /// Takes what must be journaled since the last call.
    pub fn take_journal_work(&mut self) -> JournalWork {
        JournalWork {
            catalog: std::mem::take(&mut self.catalog),
            settles: std::mem::take(&mut self.settles),
        }
    }

    /// Settles one outstanding delivery: ack, or nack/reject with or without requeue.
    pub fn settle(
        &mut self,
        conn: ConnRef,
        queue: &str,
        holder: HolderId,
        seq: Seq,
        ack: bool,
        requeue: bool,
    ) -> Result<(), Refusal> {
        let q = self.get_queue(conn, queue)?;
        let mut settled = Vec::new();
        let result = if ack {
            q.queue.ack(holder, seq).map(|s| settled.push(s))
        } else {
            q.queue.nack(holder, seq, requeue, &mut settled)
        };
        result.map_err(|e| Refusal {
            code: ErrorCode::UnknownDeliveryTag,
            message: e.to_string(),
        })?;
        let name = q.name.clone();
        self.note_settled(&name, settled);
        self.dirty.insert(name);
        Ok(())
    }

    /// Counts what was settled and remembers the settlements of journaled messages, and the
    /// messages to dead-letter.
    pub(super) fn note_settled(&mut self, queue: &Rc<str>, settled: Vec<Settled<MsgRef>>) {
        let target = self.queues.get(queue).and_then(|q| {
            let a = &q.arguments;
            let exchange = a.dead_letter_exchange.clone()?;
            Some((exchange, a.dead_letter_routing_key.clone()))
        });
        for s in settled {
            if s.msg.journaled() {
                self.settles.push((queue.clone(), s.seq, s.reason));
            }
            match (&target, s.reason) {
                (_, SettleReason::Acked) => {}
                (Some((exchange, routing_key)), SettleReason::DeadLettered) => {
                    self.dead_lettered += 1;
                    self.dead_letters.push(DeadLetter {
                        queue: queue.clone(),
                        exchange: exchange.clone(),
                        routing_key: routing_key.clone(),
                        msg: s.msg,
                    });
                    continue; // a cold one stays counted until it is read back
                }
                _ => self.dropped += 1,
            }
            if let Some(segment) = s.msg.cold_segment() {
                self.liveness.sub(segment);
            }
        }
    }

    /// The messages dead-lettered since the last call.
    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead_letters)
    }

    /// A dead letter has been read and published: its record's segment may go.
    pub fn release_dead_letter(&self, d: &DeadLetter) {
        if let Some(segment) = d.msg.cold_segment() {
            self.liveness.sub(segment);
        }
    }

    /// Settles the expired heads of every queue (dead-lettering them where the queue says so):
    /// a queue nobody consumes still lets its messages go when their time is up.
    pub fn expire(&mut self, now_ms: u64) {
        let mut expired = Vec::new();
        for (name, q) in self.queues.iter_mut() {
            let mut settled = Vec::new();
            if q.queue.expire(now_ms, &mut settled) > 0 {
                // Delayed messages became ready: their consumers are owed deliveries.
                self.dirty.insert(name.clone());
            }
            if !settled.is_empty() {
                expired.push((name.clone(), settled));
            }
        }
        for (name, settled) in expired {
            self.note_settled(&name, settled);
        }
    }

    /// Live messages per journal segment.
    pub fn liveness(&self) -> &Rc<Liveness> {
        &self.liveness
    }

    /// Moves the message `seq` of `queue`, waiting or delivered and unacked, out of memory once
    /// its record is durable: the entry keeps only the record's position (no allocation), and
    /// the payload and envelope are freed (a delivery on its way keeps its own reference to the
    /// payload until it is written; the outbox bound counts it). Returns whether it did.
    pub fn cool(&mut self, queue: &str, seq: Seq) -> bool {
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        let Some(msg) = q.queue.held_mut(seq) else {
            return false;
        };
        let MsgRef::Hot(stored) = msg else {
            return false;
        };
        let Some((position, record_len)) = stored.position() else {
            return false;
        };
        // Count it as cold before the `Stored` goes, so its segment is never uncounted.
        self.liveness.add(position.segment());
        *msg = MsgRef::Cold {
            position,
            record_len,
        };
        true
    }
}
