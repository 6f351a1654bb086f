//! The channel mesh: one bounded single-producer single-consumer channel for every ordered pair of
//! shards. This is the only way data crosses cores.
//!
//! Contract: `full_mesh` runs on the main thread and returns one `MeshEnds` per shard (`Send`);
//! each shard calls `connect` on its own executor, which waits until every peer has connected its
//! ends, then sends with `MeshSender::send` and receives with `MeshReceiver::recv`. A channel holds
//! at most `capacity` items; a sender to a full channel waits (backpressure between shards). Items
//! should be batches: a wake-up of a parked peer costs tens of microseconds (an eventfd), so one
//! item per message would spend the core on wake-ups.

use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};

/// One shard's unconnected ends of the mesh, indexed by peer shard (`None` for itself).
pub struct MeshEnds<T: Send + 'static> {
    senders: Vec<Option<SharedSender<T>>>,
    receivers: Vec<Option<SharedReceiver<T>>>,
}

/// Builds the channels of `shards` shards, each holding at most `capacity` items.
pub fn full_mesh<T: Send + 'static>(shards: usize, capacity: usize) -> Vec<MeshEnds<T>> {
    let mut ends: Vec<MeshEnds<T>> = (0..shards)
        .map(|_| MeshEnds {
            senders: (0..shards).map(|_| None).collect(),
            receivers: (0..shards).map(|_| None).collect(),
        })
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(capacity);
                ends[from].senders[to] = Some(tx);
                ends[to].receivers[from] = Some(rx);
            }
        }
    }
    ends
}

/// Sends to one peer.
pub struct MeshSender<T: Send + 'static>(ConnectedSender<T>);
/// Receives from one peer.
pub struct MeshReceiver<T: Send + 'static>(ConnectedReceiver<T>);

impl<T: Send + 'static> MeshSender<T> {
    /// Waits for room, then sends. `Err` when the peer has stopped (the item is dropped).
    pub async fn send(&self, item: T) -> Result<(), ()> {
        self.0.send(item).await.map_err(|_| ())
    }
}

impl<T: Send + 'static> MeshReceiver<T> {
    /// The next item; `None` once the peer has stopped.
    pub async fn recv(&self) -> Option<T> {
        self.0.recv().await
    }
}

impl<T: Send + 'static> MeshEnds<T> {
    /// Connects every end on the calling executor, all at once: each connect waits for its peer,
    /// so connecting one by one could wait on a peer that is itself waiting on us.
    pub async fn connect(self) -> (Vec<Option<MeshSender<T>>>, Vec<Option<MeshReceiver<T>>>) {
        let senders: Vec<_> = self
            .senders
            .into_iter()
            .map(|s| s.map(|s| glommio::spawn_local(async move { MeshSender(s.connect().await) })))
            .collect();
        let receivers: Vec<_> = self
            .receivers
            .into_iter()
            .map(|r| {
                r.map(|r| glommio::spawn_local(async move { MeshReceiver(r.connect().await) }))
            })
            .collect();
        let mut connected_senders = Vec::with_capacity(senders.len());
        for s in senders {
            connected_senders.push(match s {
                Some(task) => Some(task.await),
                None => None,
            });
        }
        let mut connected_receivers = Vec::with_capacity(receivers.len());
        for r in receivers {
            connected_receivers.push(match r {
                Some(task) => Some(task.await),
                None => None,
            });
        }
        (connected_senders, connected_receivers)
    }
}
