//! The cross-core vocabulary: every message one shard sends another, as plain owned data.
//!
//! Contract: `Send` values only (asserted below), no behaviour beyond construction: a
//! connection's session addresses `Op`s to the shard that owns each queue (or to the
//! control-plane writer); the owner answers with a `Reply` and pushes `Pushed` deliveries to the
//! connections its consumers live on. When both ends are the same shard nothing crosses a core:
//! the same values are passed by call. Message bytes travel as `Bytes` (a reference count, never
//! a copy). What executes these lives in the broker layer (`broker::ops::execute`,
//! `broker::control`) and the shard shell; this module only names them, so that every layer can
//! speak it without depending on another's state.

use bytes::Bytes;
use weir_protocol::wire;

use crate::mesh::types::{
    Binding, Cancelled, ConnRef, Declare, ExchangeDecl, HolderId, Refusal, Seq, ShardStatus,
};
use crate::storage::Position;

/// One unit of work between shards (and, unsent, within one).
#[derive(Debug)]
pub enum MeshMsg {
    /// Execute `op` on the queue host of the receiving shard, for connection `from`.
    Request { from: ConnRef, id: u64, op: Op },
    /// The answer to request `id` of connection `to`.
    Reply { to: ConnRef, id: u64, reply: Reply },
    /// Deliveries or a cancellation for a connection of the receiving shard.
    Push { from_shard: u16, push: Pushed },
}

/// One message of a publish, addressed to one or more queues of the owning shard: routed to
/// several of them, it is stored once (one `Stored`, one journal record naming every target)
/// and referenced by each.
#[derive(Clone, Debug)]
pub struct PublishItem {
    /// The publisher's sequence number: confirms and refusals name it.
    pub sequence: u64,
    pub queue: String,
    /// More target queues on the same shard (an exchange routed the message to several): empty,
    /// and so not allocated, for the default exchange.
    pub also: Vec<String>,
    pub exchange: String,
    pub routing_key: String,
    pub mandatory: bool,
    /// Whether the publisher wants a confirm for it.
    pub confirm: bool,
    /// The message's `persistent` property: journaled if its queue is durable.
    pub persistent: bool,
    pub bytes: Bytes,
    pub expiration_ms: Option<u64>,
    /// A delayed message's delivery time, ms since the Unix epoch.
    pub deliver_at_ms: Option<u64>,
    /// A dead letter's history (`broker::deaths`), journaled and delivered beside its bytes.
    pub deaths: Option<Bytes>,
    /// An idempotent producer's publish: (`producer_id`, `sequence`) names the message, and the
    /// owning shard stores it at most once (`broker::producers`).
    pub producer_id: Option<u64>,
    /// The message's `priority` property: a priority queue orders by it.
    pub priority: u8,
}

/// What became of one published message.
#[derive(Clone, Debug)]
pub struct PublishOutcome {
    pub sequence: u64,
    pub confirm: bool,
    /// Written to the journal: its confirm waits for the commit and says so.
    pub journaled: bool,
    pub result: Result<(), Refusal>,
    /// A mandatory message whose queue does not exist comes back whole, for a `Return`.
    pub returned: Option<PublishItem>,
    /// An idempotent producer's re-send of a message this shard had stored: confirmed again,
    /// not stored twice.
    pub duplicate: bool,
}

/// One settlement of an outstanding delivery.
#[derive(Clone, Debug)]
pub struct SettleItem {
    pub queue: String,
    pub holder: HolderId,
    pub seq: Seq,
    pub ack: bool,
    pub requeue: bool,
    /// A client's nack or reject: a failure, which the queue's retry policy counts (a
    /// delivery handed back unseen, by a cancelled consumer's connection, is not one).
    pub failed: bool,
    /// With `failed` and `requeue`: deliver again no sooner than this many ms from now
    /// (`Nack.delay_ms`), instead of the queue's policy delay.
    pub delay_ms: Option<u32>,
}

/// What became of an `Op::Settle`'s items, by their index in its list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SettleOutcome {
    /// Why settlements failed, in the order they did; empty when every one was made.
    pub refusals: Vec<Refusal>,
    /// The items refused for a storage reason (their record could not be journaled, or its
    /// commit failed): still outstanding at the owner for the same holder, so the connection
    /// keeps their delivery tags and the client may settle them again.
    pub kept: Vec<u32>,
    /// The items whose settle record waits for a commit: made once it is durable, `kept` if it
    /// fails (`durability::not_durable`). Empty in the answer a connection gets.
    pub waiting: Vec<u32>,
}

impl SettleOutcome {
    /// Every settlement was made.
    pub fn is_ok(&self) -> bool {
        self.refusals.is_empty()
    }
}

/// What a connection asks of the shard that owns a queue.
#[derive(Clone, Debug)]
pub enum Op {
    Declare(Declare),
    Delete {
        name: String,
        if_unused: bool,
        if_empty: bool,
    },
    Purge {
        name: String,
    },
    Info {
        name: String,
    },
    List {
        prefix: String,
        after: String,
        limit: usize,
    },
    Publish(Vec<PublishItem>),
    Consume {
        queue: String,
        tag: String,
        prefetch: u32,
        auto_ack: bool,
        exclusive: bool,
        /// Consumer priority: higher first while it has credit.
        priority: i32,
    },
    Cancel {
        queue: String,
        holder: HolderId,
    },
    SetPrefetch {
        queue: String,
        holder: HolderId,
        prefetch: u32,
    },
    Settle(Vec<SettleItem>),
    Get {
        queue: String,
        auto_ack: bool,
    },
    ConnectionClosed,
    /// The shard's counters (answered by the shard itself, not its queue host).
    Status,
    /// A change for the control-plane writer (shard 0), answered once durable and applied on
    /// every shard.
    Control(ControlOp),
    /// From the writer: apply a change to this shard's routing copy.
    Routing(RoutingChange),
    /// The shard's own timer: settle (or dead-letter) the expired heads of its queues.
    Expire,
    /// The connection wrote (or dropped unsent) deliveries this shard charged to it, `bytes` of
    /// their charges (`PushedDelivery::charge`): room for more under `outbox_bytes_max`. Sent
    /// with request id 0; nobody waits for its reply.
    DeliveriesWritten {
        bytes: u64,
    },
    /// The shard's own timer: cancel consumers holding a delivery longer than `timeout_ms`
    /// (`consumer_timeout_ms`) and requeue what they hold.
    ConsumerTimeouts {
        timeout_ms: u64,
    },
    /// A page of the shard's connections with an id above `after` (answered by the shard
    /// itself, from its connections), at most `limit`.
    ListConnections {
        after: Option<u64>,
        limit: usize,
    },
    /// A page of the consumers of the shard's queues named `prefix`..., after
    /// (`after_queue`, `after_tag`), at most `limit`.
    ListConsumers {
        prefix: String,
        after_queue: String,
        after_tag: String,
        limit: usize,
    },
}

/// A delivery as it crosses to the consumer's connection.
#[derive(Clone, Debug)]
pub struct PushedDelivery {
    pub queue: String,
    pub holder: HolderId,
    pub seq: Seq,
    pub delivery_count: u32,
    pub auto_ack: bool,
    pub exchange: String,
    pub routing_key: String,
    /// The message bytes; empty while the message is cold (`cold` is set), until it is read back.
    pub bytes: Bytes,
    /// The message is only in the journal: (record position, record length). The owning shard
    /// reads it back, envelope and payload, before the delivery leaves it.
    pub cold: Option<(Position, u32)>,
    /// Its dead-letter history (`broker::deaths`), if it was dead-lettered; a cold one's comes
    /// with its record.
    pub deaths: Option<Bytes>,
    /// What the owner charged the connection's outbox account for it (0 for a `Get`): the
    /// connection hands it back once the delivery is written (`Op::DeliveriesWritten`).
    pub charge: u32,
}

/// The owning shard's answer to an `Op`.
#[derive(Clone, Debug)]
pub enum Reply {
    Info(Box<wire::QueueInfoT>),
    Deleted(u64),
    Purged(u64),
    List(Vec<wire::QueueInfoT>),
    /// Per publish item, in order: taken, refused with why, or returned.
    Published(Vec<PublishOutcome>),
    Consumed(HolderId),
    Got(Option<Box<PushedDelivery>>, u64),
    /// Done, nothing to say (cancel, connection closed).
    Done,
    /// The answer to `Op::Settle`: what failed, and which settlements are outstanding again.
    Settled(SettleOutcome),
    Refused(Refusal),
    ShardStatus(Box<ShardStatus>),
    Connections(Vec<wire::ConnectionInfoT>),
    Consumers(Vec<wire::ConsumerInfoT>),
}

/// Something the owning shard sends a connection unasked.
#[derive(Clone, Debug)]
pub enum Pushed {
    Deliver {
        to: ConnRef,
        consumer_tag: String,
        deliveries: Vec<PushedDelivery>,
    },
    Cancelled(Cancelled),
    /// The owner cancelled a consumer past `consumer_timeout_ms` and took back every delivery it
    /// held (requeued): the connection's delivery tags for them are void.
    TimedOut(Cancelled),
}

/// A change asked of the writer.
#[derive(Clone, Debug)]
pub enum ControlOp {
    DeclareExchange {
        decl: ExchangeDecl,
        passive: bool,
    },
    DeleteExchange {
        name: String,
        if_unused: bool,
    },
    /// `binding.durable` says whether the queue is durable; the binding is durable if its
    /// exchange is too.
    Bind {
        binding: Binding,
    },
    Unbind {
        binding: Binding,
    },
    /// A queue was deleted: its bindings go.
    QueueGone {
        queue: String,
    },
}

/// One change to the table. The control-plane writer validates and applies a change to its
/// authoritative table, then sends the same change to every shard's copy, which applies it with
/// `apply` and reaches the same state.
#[derive(Clone, Debug)]
pub enum RoutingChange {
    DeclareExchange(ExchangeDecl),
    DeleteExchange(String),
    Bind(Binding),
    /// `durable` is ignored.
    Unbind(Binding),
    /// A queue was deleted: all its bindings go.
    RemoveQueue(String),
    /// Replace the whole table (a shard's copy at start-up).
    Snapshot(RoutingSnapshot),
}

/// A whole table as owned declarations and bindings, from `RoutingTable::snapshot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingSnapshot {
    /// In name order.
    pub(crate) exchanges: Vec<ExchangeDecl>,
    /// In replay order (see `replay_order`), with their stored `durable` flags.
    pub(crate) bindings: Vec<Binding>,
}

// The per-core boundary as a type fact: everything here crosses cores.
const _: () = {
    fn assert_send<T: Send>() {}
    fn all_send() {
        assert_send::<MeshMsg>();
        assert_send::<Op>();
        assert_send::<Reply>();
        assert_send::<Pushed>();
        assert_send::<PublishItem>();
        assert_send::<ControlOp>();
        assert_send::<RoutingChange>();
        assert_send::<RoutingSnapshot>();
    }
    let _ = all_send;
};
