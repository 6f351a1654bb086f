//! Pinned executors for shards, timers, and a doorbell between tasks of one executor.
//!
//! Contract: `spawn_pinned` runs on the main thread and starts one executor thread pinned to one
//! CPU (`Placement::Fixed`), whose blocking-pool thread is pinned with it. Everything else runs on
//! an executor thread. A `Doorbell` never crosses threads: it wakes a task of the same shard
//! (for example a connection's writer when a delivery is queued for it).

use std::io;
use std::time::Duration;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::{LocalExecutorBuilder, Placement};

/// How to start one shard's executor.
#[derive(Clone, Debug)]
pub struct ExecutorOptions {
    /// Thread name, e.g. "weir-shard-0".
    pub name: String,
    /// The CPU it is pinned to.
    pub cpu: usize,
    /// glommio's DMA buffer pool, bytes.
    pub io_memory_bytes: usize,
    /// Spin this long before parking when idle (zero: park at once).
    pub spin_before_park: Duration,
}

/// A running executor thread; `join` waits for its future's output.
pub struct ExecutorHandle<T: Send + 'static>(glommio::ExecutorJoinHandle<T>);

impl<T: Send + 'static> ExecutorHandle<T> {
    pub fn join(self) -> io::Result<T> {
        self.0.join().map_err(io::Error::from)
    }
}

/// Starts an executor thread pinned to `options.cpu` and runs `make()`'s future on it.
pub fn spawn_pinned<G, F, T>(options: &ExecutorOptions, make: G) -> io::Result<ExecutorHandle<T>>
where
    G: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    let mut builder = LocalExecutorBuilder::new(Placement::Fixed(options.cpu))
        .name(&options.name)
        .io_memory(options.io_memory_bytes);
    if !options.spin_before_park.is_zero() {
        builder = builder.spin_before_park(options.spin_before_park);
    }
    builder
        .spawn(make)
        .map(ExecutorHandle)
        .map_err(io::Error::from)
}

/// Sleeps on the executor's timer (resolution: the timer wheel, ~100 µs at best on a VM).
pub async fn sleep(duration: Duration) {
    glommio::timer::sleep(duration).await;
}

/// Wakes one waiting task of the same executor. Rings coalesce: ringing an already rung bell
/// does nothing, so a burst of events costs one wake-up.
pub struct Doorbell {
    tx: LocalSender<()>,
}

/// The waiting side of a `Doorbell`.
pub struct DoorbellWaiter {
    rx: LocalReceiver<()>,
}

pub fn doorbell() -> (Doorbell, DoorbellWaiter) {
    let (tx, rx) = local_channel::new_bounded(1);
    (Doorbell { tx }, DoorbellWaiter { rx })
}

impl Doorbell {
    pub fn ring(&self) {
        // Full means already rung; closed means the waiter is gone. Neither needs anything more.
        let _ = self.tx.try_send(());
    }
}

impl DoorbellWaiter {
    /// Waits for a ring; false once every `Doorbell` is dropped.
    pub async fn wait(&self) -> bool {
        self.rx.recv().await.is_some()
    }
}
