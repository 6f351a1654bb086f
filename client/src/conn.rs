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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use weir_protocol::wire::{self, Body, BodyT, Durability, ErrorCode, Range};
use weir_protocol::{Encoder, FrameDecoder, InFrame, PublishItem};

use crate::consumer::Delivery;
use crate::error::{ClientError, CloseReason, ReturnedMessage};
use crate::message::Limits;

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
pub(crate) type DeliveryTx = mpsc::UnboundedSender<Result<Delivery, ClientError>>;

pub(crate) enum Settle {
    Ack,
    Nack { requeue: bool },
    Reject { requeue: bool },
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
}

struct Shared {
    info: ServerInfo,
    /// Unconfirmed publishes this connection may still send.
    permits: Semaphore,
    /// Set once, by the driver, as it stops.
    closed: OnceLock<CloseReason>,
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

    pub(crate) fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.get().is_some()
    }
}

/// Opens a connection: TCP with `TCP_NODELAY`, `Hello`, `Welcome`, then the driver task.
pub(crate) async fn open(
    addr: std::net::SocketAddr,
    client_name: &str,
    protocol_version: u16,
) -> Result<ConnHandle, ClientError> {
    let mut stream = TcpStream::connect(addr).await?;
    // Small frames (acks, confirms' requests) must not wait for Nagle's timer.
    stream.set_nodelay(true)?;

    // The handshake runs before the driver exists: nothing else can be said before `Welcome`,
    // and the driver's codec is sized by the limits `Welcome` announces.
    let handshake_limits = weir_protocol::WireLimits::DEFAULT;
    let mut encoder = Encoder::new(handshake_limits);
    let mut out = BytesMut::new();
    let mut hello = wire::HelloT::default();
    hello.protocol_version = protocol_version;
    hello.client_name = Some(client_name.to_string());
    hello.client_version = Some(env!("CARGO_PKG_VERSION").to_string());
    encoder.encode(
        &weir_protocol::frame(1, BodyT::Hello(Box::new(hello))),
        &mut out,
    )?;
    stream.write_all(&out).await?;

    let decoder = FrameDecoder::new(handshake_limits);
    let mut rx = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let reply = loop {
        if let Some(frame) = decoder.decode(&mut rx)? {
            break frame;
        }
        if stream.read_buf(&mut rx).await? == 0 {
            return Err(ClientError::Closed(CloseReason::Eof));
        }
    };
    let welcome = match reply.frame().body_as_welcome() {
        Some(w) => w.unpack(),
        None => {
            return Err(match reply.frame().body_as_error() {
                Some(e) if e.code() == ErrorCode::ProtocolVersion => ClientError::ProtocolVersion {
                    message: e.message().unwrap_or("").to_string(),
                },
                Some(e) => ClientError::Refused {
                    code: e.code(),
                    message: e.message().unwrap_or("").to_string(),
                },
                None => ClientError::UnexpectedReply(format!(
                    "{:?} in answer to Hello",
                    reply.body_type()
                )),
            });
        }
    };
    let info = server_info(&welcome, protocol_version)?;
    let limits = info.limits.wire();

    let (tx, commands) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        permits: Semaphore::new(
            (info.limits.publishes_in_flight_max as usize).min(Semaphore::MAX_PERMITS),
        ),
        info,
        closed: OnceLock::new(),
    });
    let handle = ConnHandle { tx, shared };
    let driver = Driver {
        handle: handle.clone(),
        decoder: FrameDecoder::new(limits),
        encoder: Encoder::new(limits),
        rx,
        out: BytesMut::with_capacity(READ_CHUNK_BYTES),
        next_request: 1,
        next_sequence: 1,
        requests: HashMap::new(),
        publishes: BTreeMap::new(),
        consumers: HashMap::new(),
        closing: false,
        shutdown: false,
    };
    tokio::spawn(driver.run(stream, commands));
    Ok(handle)
}

fn server_info(w: &wire::WelcomeT, asked: u16) -> Result<ServerInfo, ClientError> {
    if w.protocol_version != asked {
        return Err(ClientError::ProtocolVersion {
            message: format!(
                "the broker answered with protocol {}; this client asked for {asked}",
                w.protocol_version
            ),
        });
    }
    let limits = w
        .limits
        .as_deref()
        .ok_or_else(|| ClientError::UnexpectedReply("Welcome without limits".into()))?;
    let limits = Limits::from_wire(limits);
    limits
        .wire()
        .check()
        .map_err(|e| ClientError::UnexpectedReply(format!("Welcome announces bad limits: {e}")))?;
    if limits.publishes_in_flight_max == 0 {
        return Err(ClientError::UnexpectedReply(
            "Welcome announces publishes_in_flight_max 0".into(),
        ));
    }
    let shard_ports = w.shard_ports.clone().unwrap_or_default();
    if shard_ports.len() != usize::from(w.shard_count) || w.shard >= w.shard_count.max(1) {
        return Err(ClientError::UnexpectedReply(format!(
            "Welcome: shard {} of {} with {} shard ports",
            w.shard,
            w.shard_count,
            shard_ports.len()
        )));
    }
    Ok(ServerInfo {
        broker_version: w.broker_version.clone().unwrap_or_default(),
        protocol_version: w.protocol_version,
        shard_count: w.shard_count,
        shard: w.shard,
        shard_ports,
        limits,
        durability: w.durability,
        connection_id: w.connection_id,
    })
}

/// What a request id is waiting for.
enum Pending {
    Reply(Reply),
    /// The consumer is registered; a refusal unregisters it.
    Consume {
        tag: String,
        reply: Reply,
    },
    /// The consumer is unregistered once the broker confirms: until then deliveries may still
    /// arrive for it, and are requeued.
    Cancel {
        tag: String,
        reply: Option<Reply>,
    },
}

struct PendingPublish {
    confirm: ConfirmTx,
    returned: Option<ReturnedMessage>,
}

struct ConsumerSlot {
    /// `None` once nobody takes deliveries any more (a cancel is in flight, or about to be).
    deliveries: Option<DeliveryTx>,
    auto_ack: bool,
    /// A `Cancel` was sent for it.
    cancelling: bool,
}

struct Driver {
    handle: ConnHandle,
    decoder: FrameDecoder,
    encoder: Encoder,
    rx: BytesMut,
    out: BytesMut,
    next_request: u64,
    next_sequence: u64,
    requests: HashMap<u64, Pending>,
    publishes: BTreeMap<u64, PendingPublish>,
    consumers: HashMap<String, ConsumerSlot>,
    /// A `Close` was sent: the broker closing the socket is the expected answer.
    closing: bool,
    /// `Command::Shutdown` arrived.
    shutdown: bool,
}

impl Driver {
    async fn run(mut self, mut stream: TcpStream, mut commands: mpsc::UnboundedReceiver<Command>) {
        let reason = self.serve(&mut stream, &mut commands).await;
        if !self.out.is_empty() && matches!(reason, CloseReason::Local) {
            // What we owe (a last ack, a cancel) is worth a bounded try.
            let _ = tokio::time::timeout(FLUSH_ON_CLOSE, stream.write_all(&self.out)).await;
        }
        let _ = tokio::time::timeout(FLUSH_ON_CLOSE, stream.shutdown()).await;
        drop(stream);
        self.fail_all(reason, &mut commands);
    }

    async fn serve(
        &mut self,
        stream: &mut TcpStream,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> CloseReason {
        let (mut reader, mut writer) = stream.split();
        loop {
            if self.rx.capacity() - self.rx.len() < READ_CHUNK_BYTES / 4 {
                self.rx.reserve(READ_CHUNK_BYTES);
            }
            tokio::select! {
                // Writing first: what we owe (acks, publishes) is what lets the broker send
                // more. Reading next, so a broker that waits for us to read never waits on our
                // writes. New commands last, when both are idle: commands queued meanwhile
                // then leave together, in one write.
                biased;
                written = writer.write_buf(&mut self.out), if !self.out.is_empty() => {
                    if let Err(e) = written {
                        return io_reason(&e);
                    }
                }
                read = reader.read_buf(&mut self.rx) => match read {
                    Ok(0) if self.closing => return CloseReason::Local,
                    Ok(0) => return CloseReason::Eof,
                    Ok(_) => {
                        if let Some(reason) = self.on_input() {
                            return reason;
                        }
                    }
                    Err(e) => return io_reason(&e),
                },
                command = commands.recv(), if self.out.len() < OUT_HIGH_WATER_BYTES => {
                    match command {
                        Some(c) => self.on_command(c),
                        None => self.shutdown = true,
                    }
                    // Everything already queued joins this write.
                    while !self.shutdown && self.out.len() < OUT_HIGH_WATER_BYTES {
                        match commands.try_recv() {
                            Ok(c) => self.on_command(c),
                            Err(_) => break,
                        }
                    }
                    if self.shutdown {
                        return CloseReason::Local;
                    }
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Request { body, reply } => {
                let id = self.request_id();
                match self.encode(id, body) {
                    Ok(()) => {
                        self.requests.insert(id, Pending::Reply(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Publish {
                exchange,
                routing_key,
                mandatory,
                messages,
                confirms,
            } => self.publish(&exchange, &routing_key, mandatory, &messages, confirms),
            Command::Consume {
                body,
                deliveries,
                reply,
            } => {
                let tag = body.consumer_tag.clone().unwrap_or_default();
                let auto_ack = body.auto_ack;
                let id = self.request_id();
                match self.encode(id, BodyT::Consume(Box::new(body))) {
                    Ok(()) => {
                        self.consumers.insert(
                            tag.clone(),
                            ConsumerSlot {
                                deliveries: Some(deliveries),
                                auto_ack,
                                cancelling: false,
                            },
                        );
                        self.requests.insert(id, Pending::Consume { tag, reply });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Cancel {
                tag,
                requeue,
                reply,
            } => {
                // Cancel first: the broker handles frames in order, so the requeued deliveries
                // cannot come straight back to this consumer.
                self.cancel_consumer(tag, reply);
                self.requeue(&requeue);
            }
            Command::Settle { kind, tags, reply } => {
                let id = if reply.is_some() {
                    self.request_id()
                } else {
                    0
                };
                let ranges = weir_protocol::ranges_of(tags);
                let result = match kind {
                    Settle::Ack => self.encoder.ack(&mut self.out, id, &ranges).map(drop),
                    Settle::Nack { requeue } => self
                        .encoder
                        .nack(&mut self.out, id, &ranges, requeue)
                        .map(drop),
                    Settle::Reject { requeue } => {
                        let mut r = wire::RejectT::default();
                        r.delivery_tag = ranges.first().map_or(0, |r| r.first());
                        r.requeue = requeue;
                        self.encoder
                            .encode(
                                &weir_protocol::frame(id, BodyT::Reject(Box::new(r))),
                                &mut self.out,
                            )
                            .map(drop)
                    }
                };
                match (result, reply) {
                    (Ok(()), Some(reply)) => {
                        self.requests.insert(id, Pending::Reply(reply));
                    }
                    (Err(e), Some(reply)) => {
                        let _ = reply.send(Err(e.into()));
                    }
                    (_, None) => {}
                }
            }
            Command::Close { reply } => {
                let id = self.request_id();
                match self.encode(id, BodyT::Close(Box::default())) {
                    Ok(()) => {
                        self.closing = true;
                        self.requests.insert(id, Pending::Reply(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Shutdown => self.shutdown = true,
        }
    }

    /// Stops a consumer: no more deliveries are handed out, and the broker is told (once).
    fn cancel_consumer(&mut self, tag: String, reply: Option<Reply>) {
        let first = match self.consumers.get_mut(&tag) {
            Some(slot) => {
                slot.deliveries = None;
                !std::mem::replace(&mut slot.cancelling, true)
            }
            // Already gone (the broker cancelled it): nothing to tell the broker.
            None => false,
        };
        if !first {
            if let Some(reply) = reply {
                let _ = reply.send(Err(ClientError::Refused {
                    code: ErrorCode::NotFound,
                    message: format!("consumer '{tag}' is already cancelled"),
                }));
            }
            return;
        }
        let mut cancel = wire::CancelT::default();
        cancel.consumer_tag = tag.clone();
        let id = self.request_id();
        match self.encode(id, BodyT::Cancel(Box::new(cancel))) {
            Ok(()) => {
                self.requests.insert(id, Pending::Cancel { tag, reply });
            }
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    fn request_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    fn encode(&mut self, request_id: u64, body: BodyT) -> Result<(), ClientError> {
        self.encoder
            .encode(&weir_protocol::frame(request_id, body), &mut self.out)?;
        Ok(())
    }

    fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        messages: &[Bytes],
        confirms: Vec<ConfirmTx>,
    ) {
        let first = self.next_sequence;
        let items = messages.iter().enumerate().map(|(i, m)| PublishItem {
            sequence: first + i as u64,
            exchange,
            routing_key,
            mandatory,
            message: m,
        });
        match self.encoder.publish(&mut self.out, 0, None, true, items) {
            Ok(_) => {
                self.next_sequence += messages.len() as u64;
                for (i, confirm) in confirms.into_iter().enumerate() {
                    self.publishes.insert(
                        first + i as u64,
                        PendingPublish {
                            confirm,
                            returned: None,
                        },
                    );
                }
            }
            Err(e) => {
                // Nothing was written: the permits come back now.
                self.handle.shared.permits.add_permits(confirms.len());
                for confirm in confirms {
                    let _ = confirm.send(Err(ClientError::Protocol(e.clone())));
                }
            }
        }
    }

    /// Sends deliveries nobody will see back to their queue.
    fn requeue(&mut self, tags: &[u64]) {
        if tags.is_empty() {
            return;
        }
        let ranges = weir_protocol::ranges_of(tags.to_vec());
        // Fire-and-forget: a failure could only be a tag the broker already forgot.
        let _ = self.encoder.nack(&mut self.out, 0, &ranges, true);
    }

    /// Decodes and dispatches every whole frame received; `Some` ends the connection.
    fn on_input(&mut self) -> Option<CloseReason> {
        loop {
            match self.decoder.decode(&mut self.rx) {
                Ok(Some(frame)) => {
                    if let Some(reason) = self.on_frame(frame) {
                        return Some(reason);
                    }
                }
                Ok(None) => return None,
                Err(e) if e.is_fatal() => return Some(CloseReason::Protocol(e)),
                // A body type from a newer broker: consumed whole, nothing to do with it.
                Err(_) => {}
            }
        }
    }

    fn on_frame(&mut self, frame: InFrame) -> Option<CloseReason> {
        let id = frame.request_id();
        let f = frame.frame();
        match frame.body_type() {
            Body::Confirm => {
                let c = f.body_as_confirm()?;
                let duplicates: Vec<Range> = c
                    .duplicates()
                    .map(|d| d.iter().copied().collect())
                    .unwrap_or_default();
                let durability = c.durability();
                for r in c.ranges().iter() {
                    let seqs: Vec<u64> = self
                        .publishes
                        .range(r.first()..=r.last())
                        .map(|(s, _)| *s)
                        .collect();
                    for sequence in seqs {
                        let duplicate = duplicates
                            .iter()
                            .any(|d| (d.first()..=d.last()).contains(&sequence));
                        self.settle_publish(sequence, |returned| match returned {
                            Some(r) => Err(ClientError::Returned(Box::new(r))),
                            None => Ok(Confirmation {
                                sequence,
                                durability,
                                duplicate,
                            }),
                        });
                    }
                }
            }
            Body::Return => {
                for (e, message) in f
                    .body_as_return()?
                    .entries()
                    .iter()
                    .map(|e| (e, e.message().map(|m| frame.message_bytes(m))))
                {
                    if let Some(p) = self.publishes.get_mut(&e.sequence()) {
                        p.returned = Some(ReturnedMessage {
                            code: e.code(),
                            exchange: e.exchange().unwrap_or("").to_string(),
                            routing_key: e.routing_key().unwrap_or("").to_string(),
                            message: message.unwrap_or_default(),
                        });
                    }
                }
            }
            Body::Deliver => {
                let tag = f.body_as_deliver()?.consumer_tag().unwrap_or("");
                let mut stray = Vec::new();
                let mut abandoned = false;
                match self.consumers.get_mut(tag) {
                    Some(slot) => {
                        for (d, message) in frame.deliveries() {
                            let delivery =
                                Delivery::new(self.handle.clone(), &d, message, slot.auto_ack);
                            let sent = match &slot.deliveries {
                                Some(tx) => tx.send(Ok(delivery)).is_ok(),
                                None => false,
                            };
                            if !sent {
                                // Its stream is gone (dropped, or `consume` was abandoned
                                // before it returned): requeue, and stop the consumer, or the
                                // broker would hand the same messages straight back.
                                abandoned |= !slot.cancelling;
                                slot.deliveries = None;
                                if !slot.auto_ack {
                                    stray.push(d.delivery_tag());
                                }
                            }
                        }
                    }
                    // Not ours at all: give them back rather than hold them until we close.
                    None => stray.extend(frame.deliveries().map(|(d, _)| d.delivery_tag())),
                }
                if abandoned {
                    self.cancel_consumer(tag.to_string(), None);
                }
                self.requeue(&stray);
            }
            Body::ConsumerCancelled => {
                let c = f.body_as_consumer_cancelled()?;
                let tag = c.consumer_tag().unwrap_or("").to_string();
                if let Some(ConsumerSlot {
                    deliveries: Some(tx),
                    ..
                }) = self.consumers.remove(&tag)
                {
                    let _ = tx.send(Err(ClientError::ConsumerCancelled {
                        tag,
                        code: c.code(),
                        message: c.message().unwrap_or("").to_string(),
                    }));
                }
            }
            Body::Error => {
                let e = f.body_as_error()?;
                let (code, message) = (e.code(), e.message().unwrap_or("").to_string());
                if id != 0 {
                    self.answer(
                        id,
                        Err(ClientError::Refused {
                            code,
                            message: message.clone(),
                        }),
                    );
                } else if let Some(sequences) = e.sequences() {
                    for r in sequences.iter() {
                        let seqs: Vec<u64> = self
                            .publishes
                            .range(r.first()..=r.last())
                            .map(|(s, _)| *s)
                            .collect();
                        for sequence in seqs {
                            self.settle_publish(sequence, |_| {
                                Err(ClientError::Refused {
                                    code,
                                    message: message.clone(),
                                })
                            });
                        }
                    }
                }
                // An error with neither a request id nor sequences (a fire-and-forget
                // settlement that failed) has nobody to tell; the connection goes on.
                if e.close() {
                    return Some(CloseReason::Broker { code, message });
                }
            }
            // Publishes are already bounded by permits and TCP; nothing to do differently.
            Body::Blocked | Body::Unblocked => {}
            _ if id != 0 => self.answer(id, Ok(frame)),
            // A push this client does not know: a newer broker's, harmless to skip.
            _ => {}
        }
        None
    }

    fn settle_publish(
        &mut self,
        sequence: u64,
        outcome: impl FnOnce(Option<ReturnedMessage>) -> Result<Confirmation, ClientError>,
    ) {
        if let Some(p) = self.publishes.remove(&sequence) {
            self.handle.shared.permits.add_permits(1);
            let _ = p.confirm.send(outcome(p.returned));
        }
    }

    fn answer(&mut self, id: u64, result: Result<InFrame, ClientError>) {
        match self.requests.remove(&id) {
            Some(Pending::Reply(reply)) => {
                let _ = reply.send(result);
            }
            Some(Pending::Consume { tag, reply }) => {
                let refused = result.is_err();
                if refused {
                    self.consumers.remove(&tag);
                }
                if reply.send(result).is_err() && !refused {
                    // `consume` was abandoned before its answer: nobody will read this stream.
                    self.cancel_consumer(tag, None);
                }
            }
            Some(Pending::Cancel { tag, reply }) => {
                // The broker has forgotten the consumer: nothing more arrives for it.
                self.consumers.remove(&tag);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            None => {}
        }
    }

    fn fail_all(mut self, reason: CloseReason, commands: &mut mpsc::UnboundedReceiver<Command>) {
        let _ = self.handle.shared.closed.set(reason.clone());
        // Wakes publishers waiting for permits; they see `closed`.
        self.handle.shared.permits.close();
        // Later sends fail at once; what is already queued is failed below.
        commands.close();
        let err = || ClientError::Closed(reason.clone());
        for (_, pending) in self.requests.drain() {
            match pending {
                Pending::Reply(reply) | Pending::Consume { reply, .. } => {
                    let _ = reply.send(Err(err()));
                }
                Pending::Cancel {
                    reply: Some(reply), ..
                } => {
                    let _ = reply.send(Err(err()));
                }
                Pending::Cancel { reply: None, .. } => {}
            }
        }
        for (_, p) in std::mem::take(&mut self.publishes) {
            let _ = p.confirm.send(Err(err()));
        }
        for (_, slot) in self.consumers.drain() {
            if let Some(tx) = slot.deliveries {
                let _ = tx.send(Err(err()));
            }
        }
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Request { reply, .. }
                | Command::Consume { reply, .. }
                | Command::Close { reply } => {
                    let _ = reply.send(Err(err()));
                }
                Command::Cancel {
                    reply: Some(reply), ..
                }
                | Command::Settle {
                    reply: Some(reply), ..
                } => {
                    let _ = reply.send(Err(err()));
                }
                Command::Publish { confirms, .. } => {
                    for c in confirms {
                        let _ = c.send(Err(err()));
                    }
                }
                _ => {}
            }
        }
    }
}

fn io_reason(e: &std::io::Error) -> CloseReason {
    CloseReason::Io {
        kind: e.kind(),
        message: e.to_string(),
    }
}
