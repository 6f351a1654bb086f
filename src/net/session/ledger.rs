//! The delivery ledger: delivery tags, the deliveries this connection holds, and settling them.
//!
//! Contract: runs on the connection's shard. Delivery tags are allocated here, per connection,
//! in order; each delivery not auto-acked is remembered by tag as (owning shard, queue,
//! consumer, queue sequence) until the client acks, nacks or rejects it, and a settlement goes
//! to every shard it touches, grouped. Deliveries pushed by owning shards are encoded straight
//! from their `Bytes`, in as many `Deliver` frames as they need, each within `deliver_batch_max`
//! and `frame_size_max`: a push of any size reaches the client whole and in order.
//!
//! A `Get` has no prefetch window, so the ledger keeps one for it (`GetWindow`): the `Get`s
//! asked and not answered plus the `Get` deliveries held unacked stay within `gets_unacked_max`,
//! and a `Get` past it is refused (`LimitExceeded`) until the client settles some.
//!
//! Faults handled: settling tags this connection does not hold (`UnknownDeliveryTag`, and
//! nothing in that frame is settled),
//! deliveries for a consumer cancelled meanwhile or a closing connection (requeued at their
//! owner, never shown to the client), a settlement an owner refused (reported once, with the
//! first refusal). A settlement's tags are kept aside until its owners answer: those an owner
//! refused for a storage reason (a full disk: the delivery is still outstanding there) are
//! outstanding here again, so the client can retry the same ack under the same tag.

use std::collections::BTreeMap;

use bytes::BytesMut;
use weir_protocol::wire::{self, BodyT, ErrorCode};
use weir_protocol::{DeathItem, DeliveryItem};

use super::{Addressed, Flow, Pending, Session, State};
use crate::broker::deaths;
use crate::mesh::msg::{Op, Pushed, PushedDelivery, Reply, SettleItem};
use crate::mesh::types::HolderId;
use crate::net::command::Settle;

/// A delivery this connection holds, by delivery tag.
#[derive(Clone, Debug)]
pub(super) struct Outstanding {
    shard: u16,
    queue: String,
    holder: HolderId,
    seq: u64,
    /// Delivered by a `Get` (counted in the `GetWindow` until settled).
    get: bool,
}

/// A settlement's tags and what they stood for, in the order of its `Op::Settle` items.
pub(super) type SettledTags = Vec<(u64, Outstanding)>;

/// The `Get`s a connection holds: asked and not answered yet, and delivered and not settled.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct GetWindow {
    asked: u32,
    held: u32,
}

impl Session {
    /// Whether another `Get` fits the connection's window; the refusal names the limit.
    pub(super) fn get_window_refusal(&self) -> Option<String> {
        let max = self.ctx.gets_unacked_max;
        let w = self.gets;
        (w.asked + w.held >= max).then(|| {
            format!(
                "this connection holds gets_unacked_max = {max} Get deliveries unacked or asked \
                 ({} unacked); settle some before the next Get",
                w.held
            )
        })
    }

    /// A `Get` was sent to its queue's owner.
    pub(super) fn get_asked(&mut self) {
        self.gets.asked += 1;
    }

    /// Acks, nacks or rejects the deliveries named; answered (if asked) once every shard is.
    pub(super) fn settle(
        &mut self,
        request_id: u64,
        s: &Settle<'_>,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        let (ack, requeue, delay_ms) = (s.ack, s.requeue, s.delay_ms);
        // A retry delay is honoured only as a requeue's, within the delayed-delivery bound, or
        // refused whole: never a yes that is not kept.
        if let Some(d) = delay_ms {
            let why = if !requeue {
                Some(
                    "delay_ms: only with requeue (a message not requeued is not delivered again)"
                        .to_string(),
                )
            } else if u64::from(d) > self.ctx.delay_ms_max {
                Some(format!(
                    "delay_ms {d}: more than delay_ms_max = {} ms; nothing in this frame was settled",
                    self.ctx.delay_ms_max
                ))
            } else {
                None
            };
            if let Some(msg) = why {
                return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
            }
        }
        // The whole frame is judged before any of it is applied: a refused frame settles nothing,
        // so every delivery it named is still outstanding and can be settled again. Judged
        // against what was outstanding when the frame came, so a tag named twice in one frame
        // is settled once, not refused.
        if let Some((first, last)) = s
            .tags
            .ranges()
            .find(|&(first, last)| self.outstanding.range(first..=last).next().is_none())
        {
            let msg = format!(
                "no outstanding delivery in tags {first}..={last}; nothing in this frame was settled"
            );
            return self.fail(out, request_id, ErrorCode::UnknownDeliveryTag, msg, false);
        }
        let mut by_shard: BTreeMap<u16, (Vec<SettleItem>, SettledTags)> = BTreeMap::new();
        for (first, last) in s.tags.ranges() {
            let tags: Vec<u64> = self
                .outstanding
                .range(first..=last)
                .map(|(t, _)| *t)
                .collect();
            for tag in tags {
                let Some(o) = self.outstanding.remove(&tag) else {
                    continue; // listed above
                };
                self.gets.held -= u32::from(o.get);
                let (items, tags) = by_shard.entry(o.shard).or_default();
                items.push(SettleItem {
                    queue: o.queue.clone(),
                    holder: o.holder,
                    seq: o.seq,
                    ack,
                    requeue,
                    failed: !ack,
                    delay_ms,
                });
                tags.push((tag, o));
            }
        }
        // A settlement that asked for a reply is answered once every shard it touched answered.
        let wait = (request_id != 0).then(|| {
            let wait = self.next_id();
            self.settle_waits
                .insert(wait, (by_shard.len() as u16, None));
            wait
        });
        for (shard, (items, tags)) in by_shard {
            let pending = Pending::Settle {
                request_id,
                wait,
                tags,
            };
            self.address(outbound, shard, Op::Settle(items), pending);
        }
        Flow::Continue
    }

    /// One shard's answer to a settlement: the tags it kept outstanding (refused for a storage
    /// reason) are this connection's again, to settle later; the client is answered (if it
    /// asked) once every shard is, or told of each refusal (if it did not).
    pub(super) fn settled(
        &mut self,
        request_id: u64,
        wait: Option<u64>,
        tags: SettledTags,
        reply: Reply,
        out: &mut BytesMut,
    ) {
        let mut refusals = match reply {
            Reply::Settled(o) => {
                self.restore(tags, &o.kept);
                o.refusals
            }
            Reply::Refused(r) => vec![r],
            other => {
                tracing::error!(?other, "unexpected reply to a settlement");
                Vec::new()
            }
        };
        let Some(wait) = wait else {
            for r in refusals {
                self.fail(out, 0, r.code, r.message, false);
            }
            return;
        };
        let Some((remaining, failure)) = self.settle_waits.get_mut(&wait) else {
            return;
        };
        if !refusals.is_empty() {
            failure.get_or_insert_with(|| refusals.remove(0));
        }
        *remaining -= 1;
        if *remaining > 0 {
            return;
        }
        match self
            .settle_waits
            .remove(&wait)
            .and_then(|(_, failure)| failure)
        {
            Some(r) => self.refuse(out, request_id, r),
            None => {
                self.reply(out, request_id, BodyT::Ok(Box::default()));
            }
        }
    }

    /// Puts back the tags at `kept` (indices into `tags`): their owner still holds those
    /// deliveries for this connection. A tag given out again meanwhile cannot be: tags are never
    /// reused.
    fn restore(&mut self, tags: SettledTags, kept: &[u32]) {
        if self.state != State::Open {
            return; // its owner requeues them when the connection's close reaches it
        }
        for (index, (tag, o)) in (0u32..).zip(tags) {
            if kept.binary_search(&index).is_ok() {
                self.gets.held += u32::from(o.get);
                self.outstanding.insert(tag, o);
            }
        }
    }

    /// The owner's answer to `Get`: at most one delivery, tagged here.
    pub(super) fn got(&mut self, request_id: u64, shard: u16, reply: Reply, out: &mut BytesMut) {
        self.gets.asked -= 1;
        match reply {
            Reply::Got(d, ready) => {
                let mut ok = wire::GetOkT::default();
                ok.messages_ready = ready;
                ok.delivery = d.map(|d| Box::new(self.take_delivery(shard, *d)));
                self.reply(out, request_id, BodyT::GetOk(Box::new(ok)));
            }
            Reply::Refused(r) => self.refuse(out, request_id, r),
            other => tracing::error!(?other, "unexpected reply to get"),
        }
    }

    /// Assigns a delivery tag to a delivery and remembers it unless it was auto-acked.
    fn take_delivery(&mut self, shard: u16, d: PushedDelivery) -> wire::DeliveryT {
        let tag = self.next_delivery_tag;
        self.next_delivery_tag += 1;
        let mut t = wire::DeliveryT::default();
        t.delivery_tag = tag;
        t.redelivered = d.delivery_count > 1;
        t.delivery_count = d.delivery_count;
        t.exchange = Some(d.exchange).filter(|e| !e.is_empty());
        t.routing_key = Some(d.routing_key).filter(|k| !k.is_empty());
        t.message = d.bytes.to_vec();
        t.deaths = d.deaths.as_deref().map(|h| {
            deaths::for_delivery(h)
                .iter()
                .map(|x| {
                    let mut t = wire::DeathT::default();
                    t.queue = Some(x.queue.to_string());
                    t.reason = x.reason;
                    t.count = x.count;
                    t.exchange = Some(x.exchange.to_string());
                    t.routing_key = Some(x.routing_key.to_string());
                    t.first_time_ms = x.first_time_ms;
                    t.last_time_ms = x.last_time_ms;
                    t
                })
                .collect()
        });
        if !d.auto_ack {
            self.gets.held += 1;
            self.outstanding.insert(
                tag,
                Outstanding {
                    shard,
                    queue: d.queue,
                    holder: d.holder,
                    seq: d.seq,
                    get: true,
                },
            );
        }
        t
    }

    /// Handles deliveries and cancellations pushed by an owning shard.
    pub fn on_push(
        &mut self,
        from_shard: u16,
        pushed: Pushed,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) {
        match pushed {
            Pushed::Deliver {
                consumer_tag,
                deliveries,
                ..
            } => {
                if !self.consumers.contains_key(&consumer_tag) || self.state != State::Open {
                    // Cancelled meanwhile: these go back to their queue for someone else.
                    let charged = deliveries.iter().map(|d| u64::from(d.charge)).sum();
                    self.hand_back(outbound, from_shard, charged);
                    let items: Vec<SettleItem> = deliveries
                        .into_iter()
                        .filter(|d| !d.auto_ack)
                        .map(|d| SettleItem {
                            queue: d.queue,
                            holder: d.holder,
                            seq: d.seq,
                            ack: false,
                            requeue: true,
                            failed: false,
                            delay_ms: None,
                        })
                        .collect();
                    if !items.is_empty() {
                        self.address(outbound, from_shard, Op::Settle(items), Pending::Quiet);
                    }
                    return;
                }
                // Tags are given in order before encoding (each frame carries its own), but a
                // delivery is remembered under its tag only once a frame carrying it is out:
                // the client can settle only what it was shown.
                let first_tag = self.next_delivery_tag;
                self.next_delivery_tag += deliveries.len() as u64;
                // Dead-letter histories, decoded only for a batch that has one.
                let histories: Vec<Vec<DeathItem<'_>>> =
                    if deliveries.iter().any(|d| d.deaths.is_some()) {
                        deliveries
                            .iter()
                            .map(|d| d.deaths.as_deref().map(deaths::for_delivery))
                            .map(Option::unwrap_or_default)
                            .collect()
                    } else {
                        Vec::new()
                    };
                let items: Vec<DeliveryItem<'_>> = deliveries
                    .iter()
                    .zip(first_tag..)
                    .enumerate()
                    .map(|(i, (d, tag))| DeliveryItem {
                        delivery_tag: tag,
                        redelivered: d.delivery_count > 1,
                        delivery_count: d.delivery_count,
                        exchange: &d.exchange,
                        routing_key: &d.routing_key,
                        message: &d.bytes,
                        deaths: histories.get(i).map_or(&[], Vec::as_slice),
                    })
                    .collect();
                let mut unsent: Vec<usize> = Vec::new();
                let mut at = 0;
                while at < items.len() {
                    match self
                        .encoder
                        .deliver_prefix(out, &consumer_tag, &items[at..])
                    {
                        Ok(count) => at += count,
                        Err(e) => {
                            // Only a delivery no frame holds even alone: the limits' relations
                            // rule that out for any message the broker accepted under them. It
                            // stays held by this connection at its owner, which requeues it
                            // when the connection closes: never lost, and never bounced
                            // straight back here in a loop.
                            tracing::error!(
                                queue = %deliveries[at].queue,
                                "cannot encode a delivery: {e}"
                            );
                            unsent.push(at);
                            at += 1;
                        }
                    }
                }
                drop(items);
                let (mut queued, mut unsent_charge) = (0, 0);
                for (index, d) in deliveries.iter().enumerate() {
                    if unsent.contains(&index) {
                        unsent_charge += u64::from(d.charge);
                    } else {
                        queued += u64::from(d.charge);
                    }
                }
                *self.unwritten.entry(from_shard).or_default() += queued;
                self.hand_back(outbound, from_shard, unsent_charge);
                for (index, (d, tag)) in deliveries.into_iter().zip(first_tag..).enumerate() {
                    if !d.auto_ack && !unsent.contains(&index) {
                        let o = Outstanding {
                            shard: from_shard,
                            queue: d.queue,
                            holder: d.holder,
                            seq: d.seq,
                            get: false,
                        };
                        self.outstanding.insert(tag, o);
                    }
                }
            }
            Pushed::Cancelled(c) => {
                self.consumers.remove(&c.consumer_tag);
                let mut cc = wire::ConsumerCancelledT::default();
                cc.consumer_tag = Some(c.consumer_tag);
                cc.code = ErrorCode::Deleted;
                cc.message = Some(c.message);
                self.reply(out, 0, BodyT::ConsumerCancelled(Box::new(cc)));
            }
            Pushed::TimedOut(c) => {
                // Its owner requeued all it held: those tags are no longer this client's to
                // settle (an ack of one now is `UnknownDeliveryTag`, not a silent no-op).
                if let Some(r) = self.consumers.remove(&c.consumer_tag) {
                    if let Some(holder) = r.holder {
                        self.outstanding.retain(|_, o| {
                            !(o.shard == from_shard && o.holder == holder && o.queue == r.queue)
                        });
                    }
                }
                let mut cc = wire::ConsumerCancelledT::default();
                cc.consumer_tag = Some(c.consumer_tag);
                cc.code = ErrorCode::LimitExceeded;
                cc.message = Some(c.message);
                self.reply(out, 0, BodyT::ConsumerCancelled(Box::new(cc)));
            }
        }
    }

    /// The shell takes the outbox to write it: the charges of what it holds, by owning shard,
    /// to hand to `on_written` once that write is done.
    pub fn take_unwritten(&mut self) -> BTreeMap<u16, u64> {
        std::mem::take(&mut self.unwritten)
    }

    /// A write is done: its deliveries' charges go back to their owners, which may dispatch
    /// that much more to this connection, once they add up to `hand_back_bytes_min` per owner.
    /// A write per delivery (one ack per delivery gets one delivery per write) must not cost a
    /// request to the owner each. Holding some back only tightens the bound, and never stalls
    /// a consumer: an owner refuses more only while its account holds `outbox_bytes_max`, and
    /// what is held back here is less than that, so the rest is unwritten and its write will
    /// hand everything back.
    pub fn on_written(&mut self, written: BTreeMap<u16, u64>, outbound: &mut Vec<Addressed>) {
        let min = self.hand_back_bytes_min();
        for (shard, bytes) in written {
            let held = self.written.entry(shard).or_default();
            *held += bytes;
            if *held >= min {
                let bytes = std::mem::take(held);
                self.hand_back(outbound, shard, bytes);
            }
        }
    }

    /// A sixteenth of `outbox_bytes_max`: a hand-back per 512 KiB of deliveries by default.
    fn hand_back_bytes_min(&self) -> u64 {
        self.ctx.outbox_bytes_max / 16
    }

    /// Tells `shard` that `bytes` of what it charged this connection are no longer held here.
    fn hand_back(&mut self, outbound: &mut Vec<Addressed>, shard: u16, bytes: u64) {
        if bytes > 0 {
            // Id 0: no reply is awaited, so nothing is pending for it.
            let op = Op::DeliveriesWritten { bytes };
            outbound.push(Addressed { shard, id: 0, op });
        }
    }
}
