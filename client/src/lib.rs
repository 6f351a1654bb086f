//! weir-client: an async client for the weir broker, for tokio.
//!
//! Contract (arrives with the broker work): connect with the `Hello`/`Welcome` handshake; declare,
//! delete and purge queues; publish one message or a batch, each resolving on its confirm; consume
//! as a `Stream` of deliveries with ack, nack and reject; `get`. Shard-aware: one connection per
//! shard, each queue's traffic sent to the shard that owns it.
//!
//! Today it re-exports the protocol crate it will speak, so applications can already build
//! messages (`Encoder::message`) and read frames with the same code the broker uses.

pub use weir_protocol as protocol;
