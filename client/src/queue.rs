//! Queue declarations and descriptions as owned Rust values.
//!
//! Contract: plain data, converted to and from the schema's object API at the edge (the
//! generated `*T` types are `#[non_exhaustive]` and carry wire details such as optional
//! strings); no I/O here.

use weir_protocol::wire;

/// What a publish past `max_length` or `max_length_bytes` does: drop the oldest ready
/// messages (`DropHead`, the default) or refuse the new one (`RejectPublish`, `QueueFull`).
pub use weir_protocol::Overflow;

/// Optional behaviour of a queue, fixed when it is declared. `None`: the broker's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArguments {
    /// Most ready messages; see `overflow`. `None`: unbounded (bounded by disk).
    pub max_length: Option<u64>,
    /// Most bytes of ready message bodies; see `overflow`. `None`: unbounded.
    pub max_length_bytes: Option<u64>,
    /// What a publish past `max_length` or `max_length_bytes` does.
    pub overflow: Overflow,
    /// Time to live of every message in the queue, ms from when the queue accepts it.
    pub message_ttl_ms: Option<u32>,
    /// Exchange that receives messages dead-lettered from this queue (rejected without requeue,
    /// expired, dropped by overflow, or past `max_deliveries`); `""` is the default exchange
    /// (the routing key names the queue). `None`: they are dropped. At least once for
    /// persistent messages of a durable queue: the original is settled only once its copy is
    /// confirmed, so a crash may double a copy but never lose it. Each copy carries its
    /// history (`Delivery::deaths`); one that would go round a cycle of queues without any
    /// consumer rejecting it on the way is dropped (`dead_letter.cycles` in `weir status`).
    pub dead_letter_exchange: Option<String>,
    /// Routing key for dead-lettered messages. `None`: the message's original routing key.
    pub dead_letter_routing_key: Option<String>,
    /// Deliveries after which an unacknowledged message is dead-lettered instead of redelivered.
    /// `None`: unlimited. It counts every delivery, the first included, so `Some(1)` means no
    /// redelivery at all. RabbitMQ's `delivery-limit` N allows N redeliveries (N + 1
    /// deliveries): its N is weir's N + 1.
    pub max_deliveries: Option<u32>,
    /// Pin the queue to a shard (today the broker accepts only the shard its name hashes to).
    pub shard: Option<u16>,
    /// Largest message priority the queue orders by; 0 makes it a plain FIFO. A priority queue
    /// delivers the ready message of the highest priority first ([`Message::priority`], capped at
    /// this), FIFO within one priority; a redelivered message goes back to the front of its own
    /// priority. Every level up to 255 is served; a handful (RabbitMQ recommends at most 10)
    /// covers most needs, and unused levels cost nothing. Under `max_length` with
    /// [`Overflow::DropHead`], the oldest message of the lowest priority is dropped (RabbitMQ
    /// drops the head, the next to be delivered).
    ///
    /// [`Message::priority`]: crate::Message::priority
    ///
    /// ```no_run
    /// # async fn example(client: weir_client::Client) -> Result<(), weir_client::ClientError> {
    /// use weir_client::{QueueArguments, QueueOptions};
    /// let options = QueueOptions {
    ///     arguments: QueueArguments { priority_max: 9, ..QueueArguments::default() },
    ///     ..QueueOptions::default()
    /// };
    /// client.declare("jobs", options).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub priority_max: u8,
    /// Queue expiry (RabbitMQ's `x-expires`): the broker deletes the queue, with its messages,
    /// once it has been unused this long, ms (at least 1). Unused: no consumers, no `get`, no
    /// (non-passive) redeclare; publishing to it or reading its info is not a use. Durable queues
    /// keep the clock across broker restarts: the time unused before a restart counts.
    ///
    /// ```no_run
    /// use weir_client::{Client, ClientError, QueueArguments, QueueOptions};
    ///
    /// # async fn example(client: Client) -> Result<(), ClientError> {
    /// // A per-session queue that cleans itself up ten minutes after its last consumer left.
    /// let arguments = QueueArguments { expires_ms: Some(600_000), ..QueueArguments::default() };
    /// client.declare("session-42", QueueOptions { arguments, ..QueueOptions::default() }).await?;
    /// let info = client.queue_info("session-42").await?;
    /// println!("expires in {:?} ms unless used", info.expires_in_ms);
    /// # Ok(())
    /// # }
    /// ```
    pub expires_ms: Option<u32>,
    /// Single active consumer (RabbitMQ's `x-single-active-consumer`): only one consumer
    /// receives at a time: the highest [`ConsumeOptions::priority`](crate::ConsumeOptions),
    /// the earliest attached among equals. The others get nothing, whatever their prefetch,
    /// until it is cancelled or its connection closes (what it held unacked then goes back to
    /// the queue, for the next); then the next in that order takes over.
    ///
    /// ```no_run
    /// use weir_client::{Client, ClientError, ConsumeOptions, QueueArguments, QueueOptions};
    ///
    /// # async fn example(client: Client) -> Result<(), ClientError> {
    /// // Ordered processing with a hot standby: every worker consumes, one works at a time.
    /// let arguments = QueueArguments { single_active_consumer: true, ..QueueArguments::default() };
    /// client.declare("ledger", QueueOptions { arguments, ..QueueOptions::default() }).await?;
    /// let worker = client.consume("ledger", ConsumeOptions::default()).await?;
    /// let info = client.queue_info("ledger").await?;
    /// assert_eq!(info.active_consumer.as_deref(), Some(worker.tag()));
    /// # Ok(())
    /// # }
    /// ```
    pub single_active_consumer: bool,
    /// Retry policy, ms: a delivery nacked or rejected with requeue comes back after
    /// `retry_delays_ms[n - 1]` on its n-th failure (counted per message, across broker
    /// restarts), and after the last delay its next failure dead-letters it (or drops it without
    /// a `dead_letter_exchange`). A consumer that goes away is not a failure: what it held comes
    /// back at once. `Delivery::nack_with_delay` overrides the delay of one attempt. Empty: a
    /// requeued delivery is ready again at once. At most the broker's `retry_delays_count_max`
    /// delays (64 by default), each at most its `delay_ms_max` (a week).
    ///
    /// ```no_run
    /// # async fn run(client: weir_client::Client) -> Result<(), weir_client::ClientError> {
    /// use weir_client::{QueueArguments, QueueOptions};
    /// let options = QueueOptions {
    ///     arguments: QueueArguments {
    ///         // 1 s, 5 s, 30 s, then to the dead-letter exchange.
    ///         retry_delays_ms: vec![1000, 5000, 30_000],
    ///         dead_letter_exchange: Some("".into()),
    ///         dead_letter_routing_key: Some("jobs.failed".into()),
    ///         ..QueueArguments::default()
    ///     },
    ///     ..QueueOptions::default()
    /// };
    /// client.declare("jobs", options).await?;
    /// # Ok(()) }
    /// ```
    pub retry_delays_ms: Vec<u32>,
}

impl QueueArguments {
    pub(crate) fn to_wire(&self) -> wire::QueueArgumentsT {
        let mut a = wire::QueueArgumentsT::default();
        a.max_length = self.max_length;
        a.max_length_bytes = self.max_length_bytes;
        a.overflow = self.overflow.to_wire();
        a.message_ttl_ms = self.message_ttl_ms;
        a.dead_letter_exchange = self.dead_letter_exchange.clone();
        a.dead_letter_routing_key = self.dead_letter_routing_key.clone();
        a.max_deliveries = self.max_deliveries;
        a.shard = self.shard;
        a.priority_max = self.priority_max;
        a.expires_ms = self.expires_ms;
        a.single_active_consumer = self.single_active_consumer;
        a.retry_delays_ms =
            (!self.retry_delays_ms.is_empty()).then(|| self.retry_delays_ms.clone());
        a
    }

    pub(crate) fn from_wire(a: &wire::QueueArgumentsT) -> QueueArguments {
        QueueArguments {
            max_length: a.max_length,
            max_length_bytes: a.max_length_bytes,
            overflow: Overflow::from_wire(a.overflow),
            message_ttl_ms: a.message_ttl_ms,
            dead_letter_exchange: a.dead_letter_exchange.clone(),
            dead_letter_routing_key: a.dead_letter_routing_key.clone(),
            max_deliveries: a.max_deliveries,
            shard: a.shard,
            priority_max: a.priority_max,
            expires_ms: a.expires_ms,
            single_active_consumer: a.single_active_consumer,
            retry_delays_ms: a.retry_delays_ms.clone().unwrap_or_default(),
        }
    }
}

/// How to declare a queue. `Default` is a durable, shared, non-auto-delete queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// Survives broker restarts.
    pub durable: bool,
    /// Only this connection may use it; deleted when the connection closes.
    pub exclusive: bool,
    /// Deleted when its last consumer is cancelled.
    pub auto_delete: bool,
    /// Only check that it exists (`NotFound` otherwise).
    pub passive: bool,
    /// Optional behaviour: limits, TTL, dead-lettering, priorities.
    pub arguments: QueueArguments,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            durable: true,
            exclusive: false,
            auto_delete: false,
            passive: false,
            arguments: QueueArguments::default(),
        }
    }
}

impl QueueOptions {
    /// A non-durable queue (kept in memory only).
    pub fn transient() -> Self {
        QueueOptions {
            durable: false,
            ..QueueOptions::default()
        }
    }

    /// A passive declare: checks that the queue exists.
    pub fn passive() -> Self {
        QueueOptions {
            passive: true,
            ..QueueOptions::default()
        }
    }
}

/// A queue as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// The queue's name (the broker's choice if it was declared with an empty one).
    pub name: String,
    /// Survives broker restarts.
    pub durable: bool,
    /// Only its declaring connection may use it.
    pub exclusive: bool,
    /// Deleted when its last consumer is cancelled.
    pub auto_delete: bool,
    /// The arguments it was declared with.
    pub arguments: QueueArguments,
    /// The shard that owns it.
    pub shard: u16,
    /// Messages waiting to be delivered.
    pub messages_ready: u64,
    /// Messages delivered and not yet settled.
    pub messages_unacked: u64,
    /// Messages not deliverable before their `deliver_at` time.
    pub messages_delayed: u64,
    /// Bytes of the ready messages.
    pub bytes_ready: u64,
    /// Consumers attached.
    pub consumers: u32,
    /// Age of the oldest ready message; `None` when none is ready.
    pub oldest_ready_age_ms: Option<u64>,
    /// With [`QueueArguments::expires_ms`]: time left before the broker deletes the queue if it
    /// stays unused, ms. `None`: no `expires_ms`, or in use (it has consumers).
    pub expires_in_ms: Option<u64>,
    /// With [`QueueArguments::single_active_consumer`]: the tag of the consumer receiving now.
    pub active_consumer: Option<String>,
    /// Messages waiting out a retry delay (counted in `messages_delayed` too).
    pub messages_retrying: u64,
    /// Messages the queue accepted since it was declared or the broker last started (the
    /// counts below start again from 0 at a restart).
    pub messages_published: u64,
    /// Deliveries to consumers and `Get`s, redeliveries included.
    pub messages_delivered: u64,
    /// Of those, redeliveries.
    pub messages_redelivered: u64,
    /// Messages settled by an ack.
    pub messages_acked: u64,
    /// Nacks and rejects, with or without requeue.
    pub messages_nacked: u64,
    /// Messages handed to the queue's dead-letter exchange.
    pub messages_dead_lettered: u64,
    /// Messages whose TTL ran out.
    pub messages_expired: u64,
    /// Messages dropped by the overflow policy or a purge.
    pub messages_dropped: u64,
    /// Bytes of the messages delivered and not yet settled.
    pub bytes_unacked: u64,
}

impl QueueInfo {
    pub(crate) fn from_wire(i: &wire::QueueInfoT) -> QueueInfo {
        QueueInfo {
            name: i.name.clone().unwrap_or_default(),
            durable: i.durable,
            exclusive: i.exclusive,
            auto_delete: i.auto_delete,
            arguments: i
                .arguments
                .as_deref()
                .map(QueueArguments::from_wire)
                .unwrap_or_default(),
            shard: i.shard,
            messages_ready: i.messages_ready,
            messages_unacked: i.messages_unacked,
            messages_delayed: i.messages_delayed,
            bytes_ready: i.bytes_ready,
            consumers: i.consumers,
            oldest_ready_age_ms: i.oldest_ready_age_ms,
            expires_in_ms: i.expires_in_ms,
            active_consumer: i.active_consumer.clone(),
            messages_retrying: i.messages_retrying,
            messages_published: i.messages_published,
            messages_delivered: i.messages_delivered,
            messages_redelivered: i.messages_redelivered,
            messages_acked: i.messages_acked,
            messages_nacked: i.messages_nacked,
            messages_dead_lettered: i.messages_dead_lettered,
            messages_expired: i.messages_expired,
            messages_dropped: i.messages_dropped,
            bytes_unacked: i.bytes_unacked,
        }
    }
}
