//! One connection to one broker shard: a driver task and the handles that talk to it.
//!
//! Contract: the driver task (`Driver::run`) owns the socket, the frame decoder and encoder, the
//! connection's request ids, publish sequence numbers and every table of pending work (requests
//! by request id, publishes by sequence, consumers by tag). Nothing else touches them, so there
//! are no locks: handles (`ConnHandle`, cheap to clone, held by the `Client`, consumers and
//! deliveries) send `Command`s over an unbounded channel and wait on a oneshot for the outcome.
//! The driver drains every queued command into one output buffer before writing, so frames
//! queued together leave in one write. Sequence numbers are assigned by the driver as it encodes,
//! which is what makes them strictly increasing in wire order.
//!
//! Coalescing (`coalesce`): while the driver is busy (writing, reading, or not yet scheduled),
//! commands queue behind it, and the next drain merges runs of adjacent ones: publishes with
//! one exchange, routing key and mandatory flag become one `Publish` frame (within
//! `publish_batch_max` and `frame_size_max`; one confirm future per message as before), and acks
//! (or nacks with one `requeue`) become one frame of tag ranges. A merged settlement asks the
//! broker for an answer only if some caller still holds its `SettleFuture` (a dropped one asks
//! none, as an AMQP ack), and that one answer goes to every waiter of the run. Only adjacent
//! commands merge, so frames leave in call order; only settlements of tags the broker surely
//! holds merge, so the broker's all-or-nothing judgement of a settlement frame gives every
//! caller the answer it would have had alone. `frames_sent` and `answers_asked` count the
//! result.
//!
//! Memory is bounded where the peer could grow it: the unconfirmed publishes of a connection are
//! bounded by a semaphore of `publishes_in_flight_max` permits, taken by the publisher before
//! its command is queued and given back by the driver as confirms (or refusals) arrive; the
//! output buffer stops taking commands past `OUT_HIGH_WATER_BYTES` until the socket drains.
//! Deliveries are bounded by each consumer's prefetch (not with `auto_ack`).
//!
//! Faults handled: the broker closing or resetting the socket, an I/O error, a frame the decoder
//! refuses (fatal ones end the connection; an unknown body type from a newer broker is skipped),
//! an `Error` frame with `close = true`, replies to requests whose caller gave up (dropped),
//! deliveries for a consumer that is being cancelled (requeued with a `Nack`). When the
//! connection ends, every pending request, publish and consumer fails with
//! `ClientError::Closed(reason)`, publishers waiting for permits are woken with the same, and
//! later commands fail at once.
//!
//! Files, one phase each: this one (the handles, the commands they send, what a connection
//! shares with them), `handshake` (TCP, `Hello`/`Welcome`, spawning the driver), `driver` (the
//! task's read/write/command loop, frame dispatch, failing everything at the end), `requests`
//! (request ids and the replies they await), `confirms` (publish sequences, confirms, returns
//! and refusals), `consumers` (consumer slots, delivery push routing, cancels, settlements),
//! `coalesce` (merging adjacent publishes and settlements into one frame each).
//! Deliveries leave this module as `RawDelivery`; it does not depend on the consumer module.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};
use weir_protocol::wire::{self, BodyT, Durability};
use weir_protocol::InFrame;

use crate::error::{ClientError, CloseReason};
use crate::message::Limits;

mod coalesce;
mod confirms;
mod consumers;
mod driver;
mod handshake;
mod requests;

pub(crate) use consumers::RawDelivery;
pub(crate) use handshake::open;

/// Output bytes beyond which the driver stops taking commands until the socket drains: a broker
/// that stops reading (TCP backpressure) slows callers instead of growing this buffer.
const OUT_HIGH_WATER_BYTES: usize = 1 << 20;
/// Receive buffer growth per read: many frames per read under load.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// How long a closing driver keeps trying to write what it owes before dropping the socket.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

/// What the broker said in `Welcome`, for one connection.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// The broker's version, e.g. "0.1.0".
    pub broker_version: String,
    /// The protocol version spoken on this connection (the one this client asked for).
    pub protocol_version: u16,
    /// Number of shards (pinned cores) the broker runs.
    pub shard_count: u16,
    /// The shard that accepted this connection.
    pub shard: u16,
    /// TCP port of each shard, indexed by shard number.
    pub shard_ports: Vec<u16>,
    /// The bounds this connection must respect; the client checks them before sending.
    pub limits: Limits,
    /// The broker's fsync policy for persistent messages.
    pub durability: Durability,
    /// The broker's id for this connection, as it appears in its logs.
    pub connection_id: u64,
}

/// The outcome of one confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    /// The publish sequence number the broker confirmed (per connection).
    pub sequence: u64,
    /// What the confirm promises: in the journal and synced (`Always`), or weaker.
    pub durability: Durability,
    /// An idempotent producer's re-send of a message already stored.
    pub duplicate: bool,
}

pub(crate) type Reply = oneshot::Sender<Result<InFrame, ClientError>>;
pub(crate) type ConfirmTx = oneshot::Sender<Result<Confirmation, ClientError>>;
/// Where a consumer's deliveries go: raw, as read off the wire; the consumer module makes them
/// `Delivery`s (with a handle on this connection) as the application takes them.
pub(crate) type DeliveryTx = mpsc::UnboundedSender<Result<RawDelivery, ClientError>>;

pub(crate) enum Settle {
    Ack,
    /// `delay_ms`: a retry no sooner than that (`Nack.delay_ms`).
    Nack {
        requeue: bool,
        delay_ms: Option<u32>,
    },
    Reject {
        requeue: bool,
    },
}

pub(crate) enum Command {
    /// Any request answered by one reply frame (or `Error`) echoing its request id.
    Request { body: BodyT, reply: Reply },
    /// One `Publish` frame; `confirms[i]` is resolved by the confirm of `messages[i]`. The
    /// publisher already holds `messages.len()` permits.
    Publish {
        exchange: String,
        routing_key: String,
        mandatory: bool,
        messages: Vec<Bytes>,
        confirms: Vec<ConfirmTx>,
    },
    /// A `Consume` whose consumer is registered before the frame leaves, so deliveries that
    /// overtake the `ConsumeOk` find it.
    Consume {
        body: wire::ConsumeT,
        deliveries: DeliveryTx,
        reply: Reply,
    },
    /// Cancels a consumer; `requeue` are deliveries it received but never handed out.
    Cancel {
        tag: String,
        requeue: Vec<u64>,
        reply: Option<Reply>,
    },
    /// A settlement; with a reply it asks the broker for an `Ok` once it is durable.
    Settle {
        kind: Settle,
        tags: Vec<u64>,
        reply: Option<Reply>,
    },
    /// An orderly goodbye: `Close`, then the broker's `Ok`, then the broker closes.
    Close { reply: Reply },
    /// Drop the connection now (the `Client` was dropped).
    Shutdown,
    /// One idempotent producer's message under its own sequence (`Publish.producer_id`): the
    /// producer numbers it, so a re-send after a reconnect carries the same number. Never merged
    /// with other publishes. The publisher already holds a permit.
    PublishAs {
        producer_id: u64,
        sequence: u64,
        exchange: String,
        routing_key: String,
        mandatory: bool,
        message: Bytes,
        confirm: ConfirmTx,
    },
}

struct Shared {
    info: ServerInfo,
    /// Unconfirmed publishes this connection may still send.
    permits: Semaphore,
    /// Set once, by the driver, as it stops.
    closed: OnceLock<CloseReason>,
    /// Frames the driver has encoded for the broker: what coalescing saves, readable by users.
    frames_sent: AtomicU64,
    /// Of those, the frames that asked the broker for an answer (a non-zero request id).
    answers_asked: AtomicU64,
}

/// A handle on one connection's driver task.
#[derive(Clone)]
pub(crate) struct ConnHandle {
    tx: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("shard", &self.shared.info.shard)
            .field("connection_id", &self.shared.info.connection_id)
            .finish()
    }
}

impl ConnHandle {
    /// Whether two handles drive the same connection (delivery tags are per connection).
    pub(crate) fn same_connection(&self, other: &ConnHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub(crate) fn info(&self) -> &ServerInfo {
        &self.shared.info
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.shared.info.limits
    }

    /// The error every operation on a dead connection gets.
    pub(crate) fn closed_error(&self) -> ClientError {
        ClientError::Closed(
            self.shared
                .closed
                .get()
                .cloned()
                .unwrap_or(CloseReason::Local),
        )
    }

    pub(crate) fn send(&self, command: Command) -> Result<(), ClientError> {
        self.tx.send(command).map_err(|_| self.closed_error())
    }

    /// Sends a request and waits for its reply; an `Error` reply is `Err(Refused)`.
    pub(crate) async fn request(&self, body: BodyT) -> Result<InFrame, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request { body, reply })?;
        self.wait(rx).await
    }

    pub(crate) async fn wait<T>(
        &self,
        rx: oneshot::Receiver<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        // A dropped sender means the driver stopped before answering.
        rx.await.unwrap_or_else(|_| Err(self.closed_error()))
    }

    /// Takes `n` publish permits, waiting while the connection has `publishes_in_flight_max`
    /// publishes unconfirmed. The driver gives them back one per confirm.
    pub(crate) async fn take_permits(&self, n: u32) -> Result<(), ClientError> {
        match self.shared.permits.acquire_many(n).await {
            Ok(permit) => {
                permit.forget();
                Ok(())
            }
            Err(_) => Err(self.closed_error()),
        }
    }

    /// Publishes sent (or queued to send) and not yet confirmed, refused or returned.
    pub(crate) fn unconfirmed(&self) -> usize {
        let max = self.shared.info.limits.publishes_in_flight_max as usize;
        max.min(Semaphore::MAX_PERMITS)
            .saturating_sub(self.shared.permits.available_permits())
    }

    /// Frames this connection has encoded for the broker (every kind, handshake excluded).
    pub(crate) fn frames_sent(&self) -> u64 {
        self.shared.frames_sent.load(Ordering::Relaxed)
    }

    /// Frames this connection has sent that asked the broker for an answer.
    pub(crate) fn answers_asked(&self) -> u64 {
        self.shared.answers_asked.load(Ordering::Relaxed)
    }

    pub(crate) fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.get().is_some()
    }
}
