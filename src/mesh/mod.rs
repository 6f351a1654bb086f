//! What crosses between shards, and how: the plain values every layer names (`types`), every
//! message as plain `Send` data (`msg`), and the batching over the channel mesh (this module).
//! The bottom of the broker's layers: `broker`, `net` and `shard` depend on it, it on nothing of
//! theirs.
//!
//! Contract: owned by one shard (its `Mesh`); `send` only appends to the queue for a peer and
//! rings the flusher, so everything a shard produces while one task runs leaves as one batch
//! (or several of `mesh_batch_max` messages): one channel item and at most one wake-up of the
//! peer per batch, however many messages. The flusher task waits for room on a full channel
//! (backpressure from a slow peer); what is queued meanwhile is counted in bytes
//! (`outgoing_bytes`, by `weight`), so the shard can stop its connections reading past
//! `mesh_outgoing_bytes_max`. The receiver tasks hand each arriving batch to the shard and wait
//! while the shard has no room for more work (`work_bytes_max`), so backpressure crosses the
//! channel to the sender. Message bytes inside travel as `Bytes`: a reference count moves, the
//! bytes do not.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::mem::size_of;

pub mod msg;
pub mod types;

pub use msg::MeshMsg;

use crate::rt::executor::{doorbell, Doorbell, DoorbellWaiter};
use crate::rt::mesh::{MeshReceiver, MeshSender};
use msg::{Op, PublishItem, PublishOutcome, Pushed, PushedDelivery, Reply, SettleItem};

pub type Batch = Vec<MeshMsg>;

/// About how many bytes of memory `msg` holds: its fixed part, and its payloads and names where
/// it carries many (publishes, deliveries, their outcomes, settlements). What the byte bounds on
/// queued work (`work_bytes_max`, `mesh_outgoing_bytes_max`) count.
pub fn weight(msg: &MeshMsg) -> usize {
    let item = |i: &PublishItem| {
        size_of::<PublishItem>()
            + i.bytes.len()
            + i.queue.len()
            + i.exchange.len()
            + i.routing_key.len()
    };
    size_of::<MeshMsg>()
        + match msg {
            MeshMsg::Request {
                op: Op::Publish(items),
                ..
            } => items.iter().map(item).sum(),
            MeshMsg::Request {
                op: Op::Settle(items),
                ..
            } => items.len() * size_of::<SettleItem>(),
            MeshMsg::Reply {
                reply: Reply::Published(outcomes),
                ..
            } => {
                outcomes.len() * size_of::<PublishOutcome>()
                    + outcomes
                        .iter()
                        .filter_map(|o| o.returned.as_ref())
                        .map(item)
                        .sum::<usize>()
            }
            MeshMsg::Push {
                push: Pushed::Deliver { deliveries, .. },
                ..
            } => deliveries
                .iter()
                .map(|d| size_of::<PushedDelivery>() + d.bytes.len() + d.queue.len())
                .sum(),
            _ => 0,
        }
}

pub struct Mesh {
    senders: Vec<Option<MeshSender<Batch>>>,
    outgoing: RefCell<Vec<VecDeque<MeshMsg>>>,
    /// The `weight` of everything queued in `outgoing` or being handed to a channel.
    outgoing_bytes: Cell<usize>,
    batch_max: usize,
    bell: Doorbell,
}

impl Mesh {
    /// The mesh of one shard, and the waiter its flusher task waits on. A batch carries at most
    /// `batch_max` messages (`mesh_batch_max`).
    pub fn new(
        senders: Vec<Option<MeshSender<Batch>>>,
        batch_max: usize,
    ) -> (Mesh, DoorbellWaiter) {
        let (bell, waiter) = doorbell();
        let outgoing = RefCell::new(senders.iter().map(|_| VecDeque::new()).collect());
        (
            Mesh {
                senders,
                outgoing,
                outgoing_bytes: Cell::new(0),
                batch_max: batch_max.max(1),
                bell,
            },
            waiter,
        )
    }

    /// Queues `msg` for `peer`; it leaves with the next batch.
    pub fn send(&self, peer: u16, msg: MeshMsg) {
        self.outgoing_bytes
            .set(self.outgoing_bytes.get() + weight(&msg));
        self.outgoing.borrow_mut()[usize::from(peer)].push_back(msg);
        self.bell.ring();
    }

    /// Bytes queued for peers and not yet in a channel: the shard's connections stop reading
    /// while this is over `mesh_outgoing_bytes_max`.
    pub fn outgoing_bytes(&self) -> usize {
        self.outgoing_bytes.get()
    }

    /// The flusher: sends each peer's queued messages, in batches of at most `batch_max`, a
    /// batch per peer in turn, until nothing is queued; a full channel makes it wait (and what
    /// waits behind it stays counted). `sent` is called after each batch has left. Runs until the
    /// shard stops.
    pub async fn flush_forever(&self, waiter: DoorbellWaiter, sent: impl Fn()) {
        while waiter.wait().await {
            loop {
                let mut any = false;
                for peer in 0..self.senders.len() {
                    let batch: Batch = {
                        let mut outgoing = self.outgoing.borrow_mut();
                        let queue = &mut outgoing[peer];
                        let n = queue.len().min(self.batch_max);
                        queue.drain(..n).collect()
                    };
                    if batch.is_empty() {
                        continue;
                    }
                    any = true;
                    let bytes: usize = batch.iter().map(weight).sum();
                    if let Some(sender) = &self.senders[peer] {
                        if sender.send(batch).await.is_err() {
                            tracing::debug!(peer, "mesh peer has stopped; batch dropped");
                        }
                    }
                    self.outgoing_bytes
                        .set(self.outgoing_bytes.get().saturating_sub(bytes));
                    sent();
                }
                if !any {
                    break;
                }
            }
        }
    }
}

/// Receives batches from one peer until it stops, handing each to `handle`; after each it
/// awaits `room`, so a shard that has more work than it may queue stops taking batches: the
/// channel fills and the peer's flusher waits.
pub async fn receive_forever<R: std::future::Future<Output = ()>>(
    receiver: MeshReceiver<Batch>,
    mut handle: impl FnMut(Batch),
    room: impl Fn() -> R,
) {
    while let Some(batch) = receiver.recv().await {
        handle(batch);
        room().await;
    }
}
