//! Payloads read back from the journal: for deliveries whose message is only on disk, and for
//! dead letters, which are republished as their producer sent them.
//!
//! Contract: runs in the worker, on the shard's thread; each read is one awaited journal read.
//! What the record becomes (a delivery completed from its record, a dead letter's publish, a requeue) is decided by
//! `broker::read_back` and `broker::dead_letter`. Faults handled: a read that fails is logged;
//! its delivery's message is requeued (redelivered later), its dead letter is dropped (at most
//! once, see `broker::dead_letter`).

use crate::broker::dead_letter::{self, DeadLetterPlan, LetterBody};
use crate::broker::host::DeadLetter;
use crate::broker::read_back;
use crate::mesh::msg::{Op, PushedDelivery};
use crate::mesh::types::ConnRef;

use super::ShardState;

impl ShardState {
    /// Publishes dead-lettered messages to their queues' dead-letter exchanges, routed by this
    /// shard's copy of the table, as this shard's own publishes (nobody waits for a confirm).
    pub(super) async fn dead_letter(&self, letters: Vec<DeadLetter>) {
        let mut plan = DeadLetterPlan::new(
            self.session.shard_count(),
            self.limits.broker.targets_per_message_max as usize,
            self.limits.wire,
        );
        for d in letters {
            let read = match dead_letter::body(&d) {
                LetterBody::Hot(bytes, key) => Some((bytes, key)),
                LetterBody::Cold {
                    position,
                    record_len,
                } => match self.journal.read(position, Some(record_len)).await {
                    Ok(record) => Some(dead_letter::read_back(position, record.body())),
                    Err(e) => {
                        tracing::error!(
                            shard = self.id,
                            queue = &*d.queue,
                            "dead-lettering: cannot read the message back: {e}"
                        );
                        None
                    }
                },
            };
            self.host.borrow().release_dead_letter(&d);
            let Some((bytes, original_key)) = read else {
                continue;
            };
            let outbound = plan.add(&d, bytes, original_key, &self.routing.table.borrow());
            if !outbound {
                self.routing
                    .unroutable
                    .set(self.routing.unroutable.get() + 1);
            }
        }
        for (shard, items) in plan.into_publishes() {
            self.request_of_own(shard, 0, Op::Publish(items));
        }
    }

    /// Reads back the payloads of `deliveries` that are only in the journal. A payload that
    /// cannot be read is logged and its message requeued; returns false if any was.
    pub(super) async fn read_back(&self, to: ConnRef, deliveries: &mut [PushedDelivery]) -> bool {
        let mut all = true;
        for d in deliveries.iter_mut() {
            let Some((position, record_len)) = d.cold else {
                continue;
            };
            match self.journal.read(position, Some(record_len)).await {
                Ok(record) => read_back::complete_from_record(d, position, record.body()),
                Err(e) => {
                    tracing::error!(
                        shard = self.id,
                        queue = d.queue,
                        "cannot read a payload back: {e}"
                    );
                    all = false;
                    let requeued = read_back::requeue_unread(&mut self.host.borrow_mut(), to, d);
                    if let Err(r) = requeued {
                        tracing::error!(
                            shard = self.id,
                            "requeue after a failed read: {}",
                            r.message
                        );
                    }
                }
            }
        }
        all
    }
}
