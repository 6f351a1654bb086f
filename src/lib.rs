//! weir: the broker's internals, as a library so that tests and benchmarks reach them.
//!
//! The module tree reads as the architecture (DESIGN.md §3, ARCHITECTURE.md):
//! - `inspect`: offline decoding of frame streams, for debugging captures (`weir inspect`).
//!
//! Modules arriving with later work: `rt` (the one door to glommio), `storage` (journal,
//! segments, recovery), `shard`, `mesh`, `net`, `broker` (queue, dispatch and routing state
//! machines, free of I/O), `config`, `limits`, `metrics`.

pub mod inspect;
