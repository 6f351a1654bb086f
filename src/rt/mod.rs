//! The runtime seam: the one module that touches glommio.
//!
//! Contract: everything the broker needs from its runtime goes through here: starting a pinned
//! executor on its own thread, spawning local tasks, and the O_DIRECT segment files of the
//! journal ([`fs`]). glommio 0.9 is frozen upstream (shared/notes/platform.md §2); keeping it
//! behind this door means a swap (glommio-ng, monoio) rewrites this module and nothing else.
//! Functions here must be called on an executor thread started by [`run_on_executor`], except
//! [`run_on_executor`] itself.

pub mod executor;
pub mod fs;
pub mod mesh;
pub mod net;

use std::future::Future;
use std::io;

use glommio::{LocalExecutorBuilder, Placement};
use tracing::Instrument;

/// Where an executor thread runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Anywhere the scheduler likes (tests).
    Unbound,
    /// Pinned to one CPU.
    Cpu(usize),
}

/// Starts an executor on a new thread, runs `make()`'s future on it to completion and returns
/// its output. `io_memory_bytes` sizes glommio's pool of DMA buffers (registered with io_uring
/// where memlock allows); writes larger than the pool fall back to heap-allocated aligned memory.
pub fn run_on_executor<G, F, T>(pinning: Pinning, io_memory_bytes: usize, make: G) -> io::Result<T>
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let placement = match pinning {
        Pinning::Unbound => Placement::Unbound,
        Pinning::Cpu(c) => Placement::Fixed(c),
    };
    let handle = LocalExecutorBuilder::new(placement)
        .io_memory(io_memory_bytes)
        .spawn(make)
        .map_err(io::Error::from)?;
    handle.join().map_err(io::Error::from)
}

/// Spawns a task on the current executor and lets it run on its own. Like `spawn`, it runs in
/// the spawner's tracing span (its shard, its connection), so its log lines say whose it is.
pub fn spawn_detached(fut: impl Future<Output = ()> + 'static) {
    glommio::spawn_local(fut.in_current_span()).detach();
}

/// Spawns a task on the current executor; awaiting the handle yields its output. The task runs
/// in the spawner's tracing span: entering it costs a thread-local push per poll, not per
/// message, and no allocation.
pub fn spawn<T: 'static>(fut: impl Future<Output = T> + 'static) -> Task<T> {
    Task(glommio::spawn_local(fut.in_current_span()))
}

/// A spawned task.
pub struct Task<T>(glommio::Task<T>);

impl<T> Future for Task<T> {
    type Output = T;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// Yields to other tasks of the executor if this one ran past its time slice.
pub async fn yield_if_needed() {
    glommio::yield_if_needed().await
}
