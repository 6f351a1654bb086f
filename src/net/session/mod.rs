//! The session state machine: what one connection may say when, what the broker answers, and
//! what the connection holds (its consumers, its outstanding deliveries, its unconfirmed
//! publishes).
//!
//! Contract: no I/O, no clock, one thread (the connection's shard; `Session` is `!Send`). The
//! connection's shard hands it each decoded frame, each reply from a queue's owning shard and
//! each push (deliveries, cancellations), with the time as an argument; it appends the frames
//! owed to an output buffer and returns the `Addressed` ops to send to owning shards. It owns the
//! connection's protocol state and its side of every delivery: delivery tags are allocated here,
//! per connection, and mapped back to (owning shard, queue, consumer, queue sequence) on ack.
//! Publishes to an exchange are routed here, by the shard's copy of the routing table (read, never
//! written: changes go to the control-plane writer), and a publish split across shards is
//! confirmed once every part was taken.
//!
//! This file holds the state and the dispatch: frames by connection state, replies by what they
//! answer. The work is in the files beside it:
//! - `commands`: each client `Command` (parsed in `net::command`) turned into ops or answers.
//! - `publish`: accepting a publish, splitting it across shards, confirming it.
//! - `ledger`: delivery tags, outstanding deliveries, settlements, pushed deliveries.
//! - `gather`: requests answered by every shard (queue listing, status).
//! - `replies`: encoding answers and refusals.
//! - `observe`: the shard's tally (confirms, refusals by limit), the connection and consumer
//!   listings gathered from every shard, and what this session tells its shard's listing.
//!
//! Faults handled: frames before `Hello`, no `Hello` within `handshake_timeout_ms` (closed),
//! a second `Hello`, a wrong protocol version, frames only
//! the broker may send, malformed frames (each gets an `Error` frame; fatal ones close this
//! connection and nothing else), acks of unknown delivery tags, deliveries for a consumer that
//! was cancelled meanwhile (requeued), frame types this broker does not serve yet (an `Error`
//! naming the frame; the connection goes on).

mod commands;
mod gather;
mod ledger;
mod observe;
mod publish;
mod replies;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use bytes::BytesMut;
use weir_protocol::wire::{self, BodyT, ErrorCode};
use weir_protocol::{Encoder, InFrame, ProtocolError, WireLimits, PROTOCOL_VERSION};

use crate::broker::control::{RoutingCopy, CONTROL_SHARD};
use crate::broker::routing::hash::FastMap;
use crate::mesh::msg::ControlOp;
use crate::mesh::msg::{Op, Reply};
use crate::mesh::types::Binding;
use crate::mesh::types::HolderId;
use crate::mesh::types::{placement, Refusal};
use crate::net::command::Command;

use ledger::Outstanding;
pub use observe::{SessionFacts, Tally};
use publish::Split;
use replies::name;

/// What the session needs to know about its broker and shard.
#[derive(Clone, Debug)]
pub struct SessionCtx {
    pub broker_version: &'static str,
    pub shard: u16,
    pub shard_ports: Vec<u16>,
    pub durability: wire::Durability,
    pub limits: WireLimits,
    pub publishes_in_flight_max: u32,
    pub prefetch_default: u32,
    pub prefetch_max: u32,
    /// Queues of one shard a message is stored once for; a message routed to more is stored
    /// once per this many (its record's envelope names every target, and must fit a record).
    pub targets_per_message_max: u32,
    /// Furthest a delayed message's delivery time may be from its publish, ms.
    pub delay_ms_max: u64,
    pub connection_id: u64,
    /// When the broker started, ms since the Unix epoch (for `Status.uptime_ms`).
    pub started_ms: u64,
    /// When this connection was accepted, ms since the Unix epoch: its `Hello` is due within
    /// `handshake_timeout_ms` of it.
    pub accepted_ms: u64,
    pub handshake_timeout_ms: u64,
    /// Requests but publishes waiting on shards, past which the connection is not read.
    pub requests_in_flight_max: u32,
    /// Consumers this connection may hold; a further `Consume` is refused.
    pub consumers_per_connection_max: u32,
    /// Unacked (and asked) `Get` deliveries this connection may hold; a further `Get` is refused.
    pub gets_unacked_max: u32,
    /// Bytes of unconfirmed publishes past which the connection stops reading.
    pub publish_bytes_in_flight_max: u64,
    /// Messages up to this size are copied out of the receive buffer (`limits.rs` says why).
    pub message_copy_bytes_max: u32,
    /// Bytes of the connection's outbox not yet written past which it stops reading: answers
    /// made here at once (listings, pongs, refusals) are bounded by it like deliveries are.
    pub outbox_bytes_max: u64,
    /// Delays one queue's retry policy may have (`QueueArguments.retry_delays_ms`).
    pub retry_delays_count_max: u32,
}

impl SessionCtx {
    pub fn shard_count(&self) -> u16 {
        self.shard_ports.len() as u16
    }
}

/// An op for the shard that owns a queue; its reply comes back to `on_reply` with the same `id`.
#[derive(Debug)]
pub struct Addressed {
    pub shard: u16,
    pub id: u64,
    pub op: Op,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitingHello,
    Open,
    Closing,
}

/// Whether the connection goes on after a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Send what was written, then close.
    Close,
}

/// What a addressed op's reply means to this connection.
enum Pending {
    /// Answer the client's request with the reply as it is.
    Reply {
        request_id: u64,
    },
    List(gather::ListGather),
    Status(gather::StatusGather),
    Connections(observe::ConnectionsGather),
    Consumers(observe::ConsumersGather),
    /// Message bytes the publish counts against `publish_bytes_in_flight_max` until answered.
    Publish {
        bytes: u64,
    },
    Consume {
        request_id: u64,
        tag: String,
    },
    Cancel {
        request_id: u64,
    },
    /// A client's settlement sent to one owner: its tags (in the order of the op's items), kept
    /// aside until the owner answers, so those it refused for a storage reason come back.
    Settle {
        request_id: u64,
        /// Set when the client asked for an answer (given once every owner answered).
        wait: Option<u64>,
        tags: ledger::SettledTags,
    },
    Get {
        request_id: u64,
        shard: u16,
    },
    /// A bind waiting for its queue's owner to say the queue exists and whether it is durable;
    /// then it goes to the control-plane writer.
    BindQueue {
        request_id: u64,
        binding: Binding,
    },
    /// A queue delete: once the owner deleted it, its bindings go through the writer before
    /// the client is answered, so a listing after the answer no longer shows them.
    DeleteQueue {
        request_id: u64,
        name: String,
    },
    /// The writer dropped a deleted queue's bindings: answer the delete.
    QueueUnbound {
        request_id: u64,
        messages: u64,
    },
    /// Nothing to answer (connection closed, requeue of a stray delivery).
    Quiet,
}

/// A consumer of this connection, by consumer tag.
#[derive(Clone, Debug)]
struct ConsumerRef {
    shard: u16,
    queue: String,
    /// Known once the owning shard answered `Consume`.
    holder: Option<HolderId>,
}

pub struct Session {
    ctx: SessionCtx,
    state: State,
    encoder: Encoder,
    next_id: u64,
    pending: FastMap<u64, Pending>,
    /// Settlements that asked for a reply, by wait id: shards yet to answer, the first failure.
    settle_waits: FastMap<u64, (u16, Option<Refusal>)>,
    next_delivery_tag: u64,
    outstanding: BTreeMap<u64, Outstanding>,
    consumers: HashMap<String, ConsumerRef>,
    next_name: u64,
    unconfirmed: u64,
    /// Message bytes of the publishes in `unconfirmed`.
    unconfirmed_bytes: u64,
    /// The shard's routing table copy: publishes to an exchange are routed here, on the
    /// publishing shard, with no hop.
    routing: Rc<RoutingCopy>,
    /// The last publish sequence this connection let through its order check (whatever became
    /// of that publish): sequences must strictly increase, so each keys one confirm and split.
    last_sequence: Option<u64>,
    /// Publishes split across shards, by sequence number (unique: see `last_sequence`).
    splits: FastMap<u64, Split>,
    /// Reused by every routed publish: the queues of one message.
    route_buf: Vec<String>,
    /// Charges of the deliveries encoded into the outbox since the shell last took it, by
    /// owning shard: handed back to each owner once the write carrying them is done.
    unwritten: BTreeMap<u16, u64>,
    /// Charges written and not yet handed back, by owning shard: they go back in amounts of
    /// `hand_back_bytes_min`, not one `DeliveriesWritten` per write.
    written: BTreeMap<u16, u64>,
    /// Entries of `pending` that are publishes: the others are requests in flight, bounded by
    /// `requests_in_flight_max`.
    publish_ops: usize,
    /// The `Get`s this connection holds unacked or waits for, bounded by `gets_unacked_max`.
    gets: ledger::GetWindow,
    /// The shard's counts this session adds to (`observe`).
    tally: Rc<Tally>,
    /// `Hello.client_name`, for the connection listing.
    client_name: Option<String>,
}

// A session lives on its connection's shard and holds that shard's `Rc` routing copy: it must
// never move to another thread.
assert_not_send!(Session);

impl Session {
    pub fn new(ctx: SessionCtx, routing: Rc<RoutingCopy>) -> Session {
        let encoder = Encoder::new(ctx.limits);
        Session {
            ctx,
            state: State::AwaitingHello,
            encoder,
            next_id: 1,
            pending: FastMap::default(),
            settle_waits: FastMap::default(),
            next_delivery_tag: 1,
            outstanding: BTreeMap::new(),
            consumers: HashMap::new(),
            next_name: 1,
            unconfirmed: 0,
            unconfirmed_bytes: 0,
            routing,
            last_sequence: None,
            splits: FastMap::default(),
            route_buf: Vec::new(),
            unwritten: BTreeMap::new(),
            written: BTreeMap::new(),
            publish_ops: 0,
            gets: ledger::GetWindow::default(),
            tally: Rc::default(),
            client_name: None,
        }
    }

    /// Counts into the shard's `tally` (a session counts into its own until told).
    pub fn count_into(&mut self, tally: Rc<Tally>) {
        self.tally = tally;
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// When the connection is closed unless `Hello` has arrived, ms since the Unix epoch; `None`
    /// once it has, so an open connection needs no timer.
    pub fn handshake_deadline(&self) -> Option<u64> {
        (self.state == State::AwaitingHello).then(|| {
            self.ctx
                .accepted_ms
                .saturating_add(self.ctx.handshake_timeout_ms)
        })
    }

    /// The shell's timer fired (or it woke for another reason) at `now_ms`: a connection still
    /// without `Hello` past its deadline is told why and closed.
    pub fn on_tick_at(&mut self, now_ms: u64, out: &mut BytesMut) -> Flow {
        match self.handshake_deadline() {
            Some(deadline) if now_ms >= deadline => {
                let msg = format!("no Hello within {} ms", self.ctx.handshake_timeout_ms);
                self.fail(out, 0, ErrorCode::ConnectionLimit, msg, true)
            }
            _ => Flow::Continue,
        }
    }

    /// False while the connection has `publishes_in_flight_max` publishes, or
    /// `publish_bytes_in_flight_max` bytes of them, unconfirmed, or `requests_in_flight_max`
    /// other requests unanswered: the connection stops reading until answers catch up (TCP
    /// backpressure on the client). Checked before each frame, so the bytes in flight exceed the
    /// bound by at most one frame.
    pub fn wants_input(&self) -> bool {
        self.unconfirmed < u64::from(self.ctx.publishes_in_flight_max)
            && self.unconfirmed_bytes < self.ctx.publish_bytes_in_flight_max
            && self.requests_in_flight() < self.ctx.requests_in_flight_max as usize
    }

    /// As `wants_input`, with the connection's outbox holding `unwritten` bytes: false past
    /// `outbox_bytes_max`, so a client that asks for listings (answered here, at once) and never
    /// reads them is slowed by TCP instead of filling the outbox. Checked before each frame: the
    /// outbox exceeds the bound by at most one answer.
    pub fn wants_input_beside(&self, unwritten: usize) -> bool {
        self.wants_input() && unwritten as u64 <= self.ctx.outbox_bytes_max
    }

    /// Requests other than publishes waiting on shards.
    fn requests_in_flight(&self) -> usize {
        self.pending.len() - self.publish_ops
    }

    fn address(
        &mut self,
        outbound: &mut Vec<Addressed>,
        shard: u16,
        op: Op,
        pending: Pending,
    ) -> u64 {
        let id = self.next_id();
        self.publish_ops += usize::from(matches!(pending, Pending::Publish { .. }));
        self.pending.insert(id, pending);
        outbound.push(Addressed { shard, id, op });
        id
    }

    /// An id for an addressed op or a settlement wait, unique on this connection.
    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn owner_of(&self, queue: &str) -> u16 {
        placement(queue, self.ctx.shard_count())
    }

    /// Answers one decoded frame; `now_ms` (ms since the Unix epoch) bounds delayed publishes.
    pub fn on_frame_at(
        &mut self,
        now_ms: u64,
        frame: &InFrame,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        let request_id = frame.request_id();
        match self.state {
            State::Closing => Flow::Close,
            State::AwaitingHello => match Command::parse(frame) {
                Ok(Command::Hello {
                    protocol_version,
                    client_name,
                    client_version,
                }) => {
                    tracing::info!(
                        shard = self.ctx.shard,
                        connection = self.ctx.connection_id,
                        client = client_name,
                        client_version,
                        protocol_version,
                        "hello"
                    );
                    if protocol_version != PROTOCOL_VERSION {
                        let msg = format!(
                            "this broker speaks weir protocol {PROTOCOL_VERSION}; the client asked for {protocol_version}"
                        );
                        return self.fail(out, request_id, ErrorCode::ProtocolVersion, msg, true);
                    }
                    self.state = State::Open;
                    self.client_name = Some(client_name.to_string()).filter(|n| !n.is_empty());
                    let welcome = self.welcome();
                    self.reply(out, request_id, welcome)
                }
                _ => {
                    let msg = format!(
                        "expected Hello as the first frame, got {}",
                        name(frame.body_type())
                    );
                    self.fail(out, request_id, ErrorCode::UnexpectedFrame, msg, true)
                }
            },
            State::Open => match Command::parse(frame) {
                Ok(command) => self.execute(now_ms, request_id, command, out, outbound),
                Err(e) => self.fail(out, request_id, e.code(), e.to_string(), false),
            },
        }
    }

    /// Answers a addressed op's reply; a reply that is one step of a longer request (a bind's queue
    /// check) routes the next step. `now_ms` (ms since the Unix epoch) dates a `Status`.
    pub fn on_reply_at(
        &mut self,
        now_ms: u64,
        id: u64,
        reply: Reply,
        out: &mut BytesMut,
        outbound: &mut Vec<Addressed>,
    ) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        self.publish_ops -= usize::from(matches!(pending, Pending::Publish { .. }));
        match (pending, reply) {
            (Pending::Quiet, Reply::Settled(o)) => {
                for r in o.refusals {
                    self.fail(out, 0, r.code, r.message, false);
                }
            }
            (Pending::Quiet, _) => {}
            (Pending::Publish { bytes }, Reply::Published(outcomes)) => {
                self.unconfirmed_bytes -= bytes;
                self.published(outcomes, out)
            }
            (Pending::Publish { .. }, other) => {
                tracing::error!(?other, "unexpected reply to a publish")
            }
            (Pending::List(gather), reply) => self.gathered_list(id, gather, reply, out),
            (Pending::Status(gather), reply) => {
                self.gathered_status(now_ms, id, gather, reply, out)
            }
            (Pending::Connections(gather), reply) => {
                self.gathered_connections(id, gather, reply, out)
            }
            (Pending::Consumers(gather), reply) => self.gathered_consumers(id, gather, reply, out),
            (Pending::Reply { request_id }, reply) => self.on_reply_to(request_id, reply, out),
            (
                Pending::BindQueue {
                    request_id,
                    binding,
                },
                reply,
            ) => self.queue_checked(request_id, binding, reply, out, outbound),
            (Pending::DeleteQueue { request_id, name }, Reply::Deleted(messages))
                if self.routing.table.borrow().has_bindings_to(&name) =>
            {
                let op = Op::Control(ControlOp::QueueGone { queue: name });
                let pending = Pending::QueueUnbound {
                    request_id,
                    messages,
                };
                self.address(outbound, CONTROL_SHARD, op, pending);
            }
            (Pending::DeleteQueue { request_id, .. }, reply) => {
                self.on_reply_to(request_id, reply, out)
            }
            (
                Pending::QueueUnbound {
                    request_id,
                    messages,
                },
                _,
            ) => {
                // Deleted either way: a failure to journal the unbinds is the writer's to log.
                let mut d = wire::QueueDeletedT::default();
                d.messages = messages;
                self.reply(out, request_id, BodyT::QueueDeleted(Box::new(d)));
            }
            (Pending::Consume { request_id, tag }, reply) => {
                self.consumed(request_id, tag, reply, out)
            }
            (Pending::Cancel { request_id }, reply) => match reply {
                Reply::Refused(r) => self.refuse(out, request_id, r),
                _ => {
                    self.reply(out, request_id, BodyT::Ok(Box::default()));
                }
            },
            (
                Pending::Settle {
                    request_id,
                    wait,
                    tags,
                },
                reply,
            ) => self.settled(request_id, wait, tags, reply, out),
            (Pending::Get { request_id, shard }, reply) => self.got(request_id, shard, reply, out),
        }
    }

    /// The connection is gone: every shard releases what it held for it.
    pub fn on_closed(&mut self, outbound: &mut Vec<Addressed>) {
        self.state = State::Closing;
        for shard in 0..self.ctx.shard_count() {
            self.address(outbound, shard, Op::ConnectionClosed, Pending::Quiet);
        }
    }

    /// Answers a frame the decoder refused. Fatal errors close the connection.
    pub fn on_decode_error(&mut self, error: &ProtocolError, out: &mut BytesMut) -> Flow {
        self.fail(out, 0, error.code(), error.to_string(), error.is_fatal())
    }

    /// Tells the client the broker is going away, then closes.
    pub fn on_shutdown(&mut self, out: &mut BytesMut) -> Flow {
        self.fail(
            out,
            0,
            ErrorCode::ShuttingDown,
            "the broker is shutting down".into(),
            true,
        )
    }

    /// Refuses a connection over `connections_per_shard_max`.
    pub fn refuse_over_limit(&mut self, out: &mut BytesMut, max: u32) -> Flow {
        let msg =
            format!("this shard already serves connections_per_shard_max = {max} connections");
        self.fail(out, 0, ErrorCode::ConnectionLimit, msg, true)
    }
}
