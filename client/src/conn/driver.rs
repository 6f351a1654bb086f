//! The driver task: the one loop that owns a connection's socket and every pending table.
//!
//! Contract: one tokio task per connection, spawned by `handshake::open`. It reads frames and
//! dispatches them (replies to `requests`, confirms, returns and publish refusals to
//! `confirms`, deliveries and consumer cancels to `consumers`), takes `Command`s from the
//! handles and encodes them into one output buffer, and writes that buffer as the socket takes
//! it. Priorities are fixed (write, then read, then new commands) so a busy peer never starves
//! what we owe it; commands queued together leave in one write, adjacent publishes and
//! settlements merged into one frame each (`coalesce`).
//!
//! Faults handled: EOF (expected after our `Close`, `Eof` otherwise), I/O errors, fatal decode
//! errors (an unknown body type is skipped), an `Error` frame with `close = true`, the last
//! handle going away. Whatever ends the loop, `fail_all` records the reason, fails every pending
//! request, publish and consumer with `Closed(reason)`, wakes publishers waiting for permits and
//! fails the commands still queued.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use weir_protocol::wire::{Body, BodyT};
use weir_protocol::{Encoder, FrameDecoder, InFrame, WireLimits};

use super::coalesce::Run;
use super::confirms::PendingPublish;
use super::consumers::ConsumerSlot;
use super::requests::Pending;
use super::{Command, ConnHandle, FLUSH_ON_CLOSE, OUT_HIGH_WATER_BYTES, READ_CHUNK_BYTES};
use crate::error::{ClientError, CloseReason};

pub(super) struct Driver {
    pub(super) handle: ConnHandle,
    decoder: FrameDecoder,
    pub(super) encoder: Encoder,
    rx: BytesMut,
    pub(super) out: BytesMut,
    pub(super) next_request: u64,
    pub(super) next_sequence: u64,
    pub(super) requests: HashMap<u64, Pending>,
    pub(super) publishes: BTreeMap<u64, PendingPublish>,
    pub(super) consumers: HashMap<String, ConsumerSlot>,
    /// Delivery tags handed to a consumer (not auto-acked) and named by no frame sent since,
    /// by the consumer's slot id: the tags whose settlements may merge (`coalesce`).
    pub(super) held: HashMap<u64, u32>,
    pub(super) next_slot: u32,
    /// Adjacent commands of one drain being merged into one frame.
    pub(super) run: Run,
    /// A `Close` was sent: the broker closing the socket is the expected answer.
    closing: bool,
    /// `Command::Shutdown` arrived.
    shutdown: bool,
}

impl Driver {
    /// A driver for a connection whose handshake is done; `rx` holds what was read past
    /// `Welcome`.
    pub(super) fn new(handle: ConnHandle, limits: WireLimits, rx: BytesMut) -> Driver {
        Driver {
            handle,
            decoder: FrameDecoder::new(limits),
            encoder: Encoder::new(limits),
            rx,
            out: BytesMut::with_capacity(READ_CHUNK_BYTES),
            next_request: 1,
            next_sequence: 1,
            requests: HashMap::new(),
            publishes: BTreeMap::new(),
            consumers: HashMap::new(),
            held: HashMap::new(),
            next_slot: 0,
            run: Run::Empty,
            closing: false,
            shutdown: false,
        }
    }

    pub(super) async fn run(
        mut self,
        mut stream: TcpStream,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
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
                        Some(c) => self.take(c),
                        None => self.shutdown = true,
                    }
                    // Everything already queued joins this write, adjacent publishes and
                    // settlements merged into one frame each (`coalesce`).
                    while !self.shutdown
                        && self.out.len() + self.run.bytes() < OUT_HIGH_WATER_BYTES
                    {
                        match commands.try_recv() {
                            Ok(c) => self.take(c),
                            Err(_) => break,
                        }
                    }
                    self.flush_run();
                    if self.shutdown {
                        return CloseReason::Local;
                    }
                }
            }
        }
    }

    /// Counts a frame encoded into the output buffer; `request_id` non-zero: it asks an answer.
    pub(super) fn count_frame(&self, request_id: u64) {
        let shared = &self.handle.shared;
        shared.frames_sent.fetch_add(1, Ordering::Relaxed);
        if request_id != 0 {
            shared.answers_asked.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn on_command(&mut self, command: Command) {
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
            } => self.consume(body, deliveries, reply),
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
            Command::Settle { kind, tags, reply } => self.settle(kind, tags, reply),
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
            Command::PublishAs {
                producer_id,
                sequence,
                exchange,
                routing_key,
                mandatory,
                message,
                confirm,
            } => self.publish_as(
                producer_id,
                sequence,
                (&exchange, &routing_key, mandatory),
                &message,
                confirm,
            ),
        }
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
            Body::Confirm => self.on_confirm(f.body_as_confirm()?),
            Body::Return => self.on_return(&frame, f.body_as_return()?),
            Body::Deliver => self.on_deliver(&frame, f.body_as_deliver()?),
            Body::ConsumerCancelled => self.on_consumer_cancelled(f.body_as_consumer_cancelled()?),
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
                    self.refuse_publishes(sequences.iter(), code, &message);
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
                Pending::Group(replies) => {
                    for reply in replies {
                        let _ = reply.send(Err(err()));
                    }
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
            if let Some(tx) = slot.into_deliveries() {
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
                Command::PublishAs { confirm, .. } => {
                    let _ = confirm.send(Err(err()));
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
