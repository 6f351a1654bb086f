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
//! its delivery's message is requeued (redelivered later), its dead letter is not sent and its
//! original not settled in the journal (it comes back to its queue at the next start); a push for a connection that closed while its payloads were
//! read is dropped as any other (its deliveries were released by the close).

use crate::broker::dead_letter::{self, DeadLetterPlan, LetterBody, Planned};
use crate::broker::host::DeadLetter;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use crate::broker::read_back;
use crate::mesh::msg::{Op, PublishItem, Pushed, PushedDelivery, Reply};
use crate::mesh::types::ConnRef;
use crate::rt;
use crate::rt::executor::{Doorbell, DoorbellWaiter};
use crate::shard::now_ms;

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
    /// shard's copy of the table, as this shard's own publishes; their originals' settle
    /// records wait for the copies' confirms (`dead_letter_answered`).
    pub(super) async fn dead_letter(&self, letters: Vec<DeadLetter>) {
        let mut plan = DeadLetterPlan::new(
            self.session.shard_count(),
            self.limits.broker.targets_per_message_max as usize,
            self.limits.wire,
            now_ms(),
        );
        let (mut sent, mut done) = (Vec::new(), Vec::new());
        for d in letters {
            let read = match dead_letter::body(&d) {
                LetterBody::Hot(letter) => Some(letter),
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
            let Some(letter) = read else {
                // Its record cannot be read: settled as dropped would lose it for good; left
                // unsettled in the journal, it comes back to its queue at the next start.
                let mut d = d;
                d.settle = None;
                done.push(d);
                continue;
            };
            match plan.add(&d, letter, &self.routing.table.borrow()) {
                Planned::Sent => sent.push(d),
                Planned::Unroutable => {
                    self.routing
                        .unroutable
                        .set(self.routing.unroutable.get() + 1);
                    done.push(d);
                }
                Planned::Cycle => {
                    self.host.borrow_mut().dead_letter_cycles += 1;
                    done.push(d);
                }
            }
        }
        let publishes: Vec<(u16, Vec<PublishItem>)> = plan.into_publishes().collect();
        let id = if publishes.is_empty() {
            done.append(&mut sent);
            0
        } else {
            self.dead_letter_waits
                .borrow_mut()
                .open(publishes.len(), sent)
        };
        for (shard, items) in publishes {
            self.request_of_own(shard, id, Op::Publish(items));
        }
        self.finish_dead_letters(done);
    }

    /// A shard answered the publish of dead-letter wait `id`: once every one has, the
    /// originals are settled.
    pub(super) fn dead_letter_answered(&self, id: u64, reply: Reply) {
        let outcomes = match &reply {
            Reply::Published(o) => Some(&o[..]),
            _ => None,
        };
        let Some(done) = self.dead_letter_waits.borrow_mut().answered(id, outcomes) else {
            return;
        };
        if done.refused > 0 {
            tracing::warn!(
                shard = self.id,
                refused = done.refused,
                "dead-lettering: copies refused by their queues (full, or the disk is); dropped"
            );
            self.host.borrow_mut().dead_letter_refused += done.refused;
        }
        self.finish_dead_letters(done.letters);
    }

    /// Settles the originals of dead letters done with; their settle records go with the next
    /// commit, which an empty request of the shard's own starts.
    fn finish_dead_letters(&self, letters: Vec<DeadLetter>) {
        if letters.is_empty() {
            return;
        }
        let journal = letters.iter().any(|d| d.settle.is_some());
        self.host.borrow_mut().finish_dead_letters(letters);
        if journal {
            self.request_of_own(self.id, 0, Op::Settle(Vec::new()));
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
