//! The queue host's consumers: consume, cancel, prefetch changes, `Get`, the deliveries each
//! connection is owed, and what a closed connection's consumers held.
//!
//! Contract: part of `QueueHost` (same shard, same data); it reaches the queue map through the
//! host's own fields. A consumer belongs to one connection (`ConnRef`); a cancelled one is
//! retired, its deliveries ackable until its connection closes. Faults handled: a consumer tag
//! already used on the connection, an exclusive consume on a queue with consumers, any consume
//! on a queue with an exclusive consumer, a consumer not of this connection: refused, nothing
//! changes. Which consumer gets a message (consumer priority, single active consumer) is the
//! queue's (`queue::consumers`); every change of a queue's consumers here is also a use of it
//! for queue expiry (`expiry::Use`), so its first consumer stops its clock and its last one
//! gone starts it.
//!
//! Two guards against a consumer that stops: the outbox account and the consumer timeout.
//! - Every delivery dispatched to a connection is charged to that connection's account here
//!   (`charge_of`: message, names, a fixed overhead) until the connection says it wrote it to
//!   its socket (`outbox_written`, from `Op::DeliveriesWritten`). While the account holds
//!   `outbox_bytes_max` no consumer of that connection is offered a message, auto-ack ones
//!   included; a write that brings it back under the bound lets dispatch resume. So what one
//!   connection can have in flight from this shard, wherever it is (mesh, read-back, outbox,
//!   kernel write), is at most `outbox_bytes_max` plus one delivery.
//! - A consumer holding a delivery longer than `consumer_timeout_ms` is cancelled
//!   (`time_out_consumers`) and all it holds goes back to ready, for the others. A `Get`
//!   delivery held unacked that long goes back too (alone: the connection's newer `Get`s stay
//!   with it); there is no consumer to cancel and the connection is not told, so its later ack
//!   of it is `UnknownDeliveryTag`.
//!
//! `Get` replies are not charged to the outbox account: one answers one request, and the
//! connection holds at most `gets_unacked_max` `Get`s asked or unacked (`limits.rs` says why that
//! bounds their bytes).

use std::rc::Rc;

use weir_protocol::wire::ErrorCode;

use super::expiry::Use;
use super::{refuse, ConsumerInfo, Hosted, QueueHost, StoredDelivery};
use crate::broker::queue::QueueDelivery;
use crate::broker::routing::hash::FastMap;
use crate::broker::stored::MsgRef;
use crate::mesh::types::HolderId;
use crate::mesh::types::{Cancelled, ConnRef, Refusal};

/// A delivery owed to a connection.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub to: ConnRef,
    pub consumer_tag: Rc<str>,
    pub queue: Rc<str>,
    pub delivery: QueueDelivery<MsgRef>,
    /// What it was charged to `to`'s outbox account: handed back once written.
    pub charge: u32,
}

/// Bytes counted per delivery beyond its message and names: the encoded delivery's own fields
/// and the owned values it crosses the mesh in, a generous round figure.
pub const DELIVERY_OVERHEAD_BYTES: u32 = 256;

/// What a delivery of `msg` to a consumer tagged `tag` costs its connection's account until it
/// is written: its message and names (a cold message's record holds both), and the overhead.
pub fn charge_of(msg: &MsgRef, tag: &str) -> u32 {
    let held = match msg {
        MsgRef::Hot(s) => s.len() as usize + s.exchange.len() + s.routing_key.len(),
        MsgRef::Cold { record_len, .. } => *record_len as usize,
    };
    (held + tag.len()).min(u32::MAX as usize) as u32 + DELIVERY_OVERHEAD_BYTES
}

/// Each connection's deliveries dispatched and not yet written, in bytes (`charge_of`).
#[derive(Debug)]
pub(super) struct Outboxes {
    max: u64,
    by_conn: FastMap<ConnRef, Outbox>,
}

#[derive(Debug, Default)]
struct Outbox {
    bytes: u64,
    /// A delivery was held back for it: its consumers' queues need a dispatch once it drains.
    blocked: bool,
}

impl Default for Outboxes {
    fn default() -> Self {
        Outboxes {
            max: u64::MAX,
            by_conn: FastMap::default(),
        }
    }
}

impl Outboxes {
    /// Charges `bytes` to `conn` if its account is under the bound (so at most one delivery
    /// past it); otherwise marks it blocked and refuses.
    fn charge(&mut self, conn: ConnRef, bytes: u32) -> bool {
        let a = self.by_conn.entry(conn).or_default();
        if a.bytes >= self.max {
            a.blocked = true;
            return false;
        }
        a.bytes += u64::from(bytes);
        true
    }

    /// `conn` wrote `bytes` of what it was charged. True if that unblocked it.
    fn written(&mut self, conn: ConnRef, bytes: u64) -> bool {
        let Some(a) = self.by_conn.get_mut(&conn) else {
            return false; // closed meanwhile: its account went with it
        };
        assert!(
            a.bytes >= bytes,
            "connection {conn:?} wrote {bytes} bytes of deliveries but was charged {}",
            a.bytes
        );
        a.bytes -= bytes;
        let unblocked = a.blocked && a.bytes < self.max;
        if unblocked {
            a.blocked = false;
        }
        if a.bytes == 0 && !a.blocked {
            self.by_conn.remove(&conn);
        }
        unblocked
    }
}

/// Set in every consumer id and in no connection id, so a consumer and a connection's `Get`s
/// never share an owner in a queue.
const CONSUMER_BIT: u64 = 1 << 63;

impl QueueHost {
    /// As `consume_at`, at priority 0 and time 0 (state-machine tests).
    #[cfg(test)]
    pub fn consume(
        &mut self,
        conn: ConnRef,
        queue: &str,
        tag: &str,
        prefetch: u32,
        auto_ack: bool,
        exclusive: bool,
    ) -> Result<HolderId, Refusal> {
        self.consume_at(conn, queue, tag, prefetch, auto_ack, exclusive, 0, 0)
    }

    /// Attaches a consumer at consumer priority `priority` (higher first: `queue::consumers`);
    /// a queue's first consumer makes it in use (`expires_ms`).
    #[allow(clippy::too_many_arguments)]
    pub fn consume_at(
        &mut self,
        conn: ConnRef,
        queue: &str,
        tag: &str,
        prefetch: u32,
        auto_ack: bool,
        exclusive: bool,
        priority: i32,
        now_ms: u64,
    ) -> Result<HolderId, Refusal> {
        let id = CONSUMER_BIT | self.next_consumer;
        let q = self.get_queue(conn, queue)?;
        // As in AMQP: an exclusive consumer keeps the queue to itself until it is cancelled or
        // its connection closes, against its own connection too.
        if q.consumers.values().any(|c| c.exclusive) {
            return refuse(
                ErrorCode::ResourceLocked,
                format!("queue '{queue}' is in exclusive use by another consumer"),
            );
        }
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
            .add_consumer_with(id, prefetch, auto_ack, priority)
            .map_err(|e| Refusal {
                code: ErrorCode::InvalidArgument,
                message: e.to_string(),
            })?;
        q.consumers.insert(
            id,
            ConsumerInfo {
                conn,
                tag: Rc::from(tag),
                exclusive,
            },
        );
        q.had_consumer = true;
        let name = q.name.clone();
        self.next_consumer += 1;
        self.used(&name, Use::Consumed, now_ms);
        self.dirty.insert(name);
        Ok(id)
    }

    /// Changes a running consumer's prefetch (its credit window); a wider window may let more
    /// deliveries go at once.
    pub fn set_prefetch(
        &mut self,
        conn: ConnRef,
        queue: &str,
        consumer: HolderId,
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

    /// As `cancel_at`, at time 0 (state-machine tests).
    #[cfg(test)]
    pub fn cancel(
        &mut self,
        conn: ConnRef,
        queue: &str,
        consumer: HolderId,
    ) -> Result<(), Refusal> {
        self.cancel_at(conn, queue, consumer, 0)
    }

    /// Cancels a consumer: nothing more is dispatched to it, and what it holds stays outstanding,
    /// ackable by its connection until that connection closes (as in AMQP). An auto-delete queue
    /// losing its last consumer goes; another is unused from `now_ms` (`expires_ms`).
    pub fn cancel_at(
        &mut self,
        conn: ConnRef,
        queue: &str,
        consumer: HolderId,
        now_ms: u64,
    ) -> Result<(), Refusal> {
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
            self.used(&name, Use::ConsumersLeft, now_ms);
            self.dirty.insert(name);
        }
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
        self.used(&name, Use::Touched, now_ms);
        Ok((d, ready))
    }

    /// Every delivery consumers are owed now, at most `max_per_queue` from each queue, and only
    /// to connections whose outbox account has room.
    pub fn take_deliveries(&mut self, now_ms: u64, max_per_queue: usize, out: &mut Vec<Outgoing>) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut deliveries = Vec::new();
        for name in dirty {
            let mut settled = Vec::new();
            let Some(q) = self.queues.get_mut(&name) else {
                continue;
            };
            deliveries.clear();
            let Hosted {
                queue, consumers, ..
            } = &mut *q;
            let outboxes = &mut self.outboxes;
            let take = |holder: HolderId, msg: &MsgRef| {
                let c = &consumers[&holder];
                outboxes.charge(c.conn, charge_of(msg, &c.tag))
            };
            queue.dispatch_within(now_ms, max_per_queue, take, &mut deliveries, &mut settled);
            let full_round = deliveries.len() == max_per_queue;
            for d in deliveries.drain(..) {
                let c = &q.consumers[&d.holder];
                out.push(Outgoing {
                    to: c.conn,
                    consumer_tag: c.tag.clone(),
                    queue: q.name.clone(),
                    charge: charge_of(&d.msg, &c.tag),
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

    /// Sets the outbox bound (`outbox_bytes_max`); unbounded until set.
    pub fn set_outbox_bytes_max(&mut self, max: u64) {
        self.outboxes.max = max;
    }

    /// Connection `conn` wrote `bytes` of the deliveries charged to it (or dropped them unsent).
    /// If that brings a blocked connection under the bound, its consumers' queues are owed a
    /// dispatch again.
    pub fn outbox_written(&mut self, conn: ConnRef, bytes: u64) {
        if !self.outboxes.written(conn, bytes) {
            return;
        }
        for (name, q) in &self.queues {
            if q.consumers.values().any(|c| c.conn == conn) {
                self.dirty.insert(name.clone());
            }
        }
    }

    /// Cancels every consumer holding a delivery handed out more than `timeout_ms` ago (0: never)
    /// and puts everything it holds back in its queue, for the other consumers; returns the
    /// cancellations to tell their connections. A retired (cancelled) consumer's overdue
    /// deliveries go back too.
    pub fn time_out_consumers(&mut self, now_ms: u64, timeout_ms: u64) -> Vec<Cancelled> {
        if timeout_ms == 0 {
            return Vec::new();
        }
        let mut cancelled = Vec::new();
        let mut released = Vec::new();
        let mut gone = Vec::new();
        for (name, q) in self.queues.iter_mut() {
            let overdue = q.queue.overdue(now_ms, timeout_ms);
            if overdue.is_empty() {
                continue;
            }
            let mut settled = Vec::new();
            let mut cancelled_here = false;
            for (holder, seq) in overdue {
                if let Some(c) = q.consumers.remove(&holder) {
                    cancelled_here = true;
                    cancelled.push(Cancelled {
                        to: c.conn,
                        consumer_tag: c.tag.to_string(),
                        message: format!(
                            "message {seq} of queue '{name}' was not acked within \
                             consumer_timeout_ms = {timeout_ms}; the consumer was cancelled \
                             and its deliveries requeued"
                        ),
                    });
                } else if q.retired.remove(&holder).is_none() {
                    // A connection's `Get`s: no consumer to cancel, so only the overdue ones
                    // go back; the connection is not told (its later ack of one is
                    // `UnknownDeliveryTag`, and frees its `gets_unacked_max` window).
                    q.queue
                        .release_overdue(holder, now_ms, timeout_ms, &mut settled);
                    continue;
                }
                q.queue.release(holder, &mut settled);
            }
            released.push((name.clone(), settled));
            if cancelled_here && q.auto_delete && q.consumers.is_empty() {
                gone.push(name.clone());
            } else {
                self.dirty.insert(name.clone());
            }
        }
        for (name, settled) in released {
            self.note_settled(&name, settled);
            self.used(&name, Use::ConsumersLeft, now_ms);
        }
        for name in gone {
            self.remove(&name, "was auto-deleted");
        }
        cancelled
    }

    /// Releases what `conn`'s consumers, retired consumers and `Get`s hold on every queue but
    /// those exclusive to it (they go whole): back to ready, to be redelivered. Returns the
    /// auto-delete queues it left without consumers; the caller removes them, after the
    /// settlements are noted here, since noting reads the queue's dead-letter exchange.
    pub(super) fn release_connection(&mut self, conn: ConnRef, now_ms: u64) -> Vec<Rc<str>> {
        let mut gone = Vec::new();
        let mut released = Vec::new();
        for (name, q) in self.queues.iter_mut() {
            if q.exclusive == Some(conn) {
                continue;
            }
            let mine: Vec<HolderId> = q
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
            let retired: Vec<HolderId> = q
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
            self.used(&name, Use::ConsumersLeft, now_ms);
        }
        // What was on its way to it went with the connection.
        self.outboxes.by_conn.remove(&conn);
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::stored::Stored;
    use crate::mesh::types::Declare;
    use bytes::Bytes;

    const A: ConnRef = ConnRef { shard: 0, conn: 1 };
    const B: ConnRef = ConnRef { shard: 1, conn: 2 };

    fn host_with(messages: usize, body: usize) -> QueueHost {
        let mut h = QueueHost::new(0);
        let declare = Declare {
            name: "q".into(),
            ..Default::default()
        };
        h.declare(A, declare, 0).unwrap();
        for _ in 0..messages {
            let m = Stored::new(
                Bytes::from(vec![0; body]),
                String::new(),
                "q".into(),
                false,
                None,
            );
            h.publish(A, "q", Rc::new(m), None, 0).unwrap();
        }
        h
    }

    fn owed(h: &mut QueueHost, now_ms: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while h.has_work() {
            let before = out.len();
            h.take_deliveries(now_ms, 16, &mut out);
            if out.len() == before {
                break;
            }
        }
        out
    }

    /// A connection that writes nothing gets one delivery past its outbox bound, auto-ack or
    /// not; the other connection's consumer gets the rest; once it writes, it gets more.
    #[test]
    fn a_connection_that_writes_nothing_is_sent_no_more_than_its_outbox() {
        let mut h = host_with(20, 1000);
        let one = charge_of(
            &MsgRef::Hot(Rc::new(Stored::new(
                Bytes::from(vec![0; 1000]),
                String::new(),
                "q".into(),
                false,
                None,
            ))),
            "slow",
        );
        h.set_outbox_bytes_max(u64::from(one) * 3);
        h.consume(A, "q", "slow", 1000, true, false).unwrap();
        h.consume(B, "q", "fast", 1000, false, false).unwrap();
        let out = owed(&mut h, 0);
        let to_a: Vec<&Outgoing> = out.iter().filter(|o| o.to == A).collect();
        assert_eq!(to_a.len(), 3, "three charges fill the bound exactly");
        assert!(to_a.iter().all(|o| o.charge == one));
        // B's consumer is bounded too: it has written nothing either.
        assert_eq!(out.iter().filter(|o| o.to == B).count(), 3);
        assert!(owed(&mut h, 0).is_empty());
        h.outbox_written(B, u64::from(one) * 3);
        let out = owed(&mut h, 0);
        assert_eq!((out.len(), out[0].to), (3, B));
        h.outbox_written(A, u64::from(one));
        let out = owed(&mut h, 0);
        assert_eq!((out.len(), out[0].to), (1, A));
        // A closed connection's account goes with it; a late hand-back changes nothing.
        h.connection_closed(A);
        h.outbox_written(A, u64::from(one));
    }

    #[test]
    fn single_active_consumer_names_the_active_one_and_fails_over_with_what_it_held() {
        let mut h = QueueHost::new(0);
        let mut d = Declare {
            name: "q".into(),
            ..Default::default()
        };
        d.arguments.single_active_consumer = true;
        h.declare(A, d, 0).unwrap();
        for _ in 0..4 {
            let m = Stored::new(
                Bytes::from_static(b"m"),
                String::new(),
                "q".into(),
                false,
                None,
            );
            h.publish(A, "q", Rc::new(m), None, 0).unwrap();
        }
        h.consume_at(A, "q", "first", 2, false, false, 0, 0)
            .unwrap();
        h.consume_at(B, "q", "second", 10, false, false, 0, 0)
            .unwrap();
        let out = owed(&mut h, 0);
        assert_eq!(out.len(), 2, "the second has credit, yet gets nothing");
        assert!(out.iter().all(|o| &*o.consumer_tag == "first"));
        let active = h.info(A, "q", 0).unwrap().active_consumer;
        assert_eq!(active.as_deref(), Some("first"));
        h.connection_closed_at(A, 0);
        let out = owed(&mut h, 0);
        assert_eq!(
            out.len(),
            4,
            "the second takes over with what the first held"
        );
        assert!(out.iter().all(|o| &*o.consumer_tag == "second"));
        assert_eq!(
            out.iter()
                .filter(|o| o.delivery.delivery_count == 2)
                .count(),
            2
        );
        let active = h.info(B, "q", 0).unwrap().active_consumer;
        assert_eq!(active.as_deref(), Some("second"));
    }

    #[test]
    fn a_higher_priority_consumer_is_served_first_until_its_prefetch_is_full() {
        let mut h = host_with(5, 10);
        h.consume_at(A, "q", "low", 100, false, false, -1, 0)
            .unwrap();
        h.consume_at(B, "q", "high", 3, false, false, 7, 0).unwrap();
        let out = owed(&mut h, 0);
        let tags: Vec<&str> = out.iter().map(|o| &*o.consumer_tag).collect();
        assert_eq!(tags, ["high", "high", "high", "low", "low"]);
    }

    #[test]
    fn a_consumer_past_its_timeout_is_cancelled_and_what_it_held_goes_to_another() {
        let mut h = host_with(3, 10);
        let stuck = h.consume(A, "q", "stuck", 10, false, false).unwrap();
        assert_eq!(owed(&mut h, 1_000).len(), 3);
        assert!(h.time_out_consumers(1_500, 500).is_empty());
        assert!(h.time_out_consumers(99_999, 0).is_empty(), "0 is off");
        let cancelled = h.time_out_consumers(1_501, 500);
        assert_eq!(cancelled.len(), 1);
        assert_eq!((cancelled[0].to, &*cancelled[0].consumer_tag), (A, "stuck"));
        assert!(cancelled[0].message.contains("consumer_timeout_ms = 500"));
        h.consume(B, "q", "other", 10, false, false).unwrap();
        let out = owed(&mut h, 2_000);
        assert_eq!(out.len(), 3);
        assert!(out
            .iter()
            .all(|o| o.to == B && o.delivery.delivery_count == 2));
        let refused = h.settle(A, "q", stuck, out[0].delivery.seq, true, false);
        assert_eq!(refused.unwrap_err().code, ErrorCode::UnknownDeliveryTag);
    }

    #[test]
    fn a_get_past_the_timeout_goes_back_alone_and_nothing_is_cancelled() {
        let mut h = host_with(3, 10);
        let old = h.get(A, "q", false, 1_000).unwrap().0.expect("a message");
        let new = h.get(A, "q", false, 1_400).unwrap().0.expect("a message");
        assert!(h.time_out_consumers(1_500, 500).is_empty());
        // No consumer to cancel, so nothing to tell; the overdue one is ready again.
        assert!(h.time_out_consumers(1_501, 500).is_empty());
        let i = h.info(A, "q", 0).unwrap();
        assert_eq!((i.messages_ready, i.messages_unacked), (2, 1));
        h.consume(B, "q", "other", 10, false, false).unwrap();
        let out = owed(&mut h, 1_600);
        assert!(out
            .iter()
            .any(|o| o.delivery.seq == old.seq && o.to == B && o.delivery.delivery_count == 2));
        // The newer one is still the connection's; the overdue one is not.
        let refused = h.settle(A, "q", A.conn, old.seq, true, false);
        assert_eq!(refused.unwrap_err().code, ErrorCode::UnknownDeliveryTag);
        h.settle(A, "q", A.conn, new.seq, true, false).unwrap();
    }
}
