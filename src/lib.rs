//! weir: the broker's internals, as a library so that tests and benchmarks reach them.
//!
//! The module tree reads as the architecture (DESIGN.md §3, ARCHITECTURE.md):
//! - `admin`: the admin HTTP listener on its own thread (`/metrics`, the JSON API, `/health`,
//!   `/ready`, the dashboard), a client of the broker's own main listener.
//! - `broker`: the state machines (queue, queue host, routing table, the control plane, journal
//!   records of the catalog, and every decision the shard shell drives), free of I/O: plain
//!   structs that take events and return what to do.
//! - `cli`: the client commands of the `weir` binary (`queue`, `publish`, `consume`, `status`,
//!   `top`).
//! - `config`: `weir serve`'s configuration: defaults, TOML file, `WEIR_*` variables, flags.
//! - `inspect`: offline decoding of frame streams, for debugging captures (`weir inspect`).
//! - `logs`: `weir serve`'s log subscriber: text or JSON lines, spans naming shard and connection.
//! - `limits`: every limit of every layer in one registry, with the relations between layers
//!   asserted.
//! - `mesh`: what crosses between shards, the bottom of the broker's layers: the plain values
//!   every layer names (`mesh::types`), every message as plain `Send` data (`mesh::msg`), and
//!   the transport (batches per peer).
//! - `net`: connections: frames -> typed commands (`command`), the session state machine, and
//!   its I/O shell (`connection`).
//! - `rt`: the one door to glommio: executors, tasks, O_DIRECT segment files.
//! - `server`: `weir serve` on the main thread: CPUs, data-directory layout, listeners, shards.
//! - `shard`: one pinned executor, the I/O shell that drives the broker's state machines: accept,
//!   the worker, journal staging, read-back, timers, orderly shutdown.
//! - `storage`: the journal: segments, records, group commit, recovery, reclaim.
//!
//! - `datadir`: the data directory's layout (`layout.toml`, shard count and generation) and
//!   where each shard's journal lives.
//! - `reshard`: `weir data reshard`, the offline move of every queue to a new shard count.
//!
//! Arriving with later work: `metrics`.

/// Fails the build if `$t` is `Send`: the per-core boundary as a type fact. Were `$t` `Send`,
/// both blanket impls would apply to it and `some_item` could not be inferred.
macro_rules! assert_not_send {
    ($t:ty) => {
        const _: fn() = || {
            trait AmbiguousIfSend<A> {
                fn some_item() {}
            }
            impl<T: ?Sized> AmbiguousIfSend<()> for T {}
            #[allow(dead_code)]
            struct IsSend;
            impl<T: ?Sized + Send> AmbiguousIfSend<IsSend> for T {}
            let _ = <$t as AmbiguousIfSend<_>>::some_item;
        };
    };
}

pub mod admin;
pub mod broker;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod inspect;
pub mod limits;
pub mod logs;
pub mod mesh;
pub mod net;
pub mod reshard;
pub mod rt;
pub mod server;
pub mod shard;
pub mod storage;
