//! The shard's side of the control plane: on the writer (shard 0), a client's routing change
//! validated, staged, fanned out to every copy and answered; on every shard, its copy applying
//! changes, and the bindings of queues that are gone handed back to the writer.
//!
//! Contract: runs in the worker, on the shard's thread; nothing here awaits (a commit is awaited
//! by a detached task), so the worker goes on meanwhile. Which answer is due when is decided by
//! `broker::control_wait`; which bindings are orphans by `broker::orphan_bindings`.
//! Faults handled: a change refused by the writer (answered with why); records the journal
//! cannot take or keep (the change is live on every copy, so they agree, but the answer says it
//! is not durable); a copy refusing a change the writer accepted (a bug: logged, and a debug
//! assertion).

use std::rc::Rc;

use crate::broker::control::CONTROL_SHARD;
use crate::broker::control_wait::Answer;
use crate::broker::durability::{holds_for_commit, storage_refusal};
use crate::broker::orphan_bindings;
use crate::mesh::msg::ControlOp;
use crate::mesh::msg::RoutingChange;
use crate::mesh::msg::{Op, Reply};
use crate::mesh::types::{ConnRef, Refusal};
use crate::rt;

use super::ShardState;

impl ShardState {
    /// The writer's side of a routing change: validate and apply it to the authoritative table,
    /// stage its records, send it to every shard's copy (in order: the mesh is FIFO per pair),
    /// and answer once every copy has it and, under `fsync = always`, its records are durable.
    pub(super) fn control(self: &Rc<Self>, from: ConnRef, id: u64, op: ControlOp) {
        let Some(writer) = &self.control else {
            let reply = Reply::Refused(Refusal {
                code: weir_protocol::wire::ErrorCode::Internal,
                message: format!("routing changes are made by shard {CONTROL_SHARD}"),
            });
            return self.reply_to(from, id, reply);
        };
        let applied = match writer.borrow_mut().execute(op) {
            Ok(applied) => applied,
            Err(e) => {
                let reply = Reply::Refused(Refusal {
                    code: e.code,
                    message: e.message,
                });
                return self.reply_to(from, id, reply);
            }
        };
        let mut reply = Reply::Done;
        let mut last = None;
        for record in &applied.records {
            match self.journal.append_control(&record.encode()) {
                Ok(a) => last = Some(a),
                Err(e) => {
                    // The change is live (every copy gets it, so they agree) but not durable.
                    reply = Reply::Refused(storage_refusal(e));
                    last = None;
                    break;
                }
            }
        }
        let shards = self.session.shard_count();
        let copies = if applied.change.is_some() { shards } else { 0 };
        let durable = !holds_for_commit(self.session.durability, last.is_some());
        let (wait, due) = self
            .control_waits
            .borrow_mut()
            .open(from, id, reply, copies, durable);
        self.held.borrow_mut().hold();
        if let Some(change) = applied.change {
            for shard in 0..shards {
                self.request_of_own(shard, wait, Op::Routing(change.clone()));
            }
        }
        match last {
            Some(last) if !durable => {
                let state = self.clone();
                rt::spawn_detached(async move {
                    let result = state.journal.commit(&last).await;
                    let due = state
                        .control_waits
                        .borrow_mut()
                        .committed(wait, result.map_err(storage_refusal));
                    state.answer_control(due);
                });
            }
            _ => self.answer_control(due),
        }
    }

    /// A shard's copy has applied routing change `wait`.
    pub(super) fn control_applied(&self, wait: u64) {
        let due = self.control_waits.borrow_mut().applied(wait);
        self.answer_control(due);
    }

    fn answer_control(&self, due: Option<Answer>) {
        let Some(a) = due else { return };
        self.reply_to(a.to, a.id, a.reply);
        self.release_held();
    }

    /// Applies a change from the writer to this shard's copy. The start-up copy also opens the
    /// shard, and is checked against the queues this shard owns: a binding to one that is gone
    /// (deleted just before a crash, its unbind not yet durable) is removed through the writer.
    pub(super) fn apply_routing(&self, change: RoutingChange) {
        let snapshot = matches!(change, RoutingChange::Snapshot(_));
        if let Err(e) = self.routing.table.borrow_mut().apply(change) {
            // The writer validated it against the same state: a copy that disagrees is a bug.
            tracing::error!(
                shard = self.id,
                "routing copy refused a change: {}",
                e.message
            );
            debug_assert!(false, "routing copy refused a change: {}", e.message);
        }
        if !snapshot {
            return;
        }
        let gone = orphan_bindings::missing_at_start(
            &self.routing.table.borrow(),
            &self.host.borrow(),
            self.id,
            self.session.shard_count(),
        );
        for queue in gone {
            self.ask_control(ControlOp::QueueGone { queue });
        }
        self.routing.ready.set(true);
        self.routing_bell.ring();
    }

    /// Queues this shard removed take their bindings with them.
    pub(super) fn forget_removed_queues(&self) {
        let removed = self.host.borrow_mut().take_removed();
        let gone = orphan_bindings::removed_with_bindings(&self.routing.table.borrow(), removed);
        for queue in gone {
            self.ask_control(ControlOp::QueueGone { queue });
        }
    }
}
