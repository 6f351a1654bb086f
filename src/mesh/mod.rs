//! What crosses between shards, and how: the plain values every layer names (`types`), every
//! message as plain `Send` data (`msg`), and the batching over the channel mesh (this module).
//! The bottom of the broker's layers: `broker`, `net` and `shard` depend on it, it on nothing of
//! theirs.
//!
//! Contract: owned by one shard (its `Mesh`); `send` only appends to the batch for a peer and
//! rings the flusher, so everything a shard produces while one task runs leaves as one batch:
//! one channel item and at most one wake-up of the peer, however many messages. The flusher task
//! waits for room on a full channel (backpressure from a slow peer); the receiver tasks hand each
//! arriving batch to the shard. Message bytes inside travel as `Bytes`: a reference count moves,
//! the bytes do not.

use std::cell::RefCell;

pub mod msg;
pub mod types;

pub use msg::MeshMsg;

use crate::rt::executor::{doorbell, Doorbell, DoorbellWaiter};
use crate::rt::mesh::{MeshReceiver, MeshSender};

pub type Batch = Vec<MeshMsg>;

pub struct Mesh {
    senders: Vec<Option<MeshSender<Batch>>>,
    outgoing: RefCell<Vec<Batch>>,
    bell: Doorbell,
}

impl Mesh {
    /// The mesh of one shard, and the waiter its flusher task waits on.
    pub fn new(senders: Vec<Option<MeshSender<Batch>>>) -> (Mesh, DoorbellWaiter) {
        let (bell, waiter) = doorbell();
        let outgoing = RefCell::new(senders.iter().map(|_| Vec::new()).collect());
        (
            Mesh {
                senders,
                outgoing,
                bell,
            },
            waiter,
        )
    }

    /// Queues `msg` for `peer`; it leaves with the next batch.
    pub fn send(&self, peer: u16, msg: MeshMsg) {
        self.outgoing.borrow_mut()[usize::from(peer)].push(msg);
        self.bell.ring();
    }

    /// The flusher: sends each peer's batch when there is one. Runs until the shard stops.
    pub async fn flush_forever(&self, waiter: DoorbellWaiter) {
        while waiter.wait().await {
            for peer in 0..self.senders.len() {
                let batch = std::mem::take(&mut self.outgoing.borrow_mut()[peer]);
                if batch.is_empty() {
                    continue;
                }
                let Some(sender) = &self.senders[peer] else {
                    continue;
                };
                if sender.send(batch).await.is_err() {
                    tracing::debug!(peer, "mesh peer has stopped; batch dropped");
                }
            }
        }
    }
}

/// Receives batches from one peer until it stops, handing each to `handle`.
pub async fn receive_forever(receiver: MeshReceiver<Batch>, mut handle: impl FnMut(Batch)) {
    while let Some(batch) = receiver.recv().await {
        handle(batch);
    }
}
