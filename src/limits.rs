//! The broker's limits: every bound of every layer, in one place, with the relations between the
//! layers asserted.
//!
//! Contract: plain values, built once at start-up from the defaults and the configuration, checked
//! by `Limits::check` before any shard starts; the error names the offending key and the reason.
//! Each layer keeps its own bounds next to their reasons (`WireLimits` for the codec,
//! `StorageLimits` for the journal); this registry adds the broker's own and checks that the
//! layers agree with each other: a message the wire accepts must fit a journal record, and one
//! `Deliver` frame.

use weir_protocol::limits::{
    deliver_frame_bytes_max, delivery_bytes_max, FRAME_OVERHEAD_BYTES_MAX,
};
use weir_protocol::WireLimits;

use crate::storage::format::RECORD_HEADER_BYTES;
use crate::storage::StorageLimits;

/// The broker's own bounds (beyond the codec's and the journal's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Connections one shard serves at once; a further connection gets `ConnectionLimit` and is
    /// closed. Bounds per-shard memory: each connection owns a receive and a send buffer.
    pub connections_per_shard_max: u32,
    /// Unconfirmed publishes per connection. Past it the broker stops reading the connection (TCP
    /// backpressure) until confirms catch up, so a fast producer cannot queue unbounded work.
    pub publishes_in_flight_max: u32,
    /// Prefetch given to a consumer that asks for 0 ("broker default").
    pub prefetch_default: u32,
    /// Largest prefetch a consumer may ask for: bounds outstanding deliveries per consumer and so
    /// the unacked index of a queue.
    pub prefetch_max: u32,
    /// Queues one shard's messages can be routed to at once: bounds the routing envelope stored
    /// with each message (a fanout to many queues of a shard is stored once, naming them all).
    pub targets_per_message_max: u32,
    /// Messages in one batch between shards: a hop per batch, never per message.
    pub mesh_batch_max: u32,
    /// Batches queued on one mesh channel; a full channel makes the sender wait (backpressure).
    pub mesh_channel_capacity: u32,
    /// Bytes of message payloads a shard keeps in memory; older ready messages are read back from
    /// the journal when delivered. This, not the backlog, bounds the broker's memory.
    pub cache_bytes_max: u64,
    /// Exchanges in the broker. Every shard holds a copy of the routing table: this and
    /// `bindings_max` bound that copy's memory, and the start-up copy each shard receives.
    pub exchanges_max: u32,
    /// Bindings in the broker, over all exchanges.
    pub bindings_max: u32,
    /// Furthest a delayed message's delivery time may be from its publish, ms: a delayed
    /// message holds its journal segment (and every later one) until it is delivered.
    pub delay_ms_max: u64,
    /// Longest a connection may take to send `Hello`, ms; then it gets an `Error` and is closed.
    /// A connection that never speaks still holds its buffers and a slot of
    /// `connections_per_shard_max`: silent sockets would otherwise crowd out real clients.
    pub handshake_timeout_ms: u64,
    /// Bytes of deliveries on their way to one connection from one owning shard: dispatched
    /// and not yet written to its socket (crossing the mesh, read back from the journal,
    /// encoded in the connection's outbox, in the write under way), counted as each delivery's
    /// message, names and a fixed per-delivery overhead. At the bound the owner stops
    /// dispatching to that connection's consumers, auto-ack ones included, until the
    /// connection has written what it holds: a consumer that never reads its socket has at most
    /// this (plus one delivery) per owning shard on its way, not its prefetch or its queue's
    /// backlog. (Encoding briefly holds a second copy of a push, and the session's encoder keeps
    /// its largest frame's buffer: both bounded by this and `frame_size_max`.) The answers a
    /// connection's session makes at once (listings of exchanges and bindings, pongs, refusals)
    /// are bounded by it too: past it in unwritten bytes the connection stops decoding until its
    /// outbox is written, so a client that pipelines listings and never reads is slowed by TCP.
    pub outbox_bytes_max: u64,
    /// Longest a delivery may stay unacked, ms, before its consumer is cancelled (a
    /// `ConsumerCancelled` naming this limit) and every delivery it holds goes back to its
    /// queue, for other consumers (RabbitMQ's `consumer_timeout`, and its default of 30
    /// minutes). A consumer that takes messages and never acks would otherwise keep them from
    /// everyone for as long as its connection lives. A `Get` delivery held unacked this long
    /// goes back too (there is no consumer to cancel; the connection is not told, and its late
    /// ack of it is `UnknownDeliveryTag`). 0 turns the timeout off.
    pub consumer_timeout_ms: u64,
    /// Messages one shard's queues hold at once: ready, delayed and outstanding, each queue's
    /// entry counted (a message routed to two queues of the shard is two entries). Every entry
    /// stays in memory whether its payload is hot or cold: 48 bytes inline in its queue's ready
    /// list, measured as 48 B of RSS per cold message (a million after a restart, over an empty
    /// broker); the list grows by doubling, so 48 to 96 B per entry. This, times that, bounds
    /// the index: the default, 4 Mi entries, is 192 to 384 MiB per shard (outstanding entries,
    /// bounded by prefetch, cost about twice as much). A publish that would pass it is refused
    /// (`LimitExceeded`, by sequence) until consumers catch up; recovery restores whatever the
    /// journal holds, even past it.
    pub queued_messages_max: u64,
    /// Requests other than publishes one connection may have waiting on shards (a listing
    /// gathered from every shard is one; a settlement touching k shards is k). Past it the broker
    /// stops reading the connection until answers come back (TCP backpressure): each pending
    /// request holds its op, its place in the owner's work queue and, for a peer that does not
    /// read, its answer in the outbox, so a pipelining client cannot queue unbounded work.
    pub requests_in_flight_max: u32,
    /// Consumers one connection may hold; a further `Consume` is refused (`LimitExceeded`).
    /// Each consumer is state at its queue's owner and in the session, and holds up to its
    /// prefetch of outstanding deliveries: this times `prefetch_max` bounds a connection's
    /// unacked deliveries.
    pub consumers_per_connection_max: u32,
    /// Queues one shard owns, of every kind (durable, transient, exclusive, server-named);
    /// declaring a new one past it is refused (`LimitExceeded`). Each queue is state, and
    /// each durable one a catalog record re-stated before every reclaim round.
    pub queues_per_shard_max: u32,
    /// Unacked `Get` deliveries one connection may hold (asked and not yet answered ones
    /// included). A `Get` has no prefetch window of its own, so without this a client could
    /// hold a whole backlog outstanding; past it a `Get` is refused (`LimitExceeded`) until
    /// the connection settles some. This also bounds the bytes of `Get` answers on their way to
    /// a connection, which are not charged to its `outbox_bytes_max` account: each answers one
    /// request the connection asked within this window, so at most `gets_unacked_max` of them,
    /// one message of at most `message_size_max` each, are in flight or in its outbox at once
    /// (and once the outbox is past `outbox_bytes_max` the connection asks for no more).
    pub gets_unacked_max: u32,
    /// Bytes of messages a connection may have published and not yet had confirmed (or refused).
    /// Past it the broker stops reading the connection, as at `publishes_in_flight_max`: a count
    /// alone lets 64 KiB messages pin 4 GiB per connection. At least one frame holding a message
    /// of `message_size_max`, so any message the wire accepts can be in flight.
    pub publish_bytes_in_flight_max: u64,
    /// Bytes of work queued for a shard's worker (requests, replies and pushes, payloads
    /// included, from its connections and its peers). Past it the shard stops receiving from the
    /// mesh, so the channels fill and the peers' flushers wait, and its connections stop reading:
    /// backpressure reaches the senders instead of the queue growing.
    pub work_bytes_max: u64,
    /// Bytes a shard has queued for its peers and not yet handed to a mesh channel. Past it the
    /// shard's connections stop reading: a slow peer slows its producers, not the sender's heap.
    pub mesh_outgoing_bytes_max: u64,
    /// Messages up to this size are copied out of the connection's receive buffer when
    /// published; larger ones stay slices of it. A slice keeps its whole receive chunk (64 KiB, or
    /// one large frame) alive while the message is in memory, so 100-byte messages arriving one
    /// per read would hold 64 KiB each; a copy of a few KiB is cheaper than that pin. A larger
    /// message pins at most its chunk, a few times its own size.
    pub message_copy_bytes_max: u32,
    /// Bytes of read-ahead windows a shard's journal keeps for reading cold messages back. A
    /// cold backlog is read back in the order it was written, so a read that misses takes a
    /// window (up to 1 MiB, where the disk's bandwidth saturates) from the message's block and
    /// the messages after it are served from memory: one disk read per window instead of one per
    /// message (a drain after a restart went from one 4 KiB read per 1 KiB message to one read
    /// per ~900). The windows are payload memory, so they are taken out of the payload cache's
    /// budget: a shard spends the smaller of this and a quarter of `cache_bytes_max` on them
    /// (`Limits::read_ahead_bytes`), and its payloads the rest, so `cache_bytes_max` still bounds
    /// both. 0 turns read-ahead off (one read per cold message).
    pub read_ahead_bytes_max: u64,
    /// Sequences below an idempotent producer's highest that a shard remembers, one bit each
    /// (a multiple of 64): a re-send within them is told from a new message exactly, an older
    /// one is refused (`SequenceOutOfWindow`) because it cannot be. It must exceed what a
    /// producer has unconfirmed at once (weir-client's producer keeps at most 1024 by default),
    /// or a re-send after a reconnect could fall out of it. Each producer costs this over 8
    /// bytes of memory per shard, and as much in each re-statement before a reclaim.
    pub producer_window_max: u64,
    /// Idempotent producers a shard remembers. Each holds its window (`producer_window_max / 8`
    /// bytes and about 100 more), so this bounds the table's memory (default: 16 Ki producers
    /// of 512 B windows, 10 MiB) and what each re-statement before a reclaim writes. A new
    /// producer past it is refused (`LimitExceeded`) unless the least recently used one has been
    /// idle for `producer_idle_expiry_ms`, which is then forgotten to make room: an active
    /// producer's promise is never dropped to make room for another.
    pub producers_per_shard_max: u32,
    /// A producer unused this long (no publish reached the shard) is forgotten, ms: after that a
    /// re-send of its old messages is stored again. Kafka forgets idle producers after a day
    /// too (`producer.id.expiration.ms`); a producer retrying longer than this has given up.
    /// Recovery counts as a use: every recovered producer starts a fresh idle period.
    pub producer_idle_expiry_ms: u64,
    /// Delays in one queue's retry policy (`QueueArguments.retry_delays_ms`); a longer policy is
    /// refused (`InvalidArgument`). The policy is part of the queue's declaration, so it is in
    /// every `QueueInfo` and listing page, in the queue's catalog record and in the re-statement
    /// written before every reclaim round: a bound keeps those small. Each delay is at most
    /// `delay_ms_max`, as a `Nack.delay_ms` is.
    pub retry_delays_count_max: u32,
}

impl BrokerLimits {
    pub const DEFAULT: BrokerLimits = BrokerLimits {
        connections_per_shard_max: 4096,
        publishes_in_flight_max: 65_536,
        prefetch_default: 256,
        prefetch_max: 65_535,
        targets_per_message_max: 128,
        mesh_batch_max: 1024,
        mesh_channel_capacity: 64,
        cache_bytes_max: 256 << 20,
        exchanges_max: 10_000,
        bindings_max: 1_000_000,
        delay_ms_max: 7 * 24 * 3_600_000,
        handshake_timeout_ms: 10_000,
        outbox_bytes_max: 8 << 20,
        consumer_timeout_ms: 30 * 60_000,
        queued_messages_max: 4 << 20,
        requests_in_flight_max: 1024,
        consumers_per_connection_max: 1024,
        queues_per_shard_max: 100_000,
        gets_unacked_max: 65_536,
        publish_bytes_in_flight_max: 16 << 20,
        work_bytes_max: 16 << 20,
        mesh_outgoing_bytes_max: 16 << 20,
        message_copy_bytes_max: 16 * 1024,
        read_ahead_bytes_max: 4 << 20,
        producer_window_max: 4096,
        producers_per_shard_max: 16_384,
        producer_idle_expiry_ms: 24 * 3_600_000,
        retry_delays_count_max: 64,
    };
}

/// Every limit of a broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub wire: WireLimits,
    pub storage: StorageLimits,
    pub broker: BrokerLimits,
    pub admin: AdminLimits,
}

/// The admin listener's bounds (`admin_listen`, `src/admin`): it serves operators and their
/// scrapers, off the shards, and none of what it holds may grow with how many ask or how slowly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Admin HTTP connections served at once; further ones wait in the listen backlog until one
    /// closes. Each holds a task and its buffers on the admin thread: a scrape storm or a pile of
    /// idle browsers cannot grow that thread's memory past this many.
    pub admin_connections_max: u32,
    /// Bytes of one admin request's body (a declare's JSON); a larger one is refused (413)
    /// before it is read whole, so a client cannot make the admin thread buffer without bound.
    pub admin_body_bytes_max: u64,
    /// Longest one admin request may take, ms: reading its headers, and from them to the whole
    /// answer (a 504 after). A client that sends half a request, or a broker that does not
    /// answer, frees its connection's slot of `admin_connections_max` after this.
    pub admin_request_timeout_ms: u64,
    /// Queues that get series of their own in `/metrics`, the first this many by name; the
    /// rest are counted in `weir_metrics_queues_omitted`. Each queue adds about 15 series, so
    /// this bounds the scrape's size and what Prometheus stores (label cardinality); name order
    /// keeps the same queues in from one scrape to the next. The JSON API lists every queue.
    pub admin_metrics_queues_max: u32,
    /// Admin requests answered per second, all connections together; a request past the pace
    /// waits for its turn (backpressure: a scraping loop is slowed, not refused). Measured:
    /// answering `/metrics` as fast as a keep-alive `curl` loop asks (about 4k a second) took
    /// 1.5 s of CPU per 10 s on the admin thread, mostly wake-ups, and as much again in `curl`,
    /// which on a 2-vCPU machine full of shards costs them a quarter of their throughput; at 100
    /// a second it costs nothing measurable, and Prometheus (one scrape per 15 s) or a dashboard
    /// (two requests a second per browser) never wait.
    pub admin_requests_per_second_max: u32,
}

impl AdminLimits {
    pub const DEFAULT: AdminLimits = AdminLimits {
        admin_connections_max: 64,
        admin_body_bytes_max: 64 * 1024,
        admin_request_timeout_ms: 10_000,
        admin_metrics_queues_max: 1000,
        admin_requests_per_second_max: 100,
    };
}

/// Longest name on the wire and in records (queue, exchange, routing key).
const NAME_BYTES_MAX: usize = 255;

/// Largest `producer_window_max`: 128 KiB of window per producer, so one producer's re-statement
/// stays a small record.
const PRODUCER_WINDOW_MAX: u64 = 1 << 20;

impl Limits {
    /// The defaults. The wire's message limit is lowered from the codec's 16 MiB to what one
    /// journal record holds with its routing envelope: a message is stored whole in one record.
    pub const DEFAULT: Limits = Limits {
        wire: WireLimits {
            message_size_max: 960 * 1024,
            ..WireLimits::DEFAULT
        },
        storage: StorageLimits::DEFAULT,
        broker: BrokerLimits::DEFAULT,
        admin: AdminLimits::DEFAULT,
    };

    /// Bytes of the largest routing envelope: exchange and key (a length and up to
    /// `NAME_BYTES_MAX` each), a target count, per target a queue name and a sequence number, an
    /// idempotent producer's stamp and a dead letter's history.
    pub fn envelope_bytes_max(&self) -> u64 {
        let per_target = 1 + NAME_BYTES_MAX as u64 + 8;
        (1 + NAME_BYTES_MAX as u64)
            + (2 + NAME_BYTES_MAX as u64)
            + 2
            + u64::from(self.broker.targets_per_message_max) * per_target
            // An idempotent producer's stamp, and a dead letter's history as an annotation.
            + 16
            + (4 + 1 + 4)
            + crate::broker::deaths::HISTORY_BYTES_MAX as u64
    }

    /// The bytes of read-ahead windows a shard keeps: `read_ahead_bytes_max`, at most a quarter
    /// of `cache_bytes_max`, whose budget they are taken out of (`payload_cache_bytes`).
    pub fn read_ahead_bytes(&self) -> u64 {
        self.broker
            .read_ahead_bytes_max
            .min(self.broker.cache_bytes_max / 4)
    }

    /// The payload cache's budget: `cache_bytes_max` less the read-ahead windows.
    pub fn payload_cache_bytes(&self) -> u64 {
        self.broker.cache_bytes_max - self.read_ahead_bytes()
    }

    /// Checks every layer and the relations between them; the error names the key and the reason.
    pub fn check(&self) -> Result<(), LimitError> {
        // Each layer names its own field; the configuration file calls it `limits.<field>`.
        self.wire.check().map_err(|e| match e {
            weir_protocol::ProtocolError::Limits { limit, reason } => {
                LimitError::new(format!("limits.{limit}"), reason)
            }
            other => LimitError::new("limits", other.to_string()),
        })?;
        self.storage.check().map_err(|e| match e {
            crate::storage::StorageError::Limit { key, reason } => {
                LimitError::new(format!("limits.{key}"), reason)
            }
            other => LimitError::new("limits", other.to_string()),
        })?;
        let b = &self.broker;
        let positive = [
            (
                "limits.connections_per_shard_max",
                u64::from(b.connections_per_shard_max),
            ),
            (
                "limits.publishes_in_flight_max",
                u64::from(b.publishes_in_flight_max),
            ),
            ("limits.prefetch_default", u64::from(b.prefetch_default)),
            (
                "limits.targets_per_message_max",
                u64::from(b.targets_per_message_max),
            ),
            ("limits.mesh_batch_max", u64::from(b.mesh_batch_max)),
            (
                "limits.mesh_channel_capacity",
                u64::from(b.mesh_channel_capacity),
            ),
            ("limits.handshake_timeout_ms", b.handshake_timeout_ms),
            ("limits.queued_messages_max", b.queued_messages_max),
            (
                "limits.requests_in_flight_max",
                u64::from(b.requests_in_flight_max),
            ),
            (
                "limits.consumers_per_connection_max",
                u64::from(b.consumers_per_connection_max),
            ),
            (
                "limits.queues_per_shard_max",
                u64::from(b.queues_per_shard_max),
            ),
            ("limits.gets_unacked_max", u64::from(b.gets_unacked_max)),
            (
                "limits.producers_per_shard_max",
                u64::from(b.producers_per_shard_max),
            ),
            ("limits.producer_idle_expiry_ms", b.producer_idle_expiry_ms),
            (
                "limits.retry_delays_count_max",
                u64::from(b.retry_delays_count_max),
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(LimitError::new(key, "must be at least 1".into()));
            }
        }
        if b.producer_window_max < 64
            || !b.producer_window_max.is_multiple_of(64)
            || b.producer_window_max > PRODUCER_WINDOW_MAX
        {
            return Err(LimitError::new(
                "limits.producer_window_max",
                format!(
                    "{} is not a multiple of 64 from 64 to {PRODUCER_WINDOW_MAX} (one bit per \
                     sequence, in 64-bit words)",
                    b.producer_window_max
                ),
            ));
        }
        if b.prefetch_default > b.prefetch_max {
            return Err(LimitError::new(
                "limits.prefetch_default",
                format!(
                    "{} exceeds prefetch_max {}",
                    b.prefetch_default, b.prefetch_max
                ),
            ));
        }
        if self.wire.name_length_max as usize > NAME_BYTES_MAX {
            return Err(LimitError::new(
                "limits.name_length_max",
                format!(
                    "{} exceeds the {NAME_BYTES_MAX} bytes a record can name",
                    self.wire.name_length_max
                ),
            ));
        }
        self.check_one_delivery_fits_a_frame()?;
        let record_room = u64::from(self.storage.record_bytes_max) - RECORD_HEADER_BYTES as u64;
        if u64::from(self.wire.message_size_max) + self.envelope_bytes_max() > record_room {
            return Err(LimitError::new(
                "limits.message_size_max",
                format!(
                    "{} plus a routing envelope of up to {} bytes exceeds the {} bytes a journal record holds \
                     (storage record_bytes_max {})",
                    self.wire.message_size_max,
                    self.envelope_bytes_max(),
                    record_room,
                    self.storage.record_bytes_max
                ),
            ));
        }
        for (key, value) in [
            ("limits.exchanges_max", self.broker.exchanges_max),
            ("limits.bindings_max", self.broker.bindings_max),
            (
                "limits.targets_per_message_max",
                self.broker.targets_per_message_max,
            ),
        ] {
            if value == 0 {
                return Err(LimitError::new(key, "must be at least 1".into()));
            }
        }
        // Each byte bound stops intake only once exceeded, so one maximal message always gets
        // through; below one frame of it the bound would throttle every large publish to one
        // message at a time.
        let one_frame = u64::from(self.wire.message_size_max) + u64::from(FRAME_OVERHEAD_BYTES_MAX);
        for (key, value) in [
            (
                "limits.publish_bytes_in_flight_max",
                self.broker.publish_bytes_in_flight_max,
            ),
            ("limits.work_bytes_max", self.broker.work_bytes_max),
            (
                "limits.mesh_outgoing_bytes_max",
                self.broker.mesh_outgoing_bytes_max,
            ),
        ] {
            if value < one_frame {
                return Err(LimitError::new(
                    key,
                    format!(
                        "{value} cannot hold one frame of a message of message_size_max {} \
                         ({one_frame} bytes)",
                        self.wire.message_size_max
                    ),
                ));
            }
        }
        if u64::from(self.wire.message_size_max) + u64::from(FRAME_OVERHEAD_BYTES_MAX)
            > self.broker.cache_bytes_max
        {
            return Err(LimitError::new(
                "limits.cache_bytes_max",
                format!(
                    "{} cannot hold even one message of message_size_max {}",
                    self.broker.cache_bytes_max, self.wire.message_size_max
                ),
            ));
        }
        self.check_one_delivery_fits_an_outbox()?;
        let block = crate::storage::BLOCK_BYTES as u64;
        if self.broker.read_ahead_bytes_max != 0 && self.broker.read_ahead_bytes_max < block {
            return Err(LimitError::new(
                "limits.read_ahead_bytes_max",
                format!(
                    "{} cannot hold one {block}-byte block of the journal (0 turns read-ahead off)",
                    self.broker.read_ahead_bytes_max
                ),
            ));
        }
        // What the windows leave of the cache must still take one message (transient payloads
        // cannot turn cold).
        if u64::from(self.wire.message_size_max) + u64::from(FRAME_OVERHEAD_BYTES_MAX)
            > self.payload_cache_bytes()
        {
            return Err(LimitError::new(
                "limits.read_ahead_bytes_max",
                format!(
                    "cache_bytes_max {} less {} of read-ahead cannot hold one message of \
                     message_size_max {}",
                    self.broker.cache_bytes_max,
                    self.read_ahead_bytes(),
                    self.wire.message_size_max
                ),
            ));
        }
        self.check_admin()
    }

    fn check_admin(&self) -> Result<(), LimitError> {
        let a = &self.admin;
        for (key, value) in [
            (
                "limits.admin_connections_max",
                u64::from(a.admin_connections_max),
            ),
            (
                "limits.admin_request_timeout_ms",
                a.admin_request_timeout_ms,
            ),
            (
                "limits.admin_requests_per_second_max",
                u64::from(a.admin_requests_per_second_max),
            ),
        ] {
            if value == 0 {
                return Err(LimitError::new(key, "must be at least 1".to_string()));
            }
        }
        // A declare with the longest names and a full retry policy must fit.
        let declare_bytes =
            4 * NAME_BYTES_MAX as u64 + 16 * u64::from(self.broker.retry_delays_count_max) + 1024;
        if a.admin_body_bytes_max < declare_bytes {
            return Err(LimitError::new(
                "limits.admin_body_bytes_max",
                format!(
                    "{} cannot hold one queue declaration with the longest names and \
                     retry_delays_count_max {} delays ({declare_bytes} bytes)",
                    a.admin_body_bytes_max, self.broker.retry_delays_count_max
                ),
            ));
        }
        Ok(())
    }

    /// A delivery of one message of `message_size_max`, with exchange name, routing key and
    /// consumer tag of the longest name, fits one `Deliver` frame: the session splits a push into
    /// frames but cannot split a message, so a maximal one that did not fit would never reach its
    /// consumer.
    fn check_one_delivery_fits_a_frame(&self) -> Result<(), LimitError> {
        let name = self.wire.name_length_max as usize;
        let bytes = deliver_frame_bytes_max(name)
            + delivery_bytes_max(self.wire.message_size_max as usize, name, name);
        if bytes as u64 > u64::from(self.wire.frame_size_max) {
            return Err(LimitError::new(
                "limits.message_size_max",
                format!(
                    "a delivery of one message of {} bytes, with names of name_length_max {}, \
                     takes up to {} bytes: over frame_size_max {}",
                    self.wire.message_size_max, name, bytes, self.wire.frame_size_max
                ),
            ));
        }
        Ok(())
    }
}

impl Limits {
    /// One `Deliver` frame carrying one message of `message_size_max` fits the outbox bound:
    /// below it, a connection could be owed a delivery its owner would never send.
    fn check_one_delivery_fits_an_outbox(&self) -> Result<(), LimitError> {
        let name = self.wire.name_length_max as usize;
        let bytes = deliver_frame_bytes_max(name)
            + delivery_bytes_max(self.wire.message_size_max as usize, name, name);
        if (bytes as u64) > self.broker.outbox_bytes_max {
            return Err(LimitError::new(
                "limits.outbox_bytes_max",
                format!(
                    "{} cannot hold one Deliver frame of a message of message_size_max {} \
                     ({} bytes with names of name_length_max {})",
                    self.broker.outbox_bytes_max, self.wire.message_size_max, bytes, name
                ),
            ));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A limit that breaks a rule: which key, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct LimitError {
    /// As the configuration file writes it: `limits.prefetch_max`.
    pub key: String,
    pub reason: String,
}

impl LimitError {
    fn new(key: impl Into<String>, reason: String) -> LimitError {
        LimitError {
            key: key.into(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_agree_across_layers() {
        Limits::DEFAULT.check().unwrap();
    }

    #[test]
    fn a_message_limit_a_journal_record_cannot_hold_is_refused() {
        let limits = Limits {
            wire: WireLimits::DEFAULT,
            ..Limits::DEFAULT
        };
        let err = limits.check().unwrap_err();
        assert_eq!(err.key, "limits.message_size_max", "{err}");
        assert!(err.reason.contains("record_bytes_max"), "{err}");
    }

    #[test]
    fn a_message_limit_whose_delivery_overflows_a_frame_is_refused() {
        // The codec's own relation (64 KiB of frame overhead) already refuses this: the
        // broker's check is asserted directly, as the last word should the codec's loosen.
        let mut limits = Limits::DEFAULT;
        limits.wire.message_size_max = limits.wire.frame_size_max - 512;
        let err = limits.check_one_delivery_fits_a_frame().unwrap_err();
        assert_eq!(err.key, "limits.message_size_max", "{err}");
        assert!(err.reason.contains("frame_size_max"), "{err}");
        Limits::DEFAULT.check_one_delivery_fits_a_frame().unwrap();
    }

    #[test]
    fn an_outbox_smaller_than_one_delivery_frame_is_refused() {
        let mut limits = Limits::DEFAULT;
        limits.broker.outbox_bytes_max = u64::from(limits.wire.message_size_max);
        let err = limits.check().unwrap_err();
        assert_eq!(err.key, "limits.outbox_bytes_max", "{err}");
        assert!(err.reason.contains("Deliver frame"), "{err}");
    }

    #[test]
    fn byte_bounds_below_one_maximal_frame_are_refused() {
        let mut limits = Limits::DEFAULT;
        limits.broker.publish_bytes_in_flight_max = u64::from(limits.wire.message_size_max);
        let err = limits.check().unwrap_err();
        assert_eq!(err.key, "limits.publish_bytes_in_flight_max", "{err}");
        let mut limits = Limits::DEFAULT;
        limits.broker.work_bytes_max = 1024;
        assert_eq!(limits.check().unwrap_err().key, "limits.work_bytes_max");
        let mut limits = Limits::DEFAULT;
        limits.broker.mesh_outgoing_bytes_max = 1024;
        assert_eq!(
            limits.check().unwrap_err().key,
            "limits.mesh_outgoing_bytes_max"
        );
    }

    #[test]
    fn read_ahead_is_taken_out_of_the_cache_and_at_most_a_quarter_of_it() {
        let mut limits = Limits::DEFAULT;
        assert_eq!(limits.read_ahead_bytes(), 4 << 20);
        assert_eq!(limits.payload_cache_bytes(), (256 << 20) - (4 << 20));
        limits.broker.cache_bytes_max = 8 << 20;
        assert_eq!(limits.read_ahead_bytes(), 2 << 20);
        limits.broker.read_ahead_bytes_max = 0;
        assert_eq!(limits.payload_cache_bytes(), 8 << 20);
        limits.broker.read_ahead_bytes_max = 100;
        assert_eq!(
            limits.check().unwrap_err().key,
            "limits.read_ahead_bytes_max"
        );
    }

    #[test]
    fn a_default_prefetch_over_the_maximum_is_refused() {
        let mut limits = Limits::DEFAULT;
        limits.broker.prefetch_default = limits.broker.prefetch_max + 1;
        assert_eq!(limits.check().unwrap_err().key, "limits.prefetch_default");
    }

    #[test]
    fn producer_limits_are_checked_by_key() {
        for (window, ok) in [
            (4096, true),
            (64, true),
            (0, false),
            (100, false),
            (1 << 21, false),
        ] {
            let mut l = Limits::DEFAULT;
            l.broker.producer_window_max = window;
            match l.check() {
                Ok(()) => assert!(ok, "window {window} taken"),
                Err(e) => {
                    assert!(!ok, "window {window} refused: {e}");
                    assert_eq!(e.key, "limits.producer_window_max");
                }
            }
        }
        let mut l = Limits::DEFAULT;
        l.broker.producers_per_shard_max = 0;
        assert_eq!(l.check().unwrap_err().key, "limits.producers_per_shard_max");
    }

    #[test]
    fn admin_limits_are_checked() {
        let mut l = Limits::DEFAULT;
        l.admin.admin_connections_max = 0;
        assert_eq!(l.check().unwrap_err().key, "limits.admin_connections_max");
        let mut l = Limits::DEFAULT;
        l.admin.admin_body_bytes_max = 100;
        let err = l.check().unwrap_err();
        assert_eq!(err.key, "limits.admin_body_bytes_max", "{err}");
        let mut l = Limits::DEFAULT;
        l.admin.admin_metrics_queues_max = 0;
        l.check().unwrap();
    }
}
