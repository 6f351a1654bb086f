//! Executing the cross-core vocabulary (`mesh::msg`) on the shard that owns a queue.
//!
//! Contract: pure functions on one shard's thread, no I/O: `execute` applies an `Op` to the
//! owning shard's `QueueHost` and says what to answer; `collect_pushes` turns the host's pending
//! deliveries into `Pushed` messages per connection; `address` groups a routed message's queues
//! by owning shard; `journal` hands the host's durable changes to a `JournalSink` (the shard's
//! journal, or nothing in tests). Message bytes stay `Bytes`: a reference count, never a copy.
//!
//! What needs a durable record is journaled before it takes effect: a published message is
//! retracted if its record is refused, and held back from consumers until its commit is durable
//! when the sink says so (fsync = always); an ack or a nack without requeue of a journaled
//! message is applied only once its settle record was taken (and, under always, is taken out of
//! its queue until the commit decides: `QueueHost::settle_when_durable`). A record refused is a
//! refusal for the client (`DiskFull` on a full disk), never an `Ok` for something not kept.

use std::rc::Rc;

use bytes::Bytes;
use weir_protocol::wire;

use crate::broker::catalog::CatalogRecord;
use crate::broker::host::SettlePlan;
use crate::broker::host::{Outgoing, QueueHost, PURGE_STEP};
use crate::broker::stored::{MsgRef, Stored};
use crate::mesh::msg::{
    Op, PublishItem, PublishOutcome, Pushed, PushedDelivery, Reply, SettleItem, SettleOutcome,
};
use crate::mesh::types::{placement, ConnRef, Refusal};
use crate::mesh::types::{HolderId, Seq};
use crate::storage::{CommitId, RetryEntry, SettleReason};

/// Addresses a message routed to `queues` (drained) to the shards that own them: one item per
/// shard naming all of that shard's queues (stored there once), or one per `targets_max` of
/// them (a record's envelope must fit). Every item shares the message's `Bytes`.
pub fn address(
    item: PublishItem,
    queues: &mut Vec<String>,
    shards: u16,
    targets_max: usize,
) -> Vec<(u16, PublishItem)> {
    queues.sort_by_key(|q| placement(q, shards));
    let mut parts: Vec<(u16, PublishItem)> = Vec::new();
    for q in queues.drain(..) {
        let owner = placement(&q, shards);
        match parts.last_mut() {
            Some((s, part)) if *s == owner && 1 + part.also.len() < targets_max.max(1) => {
                part.also.push(q)
            }
            _ => {
                let mut part = item.clone();
                part.queue = q;
                part.also = Vec::new();
                parts.push((owner, part));
            }
        }
    }
    parts
}

/// A delivery as it leaves its queue's shard: a cold message's envelope and payload are
/// both in its record, read back before it leaves.
fn wire_delivery(
    queue: String,
    holder: HolderId,
    d: &crate::broker::queue::QueueDelivery<MsgRef>,
) -> PushedDelivery {
    // A cold message's envelope and payload are both in its record: taken on read-back.
    let (bytes, exchange, routing_key, cold, deaths) = match &d.msg {
        MsgRef::Hot(s) => {
            let payload = s.payload();
            let deaths = s.deaths.clone();
            (
                payload,
                s.exchange.clone(),
                s.routing_key.clone(),
                None,
                deaths,
            )
        }
        MsgRef::Cold {
            position,
            record_len,
        } => (
            Bytes::new(),
            String::new(),
            String::new(),
            Some((*position, *record_len)),
            None,
        ),
    };
    PushedDelivery {
        queue,
        holder,
        seq: d.seq,
        delivery_count: d.delivery_count,
        auto_ack: d.auto_ack,
        exchange,
        routing_key,
        bytes,
        cold,
        deaths,
        charge: 0,
    }
}

/// Where the host's durable changes go: the shard's journal (records staged for the next group
/// commit; the shard waits for that commit before it answers), or nothing in tests.
///
/// `message` and `settle` answer with the commit round that must be durable before the change
/// may be seen (fsync = always), or `None` when it may be seen at once (the weaker policies,
/// or no journal).
pub trait JournalSink {
    /// A message accepted into durable queues, each under its sequence number: one record.
    fn message(
        &mut self,
        targets: &[(&str, Seq)],
        msg: &Rc<Stored>,
    ) -> Result<Option<CommitId>, Refusal>;
    /// Settled ranges of a queue's sequence numbers.
    fn settle(
        &mut self,
        queue: &str,
        reason: SettleReason,
        ranges: &[(u64, u64)],
    ) -> Result<Option<CommitId>, Refusal>;
    /// A durable declaration or deletion.
    fn catalog(&mut self, record: &CatalogRecord) -> Result<(), Refusal>;
    /// Messages of a queue waiting out a retry delay (`Retry` record).
    fn retry(&mut self, queue: &str, entries: &[RetryEntry]) -> Result<Option<CommitId>, Refusal>;
}

/// A sink that keeps nothing: for state-machine tests.
pub struct NoJournal;

impl JournalSink for NoJournal {
    fn message(&mut self, _: &[(&str, Seq)], _: &Rc<Stored>) -> Result<Option<CommitId>, Refusal> {
        Ok(None)
    }
    fn settle(
        &mut self,
        _: &str,
        _: SettleReason,
        _: &[(u64, u64)],
    ) -> Result<Option<CommitId>, Refusal> {
        Ok(None)
    }
    fn catalog(&mut self, _: &CatalogRecord) -> Result<(), Refusal> {
        Ok(())
    }
    fn retry(&mut self, _: &str, _: &[RetryEntry]) -> Result<Option<CommitId>, Refusal> {
        Ok(None)
    }
}

/// Hands the host's journal work to the sink: catalog records, then settle records with
/// consecutive sequence numbers of one queue and reason merged into ranges. A catalog record that
/// cannot be journaled fails the op (the declaration would not survive a restart). The settle
/// records here are those made while dispatching (auto-acks, expiry, overflow, a requeue past
/// `max_deliveries`): at least once, so one that cannot be journaled is logged (the message is
/// redelivered after a restart). Client acks and nacks are journaled before they apply
/// (`settle`); a purge's records are journaled strictly (`purge_step`).
pub fn journal(host: &mut QueueHost, sink: &mut dyn JournalSink) -> Result<(), Refusal> {
    journal_settles(host, sink, false)
}

/// As `journal`, but a settle record the sink refuses fails it too: for settlements a client
/// asked for and is answered about (a purge), which must not be answered as done if not kept.
fn journal_settles(
    host: &mut QueueHost,
    sink: &mut dyn JournalSink,
    strict: bool,
) -> Result<(), Refusal> {
    let work = host.take_journal_work();
    for record in &work.catalog {
        sink.catalog(record)?;
    }
    let mut refused = None;
    for (range, ranges) in settle_groups(&work.settles, |s| (&*s.0, s.1, s.2)) {
        let (queue, _, reason) = &work.settles[range.start];
        if let Err(e) = sink.settle(queue, *reason, &ranges) {
            tracing::warn!(
                queue = &**queue,
                "settlement not journaled (redelivered after a restart): {}",
                e.message
            );
            refused.get_or_insert(e);
        }
    }
    match refused {
        Some(e) if strict => Err(e),
        _ => Ok(()),
    }
}

/// A run of settlements of one queue and reason: where it is in its list, and its sequence
/// numbers as ranges (one settle record).
type SettleRun = (std::ops::Range<usize>, Vec<(u64, u64)>);

/// Splits `items` into runs of one queue and reason, each with its sequence numbers merged into
/// ranges where consecutive: one settle record per run.
fn settle_groups<'a, T>(
    items: &'a [T],
    key: impl Fn(&'a T) -> (&'a str, Seq, SettleReason),
) -> Vec<SettleRun> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let (queue, _, reason) = key(&items[i]);
        let start = i;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        while let Some(item) = items.get(i) {
            let (q, seq, r) = key(item);
            if q != queue || r != reason {
                break;
            }
            match ranges.last_mut() {
                Some(last) if last.1 + 1 == seq => last.1 = seq,
                _ => ranges.push((seq, seq)),
            }
            i += 1;
        }
        out.push((start..i, ranges));
    }
    out
}

/// A connection's acks and nacks. Each is checked first (one not outstanding for its holder is
/// refused, `UnknownDeliveryTag`, the others go on); one that needs a settle record is applied only
/// once the journal took the record, and under fsync = always only once that record's commit is
/// durable (taken out of its queue meanwhile, its consumer's credit given back: `waiting` in the
/// answer). A record the journal refuses refuses those settlements, which stay outstanding for the
/// same holder (`kept` in the answer, so the connection keeps their tags for a retry).
///
/// A client's nack or reject with requeue is a failure, which the queue's retry policy decides
/// (`broker::queue::retry`): a delayed retry of a journaled message is applied once the journal
/// took its `Retry` record (refused with it otherwise, the delivery kept outstanding); its
/// answer, if asked, follows that record's commit like any request's. Applying it before the
/// commit is durable delivers nothing early (it waits until its due time either way); a crash
/// before then brings the message back as its previous record left it.
fn settle(
    host: &mut QueueHost,
    sink: &mut dyn JournalSink,
    from: ConnRef,
    items: Vec<SettleItem>,
    now_ms: u64,
) -> Reply {
    let mut outcome = SettleOutcome::default();
    let mut recorded: Vec<(u32, SettleItem, SettleReason)> = Vec::new();
    let mut retries: Vec<(u32, SettleItem, RetryEntry)> = Vec::new();
    for (index, s) in (0u32..).zip(items) {
        if s.failed && s.requeue && !s.ack {
            match host.fail_plan(from, &s.queue, s.holder, s.seq, s.delay_ms, now_ms) {
                Err(r) => outcome.refusals.push(r),
                Ok(Some(entry)) => retries.push((index, s, entry)),
                Ok(None) => {
                    if let Err(r) = host.fail(from, &s.queue, s.holder, s.seq, s.delay_ms, now_ms) {
                        outcome.refusals.push(r);
                    }
                }
            }
            continue;
        }
        match host.settle_plan(from, &s.queue, s.holder, s.seq, s.ack, s.requeue) {
            Err(r) => outcome.refusals.push(r),
            Ok(SettlePlan::Now) => {
                if let Err(r) = host.settle(from, &s.queue, s.holder, s.seq, s.ack, s.requeue) {
                    outcome.refusals.push(r);
                }
            }
            Ok(SettlePlan::Record(reason)) => recorded.push((index, s, reason)),
        }
    }
    recorded
        .sort_by(|a, b| (&a.1.queue, a.2 as u8, a.1.seq).cmp(&(&b.1.queue, b.2 as u8, b.1.seq)));
    for (range, ranges) in settle_groups(&recorded, |(_, s, r)| (s.queue.as_str(), s.seq, *r)) {
        let group = &recorded[range];
        let (_, first, reason) = &group[0];
        let applied = match sink.settle(&first.queue, *reason, &ranges) {
            Err(r) => {
                outcome.refusals.extend(group.iter().map(|_| r.clone()));
                outcome.kept.extend(group.iter().map(|(index, ..)| *index));
                continue;
            }
            Ok(round) => round,
        };
        for (index, s, _) in group {
            let result = match applied {
                Some(round) => host
                    .settle_when_durable(round, from, &s.queue, s.holder, s.seq, s.ack)
                    .map(|()| outcome.waiting.push(*index)),
                None => host.settle_journaled(from, &s.queue, s.holder, s.seq, s.ack),
            };
            if let Err(r) = result {
                outcome.refusals.push(r);
            }
        }
    }
    retries.sort_by(|a, b| (&a.1.queue, a.1.seq).cmp(&(&b.1.queue, b.1.seq)));
    for group in retries.chunk_by(|a, b| a.1.queue == b.1.queue) {
        let entries: Vec<RetryEntry> = group.iter().map(|(_, _, e)| *e).collect();
        if let Err(r) = sink.retry(&group[0].1.queue, &entries) {
            outcome.refusals.extend(group.iter().map(|_| r.clone()));
            outcome.kept.extend(group.iter().map(|(index, ..)| *index));
            continue;
        }
        for (_, s, _) in group {
            if let Err(r) = host.fail(from, &s.queue, s.holder, s.seq, s.delay_ms, now_ms) {
                outcome.refusals.push(r);
            }
        }
    }
    outcome.kept.sort_unstable();
    outcome.waiting.sort_unstable();
    Reply::Settled(outcome)
}

/// Applies `op` from `from` to the host; the reply goes back to `from`, the pushes to whoever
/// they name (dispatching owed deliveries is the caller's next step: `collect_pushes`).
pub fn execute(
    host: &mut QueueHost,
    sink: &mut dyn JournalSink,
    from: ConnRef,
    op: Op,
    now_ms: u64,
    pushes: &mut Vec<Pushed>,
) -> Reply {
    let result = match op {
        Op::Declare(d) => host
            .declare(from, d, now_ms)
            .map(|i| Reply::Info(Box::new(i))),
        Op::Delete {
            name,
            if_unused,
            if_empty,
        } => host
            .delete(from, &name, if_unused, if_empty)
            .map(|(n, cancelled)| {
                pushes.extend(cancelled.into_iter().map(Pushed::Cancelled));
                Reply::Deleted(n)
            }),
        Op::Purge { name } => purge(host, sink, from, &name).map(Reply::Purged),
        Op::Info { name } => host
            .info(from, &name, now_ms)
            .map(|i| Reply::Info(Box::new(i))),
        Op::List {
            prefix,
            after,
            limit,
        } => Ok(Reply::List(host.list(&prefix, &after, limit, now_ms))),
        Op::Publish(items) => Ok(Reply::Published(
            items
                .into_iter()
                .map(|item| publish(host, sink, from, item, now_ms))
                .collect(),
        )),
        Op::Consume {
            queue,
            tag,
            prefetch,
            auto_ack,
            exclusive,
            priority,
        } => host
            .consume_at(
                from, &queue, &tag, prefetch, auto_ack, exclusive, priority, now_ms,
            )
            .map(Reply::Consumed),
        Op::Cancel { queue, holder } => host
            .cancel_at(from, &queue, holder, now_ms)
            .map(|()| Reply::Done),
        Op::SetPrefetch {
            queue,
            holder,
            prefetch,
        } => host
            .set_prefetch(from, &queue, holder, prefetch)
            .map(|()| Reply::Done),
        Op::Settle(items) => Ok(settle(host, sink, from, items, now_ms)),
        Op::Get { queue, auto_ack } => {
            host.get(from, &queue, auto_ack, now_ms).map(|(d, ready)| {
                let d = d.map(|d| Box::new(wire_delivery(queue.clone(), from.conn, &d)));
                Reply::Got(d, ready)
            })
        }
        Op::ConnectionClosed => {
            host.connection_closed_at(from, now_ms);
            Ok(Reply::Done)
        }
        Op::Status => Ok(Reply::ShardStatus(Box::new(host.status()))),
        // The host has no connections: the shard answers this one itself (`shard::observe`).
        Op::ListConnections { .. } => Ok(Reply::Connections(Vec::new())),
        Op::ListConsumers {
            prefix,
            after_queue,
            after_tag,
            limit,
        } => Ok(Reply::Consumers(host.list_consumers(
            &prefix,
            &after_queue,
            &after_tag,
            limit,
        ))),
        Op::Expire => {
            host.expire(now_ms);
            host.expire_queues(now_ms);
            Ok(Reply::Done)
        }
        Op::DeliveriesWritten { bytes } => {
            host.outbox_written(from, bytes);
            Ok(Reply::Done)
        }
        Op::ConsumerTimeouts { timeout_ms } => {
            let cancelled = host.time_out_consumers(now_ms, timeout_ms);
            pushes.extend(cancelled.into_iter().map(Pushed::TimedOut));
            Ok(Reply::Done)
        }
        Op::Control(_) | Op::Routing(_) => Err(Refusal {
            code: wire::ErrorCode::Internal,
            message: "routing changes are served by the shard, not its queue host".into(),
        }),
    };
    match (result, journal(host, sink)) {
        (Ok(reply), Ok(())) => reply,
        (Err(r), _) | (Ok(_), Err(r)) => Reply::Refused(r),
    }
}

/// Purges a queue in steps of `PURGE_STEP` (`purge_step`). The shard's worker runs the steps
/// itself, waiting for journal room before each; this runs them back to back (tests, and any
/// sink that never waits).
fn purge(
    host: &mut QueueHost,
    sink: &mut dyn JournalSink,
    from: ConnRef,
    name: &str,
) -> Result<u64, Refusal> {
    let mut purged = 0;
    loop {
        let (n, more) = purge_step(host, sink, from, name, purged)?;
        purged += n;
        if !more {
            return Ok(purged);
        }
    }
}

/// Journal room one purge step's settle record may need: a range per message at worst (a queue
/// with gaps in its sequence numbers), plus the record's header and the queue's name.
pub const PURGE_STEP_RECORD_BYTES_MAX: usize = PURGE_STEP * 16 + 512;

/// One step of a purge of `name`: at most `PURGE_STEP` messages settled and their settle record
/// handed to the journal before the next step is gathered, so a deep queue's purge holds one
/// step of them, never all. Returns how many, and whether more may be left. A purge is a
/// client's request, answered with a count: a settle record the journal refuses fails it (the
/// refusal says how many `purged_before` this step were settled, and that this step's may come
/// back after a restart), never a count that is not kept.
pub fn purge_step(
    host: &mut QueueHost,
    sink: &mut dyn JournalSink,
    from: ConnRef,
    name: &str,
    purged_before: u64,
) -> Result<(u64, bool), Refusal> {
    let (n, more) = host.purge_step(from, name, PURGE_STEP)?;
    journal_settles(host, sink, true).map_err(|e| Refusal {
        code: e.code,
        message: format!(
            "purge of '{name}' stopped after {purged_before} messages: the settle record of the \
             next {n} was not journaled (they may come back after a restart): {}",
            e.message
        ),
    })?;
    Ok((n, more))
}

/// Accepts one published message into its target queues, journaling it once (one record
/// naming every durable target) if it is persistent and any target is durable. The shard calls
/// it per message so it can wait for journal room in between.
///
/// Several targets: a queue that refuses it (full) makes the publish refused, as RabbitMQ nacks
/// it, while the queues that took it keep it; a target that no longer exists (its binding's
/// removal is on its way) is skipped. An exchange's message reaching no existing queue is
/// unroutable: returned if mandatory, else dropped and counted.
pub fn publish(
    host: &mut QueueHost,
    sink: &mut dyn JournalSink,
    from: ConnRef,
    item: PublishItem,
    now_ms: u64,
) -> PublishOutcome {
    let (sequence, confirm) = (item.sequence, item.confirm);
    let outcome = |journaled, result, returned| PublishOutcome {
        sequence,
        confirm,
        journaled,
        result,
        returned,
        duplicate: false,
    };
    let targets = std::iter::once(&item.queue).chain(&item.also);
    let durable_target = targets.clone().any(|q| host.is_durable(q) == Some(true));
    let journaled = item.persistent && durable_target;
    if !journaled && !host.cache().has_room(item.bytes.len() as u64) {
        // A transient message cannot turn cold (it is not in the journal): memory is the bound.
        let message = "this shard holds its cache_bytes_max of message payloads in memory; a non-persistent message \
                       (or one for a non-durable queue) cannot be taken until consumers catch up"
            .to_string();
        return outcome(
            false,
            Err(Refusal {
                code: wire::ErrorCode::LimitExceeded,
                message,
            }),
            None,
        );
    }
    let from_exchange = !item.exchange.is_empty();
    if from_exchange && targets.clone().all(|q| host.is_durable(q).is_none()) {
        host.unroutable += u64::from(!item.mandatory);
        return outcome(false, Ok(()), item.mandatory.then_some(item));
    }
    // Every entry's index stays in memory, hot or cold: `queued_messages_max` is its bound.
    if let Err(r) = host.index_room(1 + item.also.len() as u64) {
        return outcome(false, Err(r), None);
    }
    // Only a mandatory message may have to come back whole (a `Return`); the others give their
    // envelope strings to the queue instead of a copy.
    let for_return = item.mandatory.then(|| item.clone());
    let PublishItem {
        queue,
        also,
        exchange,
        routing_key,
        bytes,
        expiration_ms,
        deliver_at_ms,
        deaths,
        priority,
        ..
    } = item;
    let mut stored = Stored::new(bytes, exchange, routing_key, journaled, Some(host.cache()))
        .with_priority(priority);
    stored.deaths = deaths;
    let stored = Rc::new(stored);
    let mut taken: Vec<(&str, Seq)> = Vec::with_capacity(1 + also.len());
    let mut refused = None;
    for q in std::iter::once(&queue).chain(&also) {
        match host.publish_at(
            from,
            q,
            stored.clone(),
            expiration_ms,
            deliver_at_ms,
            now_ms,
        ) {
            Ok(seq) => taken.push((q, seq)),
            Err(r) if from_exchange && r.code == wire::ErrorCode::NotFound => {}
            Err(r) => {
                refused.get_or_insert(r);
            }
        }
    }
    let durable: Vec<(&str, Seq)> = taken
        .iter()
        .copied()
        .filter(|(q, _)| journaled && host.is_durable(q) == Some(true))
        .collect();
    if !durable.is_empty() {
        match sink.message(&durable, &stored) {
            Err(r) => {
                // Not durable, so not accepted: it must not be delivered or confirmed.
                for (q, seq) in taken {
                    host.retract(q, seq);
                }
                return outcome(false, Err(r), None);
            }
            // Not deliverable from any of its queues before it is durable, nor ever if its
            // commit fails (then its publish is refused).
            Ok(Some(round)) => host.hold_until_durable(round, &taken),
            Ok(None) => {}
        }
    }
    match refused {
        None => outcome(!durable.is_empty(), Ok(()), None),
        // AMQP's mandatory flag: an unroutable message comes back and is confirmed.
        Some(r)
            if for_return.is_some() && taken.is_empty() && r.code == wire::ErrorCode::NotFound =>
        {
            outcome(false, Ok(()), for_return)
        }
        Some(r) => outcome(!durable.is_empty(), Err(r), None),
    }
}

/// Every delivery the host owes, grouped into one `Deliver` push per (connection, consumer).
pub fn collect_pushes(
    host: &mut QueueHost,
    sink: &mut dyn JournalSink,
    now_ms: u64,
    max_per_queue: usize,
    pushes: &mut Vec<Pushed>,
) {
    let mut owed: Vec<Outgoing> = Vec::new();
    while host.has_work() {
        host.take_deliveries(now_ms, max_per_queue, &mut owed);
        if owed.is_empty() {
            break;
        }
        owed.sort_by(|a, b| (a.to, &a.consumer_tag).cmp(&(b.to, &b.consumer_tag)));
        for group in owed.chunk_by(|a, b| a.to == b.to && a.consumer_tag == b.consumer_tag) {
            pushes.push(Pushed::Deliver {
                to: group[0].to,
                consumer_tag: group[0].consumer_tag.to_string(),
                deliveries: group
                    .iter()
                    .map(|o| PushedDelivery {
                        charge: o.charge,
                        ..wire_delivery(o.queue.to_string(), o.delivery.holder, &o.delivery)
                    })
                    .collect(),
            });
        }
        owed.clear();
    }
    // Auto-acked and expired messages were settled while dispatching.
    if let Err(r) = journal(host, sink) {
        tracing::error!("journal: {}", r.message);
    }
    journal_usage(host, sink);
}

/// Journals the usage records of queues with `expires_ms` (`broker::expiry`): after the
/// request's own records, so no reply waits for them; one the journal refuses is logged (after
/// a crash that queue's timer resumes from its previous record).
fn journal_usage(host: &mut QueueHost, sink: &mut dyn JournalSink) {
    for record in host.take_usage() {
        if let Err(r) = sink.catalog(&record) {
            tracing::warn!(
                ?record,
                "queue usage not journaled (after a restart its expiry counts from an older record): {}",
                r.message
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! The durability rules of `execute` and `publish`, against a sink that plays the journal:
    //! it refuses records (a full disk), or names the commit round they wait for (fsync =
    //! always), whose outcome the test then decides.
    use super::*;
    use crate::broker::queue::QueueDelivery;
    use crate::mesh::types::Declare;
    use weir_protocol::wire::ErrorCode;

    const A: ConnRef = ConnRef { shard: 0, conn: 1 };
    const B: ConnRef = ConnRef { shard: 0, conn: 2 };
    const ROUND: CommitId = CommitId(7);

    /// A journal that is full (`refuse`), or puts every record in commit `round`.
    struct Sink {
        refuse: bool,
        round: Option<CommitId>,
        settles: usize,
        retries: usize,
    }

    impl Sink {
        fn full() -> Sink {
            Sink {
                refuse: true,
                round: None,
                settles: 0,
                retries: 0,
            }
        }

        fn waiting() -> Sink {
            Sink {
                refuse: false,
                round: Some(ROUND),
                settles: 0,
                retries: 0,
            }
        }

        fn result(&self) -> Result<Option<CommitId>, Refusal> {
            if self.refuse {
                return Err(Refusal {
                    code: ErrorCode::DiskFull,
                    message: "full".into(),
                });
            }
            Ok(self.round)
        }
    }

    impl JournalSink for Sink {
        fn message(
            &mut self,
            _: &[(&str, Seq)],
            _: &Rc<Stored>,
        ) -> Result<Option<CommitId>, Refusal> {
            self.result()
        }
        fn settle(
            &mut self,
            _: &str,
            _: SettleReason,
            _: &[(u64, u64)],
        ) -> Result<Option<CommitId>, Refusal> {
            self.settles += 1;
            self.result()
        }
        fn catalog(&mut self, _: &CatalogRecord) -> Result<(), Refusal> {
            Ok(())
        }
        fn retry(&mut self, _: &str, _: &[RetryEntry]) -> Result<Option<CommitId>, Refusal> {
            self.retries += 1;
            self.result()
        }
    }

    fn host() -> QueueHost {
        let mut h = QueueHost::new(0);
        let d = Declare {
            name: "q".into(),
            durable: true,
            ..Default::default()
        };
        h.declare(A, d, 0).unwrap();
        h
    }

    fn item(sequence: u64, persistent: bool) -> PublishItem {
        PublishItem {
            deaths: None,
            sequence,
            queue: "q".into(),
            also: Vec::new(),
            exchange: String::new(),
            routing_key: "q".into(),
            mandatory: false,
            confirm: true,
            persistent,
            bytes: Bytes::from(format!("m{sequence}")),
            expiration_ms: None,
            deliver_at_ms: None,
            producer_id: None,
            priority: 0,
        }
    }

    /// The (holder, queue seq) of every delivery dispatched now.
    fn dispatch(h: &mut QueueHost) -> Vec<(HolderId, Seq)> {
        let mut pushes = Vec::new();
        collect_pushes(h, &mut NoJournal, 0, 100, &mut pushes);
        pushes
            .into_iter()
            .flat_map(|p| match p {
                Pushed::Deliver { deliveries, .. } => deliveries,
                _ => Vec::new(),
            })
            .map(|d| (d.holder, d.seq))
            .collect()
    }

    /// Every settlement of the answer was made (or waits for its commit).
    fn done(reply: &Reply) -> bool {
        matches!(reply, Reply::Settled(o) if o.is_ok() && o.kept.is_empty())
    }

    fn ack(h: &mut QueueHost, sink: &mut dyn JournalSink, holder: HolderId, seq: Seq) -> Reply {
        let item = SettleItem {
            queue: "q".into(),
            holder,
            seq,
            ack: true,
            requeue: false,
            failed: false,
            delay_ms: None,
        };
        execute(h, sink, A, Op::Settle(vec![item]), 0, &mut Vec::new())
    }

    fn counts(h: &mut QueueHost) -> (u64, u64) {
        let i = h.info(A, "q", 0).unwrap();
        (i.messages_ready, i.messages_unacked)
    }

    fn get(h: &mut QueueHost, conn: ConnRef) -> Option<QueueDelivery<MsgRef>> {
        h.get(conn, "q", false, 0).unwrap().0
    }

    #[test]
    fn a_purge_whose_settle_record_the_journal_refuses_is_refused_not_counted() {
        let mut h = host();
        for s in 1..=3 {
            publish(&mut h, &mut NoJournal, A, item(s, true), 0);
        }
        let purge = || Op::Purge { name: "q".into() };
        let reply = execute(&mut h, &mut Sink::full(), A, purge(), 0, &mut Vec::new());
        match &reply {
            Reply::Refused(r) => {
                assert_eq!(r.code, ErrorCode::DiskFull);
                assert!(r.message.contains("stopped after 0 messages"), "{r:?}");
                assert!(r.message.contains("next 3"), "{r:?}");
            }
            other => panic!("a purge not journaled was answered {other:?}"),
        }
        // A journal with room: answered with the count.
        for s in 4..=5 {
            publish(&mut h, &mut NoJournal, A, item(s, true), 0);
        }
        let reply = execute(&mut h, &mut NoJournal, A, purge(), 0, &mut Vec::new());
        assert!(matches!(reply, Reply::Purged(2)), "{reply:?}");
    }

    #[test]
    fn an_ack_whose_record_the_journal_refuses_is_refused_and_stays_outstanding() {
        let mut h = host();
        publish(&mut h, &mut NoJournal, A, item(1, true), 0);
        let holder = h.consume(A, "q", "c", 10, false, false).unwrap();
        assert_eq!(dispatch(&mut h), vec![(holder, 0)]);

        let reply = ack(&mut h, &mut Sink::full(), holder, 0);
        assert!(
            matches!(&reply, Reply::Settled(o) if o.refusals[0].code == ErrorCode::DiskFull && o.kept == [0]),
            "{reply:?}"
        );
        assert_eq!(counts(&mut h), (0, 1), "still outstanding");
        assert!(get(&mut h, B).is_none(), "nobody else gets it meanwhile");
        // The client may ack it again, and it is settled then.
        assert!(done(&ack(&mut h, &mut NoJournal, holder, 0)));
        assert_eq!(counts(&mut h), (0, 0));
    }

    #[test]
    fn an_ack_waits_for_its_commit_and_comes_back_if_it_fails() {
        let mut h = host();
        for s in 1..=2 {
            publish(&mut h, &mut NoJournal, A, item(s, true), 0);
        }
        let holder = h.consume(A, "q", "c", 1, false, false).unwrap();
        assert_eq!(dispatch(&mut h), vec![(holder, 0)]);

        let mut sink = Sink::waiting();
        let reply = ack(&mut h, &mut sink, holder, 0);
        assert!(done(&reply), "{reply:?}");
        assert!(
            matches!(&reply, Reply::Settled(o) if o.waiting == [0]),
            "waits for its commit: {reply:?}"
        );
        assert_eq!(sink.settles, 1, "journaled before it applies");
        // Its credit is back at once: the next message goes while the record is committed.
        assert_eq!(dispatch(&mut h), vec![(holder, 1)]);
        assert_eq!(h.pending_rounds_through(ROUND), vec![ROUND]);

        // The commit failed: outstanding again for the same holder, so acked again later.
        assert!(h.commit_resolved(ROUND, false));
        assert_eq!(counts(&mut h), (0, 2));
        assert!(h.pending_rounds_through(ROUND).is_empty());
        assert!(done(&ack(&mut h, &mut NoJournal, holder, 0)));
        assert_eq!(counts(&mut h), (0, 1));

        // A commit that succeeds settles it; it is not outstanding any more.
        assert!(done(&ack(&mut h, &mut sink, holder, 1)));
        assert!(h.commit_resolved(ROUND, true));
        assert_eq!(counts(&mut h), (0, 0));
        let again = ack(&mut h, &mut NoJournal, holder, 1);
        assert!(
            matches!(&again, Reply::Settled(o) if o.refusals[0].code == ErrorCode::UnknownDeliveryTag && o.kept.is_empty()),
            "{again:?}"
        );
        assert!(!h.commit_resolved(ROUND, true), "resolved once");
    }

    #[test]
    fn an_ack_whose_commit_fails_after_its_connection_closed_is_redelivered() {
        let mut h = host();
        publish(&mut h, &mut NoJournal, A, item(1, true), 0);
        let holder = h.consume(A, "q", "c", 1, false, false).unwrap();
        assert_eq!(dispatch(&mut h), vec![(holder, 0)]);
        assert!(done(&ack(&mut h, &mut Sink::waiting(), holder, 0)));
        h.connection_closed(A);
        h.commit_resolved(ROUND, false);
        assert_eq!(
            counts(&mut h),
            (1, 0),
            "back to ready, not stuck with a gone holder"
        );
        let d = get(&mut h, B).expect("redelivered");
        assert_eq!((d.seq, d.delivery_count), (0, 2));
    }

    #[test]
    fn a_transient_message_and_a_requeue_need_no_record() {
        let mut h = host();
        publish(&mut h, &mut NoJournal, A, item(1, false), 0);
        publish(&mut h, &mut NoJournal, A, item(2, true), 0);
        let holder = h.consume(A, "q", "c", 10, false, false).unwrap();
        assert_eq!(dispatch(&mut h).len(), 2);
        let mut sink = Sink::full();
        assert!(done(&ack(&mut h, &mut sink, holder, 0)));
        let nack = SettleItem {
            queue: "q".into(),
            holder,
            seq: 1,
            ack: false,
            requeue: true,
            failed: false,
            delay_ms: None,
        };
        let reply = execute(
            &mut h,
            &mut sink,
            A,
            Op::Settle(vec![nack]),
            0,
            &mut Vec::new(),
        );
        assert!(done(&reply), "{reply:?}");
        assert_eq!(sink.settles, 0);
        assert_eq!(counts(&mut h), (1, 0));
    }

    fn fail(holder: HolderId, seq: Seq, delay_ms: Option<u32>) -> Op {
        Op::Settle(vec![SettleItem {
            queue: "q".into(),
            holder,
            seq,
            ack: false,
            requeue: true,
            failed: true,
            delay_ms,
        }])
    }

    #[test]
    fn a_retry_of_a_journaled_message_is_journaled_first_or_refused_and_kept() {
        let mut h = host();
        publish(&mut h, &mut NoJournal, A, item(1, true), 0);
        publish(&mut h, &mut NoJournal, A, item(2, false), 0);
        let holder = h.consume(A, "q", "c", 10, false, false).unwrap();
        assert_eq!(dispatch(&mut h).len(), 2);
        // The journal refuses the record: the retry is refused and the delivery kept.
        let mut full = Sink::full();
        let reply = execute(
            &mut h,
            &mut full,
            A,
            fail(holder, 0, Some(500)),
            1_000,
            &mut Vec::new(),
        );
        assert!(
            matches!(&reply, Reply::Settled(o) if o.kept == vec![0]),
            "{reply:?}"
        );
        assert_eq!((full.retries, counts(&mut h)), (1, (0, 2)));
        // Taken: delayed until its due time, the record written first. A transient message's
        // retry needs none.
        let mut sink = Sink::waiting();
        let reply = execute(
            &mut h,
            &mut sink,
            A,
            fail(holder, 0, Some(500)),
            1_000,
            &mut Vec::new(),
        );
        assert!(done(&reply), "{reply:?}");
        let reply = execute(
            &mut h,
            &mut sink,
            A,
            fail(holder, 1, Some(500)),
            1_000,
            &mut Vec::new(),
        );
        assert!(done(&reply), "{reply:?}");
        assert_eq!(sink.retries, 1);
        let info = h.info(A, "q", 1_000).unwrap();
        assert_eq!((info.messages_delayed, info.messages_retrying), (2, 2));
        assert_eq!(h.take_due_hint(), Some(1_501));
        let mut pushes = Vec::new();
        collect_pushes(&mut h, &mut NoJournal, 1_500, 100, &mut pushes);
        assert!(pushes.is_empty(), "redelivered before its retry was due");
        h.expire(1_501);
        assert_eq!(dispatch(&mut h).len(), 2);
    }

    #[test]
    fn a_message_is_not_delivered_before_its_commit_nor_ever_if_it_fails() {
        let mut h = host();
        let holder = h.consume(A, "q", "c", 10, false, false).unwrap();
        let mut sink = Sink::waiting();
        let o = publish(&mut h, &mut sink, A, item(1, true), 0);
        assert!(o.journaled && o.result.is_ok());
        // A transient message behind it waits too: the queue keeps its order.
        publish(&mut h, &mut sink, A, item(2, false), 0);
        assert!(dispatch(&mut h).is_empty(), "delivered before durable");
        assert!(get(&mut h, B).is_none());
        assert!(h.commit_resolved(ROUND, true));
        assert_eq!(dispatch(&mut h), vec![(holder, 0), (holder, 1)]);

        // Its commit fails: taken out, never delivered; what came after it is not held back.
        let o = publish(&mut h, &mut sink, A, item(3, true), 0);
        assert!(o.journaled);
        publish(&mut h, &mut sink, A, item(4, false), 0);
        assert!(dispatch(&mut h).is_empty());
        assert!(h.commit_resolved(ROUND, false));
        assert_eq!(dispatch(&mut h), vec![(holder, 3)]);
        assert_eq!(counts(&mut h), (0, 3));
    }

    #[test]
    fn a_requeued_message_is_not_held_behind_one_waiting_for_its_commit() {
        let mut h = host();
        publish(&mut h, &mut NoJournal, A, item(1, true), 0);
        let holder = h.consume(A, "q", "c", 1, false, false).unwrap();
        assert_eq!(dispatch(&mut h), vec![(holder, 0)]);
        publish(&mut h, &mut Sink::waiting(), A, item(2, true), 0);
        let nack = SettleItem {
            queue: "q".into(),
            holder,
            seq: 0,
            ack: false,
            requeue: true,
            failed: false,
            delay_ms: None,
        };
        execute(
            &mut h,
            &mut NoJournal,
            A,
            Op::Settle(vec![nack]),
            0,
            &mut Vec::new(),
        );
        assert_eq!(dispatch(&mut h), vec![(holder, 0)], "redelivered at once");
        assert_eq!(counts(&mut h), (1, 1), "the held one waits");
    }

    #[test]
    fn a_refused_message_record_takes_it_back_from_every_queue() {
        let mut h = host();
        h.consume(A, "q", "c", 10, false, false).unwrap();
        let o = publish(&mut h, &mut Sink::full(), A, item(1, true), 0);
        assert_eq!(o.result.map_err(|r| r.code), Err(ErrorCode::DiskFull));
        assert!(!o.journaled);
        assert!(dispatch(&mut h).is_empty());
        assert_eq!(counts(&mut h), (0, 0));
    }

    #[test]
    fn a_deleted_queue_forgets_what_waited_for_a_commit() {
        let mut h = host();
        publish(&mut h, &mut NoJournal, A, item(1, true), 0);
        let holder = h.consume(A, "q", "c", 1, false, false).unwrap();
        dispatch(&mut h);
        ack(&mut h, &mut Sink::waiting(), holder, 0);
        publish(&mut h, &mut Sink::waiting(), A, item(2, true), 0);
        h.delete(A, "q", false, false).unwrap();
        assert!(h.pending_rounds_through(ROUND).is_empty());
        // Declared again: a late failure of that commit touches nothing of the new queue.
        let d = Declare {
            name: "q".into(),
            durable: true,
            ..Default::default()
        };
        h.declare(A, d, 0).unwrap();
        publish(&mut h, &mut NoJournal, A, item(3, true), 0);
        assert!(!h.commit_resolved(ROUND, false));
        assert_eq!(counts(&mut h), (1, 0));
    }
}
