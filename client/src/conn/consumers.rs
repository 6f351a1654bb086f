//! Consumer push routing: consumer slots by tag, deliveries, cancels and settlements.
//!
//! Contract: driver-task only (methods on `Driver`), except `RawDelivery`, the plain value the
//! driver hands to a consumer's channel: what one `Deliver` entry (or `GetOk`) said, with its
//! message as a slice of the received frame. The consumer module wraps it into the public
//! `Delivery` (which adds the connection handle and the consumer's `auto_ack`), so this module
//! knows nothing of the public types. A consumer is registered before its `Consume` leaves, so
//! deliveries that overtake the `ConsumeOk` find it; it is unregistered when the broker confirms
//! its cancel, refuses its `Consume`, or cancels it itself.
//!
//! Faults handled: deliveries for a consumer whose stream is gone or whose cancel is in flight
//! (requeued with one `Nack`, and the consumer cancelled once), deliveries for a tag this
//! connection does not know (requeued), a cancel of a consumer already gone (`NotFound` to the
//! caller, nothing sent), the broker cancelling a consumer (its stream gets
//! `ConsumerCancelled`).

use bytes::Bytes;
use weir_protocol::wire::{self, BodyT, ErrorCode};
use weir_protocol::InFrame;

use super::driver::Driver;
use super::requests::Pending;
use super::{DeliveryTx, Reply, Settle};
use crate::consumer::Death;
use crate::error::ClientError;

/// One delivery as read off the wire, before the consumer module makes it a `Delivery`.
pub(crate) struct RawDelivery {
    pub(crate) delivery_tag: u64,
    pub(crate) redelivered: bool,
    pub(crate) delivery_count: u32,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    /// The `Message` flatbuffer, a slice of the received frame (verified by the decoder).
    pub(crate) message: Bytes,
    /// Dead-letter history, most recent first (empty, and not allocated, for most messages).
    pub(crate) deaths: Vec<Death>,
}

impl RawDelivery {
    /// Reads one delivery entry of a `Deliver` or `GetOk` frame; `message` is its nested message.
    pub(crate) fn new(d: &wire::Delivery<'_>, message: Bytes) -> RawDelivery {
        RawDelivery {
            delivery_tag: d.delivery_tag(),
            redelivered: d.redelivered(),
            delivery_count: d.delivery_count(),
            exchange: d.exchange().unwrap_or("").to_string(),
            routing_key: d.routing_key().unwrap_or("").to_string(),
            message,
            deaths: d
                .deaths()
                .map(|ds| ds.iter().map(|x| Death::from_wire(&x)).collect())
                .unwrap_or_default(),
        }
    }
}

pub(super) struct ConsumerSlot {
    /// `None` once nobody takes deliveries any more (a cancel is in flight, or about to be).
    deliveries: Option<DeliveryTx>,
    auto_ack: bool,
    /// A `Cancel` was sent for it.
    cancelling: bool,
    /// Its key in `Driver::held`.
    id: u32,
}

impl ConsumerSlot {
    /// Where the connection's end is told to its consumer, if anyone still listens.
    pub(super) fn into_deliveries(self) -> Option<DeliveryTx> {
        self.deliveries
    }
}

impl Driver {
    /// Registers the consumer, then sends its `Consume`.
    pub(super) fn consume(&mut self, body: wire::ConsumeT, deliveries: DeliveryTx, reply: Reply) {
        let tag = body.consumer_tag.clone().unwrap_or_default();
        let auto_ack = body.auto_ack;
        let id = self.request_id();
        match self.encode(id, BodyT::Consume(Box::new(body))) {
            Ok(()) => {
                self.next_slot = self.next_slot.wrapping_add(1);
                self.consumers.insert(
                    tag.clone(),
                    ConsumerSlot {
                        deliveries: Some(deliveries),
                        auto_ack,
                        cancelling: false,
                        id: self.next_slot,
                    },
                );
                self.requests.insert(id, Pending::Consume { tag, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Stops a consumer: no more deliveries are handed out, and the broker is told (once).
    pub(super) fn cancel_consumer(&mut self, tag: String, reply: Option<Reply>) {
        let first = match self.consumers.get_mut(&tag) {
            Some(slot) => {
                slot.deliveries = None;
                !std::mem::replace(&mut slot.cancelling, true)
            }
            // Already gone (the broker cancelled it): nothing to tell the broker.
            None => false,
        };
        if !first {
            if let Some(reply) = reply {
                let _ = reply.send(Err(ClientError::Refused {
                    code: ErrorCode::NotFound,
                    message: format!("consumer '{tag}' is already cancelled"),
                }));
            }
            return;
        }
        let mut cancel = wire::CancelT::default();
        cancel.consumer_tag = tag.clone();
        let id = self.request_id();
        match self.encode(id, BodyT::Cancel(Box::new(cancel))) {
            Ok(()) => {
                self.requests.insert(id, Pending::Cancel { tag, reply });
            }
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    /// Sends deliveries nobody will see back to their queue.
    pub(super) fn requeue(&mut self, tags: &[u64]) {
        if tags.is_empty() {
            return;
        }
        for t in tags {
            self.held.remove(t);
        }
        let ranges = weir_protocol::ranges_of(tags.to_vec());
        // Fire-and-forget: a failure could only be a tag the broker already forgot. A zero
        // delay: back at once, and not counted as a failure by the queue's retry policy (the
        // application never saw them).
        if self
            .encoder
            .nack(&mut self.out, 0, &ranges, true, Some(0))
            .is_ok()
        {
            self.count_frame(0);
        }
    }

    /// A settlement; with a reply it asks the broker for an `Ok` once it is durable.
    pub(super) fn settle(&mut self, kind: Settle, tags: Vec<u64>, reply: Option<Reply>) {
        let id = if reply.is_some() {
            self.request_id()
        } else {
            0
        };
        let ranges = weir_protocol::ranges_of(tags);
        let result = match kind {
            Settle::Ack => self.encoder.ack(&mut self.out, id, &ranges).map(drop),
            Settle::Nack { requeue, delay_ms } => self
                .encoder
                .nack(&mut self.out, id, &ranges, requeue, delay_ms)
                .map(drop),
            Settle::Reject { requeue } => {
                let mut r = wire::RejectT::default();
                r.delivery_tag = ranges.first().map_or(0, |r| r.first());
                r.requeue = requeue;
                self.encoder
                    .encode(
                        &weir_protocol::frame(id, BodyT::Reject(Box::new(r))),
                        &mut self.out,
                    )
                    .map(drop)
            }
        };
        if result.is_ok() {
            self.count_frame(id);
        }
        match (result, reply) {
            (Ok(()), Some(reply)) => {
                self.requests.insert(id, Pending::Reply(reply));
            }
            (Err(e), Some(reply)) => {
                let _ = reply.send(Err(e.into()));
            }
            (_, None) => {}
        }
    }

    /// Hands each delivery of a `Deliver` frame to its consumer's stream.
    pub(super) fn on_deliver(&mut self, frame: &InFrame, deliver: wire::Deliver<'_>) {
        let tag = deliver.consumer_tag().unwrap_or("");
        let mut stray = Vec::new();
        let mut abandoned = false;
        match self.consumers.get_mut(tag) {
            Some(slot) => {
                for (d, message) in frame.deliveries() {
                    let sent = match &slot.deliveries {
                        Some(tx) => tx.send(Ok(RawDelivery::new(&d, message))).is_ok(),
                        None => false,
                    };
                    if sent && !slot.auto_ack {
                        self.held.insert(d.delivery_tag(), slot.id);
                    }
                    if !sent {
                        // Its stream is gone (dropped, or `consume` was abandoned before it
                        // returned): requeue, and stop the consumer, or the broker would hand
                        // the same messages straight back.
                        abandoned |= !slot.cancelling;
                        slot.deliveries = None;
                        if !slot.auto_ack {
                            stray.push(d.delivery_tag());
                        }
                    }
                }
            }
            // Not ours at all: give them back rather than hold them until we close.
            None => stray.extend(frame.deliveries().map(|(d, _)| d.delivery_tag())),
        }
        if abandoned {
            self.cancel_consumer(tag.to_string(), None);
        }
        self.requeue(&stray);
    }

    /// The broker cancelled a consumer (its queue was deleted, say): its stream ends with why.
    pub(super) fn on_consumer_cancelled(&mut self, c: wire::ConsumerCancelled<'_>) {
        let tag = c.consumer_tag().unwrap_or("").to_string();
        let Some(slot) = self.consumers.remove(&tag) else {
            return;
        };
        // The broker may have forgotten its deliveries (a consumer timeout requeues them): their
        // settlements must be judged alone.
        self.held.retain(|_, id| *id != slot.id);
        if let ConsumerSlot {
            deliveries: Some(tx),
            ..
        } = slot
        {
            let _ = tx.send(Err(ClientError::ConsumerCancelled {
                tag,
                code: c.code(),
                message: c.message().unwrap_or("").to_string(),
            }));
        }
    }
}
