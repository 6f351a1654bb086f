//! Executing the cross-core vocabulary (`mesh::msg`) on the shard that owns a queue.
//!
//! Contract: pure functions on one shard's thread, no I/O: `execute` applies an `Op` to the
//! owning shard's `QueueHost` and says what to answer; `collect_pushes` turns the host's pending
//! deliveries into `Pushed` messages per connection; `address` groups a routed message's queues
//! by owning shard; `journal` hands the host's durable changes to a `JournalSink` (the shard's
//! journal, or nothing in tests). Message bytes stay `Bytes`: a reference count, never a copy.

use std::rc::Rc;

use bytes::Bytes;
use weir_protocol::wire;

use crate::broker::catalog::CatalogRecord;
use crate::broker::host::{Outgoing, QueueHost, PURGE_STEP};
use crate::broker::stored::{MsgRef, Stored};
use crate::mesh::msg::{Op, PublishItem, PublishOutcome, Pushed, PushedDelivery, Reply};
use crate::mesh::types::{placement, ConnRef, Refusal};
use crate::mesh::types::{HolderId, Seq};
use crate::storage::SettleReason;

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
    let (bytes, exchange, routing_key, cold) = match &d.msg {
        MsgRef::Hot(s) => {
            let payload = s.payload();
            (payload, s.exchange.clone(), s.routing_key.clone(), None)
        }
        MsgRef::Cold {
            position,
            record_len,
        } => (
            Bytes::new(),
            String::new(),
            String::new(),
            Some((*position, *record_len)),
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
        charge: 0,
    }
}

/// Where the host's durable changes go: the shard's journal (records staged for the next group
/// commit; the shard waits for that commit before it answers), or nothing in tests.
pub trait JournalSink {
    /// A message accepted into durable queues, each under its sequence number: one record.
    fn message(&mut self, targets: &[(&str, Seq)], msg: &Rc<Stored>) -> Result<(), Refusal>;
    /// Settled ranges of a queue's sequence numbers.
    fn settle(
        &mut self,
        queue: &str,
        reason: SettleReason,
        ranges: &[(u64, u64)],
    ) -> Result<(), Refusal>;
    /// A durable declaration or deletion.
    fn catalog(&mut self, record: &CatalogRecord) -> Result<(), Refusal>;
}

/// A sink that keeps nothing: for state-machine tests.
pub struct NoJournal;

impl JournalSink for NoJournal {
    fn message(&mut self, _: &[(&str, Seq)], _: &Rc<Stored>) -> Result<(), Refusal> {
        Ok(())
    }
    fn settle(&mut self, _: &str, _: SettleReason, _: &[(u64, u64)]) -> Result<(), Refusal> {
        Ok(())
    }
    fn catalog(&mut self, _: &CatalogRecord) -> Result<(), Refusal> {
        Ok(())
    }
}

/// Hands the host's journal work to the sink: catalog records, then settle records with
/// consecutive sequence numbers of one queue and reason merged into ranges. A catalog record that
/// cannot be journaled fails the op (the declaration would not survive a restart); a settle record
/// that cannot is logged (the message is redelivered after a restart: at least once still holds).
pub fn journal(host: &mut QueueHost, sink: &mut dyn JournalSink) -> Result<(), Refusal> {
    let work = host.take_journal_work();
    for record in &work.catalog {
        sink.catalog(record)?;
    }
    let mut i = 0;
    while i < work.settles.len() {
        let (queue, _, reason) = &work.settles[i];
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        while let Some((q, seq, r)) = work.settles.get(i) {
            if q != queue || r != reason {
                break;
            }
            match ranges.last_mut() {
                Some(last) if last.1 + 1 == *seq => last.1 = *seq,
                _ => ranges.push((*seq, *seq)),
            }
            i += 1;
        }
        if let Err(e) = sink.settle(queue, *reason, &ranges) {
            tracing::warn!(
                queue = &**queue,
                "settlement not journaled (redelivered after a restart): {}",
                e.message
            );
        }
    }
    Ok(())
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
        } => host
            .consume(from, &queue, &tag, prefetch, auto_ack, exclusive)
            .map(Reply::Consumed),
        Op::Cancel { queue, holder } => host.cancel(from, &queue, holder).map(|()| Reply::Done),
        Op::SetPrefetch {
            queue,
            holder,
            prefetch,
        } => host
            .set_prefetch(from, &queue, holder, prefetch)
            .map(|()| Reply::Done),
        Op::Settle(items) => {
            let failed: Vec<Refusal> = items
                .into_iter()
                .filter_map(|s| {
                    host.settle(from, &s.queue, s.holder, s.seq, s.ack, s.requeue)
                        .err()
                })
                .collect();
            Ok(if failed.is_empty() {
                Reply::Done
            } else {
                Reply::SettleFailed(failed)
            })
        }
        Op::Get { queue, auto_ack } => {
            host.get(from, &queue, auto_ack, now_ms).map(|(d, ready)| {
                let d = d.map(|d| Box::new(wire_delivery(queue.clone(), from.conn, &d)));
                Reply::Got(d, ready)
            })
        }
        Op::ConnectionClosed => {
            host.connection_closed(from);
            Ok(Reply::Done)
        }
        Op::Status => Ok(Reply::ShardStatus(Box::new(host.status()))),
        Op::Expire => {
            host.expire(now_ms);
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

/// Purges a queue in steps of `PURGE_STEP`, each step's settle records handed to the journal
/// before the next is gathered: a deep queue's purge holds one step of them, never all.
fn purge(
    host: &mut QueueHost,
    sink: &mut dyn JournalSink,
    from: ConnRef,
    name: &str,
) -> Result<u64, Refusal> {
    let mut total = 0;
    loop {
        let (n, more) = host.purge_step(from, name, PURGE_STEP)?;
        total += n;
        if !more {
            return Ok(total);
        }
        journal(host, sink)?;
    }
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
        ..
    } = item;
    let stored = Rc::new(Stored::new(
        bytes,
        exchange,
        routing_key,
        journaled,
        Some(host.cache()),
    ));
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
        if let Err(r) = sink.message(&durable, &stored) {
            // Not durable, so not accepted: it must not be delivered or confirmed.
            for (q, seq) in taken {
                host.retract(q, seq);
            }
            return outcome(false, Err(r), None);
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
}
