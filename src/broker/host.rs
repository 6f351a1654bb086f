//! The queue host: every queue one shard owns, with their declarations and consumers.
//!
//! Contract: plain data without I/O, owned by one shard. It answers the requests that reach the
//! owning shard (declare, delete, purge, info, list, publish, consume, cancel, settle, get) from
//! any connection of any shard, named by a `ConnRef`, and it produces the deliveries each
//! connection is owed (`take_deliveries`). Which shard owns which queue is decided before a
//! request gets here (`placement`); the host only ever sees its own queues.
//!
//! Faults handled: every refused request is a `Refusal` carrying the schema's error code and a
//! sentence; nothing is half-applied. A connection that goes away releases everything it held:
//! its consumers, its outstanding deliveries (back to ready, redelivered), its exclusive queues.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use weir_protocol::wire::{self, ErrorCode};

use crate::broker::catalog::CatalogRecord;
use crate::broker::queue::{
    Delivery, Overflow, OwnerId, Queue, QueueError, QueuePolicy, Seq, Settled,
};
use crate::storage::SettleReason;

/// A delivery of a stored message.
pub type StoredDelivery = Delivery<MsgRef>;

/// A connection, wherever it lives: its shard and its broker-unique id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnRef {
    pub shard: u16,
    pub conn: u64,
}

pub use crate::broker::stored::{Cache, Liveness, MsgRef, Stored};

/// Why a request was refused: the code for the `Error` frame and a sentence naming what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse<T>(code: ErrorCode, message: String) -> Result<T, Refusal> {
    Err(Refusal { code, message })
}

/// A declare request's parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Declare {
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: wire::QueueArgumentsT,
}

/// A delivery owed to a connection.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub to: ConnRef,
    pub consumer_tag: Rc<str>,
    pub queue: Rc<str>,
    pub delivery: Delivery<MsgRef>,
}

/// A consumer the host cancelled (its queue was deleted); its connection is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancelled {
    pub to: ConnRef,
    pub consumer_tag: String,
    pub message: String,
}

struct ConsumerInfo {
    conn: ConnRef,
    tag: Rc<str>,
}

struct Hosted {
    name: Rc<str>,
    durable: bool,
    exclusive: Option<ConnRef>,
    auto_delete: bool,
    arguments: wire::QueueArgumentsT,
    queue: Queue<MsgRef>,
    consumers: HashMap<OwnerId, ConsumerInfo>,
    /// Cancelled consumers, by the connection they belonged to: what they hold stays ackable
    /// until that connection closes.
    retired: HashMap<OwnerId, ConnRef>,
    had_consumer: bool,
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
        i.oldest_ready_age_ms = s.oldest_ready_ms.map(|t| now_ms.saturating_sub(t));
        i
    }

    fn same_declaration(&self, d: &Declare) -> bool {
        self.durable == d.durable
            && self.exclusive.is_some() == d.exclusive
            && self.auto_delete == d.auto_delete
            && self.arguments == d.arguments
    }
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
    /// Messages settled without a consumer's ack: dropped, expired, purged, dead-lettered (until
    /// exchanges exist, dead-lettering drops and counts).
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
    /// Settlements of journaled messages, for the shard to journal (`take_journal_work`).
    settles: Vec<(Rc<str>, Seq, SettleReason)>,
    /// Durable declarations and deletions, for the shard to journal.
    catalog: Vec<CatalogRecord>,
    /// Payload bytes held in memory, against the shard's budget.
    cache: Rc<Cache>,
    /// Live messages per journal segment (for reclaim).
    liveness: Rc<Liveness>,
}

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

const CONSUMER_BIT: u64 = 1 << 63;

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
            settles: Vec::new(),
            catalog: Vec::new(),
        }
    }

    /// Live messages per journal segment.
    pub fn liveness(&self) -> &Rc<Liveness> {
        &self.liveness
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

    /// Takes what must be journaled since the last call.
    pub fn take_journal_work(&mut self) -> JournalWork {
        JournalWork {
            catalog: std::mem::take(&mut self.catalog),
            settles: std::mem::take(&mut self.settles),
        }
    }

    /// Whether `queue`'s persistent messages are journaled; `None` if there is no such queue.
    pub fn is_durable(&self, queue: &str) -> Option<bool> {
        self.queues
            .get(queue)
            .map(|q| q.durable && q.exclusive.is_none())
    }

    /// Counts what was settled and remembers the settlements of journaled messages, and the
    /// messages to dead-letter.
    fn note_settled(&mut self, queue: &Rc<str>, settled: Vec<Settled<MsgRef>>) {
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

    /// Moves the ready message `seq` of `queue` out of memory once its record is durable: the
    /// entry keeps only the record's position (no allocation), and the payload and envelope are
    /// freed. Returns whether it did.
    pub fn cool(&mut self, queue: &str, seq: Seq) -> bool {
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        let Some(msg) = q.queue.ready_mut(seq) else {
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

    /// Undoes the publish of `seq` (the newest message of `queue`) when it could not be journaled.
    pub fn retract(&mut self, queue: &str, seq: Seq) {
        if let Some(q) = self.queues.get_mut(queue) {
            q.queue.retract_newest(seq);
        }
    }

    /// Puts back a durable queue and its messages, recovered from the journal.
    pub fn restore_queue(
        &mut self,
        d: Declare,
        next_seq: Seq,
        messages: impl IntoIterator<Item = (Seq, u32, MsgRef, Option<u64>)>,
        now_ms: u64,
    ) {
        let policy = policy_of(&d.arguments);
        let ttl = policy.message_ttl_ms;
        let mut queue = Queue::new(policy, next_seq);
        for (seq, bytes, msg, deliver_at) in messages {
            if let Some(segment) = msg.cold_segment() {
                self.liveness.add(segment);
            }
            if let Some(at) = deliver_at.filter(|at| *at > now_ms) {
                // Still delayed: never delivered, so not marked redelivered.
                queue.restore_delayed(seq, msg, bytes, at, 0);
                continue;
            }
            let deadline = ttl.map_or(u64::MAX, |t| now_ms.saturating_add(t));
            // It may have been delivered before the restart: count that delivery, so it is
            // marked redelivered (conservative, as AMQP brokers do after a crash).
            queue.restore(seq, msg, bytes, now_ms, deadline, 1);
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
            consumers: HashMap::new(),
            retired: HashMap::new(),
            had_consumer: false,
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
            return Ok(q.info(shard, now_ms));
        }
        if d.passive {
            return refuse(ErrorCode::NotFound, format!("queue '{}' not found", d.name));
        }
        let a = &d.arguments;
        if a.dead_letter_routing_key.is_some() && a.dead_letter_exchange.is_none() {
            return refuse(
                ErrorCode::InvalidArgument,
                "dead_letter_routing_key without dead_letter_exchange: name the exchange (\"\" is the default one)".into(),
            );
        }
        if a.priority_max > 0 {
            return refuse(
                ErrorCode::InvalidArgument,
                "priority_max: priority queues are not served yet".into(),
            );
        }
        let policy = policy_of(a);
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
            queue: Queue::new(policy, 0),
            consumers: HashMap::new(),
            retired: HashMap::new(),
            had_consumer: false,
        };
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
        for segment in q.queue.messages().filter_map(MsgRef::cold_segment) {
            self.liveness.sub(segment);
        }
        self.dirty.remove(name);
        if q.durable && q.exclusive.is_none() {
            self.catalog
                .push(CatalogRecord::DeleteQueue(name.to_string()));
        }
        let s = q.queue.stats();
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

    pub fn purge(&mut self, conn: ConnRef, name: &str) -> Result<u64, Refusal> {
        let q = self.get_queue(conn, name)?;
        let mut settled = Vec::new();
        let n = q.queue.purge(&mut settled) as u64;
        let name = q.name.clone();
        self.note_settled(&name, settled);
        Ok(n)
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
        let bytes = msg.len();
        let mut settled: Vec<Settled<MsgRef>> = Vec::new();
        let seq = match q.queue.publish(
            MsgRef::Hot(msg),
            bytes,
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

    pub fn consume(
        &mut self,
        conn: ConnRef,
        queue: &str,
        tag: &str,
        prefetch: u32,
        auto_ack: bool,
        exclusive: bool,
    ) -> Result<OwnerId, Refusal> {
        let id = CONSUMER_BIT | self.next_consumer;
        let q = self.get_queue(conn, queue)?;
        if exclusive && !q.consumers.is_empty() {
            return refuse(
                ErrorCode::ResourceLocked,
                format!("queue '{queue}' already has consumers"),
            );
        }
        if q.consumers
            .values()
            .any(|c| c.conn == conn && &*c.tag == tag)
        {
            return refuse(
                ErrorCode::DuplicateConsumerTag,
                format!("consumer tag '{tag}' is in use on this connection"),
            );
        }
        q.queue
            .add_consumer(id, prefetch, auto_ack)
            .map_err(|e| Refusal {
                code: ErrorCode::InvalidArgument,
                message: e.to_string(),
            })?;
        q.consumers.insert(
            id,
            ConsumerInfo {
                conn,
                tag: Rc::from(tag),
            },
        );
        q.had_consumer = true;
        let name = q.name.clone();
        self.next_consumer += 1;
        self.dirty.insert(name);
        Ok(id)
    }

    /// Changes a running consumer's prefetch (its credit window); a wider window may let more
    /// deliveries go at once.
    pub fn set_prefetch(
        &mut self,
        conn: ConnRef,
        queue: &str,
        consumer: OwnerId,
        prefetch: u32,
    ) -> Result<(), Refusal> {
        let q = self.get_queue(conn, queue)?;
        if q.consumers.get(&consumer).is_none_or(|c| c.conn != conn) {
            return refuse(
                ErrorCode::NotFound,
                format!("no such consumer on queue '{queue}'"),
            );
        }
        q.queue
            .set_prefetch(consumer, prefetch)
            .map_err(|e| Refusal {
                code: ErrorCode::InvalidArgument,
                message: e.to_string(),
            })?;
        let name = q.name.clone();
        self.dirty.insert(name);
        Ok(())
    }

    /// Cancels a consumer: nothing more is dispatched to it, and what it holds stays outstanding,
    /// ackable by its connection until that connection closes (as in AMQP). An auto-delete queue
    /// losing its last consumer goes.
    pub fn cancel(&mut self, conn: ConnRef, queue: &str, consumer: OwnerId) -> Result<(), Refusal> {
        let q = self.get_queue(conn, queue)?;
        if q.consumers.remove(&consumer).is_none() {
            return refuse(
                ErrorCode::NotFound,
                format!("no such consumer on queue '{queue}'"),
            );
        }
        q.queue.remove_consumer(consumer);
        q.retired.insert(consumer, conn);
        let (name, gone) = (q.name.clone(), q.auto_delete && q.consumers.is_empty());
        if gone {
            self.remove(&name, "was auto-deleted");
        } else {
            self.dirty.insert(name);
        }
        Ok(())
    }

    /// Settles one outstanding delivery: ack, or nack/reject with or without requeue.
    pub fn settle(
        &mut self,
        conn: ConnRef,
        queue: &str,
        owner: OwnerId,
        seq: Seq,
        ack: bool,
        requeue: bool,
    ) -> Result<(), Refusal> {
        let q = self.get_queue(conn, queue)?;
        let mut settled = Vec::new();
        let result = if ack {
            q.queue.ack(owner, seq).map(|s| settled.push(s))
        } else {
            q.queue.nack(owner, seq, requeue, &mut settled)
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

    /// Takes one ready message for `conn` (the `Get` request); `None` when the queue has none.
    pub fn get(
        &mut self,
        conn: ConnRef,
        queue: &str,
        auto_ack: bool,
        now_ms: u64,
    ) -> Result<(Option<StoredDelivery>, u64), Refusal> {
        let q = self.get_queue(conn, queue)?;
        let mut settled = Vec::new();
        let d = q.queue.get(conn.conn, auto_ack, now_ms, &mut settled);
        let ready = q.queue.stats().ready;
        let name = q.name.clone();
        self.note_settled(&name, settled);
        Ok((d, ready))
    }

    /// A connection went away: its consumers and `Get`s release their deliveries (redelivered
    /// later), its exclusive queues are deleted, auto-delete queues left without consumers go.
    pub fn connection_closed(&mut self, conn: ConnRef) {
        let mut gone = Vec::new();
        let mut released = Vec::new();
        for (name, q) in self.queues.iter_mut() {
            if q.exclusive == Some(conn) {
                gone.push(name.clone());
                continue;
            }
            let mine: Vec<OwnerId> = q
                .consumers
                .iter()
                .filter(|(_, c)| c.conn == conn)
                .map(|(id, _)| *id)
                .collect();
            let mut settled = Vec::new();
            for id in &mine {
                q.consumers.remove(id);
                q.queue.release(*id, &mut settled);
            }
            let retired: Vec<OwnerId> = q
                .retired
                .iter()
                .filter(|(_, c)| **c == conn)
                .map(|(id, _)| *id)
                .collect();
            let mut returned = 0;
            for id in retired {
                q.retired.remove(&id);
                returned += q.queue.release(id, &mut settled);
            }
            returned += q.queue.release(conn.conn, &mut settled);
            released.push((name.clone(), settled));
            if !mine.is_empty() && q.auto_delete && q.consumers.is_empty() {
                gone.push(name.clone());
            } else if !mine.is_empty() || returned > 0 {
                self.dirty.insert(name.clone());
            }
        }
        for (name, settled) in released {
            self.note_settled(&name, settled);
        }
        for name in gone {
            self.remove(&name, "was deleted with its connection");
        }
    }

    /// Every delivery consumers are owed now, at most `max_per_queue` from each queue.
    pub fn take_deliveries(&mut self, now_ms: u64, max_per_queue: usize, out: &mut Vec<Outgoing>) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut deliveries = Vec::new();
        for name in dirty {
            let mut settled = Vec::new();
            let Some(q) = self.queues.get_mut(&name) else {
                continue;
            };
            deliveries.clear();
            q.queue
                .dispatch(now_ms, max_per_queue, &mut deliveries, &mut settled);
            let full_round = deliveries.len() == max_per_queue;
            for d in deliveries.drain(..) {
                let c = &q.consumers[&d.owner];
                out.push(Outgoing {
                    to: c.conn,
                    consumer_tag: c.tag.clone(),
                    queue: q.name.clone(),
                    delivery: d,
                });
            }
            let again = full_round && q.queue.stats().ready > 0;
            self.note_settled(&name, settled);
            if again {
                // More is owed than one round carries: come back to it.
                self.dirty.insert(name);
            }
        }
    }

    /// This host's part of a shard's counters (the shard adds connections and journal figures).
    pub fn status(&self) -> crate::broker::ops::ShardStatus {
        let mut st = crate::broker::ops::ShardStatus {
            shard: self.shard,
            queues: self.queues.len() as u64,
            dropped: self.dropped,
            dead_lettered: self.dead_lettered,
            unroutable: self.unroutable,
            cache_bytes: self.cache.bytes(),
            ..Default::default()
        };
        for q in self.queues.values() {
            let s = q.queue.stats();
            st.messages_ready += s.ready;
            st.messages_unacked += s.outstanding;
            st.consumers += u64::from(s.consumers);
        }
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
        overflow: if a.overflow == wire::Overflow::RejectPublish {
            Overflow::RejectPublish
        } else {
            Overflow::DropHead
        },
        message_ttl_ms: a.message_ttl_ms.map(u64::from),
        max_deliveries: a.max_deliveries,
        dead_letter: a.dead_letter_exchange.is_some(),
    }
}

/// The shard that owns a queue: a stable hash of its name, the same on every shard and across
/// restarts (crc32, not std's per-process random hasher).
pub fn placement(name: &str, shard_count: u16) -> u16 {
    (crc32fast::hash(name.as_bytes()) % u32::from(shard_count.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const A: ConnRef = ConnRef { shard: 0, conn: 1 };
    const B: ConnRef = ConnRef { shard: 1, conn: 2 };

    fn declare(name: &str) -> Declare {
        Declare {
            name: name.into(),
            durable: true,
            ..Default::default()
        }
    }

    fn msg(body: &'static [u8]) -> Rc<Stored> {
        Rc::new(Stored::new(
            Bytes::from_static(body),
            String::new(),
            "q".into(),
            true,
            None,
        ))
    }

    #[test]
    fn declare_is_idempotent_and_a_mismatch_is_refused() {
        let mut h = QueueHost::new(0);
        h.declare(A, declare("q"), 0).unwrap();
        h.declare(B, declare("q"), 0).unwrap();
        let e = h
            .declare(
                A,
                Declare {
                    auto_delete: true,
                    ..declare("q")
                },
                0,
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PreconditionFailed);
        assert_eq!(
            h.declare(
                A,
                Declare {
                    passive: true,
                    ..declare("nope")
                },
                0
            )
            .unwrap_err()
            .code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn an_exclusive_queue_is_its_connections_alone_and_goes_with_it() {
        let mut h = QueueHost::new(0);
        h.declare(
            A,
            Declare {
                exclusive: true,
                ..declare("mine")
            },
            0,
        )
        .unwrap();
        // Others may publish to it (a reply queue), but not consume, inspect or delete it.
        h.publish(B, "mine", msg(b"x"), None, 0).unwrap();
        assert_eq!(
            h.consume(B, "mine", "t", 1, false, false).unwrap_err().code,
            ErrorCode::ResourceLocked
        );
        assert_eq!(
            h.info(B, "mine", 0).unwrap_err().code,
            ErrorCode::ResourceLocked
        );
        h.publish(A, "mine", msg(b"x"), None, 0).unwrap();
        h.connection_closed(A);
        assert_eq!(h.info(A, "mine", 0).unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn deliveries_go_to_the_consumers_connection_and_come_back_when_it_dies() {
        let mut h = QueueHost::new(0);
        h.declare(A, declare("q"), 0).unwrap();
        for _ in 0..3 {
            h.publish(A, "q", msg(b"m"), None, 0).unwrap();
        }
        let c = h.consume(B, "q", "ctag", 2, false, false).unwrap();
        let mut out = Vec::new();
        h.take_deliveries(0, 100, &mut out);
        assert_eq!(out.len(), 2, "prefetch 2");
        assert!(out.iter().all(|o| o.to == B && &*o.consumer_tag == "ctag"));
        h.settle(B, "q", c, out[0].delivery.seq, true, false)
            .unwrap();
        assert_eq!(
            h.settle(B, "q", c, out[0].delivery.seq, true, false)
                .unwrap_err()
                .code,
            ErrorCode::UnknownDeliveryTag
        );
        h.connection_closed(B);
        let info = h.info(A, "q", 0).unwrap();
        assert_eq!(
            (info.messages_ready, info.messages_unacked, info.consumers),
            (2, 0, 0)
        );
        h.consume(A, "q", "again", 10, false, false).unwrap();
        out.clear();
        h.take_deliveries(0, 100, &mut out);
        assert_eq!(
            out.iter()
                .map(|o| o.delivery.delivery_count)
                .collect::<Vec<_>>(),
            vec![2, 1]
        );
    }

    #[test]
    fn an_auto_delete_queue_goes_with_its_last_consumer() {
        let mut h = QueueHost::new(0);
        h.declare(
            A,
            Declare {
                auto_delete: true,
                ..declare("tmp")
            },
            0,
        )
        .unwrap();
        let c = h.consume(A, "tmp", "t", 1, false, false).unwrap();
        h.cancel(A, "tmp", c).unwrap();
        assert_eq!(h.info(A, "tmp", 0).unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn delete_if_unused_and_if_empty_are_preconditions() {
        let mut h = QueueHost::new(0);
        h.declare(A, declare("q"), 0).unwrap();
        h.publish(A, "q", msg(b"m"), None, 0).unwrap();
        assert_eq!(
            h.delete(A, "q", false, true).unwrap_err().code,
            ErrorCode::PreconditionFailed
        );
        h.consume(B, "q", "t", 1, false, false).unwrap();
        assert_eq!(
            h.delete(A, "q", true, false).unwrap_err().code,
            ErrorCode::PreconditionFailed
        );
        let (messages, cancelled) = h.delete(A, "q", false, false).unwrap();
        assert_eq!(messages, 1);
        assert_eq!(
            cancelled,
            vec![Cancelled {
                to: B,
                consumer_tag: "t".into(),
                message: "queue 'q' was deleted".into()
            }]
        );
    }

    #[test]
    fn list_pages_in_name_order() {
        let mut h = QueueHost::new(0);
        for n in ["b", "a", "c", "x.1"] {
            h.declare(A, declare(n), 0).unwrap();
        }
        let names =
            |v: Vec<wire::QueueInfoT>| v.into_iter().map(|i| i.name.unwrap()).collect::<Vec<_>>();
        assert_eq!(names(h.list("", "", 2, 0)), vec!["a", "b"]);
        assert_eq!(names(h.list("", "b", 10, 0)), vec!["c", "x.1"]);
        assert_eq!(names(h.list("x.", "", 10, 0)), vec!["x.1"]);
    }

    #[test]
    fn placement_is_stable_and_spreads() {
        assert_eq!(placement("orders", 1), 0);
        let on_one = (0..100)
            .filter(|i| placement(&format!("q{i}"), 2) == 1)
            .count();
        assert!((30..70).contains(&on_one), "{on_one} of 100 on shard 1");
        assert_eq!(placement("orders", 2), placement("orders", 2));
    }

    #[test]
    fn a_cancelled_consumers_deliveries_stay_ackable_until_its_connection_closes() {
        let mut h = QueueHost::new(0);
        h.declare(A, declare("q"), 0).unwrap();
        for _ in 0..3 {
            h.publish(A, "q", msg(b"m"), None, 0).unwrap();
        }
        let c = h.consume(B, "q", "t", 2, false, false).unwrap();
        let mut out = Vec::new();
        h.take_deliveries(0, 100, &mut out);
        h.cancel(B, "q", c).unwrap();
        h.settle(B, "q", c, out[0].delivery.seq, true, false)
            .unwrap();
        let info = h.info(A, "q", 0).unwrap();
        assert_eq!(
            (info.messages_ready, info.messages_unacked, info.consumers),
            (1, 1, 0)
        );
        h.connection_closed(B);
        let info = h.info(A, "q", 0).unwrap();
        assert_eq!(
            (info.messages_ready, info.messages_unacked),
            (2, 0),
            "released with its connection"
        );
    }
    #[test]
    fn rejected_and_expired_messages_become_dead_letters_not_drops() {
        let mut h = QueueHost::new(0);
        let mut d = declare("src");
        d.arguments.dead_letter_exchange = Some("dlx".into());
        d.arguments.dead_letter_routing_key = Some("failed".into());
        d.arguments.message_ttl_ms = Some(100);
        h.declare(A, d, 0).unwrap();
        h.declare(A, declare("plain"), 0).unwrap();
        h.publish(A, "src", msg(b"r"), None, 0).unwrap();
        let c = h.consume(A, "src", "t", 1, false, false).unwrap();
        let mut out = Vec::new();
        h.take_deliveries(0, 10, &mut out);
        assert_eq!(out.len(), 1);
        h.settle(A, "src", c, out[0].delivery.seq, false, false)
            .unwrap();
        let dead = h.take_dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].exchange.as_str(), dead[0].routing_key.as_deref()),
            ("dlx", Some("failed"))
        );
        assert_eq!((h.dead_lettered, h.dropped), (1, 0));

        // Expiry without anyone consuming: the timer's `expire`, at the deadline and not before.
        h.cancel(A, "src", c).unwrap();
        h.publish(A, "src", msg(b"e"), None, 1_000).unwrap();
        h.publish(A, "plain", msg(b"p"), Some(50), 1_000).unwrap();
        h.expire(1_049);
        assert!(h.take_dead_letters().is_empty());
        h.expire(1_100);
        assert_eq!(
            h.take_dead_letters().len(),
            1,
            "src's message, dead-lettered"
        );
        assert_eq!(
            h.dropped, 1,
            "plain's message expired, with no dead-letter exchange: dropped"
        );
        assert_eq!(h.dead_lettered, 2);
    }
}

#[cfg(test)]
mod index_cost {
    use super::*;

    /// A message out of memory costs its queue entry and nothing else: no heap allocation (the
    /// entry lives in the queue's `VecDeque`), a fixed size asserted here so growth is a decision.
    #[test]
    fn a_cold_message_costs_one_inline_entry() {
        assert_eq!(std::mem::size_of::<MsgRef>(), 16);
        assert!(
            crate::broker::queue::entry_size::<MsgRef>() <= 48,
            "{}",
            crate::broker::queue::entry_size::<MsgRef>()
        );
    }
}
