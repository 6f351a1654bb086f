//! The session state machine: what one connection may say when, what the broker answers, and
//! what the connection holds (its consumers, its outstanding deliveries, its unconfirmed
//! publishes).
//!
//! Contract: no I/O. The connection's shard hands it each decoded frame, each reply from a
//! queue's owning shard and each push (deliveries, cancellations); it appends the frames owed to
//! an output buffer and returns the `Routed` ops to send to owning shards. It owns the
//! connection's protocol state and its side of every delivery: delivery tags are allocated here,
//! per connection, and mapped back to (owning shard, queue, consumer, queue sequence) on ack.
//! Publishes to an exchange are routed here, by the shard's copy of the routing table (read, never
//! written: changes go to the control-plane writer), and a publish split across shards is
//! confirmed once every part was taken.
//!
//! Faults handled: frames before `Hello`, a second `Hello`, a wrong protocol version, frames only
//! the broker may send, malformed frames (each gets an `Error` frame; fatal ones close this
//! connection and nothing else), acks of unknown delivery tags, deliveries for a consumer that
//! was cancelled meanwhile (requeued), frame types this broker does not serve yet (an `Error`
//! naming the frame; the connection goes on).

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use bytes::BytesMut;
use weir_protocol::wire::{self, Body, BodyT, ErrorCode, Range};
use weir_protocol::{DeliveryItem, Encoder, InFrame, ProtocolError, WireLimits, PROTOCOL_VERSION};

use crate::broker::host::{placement, Declare, Refusal};
use crate::broker::ops::{
    Op, PublishItem, PublishOutcome, Pushed, Reply, SettleItem, WireDelivery,
};
use crate::broker::queue::OwnerId;
use crate::broker::routing::{Binding, ExchangeDecl, ExchangeKind};
use crate::control::{ControlOp, RoutingCopy, CONTROL_SHARD};

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
}

impl SessionCtx {
    pub fn shard_count(&self) -> u16 {
        self.shard_ports.len() as u16
    }
}

/// An op for the shard that owns a queue; its reply comes back to `on_reply` with the same `id`.
#[derive(Debug)]
pub struct Routed {
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

/// What a routed op's reply means to this connection.
enum Pending {
    /// Answer the client's request with the reply as it is.
    Reply {
        request_id: u64,
    },
    List {
        request_id: u64,
        remaining: u16,
        limit: usize,
        queues: Vec<wire::QueueInfoT>,
    },
    Status {
        request_id: u64,
        remaining: u16,
        shards: Vec<crate::broker::ops::ShardStatus>,
    },
    Publish,
    Consume {
        request_id: u64,
        tag: String,
    },
    Cancel {
        request_id: u64,
    },
    Settle {
        request_id: u64,
        wait: u64,
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

/// A publish routed to queues on several shards: confirmed once every shard took its part.
#[derive(Debug)]
struct Split {
    parts_left: u16,
    journaled: bool,
    taken: bool,
    refusal: Option<Refusal>,
    returned: Option<PublishItem>,
}

/// A delivery this connection holds, by delivery tag.
#[derive(Clone, Debug)]
struct Outstanding {
    shard: u16,
    queue: String,
    owner: OwnerId,
    seq: u64,
}

/// A consumer of this connection, by consumer tag.
#[derive(Clone, Debug)]
struct ConsumerRef {
    shard: u16,
    queue: String,
    /// Known once the owning shard answered `Consume`.
    owner: Option<OwnerId>,
}

pub struct Session {
    ctx: SessionCtx,
    state: State,
    encoder: Encoder,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Settlements that asked for a reply, by wait id: shards yet to answer, the first failure.
    settle_waits: HashMap<u64, (u16, Option<Refusal>)>,
    next_delivery_tag: u64,
    outstanding: BTreeMap<u64, Outstanding>,
    consumers: HashMap<String, ConsumerRef>,
    next_name: u64,
    unconfirmed: u64,
    /// The shard's routing table copy: publishes to an exchange are routed here, on the
    /// publishing shard, with no hop.
    routing: Rc<RoutingCopy>,
    /// Publishes split across shards, by sequence number.
    splits: HashMap<u64, Split>,
    /// Reused by every routed publish: the queues of one message.
    route_buf: Vec<String>,
}

impl Session {
    pub fn new(ctx: SessionCtx, routing: Rc<RoutingCopy>) -> Session {
        let encoder = Encoder::new(ctx.limits);
        Session {
            ctx,
            state: State::AwaitingHello,
            encoder,
            next_id: 1,
            pending: HashMap::new(),
            settle_waits: HashMap::new(),
            next_delivery_tag: 1,
            outstanding: BTreeMap::new(),
            consumers: HashMap::new(),
            next_name: 1,
            unconfirmed: 0,
            routing,
            splits: HashMap::new(),
            route_buf: Vec::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// False while the connection has `publishes_in_flight_max` publishes unconfirmed: the
    /// connection stops reading until confirms catch up (TCP backpressure on the producer).
    pub fn wants_input(&self) -> bool {
        self.unconfirmed < u64::from(self.ctx.publishes_in_flight_max)
    }

    fn route(&mut self, routed: &mut Vec<Routed>, shard: u16, op: Op, pending: Pending) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, pending);
        routed.push(Routed { shard, id, op });
        id
    }

    fn owner_of(&self, queue: &str) -> u16 {
        placement(queue, self.ctx.shard_count())
    }

    /// Answers one decoded frame.
    pub fn on_frame(
        &mut self,
        frame: &InFrame,
        out: &mut BytesMut,
        routed: &mut Vec<Routed>,
    ) -> Flow {
        let request_id = frame.request_id();
        let body = frame.body_type();
        let f = frame.frame();
        match (self.state, body) {
            (State::Closing, _) => Flow::Close,
            (State::AwaitingHello, Body::Hello) => {
                let hello = f.body_as_hello().expect("body type checked");
                if hello.protocol_version() != PROTOCOL_VERSION {
                    let msg = format!(
                        "this broker speaks weir protocol {PROTOCOL_VERSION}; the client asked for {}",
                        hello.protocol_version()
                    );
                    return self.fail(out, request_id, ErrorCode::ProtocolVersion, msg, true);
                }
                self.state = State::Open;
                let welcome = self.welcome();
                self.reply(out, request_id, welcome)
            }
            (State::AwaitingHello, _) => {
                let msg = format!("expected Hello as the first frame, got {}", name(body));
                self.fail(out, request_id, ErrorCode::UnexpectedFrame, msg, true)
            }
            (State::Open, Body::Hello) => self.fail(
                out,
                request_id,
                ErrorCode::UnexpectedFrame,
                "Hello was already received".into(),
                true,
            ),
            (State::Open, Body::Ping) => {
                let mut pong = wire::PongT::default();
                pong.payload = f.body_as_ping().expect("body type checked").payload();
                self.reply(out, request_id, BodyT::Pong(Box::new(pong)))
            }
            (State::Open, Body::Close) => {
                self.state = State::Closing;
                self.reply(out, request_id, BodyT::Ok(Box::default()));
                Flow::Close
            }
            (State::Open, Body::DeclareQueue) => {
                let d = f
                    .body_as_declare_queue()
                    .expect("body type checked")
                    .unpack();
                self.declare_queue(request_id, d, out, routed)
            }
            (State::Open, Body::DeleteQueue) => {
                let d = f.body_as_delete_queue().expect("body type checked");
                let op = Op::Delete {
                    name: d.name().to_string(),
                    if_unused: d.if_unused(),
                    if_empty: d.if_empty(),
                };
                let pending = Pending::DeleteQueue {
                    request_id,
                    name: d.name().to_string(),
                };
                self.route(routed, self.owner_of(d.name()), op, pending);
                Flow::Continue
            }
            (State::Open, Body::PurgeQueue) => {
                let name = f.body_as_purge_queue().expect("body type checked").name();
                self.route(
                    routed,
                    self.owner_of(name),
                    Op::Purge {
                        name: name.to_string(),
                    },
                    Pending::Reply { request_id },
                );
                Flow::Continue
            }
            (State::Open, Body::GetQueueInfo) => {
                let name = f
                    .body_as_get_queue_info()
                    .expect("body type checked")
                    .name();
                self.route(
                    routed,
                    self.owner_of(name),
                    Op::Info {
                        name: name.to_string(),
                    },
                    Pending::Reply { request_id },
                );
                Flow::Continue
            }
            (State::Open, Body::ListQueues) => {
                let l = f.body_as_list_queues().expect("body type checked");
                // A page's tables (a QueueInfo and its arguments per queue) must stay within the
                // client decoder's verifier budget: 1000 queues are about 2000 tables.
                let limit = if l.limit() == 0 {
                    LIST_PAGE_MAX
                } else {
                    l.limit().min(LIST_PAGE_MAX as u32) as usize
                };
                let shards = self.ctx.shard_count();
                let (prefix, after) = (
                    l.prefix().unwrap_or("").to_string(),
                    l.after().unwrap_or("").to_string(),
                );
                let id = self.next_id;
                self.next_id += 1;
                self.pending.insert(
                    id,
                    Pending::List {
                        request_id,
                        remaining: shards,
                        limit,
                        queues: Vec::new(),
                    },
                );
                for shard in 0..shards {
                    // One more than the page, to know whether more follow.
                    let op = Op::List {
                        prefix: prefix.clone(),
                        after: after.clone(),
                        limit: limit + 1,
                    };
                    routed.push(Routed { shard, id, op });
                }
                Flow::Continue
            }
            (State::Open, Body::Publish) => self.publish(frame, out, routed),
            (State::Open, Body::GetStatus) => {
                let shards = self.ctx.shard_count();
                let id = self.next_id;
                self.next_id += 1;
                self.pending.insert(
                    id,
                    Pending::Status {
                        request_id,
                        remaining: shards,
                        shards: Vec::new(),
                    },
                );
                for shard in 0..shards {
                    routed.push(Routed {
                        shard,
                        id,
                        op: Op::Status,
                    });
                }
                Flow::Continue
            }
            (State::Open, Body::Consume) => {
                let c = f.body_as_consume().expect("body type checked");
                self.consume(request_id, c, out, routed)
            }
            (State::Open, Body::Cancel) => {
                let tag = f
                    .body_as_cancel()
                    .expect("body type checked")
                    .consumer_tag();
                match self.consumers.get(tag).cloned() {
                    Some(ConsumerRef {
                        shard,
                        queue,
                        owner: Some(owner),
                    }) => {
                        self.consumers.remove(tag);
                        self.route(
                            routed,
                            shard,
                            Op::Cancel { queue, owner },
                            Pending::Cancel { request_id },
                        );
                        Flow::Continue
                    }
                    _ => {
                        let msg = format!("no consumer '{tag}' on this connection");
                        self.fail(out, request_id, ErrorCode::NotFound, msg, false)
                    }
                }
            }
            (State::Open, Body::SetPrefetch) => {
                let sp = f.body_as_set_prefetch().expect("body type checked");
                let (tag, prefetch) = (sp.consumer_tag(), sp.prefetch());
                if prefetch == 0 || prefetch > self.ctx.prefetch_max {
                    let msg = format!(
                        "prefetch {prefetch}: must be 1 to prefetch_max {}",
                        self.ctx.prefetch_max
                    );
                    return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
                }
                match self.consumers.get(tag).cloned() {
                    Some(ConsumerRef {
                        shard,
                        queue,
                        owner: Some(owner),
                    }) => {
                        let op = Op::SetPrefetch {
                            queue,
                            owner,
                            prefetch,
                        };
                        self.route(routed, shard, op, Pending::Reply { request_id });
                        Flow::Continue
                    }
                    _ => {
                        let msg = format!("no consumer '{tag}' on this connection");
                        self.fail(out, request_id, ErrorCode::NotFound, msg, false)
                    }
                }
            }
            (State::Open, Body::Ack) => {
                let ranges: Vec<Range> = f
                    .body_as_ack()
                    .expect("body type checked")
                    .ranges()
                    .iter()
                    .copied()
                    .collect();
                self.settle(request_id, &ranges, true, false, out, routed)
            }
            (State::Open, Body::Nack) => {
                let n = f.body_as_nack().expect("body type checked");
                let ranges: Vec<Range> = n.ranges().iter().copied().collect();
                self.settle(request_id, &ranges, false, n.requeue(), out, routed)
            }
            (State::Open, Body::Reject) => {
                let r = f.body_as_reject().expect("body type checked");
                let range = Range::new(r.delivery_tag(), r.delivery_tag());
                self.settle(request_id, &[range], false, r.requeue(), out, routed)
            }
            (State::Open, Body::Get) => {
                let g = f.body_as_get().expect("body type checked");
                let shard = self.owner_of(g.queue());
                let op = Op::Get {
                    queue: g.queue().to_string(),
                    auto_ack: g.auto_ack(),
                };
                self.route(routed, shard, op, Pending::Get { request_id, shard });
                Flow::Continue
            }
            (State::Open, Body::DeclareExchange) => {
                let d = f.body_as_declare_exchange().expect("body type checked");
                let Some(kind) = ExchangeKind::from_wire(d.kind()) else {
                    let msg = format!(
                        "exchange kind {} is not direct, topic or fanout",
                        d.kind().0
                    );
                    return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
                };
                let op = ControlOp::DeclareExchange {
                    decl: ExchangeDecl {
                        name: d.name().to_string(),
                        kind,
                        durable: d.durable(),
                        auto_delete: d.auto_delete(),
                    },
                    passive: d.passive(),
                };
                self.control(request_id, op, routed)
            }
            (State::Open, Body::DeleteExchange) => {
                let d = f.body_as_delete_exchange().expect("body type checked");
                let op = ControlOp::DeleteExchange {
                    name: d.name().to_string(),
                    if_unused: d.if_unused(),
                };
                self.control(request_id, op, routed)
            }
            (State::Open, Body::Bind) => {
                let b = f.body_as_bind().expect("body type checked");
                let binding = binding_of(b.exchange(), b.queue(), b.binding_key());
                // The queue's owner says whether it exists (and is this connection's to bind, if
                // exclusive) and whether it is durable; the writer does the rest.
                let op = Op::Info {
                    name: binding.queue.clone(),
                };
                let shard = self.owner_of(&binding.queue);
                let pending = Pending::BindQueue {
                    request_id,
                    binding,
                };
                self.route(routed, shard, op, pending);
                Flow::Continue
            }
            (State::Open, Body::Unbind) => {
                let b = f.body_as_unbind().expect("body type checked");
                let binding = binding_of(b.exchange(), b.queue(), b.binding_key());
                self.control(request_id, ControlOp::Unbind { binding }, routed)
            }
            (State::Open, Body::ListExchanges) => {
                let l = f.body_as_list_exchanges().expect("body type checked");
                let limit = match l.limit() {
                    0 => LIST_PAGE_MAX,
                    n => (n as usize).min(LIST_PAGE_MAX),
                };
                let (prefix, after) = (l.prefix().unwrap_or(""), l.after().unwrap_or(""));
                let table = self.routing.table.borrow();
                let mut exchanges: Vec<wire::ExchangeInfoT> = table
                    .exchanges()
                    .into_iter()
                    .filter(|(e, _)| e.name.starts_with(prefix) && e.name.as_str() > after)
                    .take(limit + 1)
                    .map(|(e, bindings)| {
                        let mut i = wire::ExchangeInfoT::default();
                        i.name = Some(e.name.clone());
                        i.kind = e.kind.to_wire();
                        i.durable = e.durable;
                        i.auto_delete = e.auto_delete;
                        i.bindings = bindings as u32;
                        i
                    })
                    .collect();
                drop(table);
                let more = exchanges.len() > limit;
                exchanges.truncate(limit);
                let mut list = wire::ExchangeListT::default();
                list.exchanges = Some(exchanges);
                list.more = more;
                self.reply(out, request_id, BodyT::ExchangeList(Box::new(list)))
            }
            (State::Open, Body::ListBindings) => {
                let l = f.body_as_list_bindings().expect("body type checked");
                let bindings: Vec<wire::BindingInfoT> = self
                    .routing
                    .table
                    .borrow()
                    .bindings(l.exchange(), l.queue())
                    .into_iter()
                    .take(BINDING_LIST_MAX)
                    .map(|b| {
                        let mut i = wire::BindingInfoT::default();
                        i.exchange = Some(b.exchange);
                        i.queue = Some(b.queue);
                        i.binding_key = Some(b.key);
                        i
                    })
                    .collect();
                let mut list = wire::BindingListT::default();
                list.bindings = Some(bindings);
                self.reply(out, request_id, BodyT::BindingList(Box::new(list)))
            }
            (State::Open, b) if broker_only(b) => {
                let msg = format!("{} is sent by the broker, never to it", name(b));
                self.fail(out, request_id, ErrorCode::UnexpectedFrame, msg, true)
            }
            (State::Open, b) => {
                let msg = format!("{} is not served by this broker version yet", name(b));
                self.fail(out, request_id, ErrorCode::UnsupportedFrame, msg, false)
            }
        }
    }

    /// Sends a routing change to the control-plane writer; its `Ok` comes once every shard has it.
    fn control(&mut self, request_id: u64, op: ControlOp, routed: &mut Vec<Routed>) -> Flow {
        let pending = Pending::Reply { request_id };
        self.route(routed, CONTROL_SHARD, Op::Control(op), pending);
        Flow::Continue
    }

    fn declare_queue(
        &mut self,
        request_id: u64,
        d: wire::DeclareQueueT,
        out: &mut BytesMut,
        routed: &mut Vec<Routed>,
    ) -> Flow {
        let mut name = d.name.unwrap_or_default();
        if name.starts_with("weir.") {
            let msg = format!(
                "queue name '{name}': names starting with 'weir.' are reserved for the broker"
            );
            return self.fail(out, request_id, ErrorCode::AccessRefused, msg, false);
        }
        if name.is_empty() {
            if d.passive {
                return self.fail(
                    out,
                    request_id,
                    ErrorCode::NotFound,
                    "a passive declare needs a name".into(),
                    false,
                );
            }
            // Placed on this connection's own shard (the name is drawn until it hashes there):
            // the connection that declared it is the one that may use it, and a shard-aware
            // client sends its traffic by the name's hash, so it lands here too, with no hop.
            loop {
                name = format!("weir.gen-{:x}-{}", self.ctx.connection_id, self.next_name);
                self.next_name += 1;
                if self.owner_of(&name) == self.ctx.shard {
                    break;
                }
            }
        }
        let shard = self.owner_of(&name);
        let arguments = d.arguments.map(|a| *a).unwrap_or_default();
        if let Some(pinned) = arguments.shard.filter(|s| *s != shard) {
            let msg = format!(
                "arguments.shard {pinned}: queue '{name}' is placed on shard {shard} by the hash of its name; \
                 pinning a queue elsewhere arrives with the control plane"
            );
            return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
        }
        let declare = Declare {
            name,
            passive: d.passive,
            durable: d.durable,
            exclusive: d.exclusive,
            auto_delete: d.auto_delete,
            arguments,
        };
        self.route(
            routed,
            shard,
            Op::Declare(declare),
            Pending::Reply { request_id },
        );
        Flow::Continue
    }

    fn publish(&mut self, frame: &InFrame, out: &mut BytesMut, routed: &mut Vec<Routed>) -> Flow {
        let p = frame.frame().body_as_publish().expect("body type checked");
        let confirm = p.confirm();
        if p.producer_id().is_some() {
            // Refused rather than ignored: a producer that asks for de-duplication must not be
            // told yes by a broker that would store its re-sends twice.
            let seqs = frame.publish_entries().map(|(e, _)| e.sequence()).collect();
            let msg =
                "producer_id: idempotent publishing is not served by this broker version yet; \
                       publish without it (at least once)"
                    .to_string();
            self.fail_sequences(
                out,
                ErrorCode::InvalidArgument,
                msg,
                weir_protocol::ranges_of(seqs),
            );
            return Flow::Continue;
        }
        let mut delayed: Vec<u64> = Vec::new();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut by_shard: BTreeMap<u16, Vec<PublishItem>> = BTreeMap::new();
        let mut no_exchange: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut unroutable: Vec<u64> = Vec::new();
        let mut returned: Vec<wire::ReturnedT> = Vec::new();
        for (entry, bytes) in frame.publish_entries() {
            let exchange = entry.exchange().unwrap_or("");
            let key = entry.routing_key().unwrap_or("");
            let message = entry.message_nested_flatbuffer(); // verified at ingress by the decoder
            let deliver_at_ms = message.deliver_at_ms().filter(|t| *t > 0).map(|t| t as u64);
            if deliver_at_ms.is_some_and(|t| t > now_ms.saturating_add(self.ctx.delay_ms_max)) {
                delayed.push(entry.sequence()); // refused: past the limit
                continue;
            }
            let item = PublishItem {
                sequence: entry.sequence(),
                queue: key.to_string(),
                also: Vec::new(),
                exchange: exchange.to_string(),
                routing_key: key.to_string(),
                mandatory: entry.mandatory(),
                confirm,
                persistent: message.persistent(),
                bytes,
                expiration_ms: message.expiration_ms().map(u64::from),
                deliver_at_ms,
            };
            if exchange.is_empty() {
                // The default exchange: the key names the queue.
                by_shard.entry(self.owner_of(key)).or_default().push(item);
                continue;
            }
            // Routed here, on the publishing shard, by this shard's copy of the table.
            let mut queues = std::mem::take(&mut self.route_buf);
            queues.clear();
            let found = {
                let table = self.routing.table.borrow();
                let mut matched: Vec<&str> = Vec::new();
                let found = table.route(exchange, key, &mut matched);
                queues.extend(matched.into_iter().map(str::to_string));
                found
            };
            if found.is_err() {
                no_exchange
                    .entry(exchange.to_string())
                    .or_default()
                    .push(item.sequence);
            } else if queues.is_empty() {
                if item.mandatory {
                    returned.push(returned_of(item));
                } else {
                    self.routing
                        .unroutable
                        .set(self.routing.unroutable.get() + 1);
                }
                if confirm {
                    unroutable.push(entry.sequence());
                }
            } else {
                self.split_by_owner(item, &mut queues, &mut by_shard);
            }
            self.route_buf = queues;
        }
        if !returned.is_empty() {
            // A returned message is sent back before its confirm, as AMQP does.
            let mut r = wire::ReturnT::default();
            r.entries = returned;
            self.reply(out, 0, BodyT::Return(Box::new(r)));
        }
        if !unroutable.is_empty() {
            // Nothing to store, so nothing to wait for: confirmed at once, as AMQP does.
            let ranges = weir_protocol::ranges_of(unroutable);
            if let Err(e) = self
                .encoder
                .confirm(out, &ranges, wire::Durability::Transient, &[])
            {
                tracing::error!("cannot encode a confirm: {e}");
            }
        }
        if !delayed.is_empty() {
            let msg = format!(
                "deliver_at_ms: more than delay_ms_max = {} ms from now",
                self.ctx.delay_ms_max
            );
            self.fail_sequences(
                out,
                ErrorCode::InvalidArgument,
                msg,
                weir_protocol::ranges_of(delayed),
            );
        }
        for (exchange, seqs) in no_exchange {
            let msg = format!("exchange '{exchange}' not found");
            self.fail_sequences(
                out,
                ErrorCode::NotFound,
                msg,
                weir_protocol::ranges_of(seqs),
            );
        }
        for (shard, items) in by_shard {
            self.unconfirmed += items.len() as u64;
            self.route(routed, shard, Op::Publish(items), Pending::Publish);
        }
        Flow::Continue
    }

    /// Addresses a routed message to the shards owning its queues: one item per shard, naming
    /// all that shard's queues (stored there once), or one per `targets_per_message_max` of
    /// them. The same `Bytes` go to every shard: a reference count each, no copy.
    fn split_by_owner(
        &mut self,
        item: PublishItem,
        queues: &mut Vec<String>,
        by_shard: &mut BTreeMap<u16, Vec<PublishItem>>,
    ) {
        let max = self.ctx.targets_per_message_max as usize;
        let parts = crate::broker::ops::address(item, queues, self.ctx.shard_count(), max);
        if parts.len() > 1 {
            self.splits.insert(
                parts[0].1.sequence,
                Split {
                    parts_left: parts.len() as u16,
                    journaled: false,
                    taken: false,
                    refusal: None,
                    returned: None,
                },
            );
        }
        for (shard, part) in parts {
            by_shard.entry(shard).or_default().push(part);
        }
    }

    fn consume(
        &mut self,
        request_id: u64,
        c: wire::Consume<'_>,
        out: &mut BytesMut,
        routed: &mut Vec<Routed>,
    ) -> Flow {
        let prefetch = if c.prefetch() == 0 {
            self.ctx.prefetch_default
        } else {
            c.prefetch()
        };
        if prefetch > self.ctx.prefetch_max {
            let msg = format!(
                "prefetch {prefetch} exceeds prefetch_max {}",
                self.ctx.prefetch_max
            );
            return self.fail(out, request_id, ErrorCode::InvalidArgument, msg, false);
        }
        let tag = match c.consumer_tag().filter(|t| !t.is_empty()) {
            Some(t) => t.to_string(),
            None => {
                self.next_name += 1;
                format!("ctag-{}", self.next_name - 1)
            }
        };
        if self.consumers.contains_key(&tag) {
            let msg = format!("consumer tag '{tag}' is in use on this connection");
            return self.fail(out, request_id, ErrorCode::DuplicateConsumerTag, msg, false);
        }
        let queue = c.queue().to_string();
        let shard = self.owner_of(&queue);
        // Registered now, so deliveries that overtake the reply find their consumer.
        self.consumers.insert(
            tag.clone(),
            ConsumerRef {
                shard,
                queue: queue.clone(),
                owner: None,
            },
        );
        let op = Op::Consume {
            queue,
            tag: tag.clone(),
            prefetch,
            auto_ack: c.auto_ack(),
            exclusive: c.exclusive(),
        };
        self.route(routed, shard, op, Pending::Consume { request_id, tag });
        Flow::Continue
    }

    fn settle(
        &mut self,
        request_id: u64,
        ranges: &[Range],
        ack: bool,
        requeue: bool,
        out: &mut BytesMut,
        routed: &mut Vec<Routed>,
    ) -> Flow {
        let mut by_shard: BTreeMap<u16, Vec<SettleItem>> = BTreeMap::new();
        for r in ranges {
            let tags: Vec<u64> = self
                .outstanding
                .range(r.first()..=r.last())
                .map(|(t, _)| *t)
                .collect();
            if tags.is_empty() {
                let msg = format!(
                    "no outstanding delivery in tags {}..={}",
                    r.first(),
                    r.last()
                );
                return self.fail(out, request_id, ErrorCode::UnknownDeliveryTag, msg, false);
            }
            for tag in tags {
                let o = self.outstanding.remove(&tag).expect("listed above");
                by_shard.entry(o.shard).or_default().push(SettleItem {
                    queue: o.queue,
                    owner: o.owner,
                    seq: o.seq,
                    ack,
                    requeue,
                });
            }
        }
        // A settlement that asked for a reply is answered once every shard it touched answered.
        let wait = (request_id != 0).then(|| {
            let wait = self.next_id;
            self.next_id += 1;
            self.settle_waits
                .insert(wait, (by_shard.len() as u16, None));
            wait
        });
        for (shard, items) in by_shard {
            let pending = match wait {
                Some(wait) => Pending::Settle { request_id, wait },
                None => Pending::Quiet,
            };
            self.route(routed, shard, Op::Settle(items), pending);
        }
        Flow::Continue
    }

    /// Answers a routed op's reply; a reply that is one step of a longer request (a bind's queue
    /// check) routes the next step.
    pub fn on_reply(
        &mut self,
        id: u64,
        reply: Reply,
        out: &mut BytesMut,
        routed: &mut Vec<Routed>,
    ) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match (pending, reply) {
            (Pending::Quiet, Reply::SettleFailed(f)) => {
                for r in f {
                    self.fail(out, 0, r.code, r.message, false);
                }
            }
            (Pending::Quiet, _) => {}
            (Pending::Publish, Reply::Published(outcomes)) => self.published(outcomes, out),
            (Pending::Publish, other) => tracing::error!(?other, "unexpected reply to a publish"),
            (
                Pending::List {
                    request_id,
                    remaining,
                    limit,
                    mut queues,
                },
                reply,
            ) => {
                if let Reply::List(more) = reply {
                    queues.extend(more);
                }
                if remaining > 1 {
                    self.pending.insert(
                        id,
                        Pending::List {
                            request_id,
                            remaining: remaining - 1,
                            limit,
                            queues,
                        },
                    );
                    return;
                }
                queues.sort_by(|a, b| a.name.cmp(&b.name));
                let more = queues.len() > limit;
                queues.truncate(limit);
                let mut list = wire::QueueListT::default();
                list.queues = Some(queues);
                list.more = more;
                self.reply(out, request_id, BodyT::QueueList(Box::new(list)));
            }
            (
                Pending::Status {
                    request_id,
                    remaining,
                    mut shards,
                },
                reply,
            ) => {
                if let Reply::ShardStatus(st) = reply {
                    shards.push(*st);
                }
                if remaining > 1 {
                    self.pending.insert(
                        id,
                        Pending::Status {
                            request_id,
                            remaining: remaining - 1,
                            shards,
                        },
                    );
                    return;
                }
                shards.sort_by_key(|s| s.shard);
                let status = self.status(shards);
                self.reply(out, request_id, BodyT::Status(Box::new(status)));
            }
            (Pending::Reply { request_id }, reply) => self.on_reply_to(request_id, reply, out),
            (
                Pending::BindQueue {
                    request_id,
                    mut binding,
                },
                reply,
            ) => match reply {
                Reply::Info(info) => {
                    binding.durable = info.durable && !info.exclusive;
                    self.control(request_id, ControlOp::Bind { binding }, routed);
                }
                Reply::Refused(r) => self.refuse(out, request_id, r),
                other => tracing::error!(?other, "unexpected reply to a bind's queue check"),
            },
            (Pending::DeleteQueue { request_id, name }, Reply::Deleted(messages))
                if self.routing.table.borrow().has_bindings_to(&name) =>
            {
                let op = Op::Control(ControlOp::QueueGone { queue: name });
                let pending = Pending::QueueUnbound {
                    request_id,
                    messages,
                };
                self.route(routed, CONTROL_SHARD, op, pending);
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
            (Pending::Consume { request_id, tag }, reply) => match reply {
                Reply::Consumed(owner) => {
                    let shard = match self.consumers.get_mut(&tag) {
                        Some(c) => {
                            c.owner = Some(owner);
                            c.shard
                        }
                        None => return,
                    };
                    let mut ok = wire::ConsumeOkT::default();
                    ok.consumer_tag = Some(tag);
                    ok.shard = shard;
                    self.reply(out, request_id, BodyT::ConsumeOk(Box::new(ok)));
                }
                Reply::Refused(r) => {
                    self.consumers.remove(&tag);
                    self.refuse(out, request_id, r);
                }
                other => tracing::error!(?other, "unexpected reply to consume"),
            },
            (Pending::Cancel { request_id }, reply) => match reply {
                Reply::Refused(r) => self.refuse(out, request_id, r),
                _ => {
                    self.reply(out, request_id, BodyT::Ok(Box::default()));
                }
            },
            (Pending::Settle { request_id, wait }, reply) => {
                let Some((remaining, failure)) = self.settle_waits.get_mut(&wait) else {
                    return;
                };
                if let Reply::SettleFailed(mut f) = reply {
                    failure.get_or_insert_with(|| f.remove(0));
                }
                *remaining -= 1;
                if *remaining == 0 {
                    let (_, failure) = self.settle_waits.remove(&wait).expect("present");
                    match failure {
                        Some(r) => self.refuse(out, request_id, r),
                        None => {
                            self.reply(out, request_id, BodyT::Ok(Box::default()));
                        }
                    }
                }
            }
            (Pending::Get { request_id, shard }, reply) => match reply {
                Reply::Got(d, ready) => {
                    let mut ok = wire::GetOkT::default();
                    ok.messages_ready = ready;
                    ok.delivery = d.map(|d| Box::new(self.take_delivery(shard, *d)));
                    self.reply(out, request_id, BodyT::GetOk(Box::new(ok)));
                }
                Reply::Refused(r) => self.refuse(out, request_id, r),
                other => tracing::error!(?other, "unexpected reply to get"),
            },
        }
    }

    /// Answers a client's request with an owner's reply as it is.
    fn on_reply_to(&mut self, request_id: u64, reply: Reply, out: &mut BytesMut) {
        let body = match reply {
            Reply::Info(i) => BodyT::QueueInfo(i),
            Reply::Deleted(n) => {
                let mut d = wire::QueueDeletedT::default();
                d.messages = n;
                BodyT::QueueDeleted(Box::new(d))
            }
            Reply::Purged(n) => {
                let mut p = wire::QueuePurgedT::default();
                p.messages = n;
                BodyT::QueuePurged(Box::new(p))
            }
            Reply::Refused(r) => return self.refuse(out, request_id, r),
            Reply::Done => BodyT::Ok(Box::default()),
            other => {
                tracing::error!(?other, "unexpected reply");
                return self.refuse(
                    out,
                    request_id,
                    Refusal {
                        code: ErrorCode::Internal,
                        message: "unexpected reply".into(),
                    },
                );
            }
        };
        self.reply(out, request_id, body);
    }

    /// The `Status` reply: totals, and every shard's counters by name (`shard.N.what`), so that
    /// counters can be added without changing the schema.
    fn status(&self, shards: Vec<crate::broker::ops::ShardStatus>) -> wire::StatusT {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut st = wire::StatusT::default();
        st.broker_version = Some(self.ctx.broker_version.to_string());
        st.shard_count = self.ctx.shard_count();
        st.uptime_ms = now.saturating_sub(self.ctx.started_ms);
        st.connections = shards.iter().map(|s| s.connections).sum::<u64>() as u32;
        st.queues = shards.iter().map(|s| s.queues).sum::<u64>() as u32;
        let mut counters = Vec::new();
        for s in &shards {
            let fields = [
                ("connections", s.connections),
                ("queues", s.queues),
                ("messages_ready", s.messages_ready),
                ("messages_unacked", s.messages_unacked),
                ("consumers", s.consumers),
                ("messages_dropped", s.dropped),
                ("messages_dead_lettered", s.dead_lettered),
                ("messages_unroutable", s.unroutable),
                ("exchanges", s.exchanges),
                ("bindings", s.bindings),
                ("cache_bytes", s.cache_bytes),
                ("cache_bytes_max", s.cache_bytes_max),
                ("journal.commits", s.journal_commits),
                ("journal.records", s.journal_records),
                ("journal.bytes_written", s.journal_bytes_written),
                ("journal.fdatasyncs", s.journal_fdatasyncs),
                ("journal.segments", s.journal_segments),
            ];
            for (name, value) in fields {
                let mut c = wire::CounterT::default();
                c.name = format!("shard.{}.{name}", s.shard);
                c.value = value;
                counters.push(c);
            }
        }
        st.counters = Some(counters);
        st
    }

    /// Assigns a delivery tag to a delivery and remembers it unless it was auto-acked.
    fn take_delivery(&mut self, shard: u16, d: WireDelivery) -> wire::DeliveryT {
        let tag = self.next_delivery_tag;
        self.next_delivery_tag += 1;
        let mut t = wire::DeliveryT::default();
        t.delivery_tag = tag;
        t.redelivered = d.delivery_count > 1;
        t.delivery_count = d.delivery_count;
        t.exchange = Some(d.exchange).filter(|e| !e.is_empty());
        t.routing_key = Some(d.routing_key).filter(|k| !k.is_empty());
        t.message = d.bytes.to_vec();
        if !d.auto_ack {
            self.outstanding.insert(
                tag,
                Outstanding {
                    shard,
                    queue: d.queue,
                    owner: d.owner,
                    seq: d.seq,
                },
            );
        }
        t
    }

    fn published(&mut self, outcomes: Vec<PublishOutcome>, out: &mut BytesMut) {
        self.unconfirmed -= outcomes.len() as u64;
        // Journaled ones were confirmed after their group commit; the others live in memory only.
        let mut confirmed: Vec<u64> = Vec::new();
        let mut confirmed_transient: Vec<u64> = Vec::new();
        let mut refused: BTreeMap<(u16, String), Vec<u64>> = BTreeMap::new();
        let mut returned = Vec::new();
        for o in outcomes {
            let Some(o) = self.merge_split(o) else {
                continue;
            };
            match o.result {
                Ok(()) if o.confirm && o.journaled => confirmed.push(o.sequence),
                Ok(()) if o.confirm => confirmed_transient.push(o.sequence),
                Ok(()) => {}
                Err(r) => refused
                    .entry((r.code.0, r.message))
                    .or_default()
                    .push(o.sequence),
            }
            if let Some(item) = o.returned {
                returned.push(returned_of(item));
            }
        }
        if !returned.is_empty() {
            // A returned message is sent back before its confirm, as AMQP does.
            let mut r = wire::ReturnT::default();
            r.entries = returned;
            self.reply(out, 0, BodyT::Return(Box::new(r)));
        }
        let durability = self.ctx.durability;
        for (seqs, durability) in [
            (confirmed, durability),
            (confirmed_transient, wire::Durability::Transient),
        ] {
            if seqs.is_empty() {
                continue;
            }
            if let Err(e) =
                self.encoder
                    .confirm(out, &weir_protocol::ranges_of(seqs), durability, &[])
            {
                tracing::error!("cannot encode a confirm: {e}");
            }
        }
        for ((code, message), seqs) in refused {
            self.fail_sequences(
                out,
                ErrorCode(code),
                message,
                weir_protocol::ranges_of(seqs),
            );
        }
    }

    /// One shard's part of a publish split across shards: `None` until the last part is in,
    /// then the whole publish's outcome (refused if any part was; journaled if any part was;
    /// returned only if no part reached a queue).
    fn merge_split(&mut self, o: PublishOutcome) -> Option<PublishOutcome> {
        let Some(split) = self.splits.get_mut(&o.sequence) else {
            return Some(o);
        };
        split.parts_left -= 1;
        split.journaled |= o.journaled;
        match o.result {
            Ok(()) if o.returned.is_some() => split.returned = o.returned,
            Ok(()) => split.taken = true,
            Err(r) => {
                split.taken = true;
                split.refusal.get_or_insert(r);
            }
        }
        if split.parts_left > 0 {
            return None;
        }
        let split = self.splits.remove(&o.sequence).expect("present");
        Some(PublishOutcome {
            sequence: o.sequence,
            confirm: o.confirm,
            journaled: split.journaled,
            result: split.refusal.map_or(Ok(()), Err),
            returned: if split.taken { None } else { split.returned },
        })
    }

    /// Handles deliveries and cancellations pushed by an owning shard.
    pub fn on_push(
        &mut self,
        from_shard: u16,
        pushed: Pushed,
        out: &mut BytesMut,
        routed: &mut Vec<Routed>,
    ) {
        match pushed {
            Pushed::Deliver {
                consumer_tag,
                deliveries,
                ..
            } => {
                if !self.consumers.contains_key(&consumer_tag) || self.state != State::Open {
                    // Cancelled meanwhile: these go back to their queue for someone else.
                    let items: Vec<SettleItem> = deliveries
                        .into_iter()
                        .filter(|d| !d.auto_ack)
                        .map(|d| SettleItem {
                            queue: d.queue,
                            owner: d.owner,
                            seq: d.seq,
                            ack: false,
                            requeue: true,
                        })
                        .collect();
                    if !items.is_empty() {
                        self.route(routed, from_shard, Op::Settle(items), Pending::Quiet);
                    }
                    return;
                }
                let max = self.ctx.limits.deliver_batch_max as usize;
                let mut batch: Vec<(u64, WireDelivery)> =
                    Vec::with_capacity(deliveries.len().min(max));
                for d in deliveries {
                    let tag = self.next_delivery_tag;
                    self.next_delivery_tag += 1;
                    if !d.auto_ack {
                        let o = Outstanding {
                            shard: from_shard,
                            queue: d.queue.clone(),
                            owner: d.owner,
                            seq: d.seq,
                        };
                        self.outstanding.insert(tag, o);
                    }
                    batch.push((tag, d));
                    if batch.len() == max {
                        self.encode_deliver(&consumer_tag, &batch, out);
                        batch.clear();
                    }
                }
                if !batch.is_empty() {
                    self.encode_deliver(&consumer_tag, &batch, out);
                }
            }
            Pushed::Cancelled(c) => {
                self.consumers.remove(&c.consumer_tag);
                let mut cc = wire::ConsumerCancelledT::default();
                cc.consumer_tag = Some(c.consumer_tag);
                cc.code = ErrorCode::Deleted;
                cc.message = Some(c.message);
                self.reply(out, 0, BodyT::ConsumerCancelled(Box::new(cc)));
            }
        }
    }

    fn encode_deliver(
        &mut self,
        consumer_tag: &str,
        batch: &[(u64, WireDelivery)],
        out: &mut BytesMut,
    ) {
        let items = batch.iter().map(|(tag, d)| DeliveryItem {
            delivery_tag: *tag,
            redelivered: d.delivery_count > 1,
            delivery_count: d.delivery_count,
            exchange: &d.exchange,
            routing_key: &d.routing_key,
            message: &d.bytes,
        });
        if let Err(e) = self.encoder.deliver(out, consumer_tag, items) {
            tracing::error!("cannot encode a delivery: {e}");
        }
    }

    /// The connection is gone: every shard releases what it held for it.
    pub fn on_closed(&mut self, routed: &mut Vec<Routed>) {
        self.state = State::Closing;
        for shard in 0..self.ctx.shard_count() {
            self.route(routed, shard, Op::ConnectionClosed, Pending::Quiet);
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

    fn welcome(&self) -> BodyT {
        let c = &self.ctx;
        let mut limits = wire::LimitsT::default();
        limits.frame_size_max = c.limits.frame_size_max;
        limits.message_size_max = c.limits.message_size_max;
        limits.publish_batch_max = c.limits.publish_batch_max;
        limits.deliver_batch_max = c.limits.deliver_batch_max;
        limits.publishes_in_flight_max = c.publishes_in_flight_max;
        limits.prefetch_max = c.prefetch_max;
        limits.name_length_max = c.limits.name_length_max;
        limits.headers_max = c.limits.headers_max;
        let mut w = wire::WelcomeT::default();
        w.protocol_version = PROTOCOL_VERSION;
        w.broker_version = Some(c.broker_version.to_string());
        w.shard_count = c.shard_count();
        w.shard = c.shard;
        w.shard_ports = Some(c.shard_ports.clone());
        w.limits = Some(Box::new(limits));
        w.durability = c.durability;
        w.connection_id = c.connection_id;
        BodyT::Welcome(Box::new(w))
    }

    fn reply(&mut self, out: &mut BytesMut, request_id: u64, body: BodyT) -> Flow {
        // Replies are frames built from our own values; failing to encode one is a broker bug,
        // and the connection cannot go on without its reply.
        match self
            .encoder
            .encode(&weir_protocol::frame(request_id, body), out)
        {
            Ok(_) => Flow::Continue,
            Err(e) => {
                tracing::error!(
                    connection = self.ctx.connection_id,
                    "cannot encode a reply: {e}"
                );
                self.state = State::Closing;
                Flow::Close
            }
        }
    }

    fn refuse(&mut self, out: &mut BytesMut, request_id: u64, r: Refusal) {
        self.fail(out, request_id, r.code, r.message, false);
    }

    fn fail_sequences(
        &mut self,
        out: &mut BytesMut,
        code: ErrorCode,
        message: String,
        sequences: Vec<Range>,
    ) {
        let mut e = wire::ErrorT::default();
        e.code = code;
        e.message = Some(message);
        e.sequences = Some(sequences.iter().map(|r| r.unpack()).collect());
        self.reply(out, 0, BodyT::Error(Box::new(e)));
    }

    fn fail(
        &mut self,
        out: &mut BytesMut,
        request_id: u64,
        code: ErrorCode,
        message: String,
        close: bool,
    ) -> Flow {
        tracing::debug!(
            connection = self.ctx.connection_id,
            ?code,
            close,
            "{message}"
        );
        let mut e = wire::ErrorT::default();
        e.code = code;
        e.message = Some(message);
        e.close = close;
        let flow = self.reply(out, request_id, BodyT::Error(Box::new(e)));
        if close {
            self.state = State::Closing;
            return Flow::Close;
        }
        flow
    }
}

/// Most queues in one `QueueList` page: about two tables each, far within the verifier budget a
/// client's decoder applies (`WireLimits::verifier_tables_max`).
const LIST_PAGE_MAX: usize = 1000;
// A full page must verify in a client that uses the default wire limits.
const _: () = assert!(2 * LIST_PAGE_MAX + 64 <= WireLimits::DEFAULT.verifier_tables_max);

/// Most bindings in one `BindingList` (one table each, within the verifier budget).
const BINDING_LIST_MAX: usize = 4 * LIST_PAGE_MAX;
const _: () = assert!(BINDING_LIST_MAX + 64 <= WireLimits::DEFAULT.verifier_tables_max);

fn name(body: Body) -> &'static str {
    body.variant_name().unwrap_or("an unknown frame")
}

/// A binding as a client names it; whether it is durable is decided from its queue and exchange.
fn binding_of(exchange: &str, queue: &str, key: Option<&str>) -> Binding {
    Binding {
        exchange: exchange.to_string(),
        queue: queue.to_string(),
        key: key.unwrap_or("").to_string(),
        durable: false,
    }
}

/// A mandatory message that routed to no queue, as it goes back in a `Return`.
fn returned_of(item: PublishItem) -> wire::ReturnedT {
    let mut r = wire::ReturnedT::default();
    r.sequence = item.sequence;
    r.code = ErrorCode::NoRoute;
    r.exchange = Some(item.exchange).filter(|e| !e.is_empty());
    r.routing_key = Some(item.routing_key);
    r.message = Some(item.bytes.to_vec());
    r
}

/// Frames only the broker sends.
fn broker_only(body: Body) -> bool {
    matches!(
        body,
        Body::Welcome
            | Body::Pong
            | Body::Ok
            | Body::Error
            | Body::Blocked
            | Body::Unblocked
            | Body::QueueInfo
            | Body::QueueDeleted
            | Body::QueuePurged
            | Body::QueueList
            | Body::ExchangeList
            | Body::BindingList
            | Body::Confirm
            | Body::Return
            | Body::ConsumeOk
            | Body::ConsumerCancelled
            | Body::Deliver
            | Body::GetOk
            | Body::Status
    )
}

#[cfg(test)]
mod tests {
    use weir_protocol::{samples, FrameDecoder};

    use super::*;

    fn ctx() -> SessionCtx {
        SessionCtx {
            broker_version: "0.1.0",
            shard: 1,
            shard_ports: vec![7001, 7002],
            durability: wire::Durability::Always,
            limits: WireLimits::DEFAULT,
            publishes_in_flight_max: 100,
            prefetch_default: 10,
            prefetch_max: 1000,
            targets_per_message_max: 128,
            delay_ms_max: 1000,
            connection_id: 42,
            started_ms: 0,
        }
    }

    fn frame(body: BodyT) -> InFrame {
        let mut buf = BytesMut::new();
        Encoder::new(WireLimits::DEFAULT)
            .encode(&weir_protocol::frame(9, body), &mut buf)
            .unwrap();
        FrameDecoder::new(WireLimits::DEFAULT)
            .decode(&mut buf)
            .unwrap()
            .unwrap()
    }

    fn hello(version: u16) -> InFrame {
        let mut h = wire::HelloT::default();
        h.protocol_version = version;
        frame(BodyT::Hello(Box::new(h)))
    }

    fn replies(out: &mut BytesMut) -> Vec<wire::FrameT> {
        let decoder = FrameDecoder::new(WireLimits::DEFAULT);
        std::iter::from_fn(|| decoder.decode(out).unwrap())
            .map(|f| f.frame().unpack())
            .collect()
    }

    fn error_of(f: &wire::FrameT) -> (ErrorCode, bool) {
        match &f.body {
            BodyT::Error(e) => (e.code, e.close),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn hello_gets_a_welcome_with_the_shard_layout_and_limits() {
        let mut s = Session::new(ctx(), Rc::default());
        let mut out = BytesMut::new();
        assert_eq!(
            s.on_frame(&hello(PROTOCOL_VERSION), &mut out, &mut Vec::new()),
            Flow::Continue
        );
        let r = replies(&mut out);
        assert_eq!(r[0].request_id, 9);
        let BodyT::Welcome(w) = &r[0].body else {
            panic!("{:?}", r[0])
        };
        assert_eq!((w.shard, w.shard_count, w.connection_id), (1, 2, 42));
        assert_eq!(w.shard_ports.as_deref(), Some(&[7001, 7002][..]));
        assert_eq!(w.limits.as_ref().unwrap().publishes_in_flight_max, 100);
        assert!(s.is_open());
    }

    #[test]
    fn a_wrong_protocol_version_is_refused_and_closed() {
        let mut s = Session::new(ctx(), Rc::default());
        let mut out = BytesMut::new();
        assert_eq!(
            s.on_frame(&hello(PROTOCOL_VERSION + 1), &mut out, &mut Vec::new()),
            Flow::Close
        );
        assert_eq!(
            error_of(&replies(&mut out)[0]),
            (ErrorCode::ProtocolVersion, true)
        );
    }

    #[test]
    fn anything_before_hello_or_a_second_hello_is_refused_and_closed() {
        let mut s = Session::new(ctx(), Rc::default());
        let mut out = BytesMut::new();
        assert_eq!(
            s.on_frame(
                &frame(BodyT::Ping(Box::default())),
                &mut out,
                &mut Vec::new()
            ),
            Flow::Close
        );
        assert_eq!(
            error_of(&replies(&mut out)[0]),
            (ErrorCode::UnexpectedFrame, true)
        );

        let mut s = Session::new(ctx(), Rc::default());
        s.on_frame(&hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
        replies(&mut out);
        assert_eq!(
            s.on_frame(&hello(PROTOCOL_VERSION), &mut out, &mut Vec::new()),
            Flow::Close
        );
        assert_eq!(
            error_of(&replies(&mut out)[0]),
            (ErrorCode::UnexpectedFrame, true)
        );
    }

    #[test]
    fn every_frame_is_routed_or_answered_and_broker_only_frames_close() {
        for body in samples::bodies() {
            let kind = body.body_type();
            if matches!(kind, Body::Hello | Body::Close) {
                continue;
            }
            let mut s = Session::new(ctx(), Rc::default());
            let mut out = BytesMut::new();
            s.on_frame(&hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
            replies(&mut out);
            let mut routed = Vec::new();
            let flow = s.on_frame(&frame(body), &mut out, &mut routed);
            let r = replies(&mut out);
            if !routed.is_empty() {
                // Served by the queue's owning shard: nothing is answered until it replies.
                assert!(r.is_empty(), "{kind:?} answered before its owner replied");
                assert_eq!(flow, Flow::Continue);
                continue;
            }
            assert_eq!(r.len(), 1, "{kind:?} got {} replies", r.len());
            if kind == Body::Publish {
                // Publishes are answered by sequence, not request id: the sample asks for an
                // idempotent producer, not served yet, so both its entries are refused in one error.
                let BodyT::Error(e) = &r[0].body else {
                    panic!("{:?}", r[0])
                };
                assert_eq!((r[0].request_id, e.code), (0, ErrorCode::InvalidArgument));
                assert_eq!(
                    e.sequences.as_deref(),
                    Some(&[wire::RangeT { first: 1, last: 2 }][..])
                );
                continue;
            }
            assert_eq!(r[0].request_id, 9, "{kind:?}");
            if broker_only(kind) {
                assert_eq!(
                    (flow, error_of(&r[0])),
                    (Flow::Close, (ErrorCode::UnexpectedFrame, true)),
                    "{kind:?}"
                );
            } else if kind == Body::Ping {
                assert!(matches!(r[0].body, BodyT::Pong(ref p) if p.payload == 123_456_789));
            } else {
                assert_eq!(flow, Flow::Continue, "{kind:?}");
            }
        }
    }

    #[test]
    fn close_is_answered_then_closes() {
        let mut s = Session::new(ctx(), Rc::default());
        let mut out = BytesMut::new();
        s.on_frame(&hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
        replies(&mut out);
        assert_eq!(
            s.on_frame(
                &frame(BodyT::Close(Box::default())),
                &mut out,
                &mut Vec::new()
            ),
            Flow::Close
        );
        assert!(matches!(replies(&mut out)[0].body, BodyT::Ok(_)));
    }

    /// A session that said hello, with a routing copy holding a topic exchange `x` bound to
    /// `queues`.
    fn routed_session(queues: &[&str]) -> Session {
        use crate::broker::routing::RoutingTable;
        let mut table = RoutingTable::new();
        table
            .declare_exchange(ExchangeDecl {
                name: "x".into(),
                kind: ExchangeKind::Topic,
                durable: true,
                auto_delete: false,
            })
            .unwrap();
        for q in queues {
            table
                .bind(Binding {
                    exchange: "x".into(),
                    queue: q.to_string(),
                    key: "a.#".into(),
                    durable: true,
                })
                .unwrap();
        }
        let copy = RoutingCopy::default();
        *copy.table.borrow_mut() = table;
        let mut s = Session::new(ctx(), Rc::new(copy));
        let mut out = BytesMut::new();
        s.on_frame(&hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
        s
    }

    fn publish_to_x(key: &str, mandatory: bool) -> InFrame {
        let mut enc = Encoder::new(WireLimits::DEFAULT);
        let message = enc
            .message(&weir_protocol::MessageProps::default(), b"body")
            .unwrap();
        let mut buf = BytesMut::new();
        let item = weir_protocol::PublishItem {
            sequence: 7,
            exchange: "x",
            routing_key: key,
            mandatory,
            message: &message,
        };
        enc.publish(&mut buf, 0, None, true, [item]).unwrap();
        FrameDecoder::new(WireLimits::DEFAULT)
            .decode(&mut buf)
            .unwrap()
            .unwrap()
    }

    fn taken(p: &PublishItem, journaled: bool) -> Reply {
        Reply::Published(vec![PublishOutcome {
            sequence: p.sequence,
            confirm: true,
            journaled,
            result: Ok(()),
            returned: None,
        }])
    }

    #[test]
    fn a_message_routed_to_two_shards_is_confirmed_once_both_took_it() {
        let shards = 2;
        let (q0, q1) = (
            (0..)
                .map(|i| format!("q{i}"))
                .find(|q| placement(q, shards) == 0)
                .unwrap(),
            (0..)
                .map(|i| format!("q{i}"))
                .find(|q| placement(q, shards) == 1)
                .unwrap(),
        );
        let mut s = routed_session(&[&q0, &q1, "q-gone-later"]);
        let mut out = BytesMut::new();
        let mut routed = Vec::new();
        s.on_frame(&publish_to_x("a.b", false), &mut out, &mut routed);
        assert!(
            replies(&mut out).is_empty(),
            "nothing is confirmed before the owners answer"
        );
        // One item per owning shard; the one holding two queues names both (stored once).
        assert_eq!(routed.len(), 2);
        let items: Vec<PublishItem> = routed
            .iter()
            .map(|r| match &r.op {
                Op::Publish(items) => items[0].clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        let targets: usize = items.iter().map(|i| 1 + i.also.len()).sum();
        assert_eq!(targets, 3);
        assert!(items
            .iter()
            .all(|i| i.bytes == items[0].bytes && i.exchange == "x"));
        s.on_reply(
            routed[0].id,
            taken(&items[0], true),
            &mut out,
            &mut Vec::new(),
        );
        assert!(replies(&mut out).is_empty(), "one part of two");
        s.on_reply(
            routed[1].id,
            taken(&items[1], false),
            &mut out,
            &mut Vec::new(),
        );
        let r = replies(&mut out);
        assert_eq!(r.len(), 1);
        let BodyT::Confirm(c) = &r[0].body else {
            panic!("{:?}", r[0])
        };
        assert_eq!(c.ranges, vec![wire::RangeT { first: 7, last: 7 }]);
        assert_eq!(
            c.durability,
            wire::Durability::Always,
            "journaled on one shard"
        );
    }

    #[test]
    fn unroutable_messages_are_returned_if_mandatory_else_counted_and_both_confirmed() {
        let mut s = routed_session(&["q"]);
        let mut out = BytesMut::new();
        let mut routed = Vec::new();
        s.on_frame(&publish_to_x("b", true), &mut out, &mut routed);
        assert!(routed.is_empty());
        let r = replies(&mut out);
        assert!(matches!(r[0].body, BodyT::Return(_)), "{:?}", r[0]);
        assert!(matches!(r[1].body, BodyT::Confirm(_)), "{:?}", r[1]);
        assert_eq!(s.routing.unroutable.get(), 0);
        s.on_frame(&publish_to_x("b", false), &mut out, &mut routed);
        let r = replies(&mut out);
        assert_eq!(r.len(), 1);
        assert!(matches!(r[0].body, BodyT::Confirm(_)), "{:?}", r[0]);
        assert_eq!(s.routing.unroutable.get(), 1);
    }
}
