//! The broker's state machines, free of I/O.
//!
//! Contract: plain data owned by one shard; no sockets, files, executors or clocks (time comes in
//! as an argument). The I/O shells (connections, the journal, the shard loop) feed them events and
//! carry out what they return, so every rule here is tested without a runtime.
//!
//! - `catalog`: durable queue declarations and deletions as journal records.
//! - `control`: the control plane: the writer's authoritative routing table (shard 0) and every
//!   shard's read copy.
//! - `host`: the queues one shard owns: declarations, consumers by connection, settle accounting.
//! - `control_wait`: a client's routing change waiting for every shard's copy and its commit.
//! - `dead_letter`: dead letters planned: which need a read-back, where each routes, which shards,
//!   and which originals wait for their copies' confirms.
//! - `deaths`: a message's dead-letter history (its encoding, one more death, cycles).
//! - `durability`: which replies wait for their commit, what a failed commit makes of them.
//! - `cooling`: which journaled messages leave memory once durable (the cache's rule).
//! - `expiry`: queue expiry (`expires_ms`): when an unused queue goes, and its usage records.
//! - `ops`: the commands a connection's shard sends a queue's owning shard, and their execution.
//! - `routing`: exchanges and bindings, and the queues a routing key reaches (direct, topic, fanout);
//!   the control-plane writer's authoritative table and every shard's copy.
//! - `orphan_bindings`: bindings whose queue is gone, for the writer to remove.
//! - `read_back`: a payload read back from the journal: a delivery completed from its record, or a requeue.
//! - `producers`: idempotent producers' windows: a re-sent publish confirmed as a duplicate, not stored twice.
//! - `reclaim`: which journal segment goes next, and the catalog restated before the first.
//! - `rebuild`: a shard's queues rebuilt from its journal's replay (a decision table).
//! - `stored`: a message as a queue holds it (payload in memory or only in the journal) and
//!   the shard's payload cache budget.
//! - `queue`: one queue's ready messages, consumers (round robin with prefetch credit),
//!   outstanding deliveries, acks, nacks, redelivery, overflow, TTL and poison messages.

pub mod catalog;
pub mod control;
pub mod control_wait;
pub mod cooling;
pub mod dead_letter;
pub mod deaths;
pub mod durability;
pub mod expiry;
pub mod host;
pub mod ops;
pub mod orphan_bindings;
pub mod producers;
pub mod queue;
pub mod read_back;
pub mod rebuild;
pub mod reclaim;
pub mod routing;
pub mod stored;
