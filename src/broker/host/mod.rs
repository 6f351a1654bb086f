//! The queue host: every queue one shard owns, with their declarations and consumers.
//!
//! Contract: plain data without I/O, owned by one shard. It answers the requests that reach the
//! owning shard (declare, delete, purge, info, list, publish, consume, cancel, settle, get) from
//! any connection of any shard, named by a `ConnRef`, and it produces the deliveries each
//! connection is owed (`take_deliveries`). Which shard owns which queue is decided before a
//! request gets here (`placement`); the host only ever sees its own queues. Time is an argument
//! (`now_ms`): the host never reads a clock.
//!
//! This file holds the queue map and what changes it: declarations, deletion, purge, info, list,
//! publish, recovery. `consumers` serves consumers and `Get`s and releases what a closed
//! connection held; `expiry` deletes queues unused for their `expires_ms` (a deadline set, and
//! the usage records that carry the clock across restarts); `settle` keeps the books of what
//! leaves a queue (journal settles, dead letters, drop counts, expiry, the liveness of journal
//! segments as messages cool) and of what waits for a commit (held messages, acks taken out
//! until their record is durable); `observe` lists the consumers of its queues.
//!
//! What grows with clients is bounded here (`HostLimits`): the queues of the shard
//! (`queues_per_shard_max`, a declare past it refused) and the entries of every queue's index
//! (`queued_messages_max`, counted in one `IndexCount`; `index_room` refuses a publish past it).
//! A purge goes in steps of at most `PURGE_STEP` messages (`purge_step`), the caller journaling
//! each step's settlements before the next, so purging a deep queue never gathers every entry.
//!
//! Faults handled: every refused request is a `Refusal` carrying the schema's error code and a
//! sentence; nothing is half-applied. A connection that goes away releases everything it held:
//! its consumers, its outstanding deliveries (back to ready, redelivered), its exclusive queues.

mod consumers;
mod expiry;
mod observe;
mod settle;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use weir_protocol::wire::{self, ErrorCode};

use crate::broker::catalog::CatalogRecord;
use crate::broker::expiry::QueueExpiry;
use crate::broker::queue::{
    IndexCount, Overflow, Queue, QueueCounts, QueueDelivery, QueueError, QueuePolicy, Settled,
};
use crate::broker::routing::hash::FastMap;
use crate::broker::stored::{Cache, Liveness, MsgRef, Stored};
use crate::mesh::types::{Cancelled, ConnRef, Declare, Refusal};
use crate::mesh::types::{HolderId, Seq};
use crate::storage::CommitId;
use crate::storage::{RetryEntry, SettleReason};

pub use consumers::{charge_of, Outgoing};
pub use settle::{DeadLetter, JournalWork, SettlePlan};

/// A delivery of a stored message.
pub type StoredDelivery = QueueDelivery<MsgRef>;

fn refuse<T>(code: ErrorCode, message: String) -> Result<T, Refusal> {
    Err(Refusal { code, message })
}

struct ConsumerInfo {
    conn: ConnRef,
    tag: Rc<str>,
    /// Consumed with `exclusive`: while it runs, the queue takes no other consumer.
    exclusive: bool,
}

struct Hosted {
    name: Rc<str>,
    durable: bool,
    exclusive: Option<ConnRef>,
    auto_delete: bool,
    arguments: wire::QueueArgumentsT,
    queue: Queue<MsgRef>,
    consumers: FastMap<HolderId, ConsumerInfo>,
    /// Cancelled consumers, by the connection they belonged to: what they hold stays ackable
    /// until that connection closes.
    retired: HashMap<HolderId, ConnRef>,
    had_consumer: bool,
    /// Messages whose record's commit is not durable yet (fsync = always): not deliverable.
    held: BTreeSet<Seq>,
    /// With `expires_ms`: when it expires if unused (`expiry`).
    expiry: Option<QueueExpiry>,
}

impl Hosted {
    fn info(&self, shard: u16, now_ms: u64) -> wire::QueueInfoT {
        let s = self.queue.stats();
        let mut i = wire::QueueInfoT::default();
        i.name = Some(self.name.to_string());
        i.durable = self.durable;
        i.exclusive = self.exclusive.is_some();
        i.auto_delete = self.auto_delete;
        i.arguments = Some(Box::new(self.arguments.clone()));
        i.shard = shard;
        i.messages_ready = s.ready;
        i.messages_unacked = s.outstanding;
        i.bytes_ready = s.ready_bytes;
        i.consumers = s.consumers;
        i.messages_delayed = s.delayed;
        i.messages_retrying = s.retrying;
        i.oldest_ready_age_ms = self
            .queue
            .oldest_ready_ms()
            .map(|t| now_ms.saturating_sub(t));
        i.expires_in_ms = self.expiry.as_ref().and_then(|e| e.expires_in(now_ms));
        i.active_consumer = self
            .queue
            .active_consumer()
            .and_then(|id| self.consumers.get(&id))
            .map(|c| c.tag.to_string());
        let c = self.queue.counts();
        i.messages_published = c.published;
        i.messages_delivered = c.delivered;
        i.messages_redelivered = c.redelivered;
        i.messages_acked = c.acked;
        i.messages_nacked = c.nacked;
        i.messages_dead_lettered = c.dead_lettered;
        i.messages_expired = c.expired;
        i.messages_dropped = c.dropped;
        i.bytes_unacked = c.bytes_unacked;
        i
    }

    fn same_declaration(&self, d: &Declare) -> bool {
        self.durable == d.durable
            && self.exclusive.is_some() == d.exclusive
            && self.auto_delete == d.auto_delete
            && self.arguments == d.arguments
    }
}

/// Messages one purge step settles: its settlements (about 64 bytes each while they wait for
/// the journal) are handed on before the next step, so a purge holds about 1 MiB at most.
pub const PURGE_STEP: usize = 16_384;

/// The host's share of `BrokerLimits` (reasons there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLimits {
    pub queues_per_shard_max: u32,
    pub queued_messages_max: u64,
}

impl HostLimits {
    /// No bound: state-machine tests that are not about limits.
    pub const UNBOUNDED: HostLimits = HostLimits {
        queues_per_shard_max: u32::MAX,
        queued_messages_max: u64::MAX,
    };
}

/// The queues of one shard.
pub struct QueueHost {
    shard: u16,
    queues: BTreeMap<Rc<str>, Hosted>,
    /// Queues whose consumers may be owed deliveries.
    dirty: BTreeSet<Rc<str>>,
    /// Consumer ids are `CONSUMER_BIT | n`, so they never collide with connection ids, which
    /// own a connection's `Get`s.
    next_consumer: u64,
    /// Messages settled without a consumer's ack and not handed to a dead-letter exchange:
    /// dropped by overflow, expired, purged, or dead-lettered by a queue that names none.
    pub dropped: u64,
    /// Messages an exchange routed here whose every target queue was gone meanwhile (not
    /// mandatory): dropped.
    pub unroutable: u64,
    /// Queues removed since the last `take_removed`: their bindings must go too.
    removed: Vec<String>,
    /// Messages dead-lettered since the last `take_dead_letters`, for the shard to publish to
    /// their queue's dead-letter exchange.
    dead_letters: Vec<DeadLetter>,
    /// Messages dead-lettered so far.
    pub dead_lettered: u64,
    /// Dead letters dropped because every queue they routed to closed a cycle.
    pub dead_letter_cycles: u64,
    /// Dead-letter copies their queues refused (full, or the disk is): dropped.
    pub dead_letter_refused: u64,
    /// Unused queues with `expires_ms`, by when they expire (`expiry`).
    deadlines: BTreeSet<(u64, Rc<str>)>,
    /// Usage records of queues with `expires_ms`, for the shard to journal (`take_usage`).
    usage: Vec<CatalogRecord>,
    /// Settlements of journaled messages, for the shard to journal (`take_journal_work`).
    settles: Vec<(Rc<str>, Seq, SettleReason)>,
    /// Durable declarations and deletions, for the shard to journal.
    catalog: Vec<CatalogRecord>,
    /// Payload bytes held in memory, against the shard's budget.
    cache: Rc<Cache>,
    /// Live messages per journal segment (for reclaim).
    liveness: Rc<Liveness>,
    /// Deliveries on their way to each connection, against `outbox_bytes_max`.
    outboxes: consumers::Outboxes,
    /// Entries of every queue here (ready, delayed, outstanding), against `queued_messages_max`.
    index: IndexCount,
    limits: HostLimits,
    /// Held messages by the commit round carrying their record (`hold_until_durable`).
    unconfirmed: BTreeMap<CommitId, Vec<(Rc<str>, Seq)>>,
    /// Acks and nacks whose settle record's commit round is not durable yet.
    settling: BTreeMap<CommitId, Vec<settle::Pending>>,
    /// The earliest due time of a delayed message noted since the last `take_due_hint` (a
    /// retry, a restore, or an expiry round's look at every queue): the shard's due timer
    /// wakes for it.
    due_hint: Option<u64>,
    /// The counts of the queues deleted since the broker started: a shard's totals go on
    /// counting what they did (`status`).
    counts_of_deleted: QueueCounts,
}

impl QueueHost {
    /// A host with no payload budget (state-machine tests).
    pub fn new(shard: u16) -> QueueHost {
        QueueHost::with_cache(shard, Cache::new(u64::MAX))
    }

    /// A host whose in-memory payloads are counted in `cache`.
    pub fn with_cache(shard: u16, cache: Rc<Cache>) -> QueueHost {
        QueueHost::with_accounts(shard, cache, Liveness::new())
    }

    /// A host whose in-memory payloads are counted in `cache` and whose journaled messages are
    /// counted per segment in `liveness`.
    pub fn with_accounts(shard: u16, cache: Rc<Cache>, liveness: Rc<Liveness>) -> QueueHost {
        QueueHost {
            cache,
            liveness,
            shard,
            queues: BTreeMap::new(),
            dirty: BTreeSet::new(),
            next_consumer: 0,
            dropped: 0,
            unroutable: 0,
            removed: Vec::new(),
            dead_letters: Vec::new(),
            dead_lettered: 0,
            dead_letter_cycles: 0,
            dead_letter_refused: 0,
            settles: Vec::new(),
            catalog: Vec::new(),
            outboxes: consumers::Outboxes::default(),
            index: IndexCount::default(),
            limits: HostLimits::UNBOUNDED,
            unconfirmed: BTreeMap::new(),
            settling: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            usage: Vec::new(),
            due_hint: None,
            counts_of_deleted: QueueCounts::default(),
        }
    }

    /// Bounds this host's queues and index (the shard sets them once, after recovery: what the
    /// journal holds comes back even past them).
    pub fn set_limits(&mut self, limits: HostLimits) {
        self.limits = limits;
    }

    /// Entries every queue here holds: the size of the shard's index.
    pub fn index_entries(&self) -> u64 {
        self.index.get()
    }

    /// Whether `entries` more queue entries fit under `queued_messages_max`; the refusal names
    /// the limit.
    pub fn index_room(&self, entries: u64) -> Result<(), Refusal> {
        let max = self.limits.queued_messages_max;
        if self.index.get().saturating_add(entries) <= max {
            return Ok(());
        }
        refuse(
            ErrorCode::LimitExceeded,
            format!(
                "this shard's queues hold queued_messages_max = {max} messages (each one's index \
                 stays in memory); no more can be taken until consumers catch up"
            ),
        )
    }

    /// Every durable queue's declaration and next sequence number: written again before the
    /// segments holding their history are reclaimed.
    pub fn restatement(&self) -> Vec<CatalogRecord> {
        let mut out = Vec::new();
        for q in self
            .queues
            .values()
            .filter(|q| q.durable && q.exclusive.is_none())
        {
            out.push(CatalogRecord::DeclareQueue(Declare {
                name: q.name.to_string(),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: q.auto_delete,
                arguments: q.arguments.clone(),
            }));
            out.push(CatalogRecord::QueueSeq {
                name: q.name.to_string(),
                next_seq: q.queue.next_seq(),
            });
        }
        self.usage_restatement(&mut out);
        out
    }

    /// The shard's payload cache account.
    pub fn cache(&self) -> &Rc<Cache> {
        &self.cache
    }

    /// The queues removed since the last call (deleted, auto-deleted, exclusive ones with their
    /// connection): the control plane drops their bindings.
    pub fn take_removed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.removed)
    }

    /// Whether `queue`'s persistent messages are journaled; `None` if there is no such queue.
    pub fn is_durable(&self, queue: &str) -> Option<bool> {
        self.queues
            .get(queue)
            .map(|q| q.durable && q.exclusive.is_none())
    }

    /// Undoes the publish of `seq` (the newest message of `queue`) when it could not be journaled.
    pub fn retract(&mut self, queue: &str, seq: Seq) {
        if let Some(q) = self.queues.get_mut(queue) {
            q.queue.retract_newest(seq);
        }
    }

    /// Holds a just-published message back in each queue of `taken` until the commit `round`
    /// carrying its record is durable (`commit_resolved`): under fsync = always a consumer is
    /// never handed a message a crash could still lose, nor one whose publish is then refused.
    pub fn hold_until_durable(&mut self, round: CommitId, taken: &[(&str, Seq)]) {
        let pending = self.unconfirmed.entry(round).or_default();
        for (queue, seq) in taken {
            if let Some(q) = self.queues.get_mut(*queue) {
                q.held.insert(*seq);
                q.queue.set_hold(q.held.first().copied());
                pending.push((q.name.clone(), *seq));
            }
        }
    }

    /// Puts back a durable queue and its messages, recovered from the journal.
    pub fn restore_queue(
        &mut self,
        d: Declare,
        next_seq: Seq,
        messages: impl IntoIterator<Item = (Seq, u32, MsgRef, Option<u64>, u8, Option<RetryEntry>)>,
        now_ms: u64,
    ) {
        let policy = policy_of(&d.arguments);
        let ttl = policy.message_ttl_ms;
        let mut queue = Queue::counted(policy, next_seq, self.index.clone());
        for (seq, bytes, msg, deliver_at, priority, retry) in messages {
            if let Some(segment) = msg.cold_segment() {
                self.liveness.add(segment);
            }
            if let Some(retry) = retry {
                // It failed and was retried: its retry's due time and counts stand.
                let deadline = ttl.map_or(u64::MAX, |t| now_ms.saturating_add(t));
                queue.restore_retry(seq, msg, bytes, retry, deadline, now_ms, priority);
                if retry.due_ms > now_ms {
                    self.note_due(retry.due_ms);
                }
                continue;
            }
            if let Some(at) = deliver_at.filter(|at| *at > now_ms) {
                // Still delayed: never delivered, so not marked redelivered.
                queue.restore_delayed(seq, msg, bytes, at, 0, priority);
                self.note_due(at);
                continue;
            }
            let deadline = ttl.map_or(u64::MAX, |t| now_ms.saturating_add(t));
            // It may have been delivered before the restart: count that delivery, so it is
            // marked redelivered (conservative, as AMQP brokers do after a crash).
            queue.restore(seq, msg, bytes, now_ms, deadline, 1, priority);
        }
        let name: Rc<str> = Rc::from(d.name.as_str());
        self.dirty.insert(name.clone());
        let hosted = Hosted {
            name: name.clone(),
            durable: d.durable,
            exclusive: None,
            auto_delete: d.auto_delete,
            arguments: d.arguments,
            queue,
            consumers: FastMap::default(),
            retired: HashMap::new(),
            had_consumer: false,
            held: BTreeSet::new(),
            expiry: None,
        };
        self.queues.insert(name, hosted);
    }

    fn get_queue(&mut self, conn: ConnRef, name: &str) -> Result<&mut Hosted, Refusal> {
        let Some(q) = self.queues.get_mut(name) else {
            return refuse(ErrorCode::NotFound, format!("queue '{name}' not found"));
        };
        if q.exclusive.is_some_and(|owner| owner != conn) {
            return refuse(
                ErrorCode::ResourceLocked,
                format!("queue '{name}' is exclusive to another connection"),
            );
        }
        Ok(q)
    }

    pub fn declare(
        &mut self,
        conn: ConnRef,
        d: Declare,
        now_ms: u64,
    ) -> Result<wire::QueueInfoT, Refusal> {
        let shard = self.shard;
        if let Some(q) = self.queues.get(d.name.as_str()) {
            if q.exclusive.is_some_and(|owner| owner != conn) {
                return refuse(
                    ErrorCode::ResourceLocked,
                    format!("queue '{}' is exclusive to another connection", d.name),
                );
            }
            if !d.passive && !q.same_declaration(&d) {
                return refuse(
                    ErrorCode::PreconditionFailed,
                    format!("queue '{}' exists with other properties (durable, exclusive, auto-delete or arguments)", d.name),
                );
            }
            if !d.passive {
                // A redeclare is a use of the queue (`expires_ms`), as in RabbitMQ.
                self.used(&d.name, expiry::Use::Touched, now_ms);
            }
            let q = &self.queues[d.name.as_str()];
            return Ok(q.info(shard, now_ms));
        }
        if d.passive {
            return refuse(ErrorCode::NotFound, format!("queue '{}' not found", d.name));
        }
        let max = self.limits.queues_per_shard_max;
        if self.queues.len() >= max as usize {
            return refuse(
                ErrorCode::LimitExceeded,
                format!(
                    "queue '{}': shard {shard} already owns queues_per_shard_max = {max} queues",
                    d.name
                ),
            );
        }
        let a = &d.arguments;
        if a.dead_letter_routing_key.is_some() && a.dead_letter_exchange.is_none() {
            return refuse(
                ErrorCode::InvalidArgument,
                "dead_letter_routing_key without dead_letter_exchange: name the exchange (\"\" is the default one)".into(),
            );
        }
        if let Err(why) = crate::broker::expiry::check(a.expires_ms) {
            return refuse(ErrorCode::InvalidArgument, why);
        }
        let policy = policy_of(a);
        let expiry = self.expiry_of(&d, now_ms);
        if d.durable && !d.exclusive {
            self.catalog.push(CatalogRecord::DeclareQueue(Declare {
                passive: false,
                ..d.clone()
            }));
        }
        let name: Rc<str> = Rc::from(d.name.as_str());
        let q = Hosted {
            name: name.clone(),
            durable: d.durable,
            exclusive: d.exclusive.then_some(conn),
            auto_delete: d.auto_delete,
            arguments: d.arguments,
            queue: Queue::counted(policy, 0, self.index.clone()),
            consumers: FastMap::default(),
            retired: HashMap::new(),
            had_consumer: false,
            held: BTreeSet::new(),
            expiry,
        };
        if let Some(deadline) = q.expiry.as_ref().and_then(QueueExpiry::deadline) {
            self.deadlines.insert((deadline, name.clone()));
        }
        let info = q.info(shard, now_ms);
        self.queues.insert(name, q);
        Ok(info)
    }

    /// Deletes a queue; returns how many messages went with it and the consumers to tell.
    pub fn delete(
        &mut self,
        conn: ConnRef,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<(u64, Vec<Cancelled>), Refusal> {
        let q = self.get_queue(conn, name)?;
        let s = q.queue.stats();
        if if_unused && s.consumers > 0 {
            return refuse(
                ErrorCode::PreconditionFailed,
                format!("queue '{name}' has {} consumers", s.consumers),
            );
        }
        if if_empty && s.ready > 0 {
            return refuse(
                ErrorCode::PreconditionFailed,
                format!("queue '{name}' has {} ready messages", s.ready),
            );
        }
        Ok(self.remove(name, "was deleted"))
    }

    fn remove(&mut self, name: &str, why: &str) -> (u64, Vec<Cancelled>) {
        let Some(q) = self.queues.remove(name) else {
            return (0, Vec::new());
        };
        self.removed.push(name.to_string());
        self.forget_pending(name);
        self.forget_expiry(&q.name, q.expiry.as_ref());
        for segment in q.queue.messages().filter_map(MsgRef::cold_segment) {
            self.liveness.sub(segment);
        }
        self.dirty.remove(name);
        if q.durable && q.exclusive.is_none() {
            self.catalog
                .push(CatalogRecord::DeleteQueue(name.to_string()));
        }
        let s = q.queue.stats();
        let mut counts = q.queue.counts();
        counts.bytes_unacked = 0;
        self.counts_of_deleted.add(&counts);
        let cancelled = q
            .consumers
            .values()
            .map(|c| Cancelled {
                to: c.conn,
                consumer_tag: c.tag.to_string(),
                message: format!("queue '{name}' {why}"),
            })
            .collect();
        (s.ready + s.outstanding, cancelled)
    }

    /// Purges every waiting message of a queue at once (state-machine tests; the shard purges
    /// with `purge_step`).
    pub fn purge(&mut self, conn: ConnRef, name: &str) -> Result<u64, Refusal> {
        let mut total = 0;
        loop {
            let (n, more) = self.purge_step(conn, name, usize::MAX)?;
            total += n;
            if !more {
                return Ok(total);
            }
        }
    }

    /// Purges at most `max` waiting messages of a queue, their settlements noted for the
    /// journal; returns how many, and whether more wait. The caller journals each step's
    /// settlements before it takes the next, so memory holds one step of them.
    pub fn purge_step(
        &mut self,
        conn: ConnRef,
        name: &str,
        max: usize,
    ) -> Result<(u64, bool), Refusal> {
        let q = self.get_queue(conn, name)?;
        let mut settled = Vec::new();
        let n = q.queue.purge_some(max, &mut settled);
        let name = q.name.clone();
        self.note_settled(&name, settled);
        Ok((n as u64, n == max))
    }

    pub fn info(
        &mut self,
        conn: ConnRef,
        name: &str,
        now_ms: u64,
    ) -> Result<wire::QueueInfoT, Refusal> {
        let shard = self.shard;
        Ok(self.get_queue(conn, name)?.info(shard, now_ms))
    }

    /// This shard's queues whose names start with `prefix` and sort after `after`, in name order.
    pub fn list(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
        now_ms: u64,
    ) -> Vec<wire::QueueInfoT> {
        use std::ops::Bound;
        self.queues
            .range::<str, _>((Bound::Excluded(after), Bound::Unbounded))
            .filter(|(name, _)| name.starts_with(prefix))
            .take(limit)
            .map(|(_, q)| q.info(self.shard, now_ms))
            .collect()
    }

    /// Accepts a message into a queue.
    pub fn publish(
        &mut self,
        conn: ConnRef,
        queue: &str,
        msg: Rc<Stored>,
        expiration_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Seq, Refusal> {
        self.publish_at(conn, queue, msg, expiration_ms, None, now_ms)
    }

    /// Accepts a message into a queue, delayed until `deliver_at_ms` if that is in the future.
    pub fn publish_at(
        &mut self,
        conn: ConnRef,
        queue: &str,
        msg: Rc<Stored>,
        expiration_ms: Option<u64>,
        deliver_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Seq, Refusal> {
        // Anyone may publish to an exclusive queue (AMQP: exclusivity is about consuming and
        // managing it); that is how a requester's private reply queue gets its replies.
        let _ = conn;
        let Some(q) = self.queues.get_mut(queue) else {
            return refuse(ErrorCode::NotFound, format!("queue '{queue}' not found"));
        };
        let (bytes, priority) = (msg.len(), msg.priority);
        let mut settled: Vec<Settled<MsgRef>> = Vec::new();
        let seq = match q.queue.publish_prioritized(
            MsgRef::Hot(msg),
            bytes,
            priority,
            now_ms,
            expiration_ms,
            deliver_at_ms,
            &mut settled,
        ) {
            Ok(seq) => seq,
            Err(QueueError::Full(which)) => {
                return refuse(
                    ErrorCode::QueueFull,
                    format!("queue '{queue}' is full ({which})"),
                );
            }
            Err(e) => return refuse(ErrorCode::Internal, e.to_string()),
        };
        let name = q.name.clone();
        self.note_settled(&name, settled);
        self.dirty.insert(name);
        Ok(seq)
    }

    /// As `connection_closed_at`, at time 0 (state-machine tests not about expiry).
    #[cfg(test)]
    pub fn connection_closed(&mut self, conn: ConnRef) {
        self.connection_closed_at(conn, 0)
    }

    /// A connection went away at `now_ms`: its consumers and `Get`s release their deliveries
    /// (redelivered later), its exclusive queues are deleted, auto-delete queues left without
    /// consumers go, and queues left without consumers are unused from now (`expires_ms`).
    pub fn connection_closed_at(&mut self, conn: ConnRef, now_ms: u64) {
        self.release_settling(conn);
        let mut gone = self.release_connection(conn, now_ms);
        gone.extend(
            self.queues
                .values()
                .filter(|q| q.exclusive == Some(conn))
                .map(|q| q.name.clone()),
        );
        // Removed in name order, as `take_removed` has always reported them.
        gone.sort_unstable();
        for name in gone {
            self.remove(&name, "was deleted with its connection");
        }
    }

    /// This host's part of a shard's counters (the shard adds connections and journal figures).
    pub fn status(&self) -> crate::mesh::types::ShardStatus {
        let mut st = crate::mesh::types::ShardStatus {
            shard: self.shard,
            queues: self.queues.len() as u64,
            dropped: self.dropped,
            dead_lettered: self.dead_lettered,
            dead_letter_cycles: self.dead_letter_cycles,
            dead_letter_refused: self.dead_letter_refused,
            unroutable: self.unroutable,
            cache_bytes: self.cache.bytes(),
            ..Default::default()
        };
        let mut counts = self.counts_of_deleted;
        for q in self.queues.values() {
            let s = q.queue.stats();
            st.messages_ready += s.ready;
            st.messages_unacked += s.outstanding;
            st.consumers += u64::from(s.consumers);
            counts.add(&q.queue.counts());
        }
        st.messages_published = counts.published;
        st.messages_delivered = counts.delivered;
        st.messages_acked = counts.acked;
        st.messages_nacked = counts.nacked;
        st.messages_expired = counts.expired;
        st
    }

    /// True when some queue may owe deliveries.
    pub fn has_work(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }
}

fn policy_of(a: &wire::QueueArgumentsT) -> QueuePolicy {
    QueuePolicy {
        max_length: a.max_length,
        max_length_bytes: a.max_length_bytes,
        overflow: Overflow::from_wire(a.overflow),
        message_ttl_ms: a.message_ttl_ms.map(u64::from),
        max_deliveries: a.max_deliveries,
        dead_letter: a.dead_letter_exchange.is_some(),
        single_active_consumer: a.single_active_consumer,
        retry_delays_ms: a.retry_delays_ms.clone().unwrap_or_default(),
        priority_max: a.priority_max,
    }
}
