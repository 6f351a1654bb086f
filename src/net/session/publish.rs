//! Publishing: accepting a `Publish`, addressing each message to the shards owning its queues,
//! and confirming it by sequence number once its owners took it.
//!
//! Contract: runs on the connection's shard. Messages go on as `Bytes` slices of the receive
//! buffer (a reference count per shard, never a copy), except those of at most
//! `message_copy_bytes_max`, copied out so that they do not pin a receive chunk. Publishes to an
//! exchange are routed here by the shard's routing copy (read only). A message whose queues sit
//! on several shards is a `Split`, confirmed once, when its last part is in. Every routed message
//! counts against `publishes_in_flight_max`, and its bytes (once per shard it goes to) against
//! `publish_bytes_in_flight_max`, until its outcome comes back.
//!
//! Idempotent producers (`Publish.producer_id`): each item carries the producer id, and each
//! owning shard judges its part (`broker::producers`): a re-send it had stored comes back as a
//! duplicate, confirmed again and listed in `Confirm.duplicates`. A split publish is a duplicate
//! only if every part was one.
//!
//! Faults handled: an idempotent publish that a shard would have to store in several parts
//! (more than `targets_per_message_max` of its queues: refused, since the parts could not be
//! told apart on a re-send), a sequence number
//! not above the connection's last one (refused: confirms are keyed by it), delivery times past
//! `delay_ms_max`, unknown exchanges (each an `Error` naming the refused sequence ranges),
//! unroutable messages (returned if mandatory, else counted; confirmed either way), a part of a
//! split refused by its shard (the whole message is refused).

use std::collections::BTreeMap;

use bytes::BytesMut;
use weir_protocol::wire::{self, BodyT, ErrorCode};

use super::{Addressed, Flow, Pending, Session};
use crate::mesh::msg::{Op, PublishItem, PublishOutcome};
use crate::mesh::types::Refusal;
use crate::net::command::Publish;

/// A publish routed to queues on several shards: confirmed once every shard took its part.
#[derive(Debug)]
pub(super) struct Split {
    parts_left: u16,
    journaled: bool,
    taken: bool,
    refusal: Option<Refusal>,
    returned: Option<PublishItem>,
    /// Every part so far was an idempotent producer's duplicate.
    duplicate: bool,
}

impl Session {
    pub(super) fn publish(
        &mut self,
        now_ms: u64,
        p: Publish<'_>,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        let confirm = p.confirm;
        let producer_id = p.producer_id;
        let mut in_parts: Vec<u64> = Vec::new();
        // The sequences refused for their order, and the last one taken when the first was.
        let mut out_of_order: Vec<u64> = Vec::new();
        let mut first_out_of_order: Option<(u64, u64)> = None;
        let mut delayed: Vec<u64> = Vec::new();
        let mut by_shard: BTreeMap<u16, Vec<PublishItem>> = BTreeMap::new();
        let mut no_exchange: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut unroutable: Vec<u64> = Vec::new();
        let mut returned: Vec<wire::ReturnedT> = Vec::new();
        for entry in p.entries(self.ctx.message_copy_bytes_max as usize) {
            // Sequences key confirms and the parts of a split: a reused one would be merged with
            // the publish that holds it. Refused as an entry, like every field refusal here: it
            // is never stored, so its `Error` names it exactly, and the publishes before it keep
            // their own confirms. Every entry that passes advances the mark, whatever becomes of
            // it, since the rule is about the client's numbering.
            if let Some(last) = self.last_sequence.filter(|&last| entry.sequence <= last) {
                first_out_of_order.get_or_insert((entry.sequence, last));
                out_of_order.push(entry.sequence);
                continue;
            }
            self.last_sequence = Some(entry.sequence);
            let (exchange, key, deliver_at_ms) =
                (entry.exchange, entry.routing_key, entry.deliver_at_ms);
            if deliver_at_ms.is_some_and(|t| t > now_ms.saturating_add(self.ctx.delay_ms_max)) {
                delayed.push(entry.sequence); // refused: past the limit
                continue;
            }
            let item = PublishItem {
                deaths: None,
                sequence: entry.sequence,
                queue: key.to_string(),
                also: Vec::new(),
                exchange: exchange.to_string(),
                routing_key: key.to_string(),
                mandatory: entry.mandatory,
                confirm,
                persistent: entry.persistent,
                bytes: entry.bytes,
                expiration_ms: entry.expiration_ms,
                deliver_at_ms,
                producer_id,
                priority: entry.priority,
            };
            if exchange.is_empty() {
                // The default exchange: the key names the queue.
                by_shard.entry(self.owner_of(key)).or_default().push(item);
                continue;
            }
            // Addressed here, on the publishing shard, by this shard's copy of the table.
            let mut queues = std::mem::take(&mut self.route_buf);
            queues.clear();
            let found = {
                let table = self.routing.table.borrow();
                let mut matched: Vec<&str> = Vec::new();
                let found = table.route(exchange, key, &mut matched);
                queues.extend(matched.into_iter().map(str::to_string));
                found
            };
            if found.is_err() {
                no_exchange
                    .entry(exchange.to_string())
                    .or_default()
                    .push(item.sequence);
            } else if queues.is_empty() {
                if item.mandatory {
                    returned.push(returned_of(item));
                } else {
                    self.routing
                        .unroutable
                        .set(self.routing.unroutable.get() + 1);
                }
                if confirm {
                    unroutable.push(entry.sequence);
                }
            } else if !self.split_by_owner(item, &mut queues, &mut by_shard) {
                in_parts.push(entry.sequence);
            }
            self.route_buf = queues;
        }
        if !returned.is_empty() {
            self.send_returned(out, returned);
        }
        if !unroutable.is_empty() {
            // Nothing to store, so nothing to wait for: confirmed at once, as AMQP does.
            self.confirm(out, unroutable, wire::Durability::Transient);
        }
        if let Some((first, last)) = first_out_of_order {
            let msg = format!(
                "publish sequence {first} is not above the last one, {last}: sequences must \
                 strictly increase on a connection"
            );
            self.fail_sequences(out, ErrorCode::InvalidArgument, msg, out_of_order);
        }
        if !delayed.is_empty() {
            let msg = format!(
                "deliver_at_ms: more than delay_ms_max = {} ms from now",
                self.ctx.delay_ms_max
            );
            self.fail_sequences(out, ErrorCode::InvalidArgument, msg, delayed);
        }
        if !in_parts.is_empty() {
            let msg = format!(
                "producer_id: an idempotent publish routes to more than targets_per_message_max \
                 = {} queues of one shard, which would store it in parts that a re-send could \
                 not tell apart",
                self.ctx.targets_per_message_max
            );
            self.fail_sequences(out, ErrorCode::LimitExceeded, msg, in_parts);
        }
        for (exchange, seqs) in no_exchange {
            let msg = format!("exchange '{exchange}' not found");
            self.fail_sequences(out, ErrorCode::NotFound, msg, seqs);
        }
        for (shard, items) in by_shard {
            let bytes = items.iter().map(|i| i.bytes.len() as u64).sum();
            self.unconfirmed += items.len() as u64;
            self.unconfirmed_bytes += bytes;
            self.address(
                outbound,
                shard,
                Op::Publish(items),
                Pending::Publish { bytes },
            );
        }
        Flow::Continue
    }

    /// Addresses a routed message to the shards owning its queues: one item per shard, naming
    /// all that shard's queues (stored there once), or one per `targets_per_message_max` of
    /// them. The same `Bytes` go to every shard: a reference count each, no copy. False (and
    /// nothing addressed) for an idempotent producer's message a shard would take in parts.
    fn split_by_owner(
        &mut self,
        item: PublishItem,
        queues: &mut Vec<String>,
        by_shard: &mut BTreeMap<u16, Vec<PublishItem>>,
    ) -> bool {
        let max = self.ctx.targets_per_message_max as usize;
        let idempotent = item.producer_id.is_some();
        let parts = crate::broker::ops::address(item, queues, self.ctx.shard_count(), max);
        if idempotent && parts.windows(2).any(|w| w[0].0 == w[1].0) {
            return false;
        }
        if parts.len() > 1 {
            self.splits.insert(
                parts[0].1.sequence,
                Split {
                    parts_left: parts.len() as u16,
                    journaled: false,
                    taken: false,
                    refusal: None,
                    returned: None,
                    duplicate: true,
                },
            );
        }
        for (shard, part) in parts {
            by_shard.entry(shard).or_default().push(part);
        }
        true
    }

    /// An owner's outcomes for its part of publishes: confirms, returns and refusals, by range.
    pub(super) fn published(&mut self, outcomes: Vec<PublishOutcome>, out: &mut BytesMut) {
        self.unconfirmed -= outcomes.len() as u64;
        // Journaled ones were confirmed after their group commit; the others live in memory only.
        let mut confirmed: Vec<u64> = Vec::new();
        let mut confirmed_transient: Vec<u64> = Vec::new();
        // Idempotent producers' re-sends confirmed without being stored again.
        let mut duplicates: Vec<u64> = Vec::new();
        let mut refused: BTreeMap<(u16, String), Vec<u64>> = BTreeMap::new();
        let mut returned = Vec::new();
        for o in outcomes {
            let Some(o) = self.merge_split(o) else {
                continue;
            };
            if o.duplicate && o.confirm && o.result.is_ok() {
                duplicates.push(o.sequence);
            }
            match o.result {
                Ok(()) if o.confirm && o.journaled => confirmed.push(o.sequence),
                Ok(()) if o.confirm => confirmed_transient.push(o.sequence),
                Ok(()) => {}
                Err(r) => refused
                    .entry((r.code.0, r.message))
                    .or_default()
                    .push(o.sequence),
            }
            if let Some(item) = o.returned {
                returned.push(returned_of(item));
            }
        }
        if !returned.is_empty() {
            self.send_returned(out, returned);
        }
        duplicates.sort_unstable();
        let durability = self.ctx.durability;
        for (seqs, durability) in [
            (confirmed, durability),
            (confirmed_transient, wire::Durability::Transient),
        ] {
            if !seqs.is_empty() {
                let dups: Vec<u64> = if duplicates.is_empty() {
                    Vec::new()
                } else {
                    seqs.iter()
                        .copied()
                        .filter(|s| duplicates.binary_search(s).is_ok())
                        .collect()
                };
                self.confirm_with(out, seqs, durability, dups);
            }
        }
        for ((code, message), seqs) in refused {
            self.fail_sequences(out, ErrorCode(code), message, seqs);
        }
    }

    /// A returned message is sent back before its confirm, as AMQP does.
    fn send_returned(&mut self, out: &mut BytesMut, returned: Vec<wire::ReturnedT>) {
        let mut r = wire::ReturnT::default();
        r.entries = returned;
        self.reply(out, 0, BodyT::Return(Box::new(r)));
    }

    fn confirm(&mut self, out: &mut BytesMut, seqs: Vec<u64>, durability: wire::Durability) {
        self.confirm_with(out, seqs, durability, Vec::new());
    }

    /// A confirm of `seqs`, listing the subset `duplicates` (re-sends not stored again).
    pub(super) fn confirm_with(
        &mut self,
        out: &mut BytesMut,
        seqs: Vec<u64>,
        durability: wire::Durability,
        duplicates: Vec<u64>,
    ) {
        self.tally.confirmed(seqs.len());
        let ranges = weir_protocol::ranges_of(seqs);
        let duplicates = weir_protocol::ranges_of(duplicates);
        if let Err(e) = self.encoder.confirm(out, &ranges, durability, &duplicates) {
            tracing::error!("cannot encode a confirm: {e}");
        }
    }

    /// One shard's part of a publish split across shards: `None` until the last part is in,
    /// then the whole publish's outcome (refused if any part was; journaled if any part was;
    /// returned only if no part reached a queue).
    fn merge_split(&mut self, o: PublishOutcome) -> Option<PublishOutcome> {
        let Some(split) = self.splits.get_mut(&o.sequence) else {
            return Some(o);
        };
        split.parts_left -= 1;
        split.journaled |= o.journaled;
        split.duplicate &= o.duplicate;
        match o.result {
            Ok(()) if o.returned.is_some() => split.returned = o.returned,
            Ok(()) => split.taken = true,
            Err(r) => {
                split.taken = true;
                split.refusal.get_or_insert(r);
            }
        }
        if split.parts_left > 0 {
            return None;
        }
        // Present: it was found above.
        let split = self.splits.remove(&o.sequence)?;
        Some(PublishOutcome {
            sequence: o.sequence,
            confirm: o.confirm,
            journaled: split.journaled,
            result: split.refusal.map_or(Ok(()), Err),
            returned: if split.taken { None } else { split.returned },
            duplicate: split.duplicate,
        })
    }
}

/// A mandatory message that routed to no queue, as it goes back in a `Return`.
fn returned_of(item: PublishItem) -> wire::ReturnedT {
    let mut r = wire::ReturnedT::default();
    r.sequence = item.sequence;
    r.code = ErrorCode::NoRoute;
    r.exchange = Some(item.exchange).filter(|e| !e.is_empty());
    r.routing_key = Some(item.routing_key);
    r.message = Some(item.bytes.to_vec());
    r
}
