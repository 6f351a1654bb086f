//! Frames -> commands: what a client asked for, read once off a verified frame.
//!
//! Contract: no I/O and no state; any thread. The protocol crate turns bytes into verified
//! `InFrame`s, this module turns each into a typed `Command`, and the session turns commands
//! into state. A command borrows its frame: names are `&str` into the receive buffer and a
//! publish's messages are handed out as `Bytes` slices of it, so parsing copies and allocates
//! nothing, but for the small messages a caller asks to have copied out (`Publish::entries`).
//!
//! Faults handled: only what the decoder has not already checked (it verified the flatbuffer,
//! the body type, batch sizes, name lengths, nested messages and range order). What is left is
//! a value the schema admits but the broker does not serve (an unknown exchange kind): a
//! `CommandError`, which the session answers with an `Error` frame and goes on.

use bytes::Bytes;
use flatbuffers::Vector;
use weir_protocol::wire::{self, Body, ErrorCode};
use weir_protocol::InFrame;

use crate::broker::routing::ExchangeKind;

/// One client request, borrowed from its frame.
#[derive(Debug)]
pub enum Command<'a> {
    Hello {
        protocol_version: u16,
        client_name: &'a str,
        client_version: &'a str,
    },
    Ping {
        payload: u64,
    },
    Close,
    DeclareQueue(DeclareQueue<'a>),
    DeleteQueue {
        name: &'a str,
        if_unused: bool,
        if_empty: bool,
    },
    PurgeQueue {
        name: &'a str,
    },
    GetQueueInfo {
        name: &'a str,
    },
    /// `limit` as the client sent it (0: the broker's page size).
    ListQueues {
        prefix: &'a str,
        after: &'a str,
        limit: u32,
    },
    GetStatus,
    Publish(Publish<'a>),
    Consume(Consume<'a>),
    Cancel {
        consumer_tag: &'a str,
    },
    SetPrefetch {
        consumer_tag: &'a str,
        prefetch: u32,
    },
    /// `Ack`, `Nack` and `Reject`: one way to settle deliveries.
    Settle(Settle<'a>),
    Get {
        queue: &'a str,
        auto_ack: bool,
    },
    DeclareExchange {
        name: &'a str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        passive: bool,
    },
    DeleteExchange {
        name: &'a str,
        if_unused: bool,
    },
    Bind(BindingRef<'a>),
    Unbind(BindingRef<'a>),
    /// `limit` as the client sent it (0: the broker's page size).
    ListExchanges {
        prefix: &'a str,
        after: &'a str,
        limit: u32,
    },
    ListBindings {
        exchange: Option<&'a str>,
        queue: Option<&'a str>,
    },
    /// `limit` as the client sent it (0: the broker's page size).
    ListConnections {
        after: Option<u64>,
        limit: u32,
    },
    ListConsumers {
        prefix: &'a str,
        after_queue: &'a str,
        after_tag: &'a str,
        limit: u32,
    },
    /// A frame only the broker sends.
    BrokerOnly(Body),
    /// A frame this broker version does not serve yet.
    Unsupported(Body),
}

#[derive(Debug)]
pub struct DeclareQueue<'a> {
    /// Empty: the broker names the queue.
    pub name: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: Option<wire::QueueArguments<'a>>,
}

#[derive(Debug)]
pub struct Consume<'a> {
    pub queue: &'a str,
    /// Empty or absent: the broker names the consumer.
    pub consumer_tag: Option<&'a str>,
    /// 0: the broker's default.
    pub prefetch: u32,
    pub auto_ack: bool,
    pub exclusive: bool,
    /// Consumer priority (`x-priority`): higher first while it has credit.
    pub priority: i32,
}

/// A binding as a client names it (`Bind`, `Unbind`).
#[derive(Debug)]
pub struct BindingRef<'a> {
    pub exchange: &'a str,
    pub queue: &'a str,
    pub key: Option<&'a str>,
}

/// A settlement of delivery tags: `ack`, or a nack/reject that may requeue.
#[derive(Debug)]
pub struct Settle<'a> {
    pub tags: Tags<'a>,
    pub ack: bool,
    pub requeue: bool,
    /// `Nack.delay_ms` / `Reject.delay_ms`: a retry no sooner than this many ms from now.
    pub delay_ms: Option<u32>,
}

/// The delivery tags of a settlement, read in place.
#[derive(Debug)]
pub enum Tags<'a> {
    /// Inclusive ranges, each in order (the decoder checked).
    Ranges(Vector<'a, wire::Range>),
    /// One tag (`Reject`).
    One(u64),
}

impl Tags<'_> {
    /// The tags as inclusive `(first, last)` ranges.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (ranges, one) = match self {
            Tags::Ranges(r) => (Some(r), None),
            Tags::One(t) => (None, Some((*t, *t))),
        };
        let ranges = ranges.into_iter().flat_map(|r| r.iter());
        ranges.map(|r| (r.first(), r.last())).chain(one)
    }
}

/// A `Publish` frame: its flags, and its entries read on demand.
#[derive(Debug)]
pub struct Publish<'a> {
    pub confirm: bool,
    pub producer_id: Option<u64>,
    frame: &'a InFrame,
}

/// One message of a `Publish`, with the properties the broker acts on read off its message.
#[derive(Debug)]
pub struct PublishEntry<'a> {
    pub sequence: u64,
    /// Empty: the default exchange (the key names the queue).
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub mandatory: bool,
    pub persistent: bool,
    /// Absent, or not after the epoch: delivered at once.
    pub deliver_at_ms: Option<u64>,
    pub expiration_ms: Option<u64>,
    /// The message, a slice of the receive buffer or (if small) a copy: what is stored and
    /// delivered.
    pub bytes: Bytes,
    /// The message's `priority` (0 unless set): a priority queue orders by it.
    pub priority: u8,
}

impl<'a> Publish<'a> {
    /// The entries in frame order. A message of at most `copy_bytes_max` bytes is copied out of
    /// the receive buffer (the one copy parsing makes, and only by request): a slice would keep
    /// the whole receive chunk alive as long as the message is in memory.
    pub fn entries(&self, copy_bytes_max: usize) -> impl Iterator<Item = PublishEntry<'a>> + 'a {
        self.frame.publish_entries().map(move |(e, bytes)| {
            let bytes = if bytes.len() <= copy_bytes_max {
                Bytes::copy_from_slice(&bytes)
            } else {
                bytes
            };
            // Verified at ingress by the decoder, like the frame around it.
            let message = e.message_nested_flatbuffer();
            PublishEntry {
                sequence: e.sequence(),
                exchange: e.exchange().unwrap_or(""),
                routing_key: e.routing_key().unwrap_or(""),
                mandatory: e.mandatory(),
                persistent: message.persistent(),
                deliver_at_ms: message.deliver_at_ms().filter(|t| *t > 0).map(|t| t as u64),
                expiration_ms: message.expiration_ms().map(u64::from),
                bytes,
                priority: message.priority(),
            }
        })
    }
}

/// A request the decoder let through that the broker cannot act on.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("exchange kind {0} is not direct, topic or fanout")]
    ExchangeKind(u8),
}

impl CommandError {
    /// The code of the `Error` frame that answers it (the connection goes on).
    pub fn code(&self) -> ErrorCode {
        match self {
            CommandError::ExchangeKind(_) => ErrorCode::InvalidArgument,
        }
    }
}

impl<'a> Command<'a> {
    /// Reads a verified frame's body.
    pub fn parse(frame: &'a InFrame) -> Result<Command<'a>, CommandError> {
        let f = frame.frame();
        let body = f.body_type();
        // Each `body_as_*` is `Some` exactly when `body` says so (the union is required), so the
        // catch-all takes exactly the rest. The hot frames are tried first.
        let command = if let Some(p) = f.body_as_publish() {
            Command::Publish(Publish {
                confirm: p.confirm(),
                producer_id: p.producer_id(),
                frame,
            })
        } else if let Some(a) = f.body_as_ack() {
            Command::Settle(Settle {
                tags: Tags::Ranges(a.ranges()),
                ack: true,
                requeue: false,
                delay_ms: None,
            })
        } else if let Some(n) = f.body_as_nack() {
            Command::Settle(Settle {
                tags: Tags::Ranges(n.ranges()),
                ack: false,
                requeue: n.requeue(),
                delay_ms: n.delay_ms(),
            })
        } else if let Some(r) = f.body_as_reject() {
            Command::Settle(Settle {
                tags: Tags::One(r.delivery_tag()),
                ack: false,
                requeue: r.requeue(),
                delay_ms: r.delay_ms(),
            })
        } else if let Some(h) = f.body_as_hello() {
            Command::Hello {
                protocol_version: h.protocol_version(),
                client_name: h.client_name().unwrap_or(""),
                client_version: h.client_version().unwrap_or(""),
            }
        } else if let Some(p) = f.body_as_ping() {
            Command::Ping {
                payload: p.payload(),
            }
        } else if f.body_as_close().is_some() {
            Command::Close
        } else if let Some(d) = f.body_as_declare_queue() {
            Command::DeclareQueue(DeclareQueue {
                name: d.name().unwrap_or(""),
                passive: d.passive(),
                durable: d.durable(),
                exclusive: d.exclusive(),
                auto_delete: d.auto_delete(),
                arguments: d.arguments(),
            })
        } else if let Some(d) = f.body_as_delete_queue() {
            Command::DeleteQueue {
                name: d.name(),
                if_unused: d.if_unused(),
                if_empty: d.if_empty(),
            }
        } else if let Some(p) = f.body_as_purge_queue() {
            Command::PurgeQueue { name: p.name() }
        } else if let Some(i) = f.body_as_get_queue_info() {
            Command::GetQueueInfo { name: i.name() }
        } else if let Some(l) = f.body_as_list_queues() {
            Command::ListQueues {
                prefix: l.prefix().unwrap_or(""),
                after: l.after().unwrap_or(""),
                limit: l.limit(),
            }
        } else if f.body_as_get_status().is_some() {
            Command::GetStatus
        } else if let Some(c) = f.body_as_consume() {
            Command::Consume(Consume {
                queue: c.queue(),
                consumer_tag: c.consumer_tag(),
                prefetch: c.prefetch(),
                auto_ack: c.auto_ack(),
                exclusive: c.exclusive(),
                priority: c.priority(),
            })
        } else if let Some(c) = f.body_as_cancel() {
            Command::Cancel {
                consumer_tag: c.consumer_tag(),
            }
        } else if let Some(sp) = f.body_as_set_prefetch() {
            Command::SetPrefetch {
                consumer_tag: sp.consumer_tag(),
                prefetch: sp.prefetch(),
            }
        } else if let Some(g) = f.body_as_get() {
            Command::Get {
                queue: g.queue(),
                auto_ack: g.auto_ack(),
            }
        } else if let Some(d) = f.body_as_declare_exchange() {
            let kind =
                ExchangeKind::from_wire(d.kind()).ok_or(CommandError::ExchangeKind(d.kind().0))?;
            Command::DeclareExchange {
                name: d.name(),
                kind,
                durable: d.durable(),
                auto_delete: d.auto_delete(),
                passive: d.passive(),
            }
        } else if let Some(d) = f.body_as_delete_exchange() {
            Command::DeleteExchange {
                name: d.name(),
                if_unused: d.if_unused(),
            }
        } else if let Some(b) = f.body_as_bind() {
            Command::Bind(BindingRef {
                exchange: b.exchange(),
                queue: b.queue(),
                key: b.binding_key(),
            })
        } else if let Some(b) = f.body_as_unbind() {
            Command::Unbind(BindingRef {
                exchange: b.exchange(),
                queue: b.queue(),
                key: b.binding_key(),
            })
        } else if let Some(l) = f.body_as_list_exchanges() {
            Command::ListExchanges {
                prefix: l.prefix().unwrap_or(""),
                after: l.after().unwrap_or(""),
                limit: l.limit(),
            }
        } else if let Some(l) = f.body_as_list_bindings() {
            Command::ListBindings {
                exchange: l.exchange(),
                queue: l.queue(),
            }
        } else if let Some(l) = f.body_as_list_connections() {
            Command::ListConnections {
                after: l.after(),
                limit: l.limit(),
            }
        } else if let Some(l) = f.body_as_list_consumers() {
            Command::ListConsumers {
                prefix: l.prefix().unwrap_or(""),
                after_queue: l.after_queue().unwrap_or(""),
                after_tag: l.after_tag().unwrap_or(""),
                limit: l.limit(),
            }
        } else if broker_only(body) {
            Command::BrokerOnly(body)
        } else {
            Command::Unsupported(body)
        };
        Ok(command)
    }
}

/// Frames only the broker sends.
pub fn broker_only(body: Body) -> bool {
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
            | Body::ConnectionList
            | Body::ConsumerList
    )
}
