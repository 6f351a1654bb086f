//! weir-client: an async client for the weir broker, for tokio.
//!
//! Connect with the `Hello`/`Welcome` handshake; declare, delete, purge, describe and list
//! queues; publish one message or a batch, each message resolving on its confirm; consume as a
//! `Stream` of deliveries settled with `ack`, `nack` and `reject`; `get` one message. All errors
//! are one `ClientError`.
//!
//! Shard-aware by default: the broker runs one shard per core, each owning some queues. The
//! client opens one connection per shard and sends each queue's traffic to its owner (the same
//! placement function as the broker's), so the common path never crosses cores in the broker.
//! `ClientOptions::single_connection()` uses one connection and lets the broker forward.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weir_client::ClientError> {
//! use weir_client::{Client, ClientOptions, ConsumeOptions, Message, QueueOptions};
//!
//! let client = Client::connect("127.0.0.1:5680", ClientOptions::default()).await?;
//! client.declare("jobs", QueueOptions::default()).await?;
//! let confirm = client.publish("jobs", Message::new("work")).await?;
//! confirm.await?; // durable once this returns
//! let mut jobs = client.consume("jobs", ConsumeOptions::default()).await?;
//! while let Some(delivery) = jobs.recv().await {
//!     let delivery = delivery?;
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Module map: `client` (routing, the public API), `conn` (one connection's driver task: the
//! only owner of its socket and pending tables), `consumer` (the delivery stream and
//! settlements), `message` (building messages, limits), `queue` (queue values), `error`.

mod client;
mod conn;
mod consumer;
mod error;
mod message;
mod queue;

pub use weir_protocol as protocol;
pub use weir_protocol::wire::{Durability, ErrorCode};

pub use client::{placement, Client, ClientOptions, PublishFuture, PublishOptions};
pub use conn::{Confirmation, ServerInfo};
pub use consumer::{ConsumeOptions, Consumer, Delivery, SettleFuture};
pub use error::{ClientError, CloseReason, ReturnedMessage};
pub use message::{Limits, Message};
pub use queue::{Overflow, QueueArguments, QueueInfo, QueueOptions};
