//! weir-client: an async client for the weir broker, for tokio.
//!
//! Connect with the `Hello`/`Welcome` handshake; declare, delete, purge, describe and list
//! queues; publish one message or a batch, each message resolving on its confirm; consume as a
//! `Stream` of deliveries settled with `ack`, `nack` and `reject`; `get` one message; declare
//! direct, topic and fanout exchanges and bind queues to them; request-reply with a
//! [`Requester`]. All errors are one `ClientError`.
//!
//! Shard-aware by default: the broker runs one shard per core, each owning some queues. The
//! client opens one connection per shard and sends each queue's traffic to its owner (the same
//! placement function as the broker's), so the common path never crosses cores in the broker.
//! `ClientOptions::single_connection()` uses one connection and lets the broker forward.
//!
//! The per-message idiom is cheap without batching by hand: `publish` calls and `ack`s made
//! while a connection is busy are merged as they leave, adjacent publishes to one route into one
//! `Publish` frame and adjacent acks into one `Ack` of tag ranges, which asks the broker for no
//! answer unless some caller still awaits its `SettleFuture` (drop it for AMQP's fire-and-forget
//! ack; awaited ones each get their own exact answer). [`Consumer::recv_many`] takes every
//! delivery already arrived in one call and [`Delivery::ack_all`] acks a batch in one frame;
//! [`Client::frames_sent`] counts the frames that left.
//!
//! # Example
//!
//! A durable queue, 1000 persistent messages published in batches with their confirms
//! pipelined, then consumed and acked. It needs a running broker: from the repository root,
//! `cargo run --release --bin weir -- serve` starts one on 127.0.0.1:5680 (data in
//! `./weir-data`, one shard per CPU, `fsync = always`). Then this is the `work_queue` example's
//! core (`cargo run -p weir-client --example work_queue`); see also the `producer`, `worker`
//! and `bench` examples.
//!
//! ```no_run
//! use weir_client::{Client, ClientError, ClientOptions, ConsumeOptions, Message, QueueOptions};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), ClientError> {
//!     let client = Client::connect("127.0.0.1:5680", ClientOptions::default()).await?;
//!     println!("{} shards", client.server().shard_count);
//!
//!     // Durable by default: the declaration survives restarts, and so do persistent messages.
//!     client.declare("jobs", QueueOptions::default()).await?;
//!
//!     // Publish in batches; each message gets a future that resolves on its confirm. Keeping
//!     // the futures and awaiting them later keeps many publishes in flight (pipelined), so they
//!     // share the broker's group commits.
//!     let mut confirms = Vec::new();
//!     for batch in 0..10 {
//!         let messages = (0..100).map(|i| Message::new(format!("job {batch}-{i}")));
//!         confirms.extend(client.publish_batch("jobs", messages).await?);
//!     }
//!     for confirm in confirms {
//!         confirm.await?; // in the journal and fdatasynced (`fsync = always`)
//!     }
//!
//!     // Consume with a prefetch window: at most 100 unacked deliveries at a time.
//!     let options = ConsumeOptions { prefetch: 100, ..ConsumeOptions::default() };
//!     let mut jobs = client.consume("jobs", options).await?;
//!     let mut acks = Vec::new();
//!     while acks.len() < 1000 {
//!         let Some(delivery) = jobs.recv().await else { break };
//!         let delivery = delivery?;
//!         println!("{}", String::from_utf8_lossy(delivery.body()));
//!         acks.push(delivery.ack()); // sent now; its answer is awaited below
//!     }
//!     for ack in acks {
//!         ack.await?;
//!     }
//!     jobs.cancel().await?;
//!     client.close().await
//! }
//! ```
//!
//! # Exchanges, pub/sub and request-reply
//!
//! ```no_run
//! use weir_client::{
//!     Client, ClientError, ClientOptions, ConsumeOptions, ExchangeKind, ExchangeOptions, Message,
//!     PublishOptions, QueueOptions,
//! };
//!
//! # async fn example(client: Client) -> Result<(), ClientError> {
//! // Pub/sub: a topic exchange, and a private queue per subscriber (server-named, exclusive,
//! // auto-delete: it goes with this connection).
//! client.declare_exchange("logs", ExchangeKind::Topic, ExchangeOptions::default()).await?;
//! let private = QueueOptions { durable: false, exclusive: true, auto_delete: true, ..QueueOptions::default() };
//! let mine = client.declare("", private).await?.name;
//! client.bind(&mine, "logs", "*.error").await?; // every shard routes by it once this returns
//! let to_logs = PublishOptions { exchange: "logs".into(), mandatory: false };
//! client.publish_with(&to_logs, "db.error", Message::new("disk full")).await?.await?;
//! let mut errors = client.consume(&mine, ConsumeOptions::default()).await?;
//! let first = errors.recv().await.expect("open")?;
//! first.ack().await?;
//!
//! // Request-reply: a private reply queue, correlation ids, a timeout, many in flight.
//! let requester = client.requester().await?;
//! let reply = requester.request("rpc", "upper", Message::new("hello")).await?;
//! println!("{}", String::from_utf8_lossy(reply.body()));
//! # Ok(())
//! # }
//! ```
//!
//! A responder consumes its request queue and publishes each answer to the request's
//! `reply_to` with its `correlation_id` (the `responder` example).
//!
//! # Errors and delivery guarantees
//!
//! Every fallible call returns [`ClientError`]. A confirm (`Ok` from a [`PublishFuture`]) means
//! what [`Confirmation::durability`] says: under the broker's default `fsync = always`, the
//! message is in the journal and synced, and survives a crash. Consuming is at-least-once:
//! deliveries not acked when a connection dies go back to their queue, marked
//! [`Delivery::redelivered`]. The client does not reconnect by itself; an
//! [`IdempotentProducer`] does: it re-sends unconfirmed messages under their sequences after a
//! reconnect, and the broker stores each at most once per queue (exactly-once publishing, with
//! re-sends confirmed as [`Confirmation::duplicate`]).
//!
//! Module map: `client` (routing, the public API), `conn` (one connection's driver task: the
//! only owner of its socket and pending tables; it hands raw deliveries up), `consumer` (the delivery stream and
//! settlements), `message` (building messages, limits), `queue` (queue values), `exchange`
//! (exchanges and bindings), `rpc` (request-reply), `error`, `producer` (the idempotent
//! producer: its own numbering, unconfirmed messages kept, reconnect and re-send).

#![warn(missing_docs)]

mod client;
mod conn;
mod consumer;
mod error;
mod exchange;
mod message;
mod observe;
mod producer;
mod queue;
mod rpc;

/// The wire protocol crate (frames, codec, generated schema types), for what this crate does not
/// wrap, such as reading a [`Delivery::message`] in place.
pub use weir_protocol as protocol;
/// The fsync policy a confirm was given under, and the broker's error codes.
pub use weir_protocol::wire::{Durability, ErrorCode};

pub use client::{placement, BrokerStatus, Client, ClientOptions, PublishFuture, PublishOptions};
pub use conn::{Confirmation, ServerInfo};
pub use consumer::{ConsumeOptions, Consumer, Death, Delivery, SettleFuture};
pub use error::{ClientError, CloseReason, ReturnedMessage};
pub use exchange::{BindingInfo, ExchangeInfo, ExchangeKind, ExchangeOptions};
pub use message::{Limits, Message};
pub use observe::{ConnectionInfo, ConsumerInfo, Histogram};
pub use producer::{IdempotentProducer, ProducerFuture, ProducerOptions};
pub use queue::{Overflow, QueueArguments, QueueInfo, QueueOptions};
pub use rpc::{Requester, REQUEST_TIMEOUT_DEFAULT};
