//! The queue host's consumers: consume, cancel, prefetch changes, `Get`, the deliveries each
//! connection is owed, and what a closed connection's consumers held.
//!
//! Contract: part of `QueueHost` (same shard, same data); it reaches the queue map through the
//! host's own fields. A consumer belongs to one connection (`ConnRef`); a cancelled one is
//! retired, its deliveries ackable until its connection closes. Faults handled: a consumer tag
//! already used on the connection, an exclusive consume on a queue with consumers, any consume
//! on a queue with an exclusive consumer, a consumer not of this connection: refused, nothing
//! changes.

use std::rc::Rc;

use weir_protocol::wire::ErrorCode;

use super::{refuse, ConsumerInfo, QueueHost, StoredDelivery};
use crate::broker::queue::QueueDelivery;
use crate::broker::stored::MsgRef;
use crate::mesh::types::HolderId;
use crate::mesh::types::{ConnRef, Refusal};

/// A delivery owed to a connection.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub to: ConnRef,
    pub consumer_tag: Rc<str>,
    pub queue: Rc<str>,
    pub delivery: QueueDelivery<MsgRef>,
}

/// Set in every consumer id and in no connection id, so a consumer and a connection's `Get`s
/// never share an owner in a queue.
const CONSUMER_BIT: u64 = 1 << 63;

impl QueueHost {
    pub fn consume(
        &mut self,
        conn: ConnRef,
        queue: &str,
        tag: &str,
        prefetch: u32,
        auto_ack: bool,
        exclusive: bool,
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
                exclusive,
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

    /// Cancels a consumer: nothing more is dispatched to it, and what it holds stays outstanding,
    /// ackable by its connection until that connection closes (as in AMQP). An auto-delete queue
    /// losing its last consumer goes.
    pub fn cancel(
        &mut self,
        conn: ConnRef,
        queue: &str,
        consumer: HolderId,
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
        Ok((d, ready))
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
                let c = &q.consumers[&d.holder];
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

    /// Releases what `conn`'s consumers, retired consumers and `Get`s hold on every queue but
    /// those exclusive to it (they go whole): back to ready, to be redelivered. Returns the
    /// auto-delete queues it left without consumers; the caller removes them, after the
    /// settlements are noted here, since noting reads the queue's dead-letter exchange.
    pub(super) fn release_connection(&mut self, conn: ConnRef) -> Vec<Rc<str>> {
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
        }
        gone
    }
}
