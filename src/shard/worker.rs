//! The worker: the one task that executes requests for this shard's queues and hands replies
//! and pushes to its connections, in arrival order, so a request never runs inside another.
//!
//! Contract: one task on the shard's thread; it owns the order of everything the shard does to
//! its queues. It awaits only journal room (a publish), the read-back of a `Get`'s or a dead
//! letter's cold payload, and nothing else: deliveries' cold payloads are read by the read-back
//! task (`read_back`), and commits by the confirmer (`confirmer`), so later requests join the
//! next group commit.
//! Faults handled: a journal that cannot take a request's records (the request, or the part of it
//! that needed them, is refused: `ops`; dispatching's own settlements are logged), a commit that
//! fails (the held reply becomes a refusal for what that commit carried and no more, its held
//! messages are taken out of their queues, its acks put back outstanding, nothing is cooled), a
//! payload that cannot be read back (requeued, `read_back`), replies and pushes for connections
//! that have gone (dropped).
//!
//! Under fsync = always a journaled message is not deliverable, nor an ack applied, before the
//! commit carrying its record is durable: the commit's waiter resolves it in the host
//! (`resolve_commits`) and asks the worker to dispatch what that made owed.
//!
//! An idempotent producer's message is judged by the shard's producer table before it is stored
//! (`broker::producers`): a duplicate is answered without storing anything, its reply waiting for
//! the commit that carries the original (fsync = always); a stored one's record carries its
//! (producer, sequence) stamp, and a commit that fails takes it out of the window again. The
//! expiry tick forgets producers idle past `producer_idle_expiry_ms`.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::BytesMut;

use crate::broker::control::CONTROL_CONN;
use crate::broker::dead_letter::DEAD_LETTER_WAIT;
use crate::broker::durability;
use crate::broker::ops;
use crate::broker::producers;
use crate::broker::read_back;
use crate::mesh::msg::{Op, Pushed, Reply};
use crate::mesh::types::{ConnRef, Refusal};
use crate::mesh::MeshMsg;
use crate::net::session::{Addressed, Session};
use crate::rt::executor::DoorbellWaiter;
use crate::storage::{CommitId, ProducerStamp};
use weir_protocol::wire::Durability;

use super::confirmer::AwaitingCommit;
use super::staging::record_room;
use super::{now_ms, ShardState};

/// The worker: executes requests for this shard's queues and hands replies and pushes to its
/// connections, in arrival order. One task, so a request never runs inside another.
pub(super) async fn work_forever(state: Rc<ShardState>, bell: DoorbellWaiter) {
    loop {
        loop {
            let Some(msg) = state.next_work() else {
                break;
            };
            match msg {
                MeshMsg::Request { from, id, op } => state.execute(from, id, op).await,
                other => state.deliver(other),
            }
        }
        state.idle.ring();
        if !bell.wait().await {
            return;
        }
    }
}

impl ShardState {
    /// Executes a request on this shard's queues. Publishes go message by message, each after
    /// the journal has room for it: the byte bound of the group-commit window is what slows
    /// producers down, through the mesh and their connections, never a refusal.
    pub(super) async fn execute(self: &Rc<Self>, from: ConnRef, id: u64, op: Op) {
        let op = match op {
            Op::Control(c) => return self.control(from, id, c),
            Op::Routing(change) => {
                self.apply_routing(change);
                let reply = Reply::Done;
                return self.reply_to(from, id, reply);
            }
            // Answered from the shard's connections, which the queue host does not know.
            Op::ListConnections { after, limit } => {
                let reply = Reply::Connections(self.list_connections(after, limit, now_ms()));
                return self.reply_to(from, id, reply);
            }
            op => op,
        };
        let now = now_ms();
        let mut pushes = Vec::new();
        // The commit round of each journaled message of a publish: a request whose messages
        // span several commits gets each message's own commit's outcome.
        let mut rounds: Vec<Option<CommitId>> = Vec::new();
        // The newest commit an idempotent producer's duplicate in this request waits for: the
        // one carrying the original, or a later one (fsync = always).
        let mut duplicate_round: Option<CommitId> = None;
        let always = self.session.durability == Durability::Always;
        let reply = match op {
            Op::Publish(items) => {
                let mut outcomes = Vec::with_capacity(items.len());
                for item in items {
                    self.journal.wait_for_room(record_room(&item)).await;
                    let (sequence, producer) = (item.sequence, item.producer_id);
                    if let Some(p) = producer {
                        let verdict = self.producers.borrow_mut().check(p, sequence, now);
                        if let Some(o) = producers::answered(&item, verdict) {
                            let round = always.then_some(o.1).flatten();
                            duplicate_round = duplicate_round.max(round);
                            rounds.push(round);
                            outcomes.push(o.0);
                            continue;
                        }
                    }
                    let mut host = self.host.borrow_mut();
                    let mut sink = self.staging();
                    sink.stamp = producer.map(|producer_id| ProducerStamp {
                        producer_id,
                        sequence,
                    });
                    let outcome = ops::publish(&mut host, &mut sink, from, item, now);
                    // Its record is the newest the request appended.
                    let round = self.appended.get().map(|a| a.commit);
                    let round = round.filter(|_| outcome.journaled);
                    rounds.push(round);
                    if let (Some(p), true) = (producer, producers::stored(&outcome)) {
                        let round = round.filter(|_| always);
                        self.producers.borrow_mut().taken(
                            p,
                            sequence,
                            outcome.journaled,
                            round,
                            now,
                        );
                    }
                    outcomes.push(outcome);
                }
                Reply::Published(outcomes)
            }
            // A purge goes step by step, each after the journal has room for its settle record:
            // a deep queue's purge is slowed by the commit window, never refused by it.
            Op::Purge { name } => {
                let mut purged = 0;
                loop {
                    self.journal
                        .wait_for_room(ops::PURGE_STEP_RECORD_BYTES_MAX)
                        .await;
                    let mut host = self.host.borrow_mut();
                    let mut sink = self.staging();
                    match ops::purge_step(&mut host, &mut sink, from, &name, purged) {
                        Ok((n, true)) => purged += n,
                        Ok((n, false)) => break Reply::Purged(purged + n),
                        Err(r) => break Reply::Refused(r),
                    }
                }
            }
            op => {
                if matches!(op, Op::Expire) {
                    self.producers.borrow_mut().expire(now);
                }
                let mut host = self.host.borrow_mut();
                let mut sink = self.staging();
                let mut reply = ops::execute(&mut host, &mut sink, from, op, now, &mut pushes);
                if let Reply::ShardStatus(st) = &mut reply {
                    let j = self.journal.stats();
                    st.connections = self.connections.borrow().len() as u64;
                    st.unroutable += self.routing.unroutable.get();
                    let table = self.routing.table.borrow();
                    st.exchanges = table.exchange_count() as u64;
                    st.bindings = table.binding_count() as u64;
                    st.cache_bytes_max = host.cache().max();
                    st.journal_commits = j.commits;
                    st.journal_records = j.records;
                    st.journal_bytes_written = j.bytes_written;
                    st.journal_fdatasyncs = j.fdatasyncs;
                    st.journal_segments = self
                        .journal
                        .segments()
                        .iter()
                        .filter(|s| !s.reclaimed)
                        .count() as u64;
                    let r = self.journal.read_back_stats();
                    st.read_back_reads = r.reads;
                    st.read_back_records = r.records;
                    self.observe(st);
                }
                reply
            }
        };
        {
            let mut host = self.host.borrow_mut();
            let mut sink = self.staging();
            if let Err(r) = ops::journal(&mut host, &mut sink) {
                tracing::error!(shard = self.id, "journal: {}", r.message);
            }
        }
        // Only the request's own records hold its reply back; what dispatching settles below
        // (auto-acks, expiries) is committed with the next group commit without anyone waiting.
        let own = self.appended.take();
        // A request of duplicates only appended nothing, yet its confirms wait for the commit
        // carrying the originals; after the requests already waiting, in commit order.
        let own_commit = own.map(|a| a.commit).max(
            duplicate_round
                .max(self.newest_awaited())
                .filter(|_| duplicate_round.is_some()),
        );
        let written = std::mem::take(&mut *self.written.borrow_mut());
        {
            let mut host = self.host.borrow_mut();
            let mut sink = self.staging();
            ops::collect_pushes(
                &mut host,
                &mut sink,
                now,
                self.limits.wire.deliver_batch_max as usize,
                &mut pushes,
            );
            self.appended.set(None);
            self.written.borrow_mut().clear();
        }
        self.forget_removed_queues();
        self.arm_due_timer();
        let mut reply = Some(reply);
        if let Some(Reply::Got(Some(d), _)) = reply.as_mut() {
            if !self.read_back(from, std::slice::from_mut(&mut **d)).await {
                reply = Some(Reply::Refused(read_back::unread_refusal()));
            }
        }
        // A confirm (or a declare-ok) under fsync = always means on disk: the reply waits for the
        // group commit carrying this request's own records. Otherwise it goes now, before the
        // pushes, so a consumer's connection has its ConsumeOk before the deliveries after it.
        // (Under interval and never the records are staged; the committer makes them durable
        // with the next group commit, and the confirm says which policy it was given under.)
        let mut held_reply = None;
        if durability::holds_for_commit(self.session.durability, own_commit.is_some()) {
            held_reply = reply.take();
        }
        if let Some(reply) = reply.take() {
            self.reply_to(from, id, reply);
        }
        // Deliveries go at once, or, with cold payloads, once the read-back task has read them
        // (the worker does not wait for it). Under fsync = always the host held back every
        // message whose record is not durable yet (it becomes deliverable when its commit is);
        // otherwise a consumer may see a message before its publisher's confirm.
        self.send_pushes(pushes);
        let dead = self.host.borrow_mut().take_dead_letters();
        if !dead.is_empty() {
            self.dead_letter(dead).await;
        }
        // Once the records are durable: cool their payloads if over budget, and send the reply
        // if it waited. Later requests go on meanwhile and join the next commit.
        let Some(commit) = own_commit else { return };
        let reply = held_reply.take();
        if reply.is_some() {
            self.held.borrow_mut().hold();
        }
        self.await_commit(AwaitingCommit {
            commit,
            from,
            id,
            reply,
            rounds,
            written,
        });
    }

    /// Resolves in the host every commit round up to `newest` (which has finished) that it
    /// waits for, or that `rounds` names: held messages become deliverable or are taken out,
    /// settlements are made or put back; then the worker dispatches what that made owed.
    /// Returns each round's outcome.
    pub(super) async fn resolve_commits(
        &self,
        newest: CommitId,
        rounds: &[Option<CommitId>],
    ) -> BTreeMap<CommitId, Result<(), Refusal>> {
        let mut wanted = self.host.borrow().pending_rounds_through(newest);
        wanted.extend(rounds.iter().flatten().copied());
        wanted.sort_unstable();
        wanted.dedup();
        let mut outcomes = BTreeMap::new();
        let mut changed = false;
        for round in wanted {
            // Finished already: this does not wait.
            let result = self.journal.commit_round(round).await;
            changed |= self
                .host
                .borrow_mut()
                .commit_resolved(round, result.is_ok());
            self.producers.borrow_mut().resolved(round, result.is_ok());
            outcomes.insert(round, result.map_err(durability::storage_refusal));
        }
        if changed {
            self.dispatch_owed();
        }
        outcomes
    }

    /// Has the worker dispatch what the host owes, in its order: an empty settlement of the
    /// shard's own, since every request the worker executes ends by dispatching (and by
    /// publishing what was dead-lettered); its answer goes to nobody.
    fn dispatch_owed(&self) {
        self.request_of_own(self.id, 0, Op::Settle(Vec::new()));
    }

    pub(super) fn deliver(&self, msg: MeshMsg) {
        match msg {
            MeshMsg::Request { .. } => unreachable!("requests are executed by the worker"),
            MeshMsg::Reply { to, id, reply } if to.conn == CONTROL_CONN => {
                if id & DEAD_LETTER_WAIT != 0 {
                    self.dead_letter_answered(id, reply);
                } else if id != 0 {
                    self.control_applied(id);
                }
            }
            MeshMsg::Reply { to, id, reply } => self.to_connection(to, |session, out, outbound| {
                session.on_reply_at(now_ms(), id, reply, out, outbound);
            }),
            MeshMsg::Push { from_shard, push } => {
                self.to_connection(push_target(&push), |session, out, outbound| {
                    session.on_push(from_shard, push, out, outbound);
                })
            }
        }
    }

    /// Sends a push to its connection, on whichever shard it lives.
    pub(super) fn send_push(&self, push: Pushed) {
        let to = push_target(&push);
        self.send_to(
            to.shard,
            MeshMsg::Push {
                from_shard: self.id,
                push,
            },
        );
    }

    /// Hands something to connection `to`'s session, if it is still here (a connection that has
    /// gone is dropped: its deliveries are released when the owning shard learns of the close),
    /// rings it, and sends on what the session routed.
    fn to_connection(
        &self,
        to: ConnRef,
        give: impl FnOnce(&mut Session, &mut BytesMut, &mut Vec<Addressed>),
    ) {
        let Some(entry) = self.connections.borrow().get(&to.conn).cloned() else {
            return;
        };
        let mut outbound = Vec::new();
        give(
            &mut entry.session.borrow_mut(),
            &mut entry.outbox.borrow_mut(),
            &mut outbound,
        );
        entry.bell.ring();
        self.send_addressed(to, outbound);
    }
}

/// The connection a push is for.
fn push_target(push: &Pushed) -> ConnRef {
    match push {
        Pushed::Deliver { to, .. } => *to,
        Pushed::Cancelled(c) | Pushed::TimedOut(c) => c.to,
    }
}
