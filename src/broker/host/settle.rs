//! The queue host's settle accounting: acks and nacks, and the books of every message that leaves
//! a queue, however it leaves.
//!
//! Contract: part of `QueueHost` (same shard, same data). Every `Settled` a queue hands back goes
//! through `note_settled`, which journals the settle of a journaled message, counts a drop, or
//! queues a dead letter for the shard to publish; a cold message's journal segment stays counted
//! live (`Liveness`) until nothing refers to its record, so reclaim never takes a record still
//! needed. Faults handled: an ack or nack for a delivery that is not outstanding for its owner is
//! refused (`UnknownDeliveryTag`), nothing changes.
//!
//! Durability of what a request changed, under fsync = always (`ops` decides, the shard tells the
//! outcome of each commit round through `commit_resolved`): an ack, or a nack without requeue, of
//! a journaled message is taken out of its queue while its settle record is not durable
//! (`settle_when_durable`: its consumer's credit is given back at once) and settled only once
//! that commit is; if the commit fails it is put back, outstanding for the same holder (or ready,
//! if the holder's connection closed meanwhile), so an ack the client is told failed is never
//! applied. A journaled message is held in its queues, not deliverable, until its record's commit
//! is durable (`QueueHost::hold_until_durable`), and taken out again if that commit fails: a
//! refused publish is never delivered. Settlements made while dispatching (auto-acks, expiry,
//! overflow, a requeue past `max_deliveries`) stay at least once: applied at once, their records
//! journaled with the next commit, a record that cannot be is logged (redelivered after a
//! restart). A client's nack or reject with requeue is a failure (`fail_plan`, `fail`): the
//! queue's retry policy requeues it, delays it (a delayed retry of a journaled message is a
//! `Retry` record the caller journals first) or gives it up, journaled as dispatching settles.

use std::rc::Rc;

use weir_protocol::wire::{DeathReason, ErrorCode};

use super::QueueHost;
use crate::broker::catalog::CatalogRecord;
use crate::broker::queue::{QueueError, RetryDecision, Settled, Taken};
use crate::broker::stored::{Liveness, MsgRef};
use crate::mesh::types::{ConnRef, Refusal};
use crate::mesh::types::{HolderId, Seq};
use crate::storage::{CommitId, RetryEntry, SettleReason};

/// An ack or nack waiting for its settle record's commit.
#[derive(Debug)]
pub(super) struct Pending {
    queue: Rc<str>,
    conn: ConnRef,
    taken: Taken<MsgRef>,
    ack: bool,
    /// The holder's connection closed meanwhile: if the commit fails, it goes back to ready.
    released: bool,
}

/// How a settlement is to be made (`QueueHost::settle_plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettlePlan {
    /// Nothing needs journaling first (a transient message, or a requeue): settled at once.
    Now,
    /// Its settle record, with this reason, must be journaled first.
    Record(SettleReason),
}

/// A message its queue dead-lettered (rejected without requeue, expired, pushed out by overflow,
/// past `max_deliveries`): the shard publishes it to `exchange` with `routing_key` (the queue's
/// `dead_letter_routing_key`, or `None` for the message's own key). A cold message's segment is
/// still counted live until the letter is done with (`finish_dead_letters`).
#[derive(Debug)]
pub struct DeadLetter {
    pub queue: Rc<str>,
    pub exchange: String,
    pub routing_key: Option<String>,
    pub msg: MsgRef,
    /// Why, as its history will say.
    pub why: DeathReason,
    /// A journaled message's sequence number in `queue`: its settle record waits until its copy
    /// is confirmed (at least once), then `finish_dead_letters` stages it.
    pub settle: Option<Seq>,
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
        self.settle_with(conn, queue, holder, seq, ack, requeue, true)
    }

    /// As `settle`, for a settlement whose record the caller has journaled already.
    pub fn settle_journaled(
        &mut self,
        conn: ConnRef,
        queue: &str,
        holder: HolderId,
        seq: Seq,
        ack: bool,
    ) -> Result<(), Refusal> {
        self.settle_with(conn, queue, holder, seq, ack, false, false)
    }

    /// Checks a settlement without applying it, and says whether its record must be journaled
    /// first (an ack, or a nack without requeue, of a journaled message) and with which reason.
    pub fn settle_plan(
        &mut self,
        conn: ConnRef,
        queue: &str,
        holder: HolderId,
        seq: Seq,
        ack: bool,
        requeue: bool,
    ) -> Result<SettlePlan, Refusal> {
        let q = self.get_queue(conn, queue)?;
        let Some(msg) = q.queue.outstanding_for(holder, seq) else {
            return Err(Refusal {
                code: ErrorCode::UnknownDeliveryTag,
                message: crate::broker::queue::QueueError::NotOutstanding { holder, seq }
                    .to_string(),
            });
        };
        // A dead-lettered message's settle record waits for its copy's confirm instead (at least
        // once: see `broker::dead_letter`), so it is settled now, in memory.
        let dead_letter = !ack && q.queue.policy().dead_letter;
        Ok(if (!ack && requeue) || !msg.journaled() || dead_letter {
            SettlePlan::Now
        } else {
            SettlePlan::Record(q.queue.settle_reason(ack))
        })
    }

    /// Takes an outstanding delivery out for an ack (or a nack without requeue) whose settle
    /// record goes with commit `round`; `commit_resolved` settles it or puts it back.
    pub fn settle_when_durable(
        &mut self,
        round: CommitId,
        conn: ConnRef,
        queue: &str,
        holder: HolderId,
        seq: Seq,
        ack: bool,
    ) -> Result<(), Refusal> {
        let q = self.get_queue(conn, queue)?;
        let taken = q.queue.take(holder, seq).map_err(|e| Refusal {
            code: ErrorCode::UnknownDeliveryTag,
            message: e.to_string(),
        })?;
        let name = q.name.clone();
        self.settling.entry(round).or_default().push(Pending {
            queue: name.clone(),
            conn,
            taken,
            ack,
            released: false,
        });
        // Its credit came back: the consumer may be owed more.
        self.dirty.insert(name);
        Ok(())
    }

    /// The commit rounds up to `round` that something here waits for.
    pub fn pending_rounds_through(&self, round: CommitId) -> Vec<CommitId> {
        let mut rounds: Vec<CommitId> = self
            .unconfirmed
            .range(..=round)
            .map(|(r, _)| *r)
            .chain(self.settling.range(..=round).map(|(r, _)| *r))
            .collect();
        rounds.sort_unstable();
        rounds.dedup();
        rounds
    }

    /// Commit `round` is durable, or failed: the messages it held become deliverable, or are
    /// taken out (never accepted); the settlements waiting for it are made, or put back. Each
    /// round is resolved once, by whichever waiter gets there first. Returns whether anything
    /// changed (then dispatching may be owed).
    pub fn commit_resolved(&mut self, round: CommitId, durable: bool) -> bool {
        let mut changed = false;
        // A round holds many messages of few queues (in runs): each queue's hold is moved and its
        // dispatch asked for once per run, not once per message.
        let mut touched: Vec<Rc<str>> = Vec::new();
        for (queue, seq) in self.unconfirmed.remove(&round).unwrap_or_default() {
            let Some(q) = self.queues.get_mut(&queue) else {
                continue;
            };
            q.held.remove(&seq);
            if !durable {
                q.queue.remove_waiting(seq);
            }
            if touched.last() != Some(&queue) {
                touched.push(queue);
            }
        }
        for queue in touched {
            if let Some(q) = self.queues.get_mut(&queue) {
                q.queue.set_hold(q.held.first().copied());
            }
            self.dirty.insert(queue);
            changed = true;
        }
        for p in self.settling.remove(&round).unwrap_or_default() {
            let Some(q) = self.queues.get_mut(&p.queue) else {
                self.dispose(p);
                continue;
            };
            let mut settled = Vec::new();
            let journal = if durable {
                settled.push(q.queue.finish(p.taken, p.ack));
                false
            } else {
                q.queue.put_back(p.taken, p.released, &mut settled);
                true // only a requeue past max_deliveries, settled as dispatching does
            };
            self.note_settled_with(&p.queue, settled, journal);
            self.dirty.insert(p.queue);
            changed = true;
        }
        changed
    }

    /// A queue went: what waited for a commit in it is forgotten (a queue declared again under
    /// the name must not see it).
    pub(super) fn forget_pending(&mut self, queue: &str) {
        self.unconfirmed.retain(|_, held| {
            held.retain(|(q, _)| &**q != queue);
            !held.is_empty()
        });
        let mut gone = Vec::new();
        self.settling.retain(|_, pending| {
            let (this, rest): (Vec<Pending>, Vec<Pending>) = std::mem::take(pending)
                .into_iter()
                .partition(|p| &*p.queue == queue);
            gone.extend(this);
            *pending = rest;
            !pending.is_empty()
        });
        for p in gone {
            self.dispose(p);
        }
    }

    /// A connection closed: what it was settling goes back to ready if its commit fails.
    pub(super) fn release_settling(&mut self, conn: ConnRef) {
        for p in self.settling.values_mut().flatten() {
            if p.conn == conn {
                p.released = true;
            }
        }
    }

    fn dispose(&self, p: Pending) {
        if let Some(segment) = p.taken.msg().cold_segment() {
            self.liveness.sub(segment);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn settle_with(
        &mut self,
        conn: ConnRef,
        queue: &str,
        holder: HolderId,
        seq: Seq,
        ack: bool,
        requeue: bool,
        journal: bool,
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
        self.note_settled_with(&name, settled, journal);
        self.dirty.insert(name);
        Ok(())
    }

    /// Counts what was settled and remembers the settlements of journaled messages, and the
    /// messages to dead-letter.
    pub(super) fn note_settled(&mut self, queue: &Rc<str>, settled: Vec<Settled<MsgRef>>) {
        self.note_settled_with(queue, settled, true)
    }

    /// As `note_settled`; `journal` false when the settle records are journaled already.
    fn note_settled_with(&mut self, queue: &Rc<str>, settled: Vec<Settled<MsgRef>>, journal: bool) {
        let target = self.queues.get(queue).and_then(|q| {
            let a = &q.arguments;
            let exchange = a.dead_letter_exchange.clone()?;
            Some((exchange, a.dead_letter_routing_key.clone()))
        });
        for s in settled {
            let journaled = journal && s.msg.journaled();
            let dead_letter = target.is_some() && s.reason == SettleReason::DeadLettered;
            if journaled && !dead_letter {
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
                        why: s.why,
                        settle: journaled.then_some(s.seq),
                    });
                    continue; // it stays counted live until its letter is done with
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

    /// Dead letters done with (their copies confirmed, dropped or refused): their originals'
    /// settle records are staged, to be journaled with the next request, and their records'
    /// segments may go. An original whose queue was deleted meanwhile (the same name may have
    /// been declared again: `Rc::ptr_eq` tells the incarnations apart) needs no settle record:
    /// the deletion is journaled.
    pub fn finish_dead_letters(&mut self, letters: Vec<DeadLetter>) {
        for d in letters {
            if let Some(seq) = d.settle {
                let alive = self
                    .queues
                    .get(&*d.queue)
                    .is_some_and(|q| Rc::ptr_eq(&q.name, &d.queue));
                if alive {
                    self.settles
                        .push((d.queue.clone(), seq, SettleReason::DeadLettered));
                }
            }
            if let Some(segment) = d.msg.cold_segment() {
                self.liveness.sub(segment);
            }
        }
    }

    /// Settles the expired heads of every queue (dead-lettering them where the queue says so):
    /// a queue nobody consumes still lets its messages go when their time is up.
    pub fn expire(&mut self, now_ms: u64) {
        let mut expired = Vec::new();
        let mut next_due: Option<u64> = None;
        for (name, q) in self.queues.iter_mut() {
            let mut settled = Vec::new();
            if q.queue.expire(now_ms, &mut settled) > 0 {
                // Delayed messages became ready: their consumers are owed deliveries.
                self.dirty.insert(name.clone());
            }
            if !settled.is_empty() {
                expired.push((name.clone(), settled));
            }
            if let Some(at) = q.queue.next_due() {
                next_due = Some(next_due.map_or(at, |n| n.min(at)));
            }
        }
        // The look at every queue is also the due timer's: it wakes for the earliest left.
        if let Some(at) = next_due {
            self.note_due(at);
        }
        for (name, settled) in expired {
            self.note_settled(&name, settled);
        }
    }

    /// A client's nack or reject with requeue of an outstanding delivery, checked without
    /// applying it: `Some` with what its `Retry` record must say when it is a delayed retry of a
    /// journaled message (journaled before `fail` applies it), `None` when nothing needs
    /// journaling first (a requeue at once, a transient message, or given up: a settlement made
    /// at once and journaled with the next commit, as a requeue past `max_deliveries` is).
    pub fn fail_plan(
        &mut self,
        conn: ConnRef,
        queue: &str,
        holder: HolderId,
        seq: Seq,
        delay_ms: Option<u32>,
        now_ms: u64,
    ) -> Result<Option<RetryEntry>, Refusal> {
        let q = self.get_queue(conn, queue)?;
        let (decision, entry) = q
            .queue
            .failure_plan(holder, seq, delay_ms, now_ms)
            .map_err(not_outstanding)?;
        let journaled = q
            .queue
            .outstanding_for(holder, seq)
            .is_some_and(|m| m.journaled());
        Ok(match decision {
            RetryDecision::Delay { .. } if journaled => Some(entry),
            _ => None,
        })
    }

    /// Applies a failure (see `fail_plan`): requeued, delayed until its retry is due, or given
    /// up (dead-lettered or dropped, journaled with the next commit).
    pub fn fail(
        &mut self,
        conn: ConnRef,
        queue: &str,
        holder: HolderId,
        seq: Seq,
        delay_ms: Option<u32>,
        now_ms: u64,
    ) -> Result<RetryDecision, Refusal> {
        let q = self.get_queue(conn, queue)?;
        let mut settled = Vec::new();
        let decision = q
            .queue
            .fail(holder, seq, delay_ms, now_ms, &mut settled)
            .map_err(not_outstanding)?;
        let name = q.name.clone();
        if let RetryDecision::Delay { due_ms, .. } = decision {
            self.note_due(due_ms);
        }
        self.note_settled(&name, settled);
        // Its credit came back (and a requeued message is ready): dispatch may be owed.
        self.dirty.insert(name);
        Ok(decision)
    }

    /// A delayed message is due at `at`: the due timer must wake by then.
    pub(super) fn note_due(&mut self, at: u64) {
        self.due_hint = Some(self.due_hint.map_or(at, |h| h.min(at)));
    }

    /// The earliest due time noted since the last call (see `QueueHost::due_hint`).
    pub fn take_due_hint(&mut self) -> Option<u64> {
        self.due_hint.take()
    }

    /// The earliest due time of a delayed message in any queue here: one look per queue.
    pub fn next_due(&self) -> Option<u64> {
        self.queues
            .values()
            .filter_map(|q| q.queue.next_due())
            .min()
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

fn not_outstanding(e: QueueError) -> Refusal {
    Refusal {
        code: ErrorCode::UnknownDeliveryTag,
        message: e.to_string(),
    }
}
