//! The queue state machine: one queue's ready messages, consumers and outstanding deliveries.
//!
//! Contract: plain data without I/O, owned by the shard that owns the queue (one thread, no
//! locks). The shard's I/O shell feeds it events (publish, consume, dispatch, ack, nack, a
//! consumer gone) with the time passed in, and acts on what it returns: deliveries to send and
//! settlements to journal. It never touches message bytes: `M` is the shard's handle on them (a
//! journal position, or an in-memory buffer for transient messages), copied around as-is.
//!
//! Every message the queue accepted is, at every moment, in exactly one of four places: ready
//! (waiting, in sequence order; in a priority queue, in sequence order within its priority,
//! higher priorities handed out first: `ready.rs`), delayed (its delivery time still to come: a
//! delayed publish, or a failed delivery waiting out its retry delay, `retry.rs`), outstanding
//! (delivered to one owner, not yet settled), or settled (handed back to the caller in a
//! `Settled`, after which the queue forgets it). The property test
//! in `tests.rs` checks that against a model after every event. One more place, outside the
//! queue: a delivery `take`n for a settlement whose record is not durable yet is the caller's
//! until it hands it back to `finish` (settled) or `put_back` (outstanding or ready again).
//! Waiting messages from the `set_hold` sequence number on are not handed out (nor expired) yet:
//! their records are not durable.
//!
//! Which consumer is offered the next message is `consumers.rs`'s: the highest consumer
//! priority with credit first, round robin among equals, only the active one under single
//! active consumer; the property test checks those rules against its model too.
//!
//! Every entry the queue holds is counted in its `IndexCount` (shared by all the queues of a
//! shard), from its publish or restore until it is settled, retracted or its queue dropped: the
//! shard's index is bounded by that count (`limits.queued_messages_max`), whatever the payloads.
//! A purge goes in steps (`purge_some`), so a deep queue's purge never gathers every entry at
//! once; the ready list gives back its memory as it shrinks. What it did (published, delivered,
//! acked, ...) and the bytes it has outstanding are counted as it does it (`counts.rs`: field
//! increments, for its info).
//!
//! Faults handled: acks and nacks for sequence numbers that are not outstanding for that owner
//! (an error, nothing changes), consumers vanishing with deliveries outstanding (their messages
//! go back to ready, to be redelivered with their delivery count), poison messages (past
//! `max_deliveries` they are dead-lettered or dropped instead of requeued), failed deliveries
//! (a client's nack or reject with requeue: retried after a delay, or given up past the queue's
//! retry policy, `retry.rs`).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::broker::routing::hash::FastMap;
use crate::mesh::types::{HolderId, Seq};
use crate::storage::SettleReason;

use weir_protocol::wire::DeathReason;
mod consumers;
use consumers::{Consumer, Consumers};

/// What the queue does when a publish would take it past a length limit (the wire's type).
pub use weir_protocol::Overflow;

mod ready;
use ready::{Ready, Sequenced};

mod counts;
pub use counts::QueueCounts;

/// The queue's declared behaviour.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Most ready messages. Enforced on publish: a requeued message (nack, a consumer gone) was
    /// accepted already and comes back even past the limit; the next publish under `DropHead`
    /// trims the queue back to it.
    pub max_length: Option<u64>,
    /// Most bytes of ready messages.
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// Time to live of every message, ms from when the queue accepts it.
    pub message_ttl_ms: Option<u64>,
    /// Deliveries after which a message is dead-lettered (or dropped) instead of requeued.
    pub max_deliveries: Option<u32>,
    /// Whether the queue has a dead-letter exchange: decides `DeadLettered` versus `Dropped`.
    pub dead_letter: bool,
    /// Only one consumer is offered messages at a time (`consumers.rs`).
    pub single_active_consumer: bool,
    /// Retry policy: the delay after each failure in turn, ms; then the message is given up
    /// (`retry.rs`). Empty: a failed delivery is ready again at once.
    pub retry_delays_ms: Vec<u32>,
    /// Largest priority the queue orders by (a message's own is capped at it); 0: a plain FIFO.
    pub priority_max: u8,
}

/// A message handed to a consumer (or a `Get`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueDelivery<M> {
    pub holder: HolderId,
    pub seq: Seq,
    pub msg: M,
    /// Deliveries so far, this one included. Above 1 means redelivered.
    pub delivery_count: u32,
    /// Settled at once (auto-ack): no ack expected.
    pub auto_ack: bool,
}

/// A message the queue is done with. The shard journals it (settle record) and, for
/// `DeadLettered`, republishes it to the dead-letter exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled<M> {
    pub seq: Seq,
    pub msg: M,
    pub bytes: u32,
    pub reason: SettleReason,
    /// Why it leaves, as its dead-letter history will say (meaningful for `DeadLettered`).
    pub why: DeathReason,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue is full ({0})")]
    Full(&'static str),
    #[error("consumer {0} already exists on this queue")]
    DuplicateConsumer(HolderId),
    #[error("no consumer {0} on this queue")]
    UnknownConsumer(HolderId),
    #[error("message {seq} is not outstanding for {holder}")]
    NotOutstanding { holder: HolderId, seq: Seq },
    #[error("prefetch must be at least 1")]
    ZeroPrefetch,
}

/// One message's entry: a handful of words, no heap allocation of its own.
#[derive(Clone, Debug)]
struct Entry<M> {
    seq: Seq,
    msg: M,
    bytes: u32,
    delivery_count: u32,
    enqueued_ms: u64,
    /// When it expires; `u64::MAX` for never.
    deadline_ms: u64,
}

impl<M> Sequenced for Entry<M> {
    fn seq(&self) -> Seq {
        self.seq
    }
}

#[derive(Clone, Debug)]
struct Outstanding<M> {
    entry: Entry<M>,
    holder: HolderId,
    /// When it was handed out: `overdue` measures `consumer_timeout_ms` from here.
    delivered_ms: u64,
    /// Its level in the ready list, where a requeue puts it back (a ready entry's level is
    /// where it is, so only entries out of the ready list carry it).
    priority: u8,
}

/// A message whose delivery time has not come yet, with the level it joins ready at.
#[derive(Clone, Debug)]
struct Delayed<M> {
    entry: Entry<M>,
    priority: u8,
}

/// Bytes of one queue entry holding an `M`: the per-message cost of a ready message's index.
pub fn entry_size<M>() -> usize {
    std::mem::size_of::<Entry<M>>()
}

/// Entries held by the queues sharing it (one shard's): ready, delayed and outstanding.
pub type IndexCount = Rc<Cell<u64>>;

/// One consumer as a listing shows it (`Queue::consumer_facts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerFacts {
    pub prefetch: u32,
    pub unacked: u32,
    pub auto_ack: bool,
    pub priority: i32,
    pub active: bool,
}

/// Counters a `QueueInfo` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: u64,
    pub ready_bytes: u64,
    pub outstanding: u64,
    pub consumers: u32,
    /// Messages whose delivery time has not come yet.
    pub delayed: u64,
    /// Of those, messages waiting out a retry delay.
    pub retrying: u64,
}

#[derive(Debug)]
pub struct Queue<M> {
    policy: QueuePolicy,
    ready: Ready<Entry<M>>,
    ready_bytes: u64,
    /// Delayed messages (published with a delivery time still to come), by sequence number;
    /// `due` orders them by that time. They join `ready`, in sequence order, when it comes
    /// (`promote`): at the next dispatch, `Get` or expiry tick.
    delayed: BTreeMap<Seq, Delayed<M>>,
    due: BTreeSet<(u64, Seq)>,
    outstanding: FastMap<Seq, Outstanding<M>>,
    /// Who is offered the next message: priorities, round robin, single active.
    consumers: Consumers,
    next_seq: Seq,
    index: IndexCount,
    /// Waiting messages from this sequence number on are not deliverable yet: their records'
    /// commit is not durable (`hold_from`). Nothing older is ever behind it, see `set_hold`.
    hold: Option<Seq>,
    /// Failures counted and retries waiting (`retry.rs`).
    retry: retry::Retries,
    /// What it has done since it was made, for its info (`counts.rs`).
    counts: QueueCounts,
}

/// An outstanding delivery taken out of its queue for a settlement whose record is not durable
/// yet: its holder's credit is given back at once; `finish` settles it once the record is
/// durable, `put_back` makes it outstanding again if it never will be.
#[derive(Clone, Debug)]
pub struct Taken<M> {
    holder: HolderId,
    entry: Entry<M>,
    /// When it was handed out: a put-back delivery keeps its age for `consumer_timeout_ms`.
    delivered_ms: u64,
    priority: u8,
}

impl<M> Taken<M> {
    pub fn seq(&self) -> Seq {
        self.entry.seq
    }

    pub fn holder(&self) -> HolderId {
        self.holder
    }

    pub fn msg(&self) -> &M {
        &self.entry.msg
    }
}

impl<M: Clone> Queue<M> {
    /// An empty queue whose first message gets sequence number `next_seq` (0 for a new queue;
    /// after recovery, one past every number the journal mentions).
    pub fn new(policy: QueuePolicy, next_seq: Seq) -> Queue<M> {
        Queue::counted(policy, next_seq, IndexCount::default())
    }

    /// As `new`, its entries counted in `index` (shared with the shard's other queues).
    pub fn counted(policy: QueuePolicy, next_seq: Seq, index: IndexCount) -> Queue<M> {
        let consumers = Consumers::new(policy.single_active_consumer);
        Queue {
            index,
            ready: Ready::new(policy.priority_max),
            policy,
            ready_bytes: 0,
            delayed: BTreeMap::new(),
            due: BTreeSet::new(),
            outstanding: FastMap::default(),
            consumers,
            next_seq,
            hold: None,
            retry: retry::Retries::default(),
            counts: QueueCounts::default(),
        }
    }

    pub fn policy(&self) -> &QueuePolicy {
        &self.policy
    }

    /// The sequence number the next publish will get.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// The queue's counts, O(1): read on every dispatch round.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            ready: self.ready.len() as u64,
            ready_bytes: self.ready_bytes,
            outstanding: self.outstanding.len() as u64,
            consumers: self.consumers.len() as u32,
            delayed: self.delayed.len() as u64,
            retrying: self.retry.waiting(),
        }
    }

    /// Its event counts and unacked bytes, since it was made.
    pub fn counts(&self) -> QueueCounts {
        self.counts
    }

    /// When the oldest ready message was accepted, if there is one. A scan of the ready list (a
    /// delayed message counts from its delivery time, so once promoted it sits, younger, ahead of
    /// older ones), so only for a queue's info, never on the dispatch path.
    pub fn oldest_ready_ms(&self) -> Option<u64> {
        self.ready.iter().map(|e| e.enqueued_ms).min()
    }

    /// Accepts a message, or refuses it (`Full`) under `Overflow::RejectPublish`. Under
    /// `DropHead`, the oldest ready messages that no longer fit are pushed to `settled` (the new
    /// message itself, if even an empty queue cannot hold it).
    ///
    /// With `deliver_at_ms` in the future the message is delayed: it takes its sequence number
    /// now, waits outside the ready list (and its limits) and joins it when its time comes; its
    /// time to live counts from then.
    pub fn publish(
        &mut self,
        msg: M,
        bytes: u32,
        now_ms: u64,
        expiration_ms: Option<u64>,
        deliver_at_ms: Option<u64>,
        settled: &mut Vec<Settled<M>>,
    ) -> Result<Seq, QueueError> {
        self.publish_prioritized(msg, bytes, 0, now_ms, expiration_ms, deliver_at_ms, settled)
    }

    /// As `publish`, for a message of `priority` (capped at the queue's `priority_max`). Under
    /// `DropHead` a priority queue drops from the head of its lowest non-empty level: the
    /// oldest of what matters least (the new message itself if it is lower than all of them).
    #[allow(clippy::too_many_arguments)]
    pub fn publish_prioritized(
        &mut self,
        msg: M,
        bytes: u32,
        priority: u8,
        now_ms: u64,
        expiration_ms: Option<u64>,
        deliver_at_ms: Option<u64>,
        settled: &mut Vec<Settled<M>>,
    ) -> Result<Seq, QueueError> {
        let priority = priority.min(self.policy.priority_max);
        if let Some(at) = deliver_at_ms.filter(|at| *at > now_ms) {
            let entry = self.new_entry(msg, bytes, at, expiration_ms);
            let seq = entry.seq;
            self.delay(at, entry, priority);
            self.counts.published += 1;
            return Ok(seq);
        }
        if !self.fits(self.ready.len() as u64, self.ready_bytes, bytes) {
            if self.policy.overflow == Overflow::RejectPublish {
                let which = if self
                    .policy
                    .max_length
                    .is_some_and(|m| self.ready.len() as u64 >= m)
                {
                    "max_length"
                } else {
                    "max_length_bytes"
                };
                return Err(QueueError::Full(which));
            }
            self.make_room(bytes, priority, settled);
        }
        let entry = self.new_entry(msg, bytes, now_ms, expiration_ms);
        let seq = entry.seq;
        self.counts.published += 1;
        self.admit(entry, priority, settled);
        Ok(seq)
    }

    /// Puts back a message of `priority` (capped at `priority_max`) recovered from the journal.
    /// Messages must come in ascending sequence order; `next_seq` moves past them.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &mut self,
        seq: Seq,
        msg: M,
        bytes: u32,
        enqueued_ms: u64,
        deadline_ms: u64,
        delivery_count: u32,
        priority: u8,
    ) {
        let priority = priority.min(self.policy.priority_max);
        assert!(
            self.ready
                .back_at(priority)
                .is_none_or(|last| last.seq < seq),
            "restore out of order at seq {seq}"
        );
        self.counted_in();
        self.push_ready(
            Entry {
                seq,
                msg,
                bytes,
                delivery_count,
                enqueued_ms,
                deadline_ms,
            },
            priority,
        );
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// Puts back a delayed message recovered from the journal, due at `deliver_at_ms`.
    pub fn restore_delayed(
        &mut self,
        seq: Seq,
        msg: M,
        bytes: u32,
        deliver_at_ms: u64,
        delivery_count: u32,
        priority: u8,
    ) {
        let priority = priority.min(self.policy.priority_max);
        let deadline_ms = self
            .policy
            .message_ttl_ms
            .map_or(u64::MAX, |t| deliver_at_ms.saturating_add(t));
        let entry = Entry {
            seq,
            msg,
            bytes,
            delivery_count,
            enqueued_ms: deliver_at_ms,
            deadline_ms,
        };
        self.counted_in();
        self.delay(deliver_at_ms, entry, priority);
        self.next_seq = self.next_seq.max(seq + 1);
    }

    fn delay(&mut self, at: u64, entry: Entry<M>, priority: u8) {
        self.due.insert((at, entry.seq));
        self.delayed.insert(entry.seq, Delayed { entry, priority });
    }

    /// Moves the delayed messages whose time has come to ready, in sequence order (under the
    /// queue's limits, as a publish would). Returns how many became ready.
    pub fn promote(&mut self, now_ms: u64, settled: &mut Vec<Settled<M>>) -> usize {
        let mut promoted = 0;
        while let Some(&(at, seq)) = self.due.first() {
            if at > now_ms {
                break;
            }
            self.due.pop_first();
            let Delayed { entry, priority } = self
                .delayed
                .remove(&seq)
                .expect("due names a delayed message");
            if self.retry.leave_delayed(seq) {
                // A retry was accepted already: back as a requeue, past the length limits.
                if self.requeue(entry, priority, settled) {
                    promoted += 1;
                }
                continue;
            }
            if !self.fits(self.ready.len() as u64, self.ready_bytes, entry.bytes) {
                if self.policy.overflow == Overflow::RejectPublish {
                    settled.push(self.dead_letter_or_drop(entry, DeathReason::MaxLength));
                    continue;
                }
                self.make_room(entry.bytes, priority, settled);
            }
            if self.admit(entry, priority, settled) {
                promoted += 1;
            }
        }
        promoted
    }

    /// A new entry under the next sequence number; its time to live (the queue's or its own,
    /// the shorter) counts from `from_ms`, when it becomes deliverable.
    fn new_entry(
        &mut self,
        msg: M,
        bytes: u32,
        from_ms: u64,
        expiration_ms: Option<u64>,
    ) -> Entry<M> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.counted_in();
        let ttl = [self.policy.message_ttl_ms, expiration_ms]
            .into_iter()
            .flatten()
            .min();
        Entry {
            seq,
            msg,
            bytes,
            delivery_count: 0,
            enqueued_ms: from_ms,
            deadline_ms: ttl.map_or(u64::MAX, |t| from_ms.saturating_add(t)),
        }
    }

    /// `DropHead`: the oldest ready messages go (dead-lettered or dropped) until one of `bytes`
    /// fits, or none is left. In a priority queue they go from the lowest level at or below
    /// `priority` (the one coming in); if every ready message is of a higher priority, the new
    /// message is the one that goes (`admit` drops it), and the queue is trimmed from its lowest
    /// level back to its limits (a requeue may have taken it past them), as a plain queue is.
    fn make_room(&mut self, bytes: u32, priority: u8, settled: &mut Vec<Settled<M>>) {
        while !self.fits(self.ready.len() as u64, self.ready_bytes, bytes) {
            let Some(lowest) = self.ready.lowest() else {
                return;
            };
            if lowest > priority {
                while self.over_limits() {
                    self.drop_lowest(settled);
                }
                return;
            }
            self.drop_lowest(settled);
        }
    }

    fn over_limits(&self) -> bool {
        self.policy
            .max_length
            .is_some_and(|max| self.ready.len() as u64 > max)
            || self
                .policy
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes > max)
    }

    /// The oldest message of the lowest level goes (all of ready, in a plain queue).
    fn drop_lowest(&mut self, settled: &mut Vec<Settled<M>>) {
        let lowest = self.ready.lowest().expect("not empty");
        let head = self.ready.pop_front_at(lowest).expect("not empty");
        self.ready_bytes -= u64::from(head.bytes);
        settled.push(self.dead_letter_or_drop(head, DeathReason::MaxLength));
    }

    /// Puts `entry` into ready in sequence order (within its level) if it fits; otherwise (even
    /// an empty queue cannot hold it: max_length 0, or one message over the bytes; or every
    /// ready message outranks it) it is settled at once.
    fn admit(&mut self, entry: Entry<M>, priority: u8, settled: &mut Vec<Settled<M>>) -> bool {
        if !self.fits(self.ready.len() as u64, self.ready_bytes, entry.bytes) {
            settled.push(self.dead_letter_or_drop(entry, DeathReason::MaxLength));
            return false;
        }
        self.ready_bytes += u64::from(entry.bytes);
        self.ready.insert(entry, priority);
        true
    }

    fn fits(&self, len: u64, total: u64, bytes: u32) -> bool {
        self.policy.max_length.is_none_or(|max| len < max)
            && self
                .policy
                .max_length_bytes
                .is_none_or(|max| total + u64::from(bytes) <= max)
    }

    /// Every message the queue holds, ready, delayed and outstanding.
    pub fn messages(&self) -> impl Iterator<Item = &M> {
        self.ready
            .iter()
            .map(|e| &e.msg)
            .chain(self.delayed.values().map(|d| &d.entry.msg))
            .chain(self.outstanding.values().map(|o| &o.entry.msg))
    }

    /// The waiting (ready or delayed) message `seq`, to change how it is held (see
    /// `QueueHost::cool`).
    pub fn ready_mut(&mut self, seq: Seq) -> Option<&mut M> {
        if let Some(e) = self.ready.get_mut(seq) {
            return Some(&mut e.msg);
        }
        self.delayed.get_mut(&seq).map(|d| &mut d.entry.msg)
    }

    /// Takes back the newest message if it is `seq` and still waiting (its publish could not be
    /// made durable). Returns whether it did.
    pub fn retract_newest(&mut self, seq: Seq) -> bool {
        if let Some(e) = self.ready.pop_back_if(seq) {
            self.ready_bytes -= u64::from(e.bytes);
            self.counted_out(1);
            self.counts.published = self.counts.published.saturating_sub(1);
            return true;
        }
        if seq + 1 == self.next_seq {
            if let Some(Delayed { entry: e, .. }) = self.delayed.remove(&seq) {
                let was_due = self.due.remove(&(e.enqueued_ms, seq));
                debug_assert!(was_due, "delayed message {seq} is due at its enqueued_ms");
                self.counted_out(1);
                self.counts.published = self.counts.published.saturating_sub(1);
                return true;
            }
        }
        false
    }

    pub fn add_consumer(
        &mut self,
        id: HolderId,
        prefetch: u32,
        auto_ack: bool,
    ) -> Result<(), QueueError> {
        self.add_consumer_with(id, prefetch, auto_ack, 0)
    }

    /// As `add_consumer`, at consumer priority `priority` (higher first; see `consumers.rs`).
    pub fn add_consumer_with(
        &mut self,
        id: HolderId,
        prefetch: u32,
        auto_ack: bool,
        priority: i32,
    ) -> Result<(), QueueError> {
        if prefetch == 0 {
            return Err(QueueError::ZeroPrefetch);
        }
        if self.consumers.contains(id) {
            return Err(QueueError::DuplicateConsumer(id));
        }
        self.consumers.add(Consumer {
            id,
            prefetch,
            in_flight: 0,
            auto_ack,
            priority,
        });
        Ok(())
    }

    /// Stops dispatching to consumer `id`; what it holds stays outstanding (still ackable)
    /// until `release`. Returns whether it was a consumer.
    pub fn remove_consumer(&mut self, id: HolderId) -> bool {
        self.consumers.remove(id)
    }

    /// With `single_active_consumer`: the consumer offered messages now.
    pub fn active_consumer(&self) -> Option<HolderId> {
        self.consumers.active()
    }

    /// What consumer `id` is, for a listing: its prefetch, the deliveries it holds (counted
    /// against prefetch), auto-ack, priority, and whether it is offered messages (false only
    /// for a waiting consumer under single active consumer).
    pub fn consumer_facts(&self, id: HolderId) -> Option<ConsumerFacts> {
        let c = self.consumers.get(id)?;
        Some(ConsumerFacts {
            prefetch: c.prefetch,
            unacked: c.in_flight,
            auto_ack: c.auto_ack,
            priority: c.priority,
            active: !self.policy.single_active_consumer || self.consumers.active() == Some(id),
        })
    }

    pub fn set_prefetch(&mut self, id: HolderId, prefetch: u32) -> Result<(), QueueError> {
        if prefetch == 0 {
            return Err(QueueError::ZeroPrefetch);
        }
        let c = self
            .consumers
            .get_mut(id)
            .ok_or(QueueError::UnknownConsumer(id))?;
        c.prefetch = prefetch;
        Ok(())
    }

    /// Removes consumer `id` (if it is one) and returns every message outstanding for `id`
    /// (consumer or `Get` owner) to ready, to be redelivered; those past `max_deliveries` go to
    /// `settled` instead. Returns how many went back to ready.
    pub fn release(&mut self, id: HolderId, settled: &mut Vec<Settled<M>>) -> usize {
        self.remove_consumer(id);
        let mut seqs: Vec<Seq> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.holder == id)
            .map(|(s, _)| *s)
            .collect();
        seqs.sort_unstable();
        let mut requeued = 0;
        for seq in seqs {
            let o = self.outstanding.remove(&seq).expect("listed above");
            self.counts.bytes_unacked -= u64::from(o.entry.bytes);
            if self.requeue(o.entry, o.priority, settled) {
                requeued += 1;
            }
        }
        requeued
    }

    /// Hands ready messages to consumers with credit, at most `max` of them: the highest
    /// consumer priority first, round robin among equals, only the active one under
    /// `single_active_consumer` (`consumers.rs`).
    /// Expired messages met at the head are settled as `Expired` on the way.
    pub fn dispatch(
        &mut self,
        now_ms: u64,
        max: usize,
        out: &mut Vec<QueueDelivery<M>>,
        settled: &mut Vec<Settled<M>>,
    ) {
        self.dispatch_within(now_ms, max, |_, _| true, out, settled)
    }

    /// As `dispatch`, offering each message only to consumers `take(consumer, message)`
    /// accepts (and charges, when it accepts): their connection's room for deliveries in
    /// flight. A consumer refused is skipped for that message, as one without prefetch credit.
    pub fn dispatch_within(
        &mut self,
        now_ms: u64,
        max: usize,
        mut take: impl FnMut(HolderId, &M) -> bool,
        out: &mut Vec<QueueDelivery<M>>,
        settled: &mut Vec<Settled<M>>,
    ) {
        self.promote(now_ms, settled);
        let mut sent = 0;
        while sent < max {
            self.expire_head(now_ms, settled);
            if self.head_held() {
                return;
            }
            let Some(head) = self.ready.front() else {
                return;
            };
            let Some(c) = self.consumers.pick(|c| take(c.id, &head.msg)) else {
                return;
            };
            let (id, auto_ack) = (c.id, c.auto_ack);
            let delivery = self
                .hand_out(id, auto_ack, now_ms, settled)
                .expect("not empty");
            if !auto_ack {
                self.consumers.charge(id);
            }
            out.push(delivery);
            sent += 1;
        }
    }

    /// Takes one ready message for `owner` without a consumer (the `Get` request).
    pub fn get(
        &mut self,
        holder: HolderId,
        auto_ack: bool,
        now_ms: u64,
        settled: &mut Vec<Settled<M>>,
    ) -> Option<QueueDelivery<M>> {
        self.promote(now_ms, settled);
        self.expire_head(now_ms, settled);
        if self.head_held() {
            return None;
        }
        self.hand_out(holder, auto_ack, now_ms, settled)
    }

    /// Takes the head message for `owner`: settled at once under auto-ack, outstanding otherwise.
    fn hand_out(
        &mut self,
        holder: HolderId,
        auto_ack: bool,
        now_ms: u64,
        settled: &mut Vec<Settled<M>>,
    ) -> Option<QueueDelivery<M>> {
        let (mut entry, priority) = self.pop_ready()?;
        entry.delivery_count += 1;
        self.counts.delivered += 1;
        self.counts.redelivered += u64::from(entry.delivery_count > 1);
        let delivery = QueueDelivery {
            holder,
            seq: entry.seq,
            msg: entry.msg.clone(),
            delivery_count: entry.delivery_count,
            auto_ack,
        };
        if auto_ack {
            settled.push(self.leave(entry, SettleReason::Acked, DeathReason::Rejected));
        } else {
            self.counts.bytes_unacked += u64::from(entry.bytes);
            let o = Outstanding {
                entry,
                holder,
                delivered_ms: now_ms,
                priority,
            };
            self.outstanding.insert(o.entry.seq, o);
        }
        Some(delivery)
    }

    /// Settles an outstanding delivery as acked.
    pub fn ack(&mut self, holder: HolderId, seq: Seq) -> Result<Settled<M>, QueueError> {
        let o = self.take_outstanding(holder, seq)?;
        Ok(self.leave(o.entry, SettleReason::Acked, DeathReason::Rejected))
    }

    /// A failed delivery: back to ready with `requeue` (unless past `max_deliveries`), otherwise
    /// dead-lettered or dropped.
    pub fn nack(
        &mut self,
        holder: HolderId,
        seq: Seq,
        requeue: bool,
        settled: &mut Vec<Settled<M>>,
    ) -> Result<(), QueueError> {
        let o = self.take_outstanding(holder, seq)?;
        self.counts.nacked += 1;
        if requeue {
            self.requeue(o.entry, o.priority, settled);
        } else {
            settled.push(self.dead_letter_or_drop(o.entry, DeathReason::Rejected));
        }
        Ok(())
    }

    /// Settles every ready and delayed message as purged; outstanding deliveries are untouched.
    /// Returns how many were purged.
    pub fn purge(&mut self, settled: &mut Vec<Settled<M>>) -> usize {
        self.purge_some(usize::MAX, settled)
    }

    /// Settles at most `max` waiting messages as purged, delayed ones first (by sequence), then
    /// ready ones from the head; outstanding deliveries are untouched. Returns how many it
    /// purged: fewer than `max` means none is left waiting. A caller purging a deep queue hands
    /// each step's settlements on before it takes the next, so memory holds one step's worth.
    pub fn purge_some(&mut self, max: usize, settled: &mut Vec<Settled<M>>) -> usize {
        let mut n = 0;
        while n < max {
            let Some((seq, Delayed { entry: e, .. })) = self.delayed.pop_first() else {
                break;
            };
            let was_due = self.due.remove(&(e.enqueued_ms, seq));
            debug_assert!(was_due, "delayed message {seq} is due at its enqueued_ms");
            self.retry.leave_delayed(seq);
            settled.push(self.leave(e, SettleReason::Purged, DeathReason::Rejected));
            n += 1;
        }
        while n < max {
            let Some(e) = self.pop_held_or_not() else {
                break;
            };
            settled.push(self.leave(e, SettleReason::Purged, DeathReason::Rejected));
            n += 1;
        }
        n
    }

    /// The message `seq`, waiting or outstanding, to change how it is held (see
    /// `QueueHost::cool`): a delivered message can leave memory as a waiting one can, since its
    /// redelivery, if it comes back, reads it back like any cold message.
    pub fn held_mut(&mut self, seq: Seq) -> Option<&mut M> {
        if self.outstanding.contains_key(&seq) {
            return self.outstanding.get_mut(&seq).map(|o| &mut o.entry.msg);
        }
        self.ready_mut(seq)
    }

    /// Holders with a delivery handed out more than `timeout_ms` before `now_ms`, each with its
    /// oldest such delivery's sequence number, in holder order. One pass over the outstanding
    /// deliveries: their number is bounded by the consumers' prefetch.
    pub fn overdue(&self, now_ms: u64, timeout_ms: u64) -> Vec<(HolderId, Seq)> {
        let mut oldest: BTreeMap<HolderId, (u64, Seq)> = BTreeMap::new();
        for (seq, o) in &self.outstanding {
            if now_ms.saturating_sub(o.delivered_ms) <= timeout_ms {
                continue;
            }
            let slot = oldest.entry(o.holder).or_insert((o.delivered_ms, *seq));
            *slot = (*slot).min((o.delivered_ms, *seq));
        }
        oldest
            .into_iter()
            .map(|(holder, (_, seq))| (holder, seq))
            .collect()
    }

    /// Returns to ready (or to `settled`, past `max_deliveries`) every message outstanding for
    /// `holder` that was handed out more than `timeout_ms` before `now_ms`, and only those: a
    /// `Get` holder's overdue deliveries, while its newer ones stay with it. Returns how many
    /// went back to ready.
    pub fn release_overdue(
        &mut self,
        holder: HolderId,
        now_ms: u64,
        timeout_ms: u64,
        settled: &mut Vec<Settled<M>>,
    ) -> usize {
        let seqs: Vec<Seq> = self
            .outstanding
            .iter()
            .filter(|(_, o)| {
                o.holder == holder && now_ms.saturating_sub(o.delivered_ms) > timeout_ms
            })
            .map(|(s, _)| *s)
            .collect();
        let mut requeued = 0;
        for seq in seqs {
            let o = self.outstanding.remove(&seq).expect("listed above");
            self.counts.bytes_unacked -= u64::from(o.entry.bytes);
            if self.requeue(o.entry, o.priority, settled) {
                requeued += 1;
            }
        }
        requeued
    }

    /// Entries this queue holds: ready, delayed and outstanding.
    pub fn len(&self) -> usize {
        self.ready.len() + self.delayed.len() + self.outstanding.len()
    }

    /// Whether the queue holds no entry at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take_outstanding(
        &mut self,
        holder: HolderId,
        seq: Seq,
    ) -> Result<Outstanding<M>, QueueError> {
        match self.outstanding.get(&seq) {
            Some(o) if o.holder == holder => {}
            _ => return Err(QueueError::NotOutstanding { holder, seq }),
        }
        let o = self.outstanding.remove(&seq).expect("checked above");
        self.counts.bytes_unacked -= u64::from(o.entry.bytes);
        self.consumers.credit_back(holder);
        Ok(o)
    }

    /// Back to ready in sequence order (within its level), so redeliveries keep publish order
    /// among themselves; past `max_deliveries` it is dead-lettered or dropped instead. True if it
    /// went to ready.
    fn requeue(&mut self, entry: Entry<M>, priority: u8, settled: &mut Vec<Settled<M>>) -> bool {
        if self
            .policy
            .max_deliveries
            .is_some_and(|max| entry.delivery_count >= max)
        {
            settled.push(self.dead_letter_or_drop(entry, DeathReason::DeliveryLimit));
            return false;
        }
        self.ready_bytes += u64::from(entry.bytes);
        self.ready.insert(entry, priority);
        true
    }

    /// Moves delayed messages whose time has come to ready, then settles the messages at the
    /// head whose time is up (expired, or dead-lettered if the queue has a dead-letter
    /// exchange); ones behind a live head wait until they reach it. In a priority queue every
    /// level's head is a head: each level is swept (the tick's work, not dispatch's). Returns
    /// how many became ready.
    pub fn expire(&mut self, now_ms: u64, settled: &mut Vec<Settled<M>>) -> usize {
        let promoted = self.promote(now_ms, settled);
        for p in self.ready.levels() {
            self.expire_level(p, now_ms, settled);
        }
        promoted
    }

    /// Expires what it meets at the head: the front of the level handed out next.
    fn expire_head(&mut self, now_ms: u64, settled: &mut Vec<Settled<M>>) {
        while self.ready.front().is_some_and(|e| e.deadline_ms <= now_ms) && !self.head_held() {
            let (e, _) = self.pop_ready().expect("not empty");
            let reason = if self.policy.dead_letter {
                SettleReason::DeadLettered
            } else {
                SettleReason::Expired
            };
            settled.push(self.leave(e, reason, DeathReason::Expired));
        }
    }

    /// Settles the expired messages at the front of level `p`, up to the first live or held
    /// one. Returns how many.
    fn expire_level(&mut self, p: u8, now_ms: u64, settled: &mut Vec<Settled<M>>) -> usize {
        let mut n = 0;
        while self
            .ready
            .front_at(p)
            .is_some_and(|e| e.deadline_ms <= now_ms && self.hold.is_none_or(|h| e.seq < h))
        {
            let e = self.ready.pop_front_at(p).expect("not empty");
            self.ready_bytes -= u64::from(e.bytes);
            let reason = if self.policy.dead_letter {
                SettleReason::DeadLettered
            } else {
                SettleReason::Expired
            };
            settled.push(self.leave(e, reason, DeathReason::Expired));
            n += 1;
        }
        n
    }

    fn dead_letter_or_drop(&mut self, e: Entry<M>, why: DeathReason) -> Settled<M> {
        let reason = if self.policy.dead_letter {
            SettleReason::DeadLettered
        } else {
            SettleReason::Dropped
        };
        self.leave(e, reason, why)
    }

    /// An entry leaves the queue for good: uncounted, and handed back as settled.
    /// `why` says what a `DeadLettered` (or `Dropped`) settlement's history records.
    fn leave(&mut self, e: Entry<M>, reason: SettleReason, why: DeathReason) -> Settled<M> {
        self.counted_out(1);
        self.retry.forget(e.seq);
        self.counts.left(reason, why);
        Settled {
            seq: e.seq,
            msg: e.msg,
            bytes: e.bytes,
            reason,
            why,
        }
    }

    fn counted_in(&self) {
        self.index.set(self.index.get() + 1);
    }

    /// Holds back every waiting message from `from` on (`None`: none): they are not handed out,
    /// nor expired, until the hold moves past them. The caller holds only messages newer than
    /// any it ever let go, so a requeued message is never behind the hold.
    pub fn set_hold(&mut self, from: Option<Seq>) {
        self.hold = from;
        self.ready.set_hold(from);
    }

    fn head_held(&self) -> bool {
        self.hold
            .is_some_and(|h| self.ready.front().is_some_and(|e| e.seq >= h))
    }

    /// Takes back the waiting (ready or delayed) message `seq`, wherever it is: its record's
    /// commit failed, so it was never accepted. Returns whether it was there.
    pub fn remove_waiting(&mut self, seq: Seq) -> bool {
        if let Some(e) = self.ready.remove(seq) {
            self.ready_bytes -= u64::from(e.bytes);
            self.counted_out(1);
            self.counts.published = self.counts.published.saturating_sub(1);
            return true;
        }
        if let Some(Delayed { entry: e, .. }) = self.delayed.remove(&seq) {
            let was_due = self.due.remove(&(e.enqueued_ms, seq));
            debug_assert!(was_due, "delayed message {seq} is due at its enqueued_ms");
            self.counted_out(1);
            self.counts.published = self.counts.published.saturating_sub(1);
            return true;
        }
        false
    }

    /// The message `seq` if it is outstanding for `holder`.
    pub fn outstanding_for(&self, holder: HolderId, seq: Seq) -> Option<&M> {
        self.outstanding
            .get(&seq)
            .filter(|o| o.holder == holder)
            .map(|o| &o.entry.msg)
    }

    /// How an ack (or a nack without requeue) of one of this queue's messages is settled.
    pub fn settle_reason(&self, ack: bool) -> SettleReason {
        match (ack, self.policy.dead_letter) {
            (true, _) => SettleReason::Acked,
            (false, true) => SettleReason::DeadLettered,
            (false, false) => SettleReason::Dropped,
        }
    }

    /// Takes an outstanding delivery out for a settlement (see `Taken`); its holder's credit is
    /// given back now. A taken entry is not counted in the index while it is out (the queue may
    /// be dropped meanwhile); `put_back` counts it again.
    pub fn take(&mut self, holder: HolderId, seq: Seq) -> Result<Taken<M>, QueueError> {
        let o = self.take_outstanding(holder, seq)?;
        self.counted_out(1);
        Ok(Taken {
            holder,
            entry: o.entry,
            delivered_ms: o.delivered_ms,
            priority: o.priority,
        })
    }

    /// Settles a taken delivery: acked, or (a nack without requeue) dead-lettered or dropped.
    pub fn finish(&mut self, t: Taken<M>, ack: bool) -> Settled<M> {
        let reason = self.settle_reason(ack);
        self.retry.forget(t.entry.seq);
        self.counts.nacked += u64::from(!ack);
        self.counts.left(reason, DeathReason::Rejected);
        Settled {
            seq: t.entry.seq,
            msg: t.entry.msg,
            bytes: t.entry.bytes,
            reason,
            why: DeathReason::Rejected,
        }
    }

    /// Puts a taken delivery back: outstanding for its holder again (its consumer, if still
    /// here, takes the credit back), or, if that holder has been released meanwhile (its
    /// connection closed), back to ready to be redelivered.
    pub fn put_back(&mut self, t: Taken<M>, released: bool, settled: &mut Vec<Settled<M>>) {
        self.counted_in();
        if released {
            self.requeue(t.entry, t.priority, settled);
            return;
        }
        self.consumers.charge(t.holder);
        self.counts.bytes_unacked += u64::from(t.entry.bytes);
        let seq = t.entry.seq;
        let o = Outstanding {
            entry: t.entry,
            holder: t.holder,
            delivered_ms: t.delivered_ms,
            priority: t.priority,
        };
        self.outstanding.insert(seq, o);
    }

    fn push_ready(&mut self, entry: Entry<M>, priority: u8) {
        self.ready_bytes += u64::from(entry.bytes);
        self.ready.push_back(entry, priority);
    }

    /// The front of the highest level, held or not (a purge takes held messages too).
    fn pop_held_or_not(&mut self) -> Option<Entry<M>> {
        let p = self.ready.levels().next()?;
        let e = self.ready.pop_front_at(p).expect("a non-empty level");
        self.ready_bytes -= u64::from(e.bytes);
        Some(e)
    }

    /// The next message to hand out, with its level (a drained list gives its memory back).
    fn pop_ready(&mut self) -> Option<(Entry<M>, u8)> {
        let (e, p) = self.ready.pop_front()?;
        self.ready_bytes -= u64::from(e.bytes);
        Some((e, p))
    }
}

impl<M> Queue<M> {
    fn counted_out(&self, n: u64) {
        self.index.set(self.index.get() - n);
    }
}

impl<M> Drop for Queue<M> {
    /// A queue deleted with its messages: they leave the shard's index with it.
    fn drop(&mut self) {
        let held = self.ready.len() + self.delayed.len() + self.outstanding.len();
        self.counted_out(held as u64);
    }
}

mod retry;
pub use retry::{decide, RetryDecision};

#[cfg(test)]
mod tests;
