//! Payloads read back from the journal: for deliveries whose message is only on disk, and for
//! dead letters, which are republished as their producer sent them.
//!
//! Contract: on the shard's thread. Deliveries are read back by a task of their own
//! (`read_back_forever`), not by the worker: the worker hands it every push that needs a
//! payload read (`ReadBackFifo`) and goes on with publishes and acks while the reads are in
//! flight. The task takes the pushes in order, reads their cold payloads (through the journal's
//! read-ahead windows: one disk read per window, not per message) and sends each push on when
//! its payloads are in. While it holds any push, every push the worker makes goes behind it
//! (`broker::read_back::goes_behind`), so each connection gets its pushes in the order they were
//! made. `Get`'s read-back and dead letters are still awaited by the worker (one answer each,
//! mostly served by a window). The FIFO needs no bound of its own: every delivery in it was
//! charged to its connection's outbox account when dispatched (`outbox_bytes_max` per
//! connection and owning shard, handed back once written, or at once when unread), so owners
//! stop dispatching to a connection whose deliveries wait here exactly as if they waited in its
//! outbox; what else it holds (cancellations, timeouts) is one small push per consumer.
//! What the record becomes (a delivery completed from its record, a dead letter's publish, a requeue) is decided by
//! `broker::read_back` and `broker::dead_letter`. Faults handled: a read that fails is logged;
//! its delivery's message is requeued (redelivered later), its dead letter is dropped (at most
//! once, see `broker::dead_letter`); a push for a connection that closed while its payloads were
//! read is dropped as any other (its deliveries were released by the close).

use crate::broker::dead_letter::{self, DeadLetterPlan, LetterBody};
use crate::broker::host::DeadLetter;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use crate::broker::read_back;
use crate::mesh::msg::{Op, Pushed, PushedDelivery};
use crate::mesh::types::ConnRef;
use crate::rt;
use crate::rt::executor::{Doorbell, DoorbellWaiter};

use super::ShardState;

/// Pushes waiting for the read-back task, in the order the worker made them.
pub(super) struct ReadBackFifo {
    queue: RefCell<VecDeque<Pushed>>,
    /// Pushes handed over and not yet sent on: those queued and the one being read.
    held: Cell<usize>,
    bell: Doorbell,
}

impl ReadBackFifo {
    pub(super) fn new() -> (ReadBackFifo, DoorbellWaiter) {
        let (bell, waiter) = rt::executor::doorbell();
        let fifo = ReadBackFifo {
            queue: RefCell::new(VecDeque::new()),
            held: Cell::new(0),
            bell,
        };
        (fifo, waiter)
    }

    /// Pushes handed over and not yet sent on.
    pub(super) fn held(&self) -> usize {
        self.held.get()
    }

    fn hand(&self, push: Pushed) {
        self.held.set(self.held.get() + 1);
        self.queue.borrow_mut().push_back(push);
        self.bell.ring();
    }

    fn take(&self) -> Option<Pushed> {
        self.queue.borrow_mut().pop_front()
    }

    fn sent(&self) {
        self.held.set(self.held.get() - 1);
    }
}

/// The read-back task: reads the cold payloads of the pushes handed to it, in order, and sends
/// each on once its payloads are in (a delivery whose payload cannot be read was requeued and
/// is left out).
pub(super) async fn read_back_forever(state: Rc<ShardState>, bell: DoorbellWaiter) {
    loop {
        while let Some(mut push) = state.read_backs.take() {
            if let Pushed::Deliver { to, deliveries, .. } = &mut push {
                let to = *to;
                if !state.read_back(to, deliveries).await {
                    read_back::keep_read_back(deliveries);
                }
            }
            state.read_backs.sent();
            if !matches!(&push, Pushed::Deliver { deliveries, .. } if deliveries.is_empty()) {
                state.send_push(push);
            }
            // Served from windows, a run of pushes reads nothing from disk: let the worker in.
            rt::yield_if_needed().await;
        }
        if !bell.wait().await {
            return;
        }
    }
}

impl ShardState {
    /// Sends pushes the worker made on to their connections: through the read-back task when a
    /// push needs a payload read or the task holds earlier ones (so order is kept), else now.
    pub(super) fn send_pushes(&self, pushes: Vec<Pushed>) {
        for push in pushes {
            if read_back::goes_behind(&push, self.read_backs.held()) {
                self.read_backs.hand(push);
            } else {
                self.send_push(push);
            }
        }
    }

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
