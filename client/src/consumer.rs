//! Consuming: a `Consumer` is a `Stream` of `Delivery`s; each delivery settles itself.
//!
//! Contract: the connection's driver task pushes each delivery, raw (`conn::RawDelivery`), into
//! its consumer's channel as the `Deliver` frame is read; the `Consumer` (owned by the
//! application) takes them out and makes each a `Delivery` bound to its connection. The
//! channel is unbounded because the broker bounds it: at most `prefetch` unacknowledged
//! deliveries per consumer (an `auto_ack` consumer has no such bound; the broker's own pacing
//! and TCP are all it gets). A `Delivery` keeps a handle on the connection it came from,
//! because delivery tags mean something only there; settling on a dead connection fails with
//! `Closed` (the broker has already requeued it).
//!
//! Faults handled: the broker cancelling the consumer (the stream yields
//! `Err(ConsumerCancelled)` and ends), the connection dying (`Err(Closed)`, then the end),
//! the application dropping or cancelling a consumer that still holds undelivered deliveries
//! (they are nacked with requeue, so they go to another consumer now rather than when the
//! connection closes).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use weir_protocol::wire::{self, ErrorCode};

use crate::conn::{Command, ConnHandle, RawDelivery, Settle};
use crate::error::ClientError;

/// How to consume a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// Unique on the connection; empty: the client picks one.
    pub tag: String,
    /// Most unacknowledged deliveries this consumer may hold; 0: the broker's default.
    pub prefetch: u32,
    /// Deliveries are settled as they are sent (at-most-once); `ack` is then a no-op.
    pub auto_ack: bool,
    /// The queue's only consumer; refused (`ResourceLocked`) if it has another, and while it
    /// runs every other consume of the queue is refused the same way.
    pub exclusive: bool,
    /// Consumer priority (RabbitMQ's `x-priority`; default 0, may be negative): while a
    /// consumer of higher priority has room in its prefetch window, lower ones get nothing;
    /// equal priorities share round robin. With a single-active-consumer queue it picks which
    /// consumer is active.
    ///
    /// ```no_run
    /// use weir_client::{Client, ClientError, ConsumeOptions};
    ///
    /// # async fn example(client: Client) -> Result<(), ClientError> {
    /// // A fast local worker takes what it can; the remote one gets only the overflow.
    /// let fast = ConsumeOptions { prefetch: 50, priority: 10, ..ConsumeOptions::default() };
    /// let local = client.consume("jobs", fast).await?;
    /// let overflow = ConsumeOptions { prefetch: 50, priority: 0, ..ConsumeOptions::default() };
    /// let remote = client.consume("jobs", overflow).await?;
    /// # drop((local, remote));
    /// # Ok(())
    /// # }
    /// ```
    pub priority: i32,
}

/// One message handed to this client, by a consumer or by `get`.
pub struct Delivery {
    conn: ConnHandle,
    /// Tag, flags, exchange, routing key and the `Message` flatbuffer (a slice of the received
    /// frame, verified by the decoder), as the driver read them.
    raw: RawDelivery,
    auto_ack: bool,
}

impl Delivery {
    /// Makes the driver's raw delivery public, bound to the connection it came over.
    pub(crate) fn new(conn: ConnHandle, raw: RawDelivery, auto_ack: bool) -> Delivery {
        Delivery {
            conn,
            raw,
            auto_ack,
        }
    }

    /// The message's properties and body, read in place.
    pub fn message(&self) -> wire::Message<'_> {
        // SAFETY: `message` is a slice of a frame that came out of `FrameDecoder::decode`, which
        // verifies every nested message of `Deliver` and `GetOk` frames (weir-protocol's
        // invariant "every nested message is verified at ingress"), and `Bytes` is immutable.
        unsafe { weir_protocol::message_unchecked(&self.raw.message) }
    }

    /// The message's wire bytes exactly as published: re-publishable as they are.
    pub fn message_bytes(&self) -> &Bytes {
        &self.raw.message
    }

    /// The message body (empty if it had none).
    pub fn body(&self) -> &[u8] {
        self.message().body().map(|b| b.bytes()).unwrap_or(&[])
    }

    /// The application's message id, if the publisher set one.
    pub fn message_id(&self) -> Option<&str> {
        self.message().message_id()
    }

    /// The correlation id (request-reply), if set.
    pub fn correlation_id(&self) -> Option<&str> {
        self.message().correlation_id()
    }

    /// The queue a reply should be published to, if set.
    pub fn reply_to(&self) -> Option<&str> {
        self.message().reply_to()
    }

    /// The body's MIME type, if set.
    pub fn content_type(&self) -> Option<&str> {
        self.message().content_type()
    }

    /// The body's content encoding (e.g. `gzip`), if set.
    pub fn content_encoding(&self) -> Option<&str> {
        self.message().content_encoding()
    }

    /// The application headers, in order.
    pub fn headers(&self) -> Vec<(&str, &[u8])> {
        self.message()
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key(), h.value().map(|v| v.bytes()).unwrap_or(&[])))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first header named `key`.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// When the producer created the message, ms since the Unix epoch (0: not set).
    pub fn timestamp_ms(&self) -> i64 {
        self.message().timestamp_ms()
    }

    /// The message's own time to live, ms from when a queue accepted it, if set.
    pub fn expiration_ms(&self) -> Option<u32> {
        self.message().expiration_ms()
    }

    /// The message's priority, 0 (lowest, the default) to 255.
    pub fn priority(&self) -> u8 {
        self.message().priority()
    }

    /// The earliest delivery time, ms since the Unix epoch, if the publisher delayed it.
    pub fn deliver_at_ms(&self) -> Option<i64> {
        self.message().deliver_at_ms()
    }

    /// Whether it was published persistent (journaled on a durable queue).
    pub fn persistent(&self) -> bool {
        self.message().persistent()
    }

    /// Connection-scoped; what acks name.
    pub fn delivery_tag(&self) -> u64 {
        self.raw.delivery_tag
    }

    /// Delivered before (to this or another consumer) and not acked.
    pub fn redelivered(&self) -> bool {
        self.raw.redelivered
    }

    /// Deliveries of this message so far, this one included.
    pub fn delivery_count(&self) -> u32 {
        self.raw.delivery_count
    }

    /// The exchange it was published to (empty: the default exchange).
    pub fn exchange(&self) -> &str {
        &self.raw.exchange
    }

    /// The routing key it was published with (on the default exchange, the queue's name).
    pub fn routing_key(&self) -> &str {
        &self.raw.routing_key
    }

    /// Its dead-letter history, most recent first, like RabbitMQ's `x-death`: one line per
    /// queue and reason it was dead-lettered from, with a count. Empty for a message that was
    /// never dead-lettered. The broker adds it beside the message; the message's own bytes are
    /// untouched.
    ///
    /// ```no_run
    /// # async fn f(c: weir_client::Client) -> Result<(), weir_client::ClientError> {
    /// let mut dead = c.consume("orders.dead", Default::default()).await?;
    /// while let Some(d) = dead.recv().await {
    ///     let d = d?;
    ///     if let Some(last) = d.deaths().first() {
    ///         println!("{} from {} ({} times)", last.reason_name(), last.queue, last.count);
    ///     }
    ///     d.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn deaths(&self) -> &[Death] {
        &self.raw.deaths
    }

    /// Whether the broker settled it as it sent it (auto-ack consumer or `get`).
    pub fn is_auto_acked(&self) -> bool {
        self.auto_ack
    }

    /// Done with it: the broker forgets it.
    ///
    /// The ack is sent when this is called, not when the future is polled; the future resolves
    /// once the broker answers that the ack is durable (or refuses it, e.g. `UnknownDeliveryTag`).
    /// So `d.ack().await?` settles one at a time, while keeping the futures and awaiting them
    /// later lets many acks share one group commit; dropping the future forgoes the answer, not
    /// the ack. Acks queued while the connection is busy leave merged, as one frame of tag
    /// ranges; one whose future was dropped before it left asks the broker for no answer at all
    /// (AMQP's ack), and the awaited ones share one answer that is each one's own (a tag the
    /// broker no longer holds is never merged, so it alone gets `UnknownDeliveryTag`). An
    /// auto-acked delivery needs no ack: the future is ready at once.
    pub fn ack(&self) -> SettleFuture {
        if self.auto_ack {
            return SettleFuture::ready(Ok(()));
        }
        self.settle(Settle::Ack)
    }

    /// Acks many deliveries in one frame (their tags as ranges) for one answer from the broker,
    /// judged whole: if a range of them names no delivery the broker still holds, none is
    /// settled. They must
    /// have come over one connection, as every delivery of one `Consumer` does; auto-acked ones
    /// are skipped. Sent when called, like `ack`.
    pub fn ack_all(deliveries: &[Delivery]) -> SettleFuture {
        let mut manual = deliveries.iter().filter(|d| !d.auto_ack);
        let Some(first) = manual.next() else {
            return SettleFuture::ready(Ok(()));
        };
        if manual.clone().any(|d| !d.conn.same_connection(&first.conn)) {
            return SettleFuture::ready(Err(ClientError::InvalidArgument(
                "ack_all: the deliveries came over different connections; ack each consumer's own"
                    .into(),
            )));
        }
        let tags = std::iter::once(first)
            .chain(manual)
            .map(|d| d.raw.delivery_tag)
            .collect();
        SettleFuture::send(&first.conn, Settle::Ack, tags)
    }

    /// Failed: with `requeue` it goes back to its queue (redelivered), without it it is
    /// dead-lettered or dropped. Sent at once, like `ack`.
    pub fn nack(&self, requeue: bool) -> SettleFuture {
        match self.refuse_auto_acked("nack") {
            Ok(()) => self.settle(Settle::Nack {
                requeue,
                delay_ms: None,
            }),
            Err(e) => SettleFuture::ready(Err(e)),
        }
    }

    /// Failed, try again later: the message goes back to its queue and is delivered again no
    /// sooner than `delay` from now (a retry with backoff, NATS' "NAK with delay"), overriding
    /// the queue's `retry_delays` for this attempt; it still counts as one of its failures. The
    /// delay is kept across broker restarts. Whole milliseconds, at most the broker's
    /// `delay_ms_max` (a week by default; more is refused with `InvalidArgument`). A zero delay
    /// is a plain requeue that is not counted as a failure. Sent at once; await the future for
    /// the broker's answer (after the retry is journaled).
    ///
    /// ```no_run
    /// # async fn run(client: weir_client::Client) -> Result<(), weir_client::ClientError> {
    /// use std::time::Duration;
    /// let mut consumer = client.consume("jobs", weir_client::ConsumeOptions::default()).await?;
    /// while let Some(delivery) = consumer.recv().await {
    ///     let delivery = delivery?;
    ///     if delivery.body() == b"not yet" {
    ///         // Redelivered in 30 s or later, with its delivery count one higher.
    ///         delivery.nack_with_delay(Duration::from_secs(30)).await?;
    ///     } else {
    ///         delivery.ack().await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn nack_with_delay(&self, delay: Duration) -> SettleFuture {
        let Ok(delay_ms) = u32::try_from(delay.as_millis()) else {
            return SettleFuture::ready(Err(ClientError::InvalidArgument(format!(
                "nack_with_delay: {delay:?} is more than the wire's {} ms",
                u32::MAX
            ))));
        };
        match self.refuse_auto_acked("nack") {
            Ok(()) => self.settle(Settle::Nack {
                requeue: true,
                delay_ms: Some(delay_ms),
            }),
            Err(e) => SettleFuture::ready(Err(e)),
        }
    }

    /// As `nack`, AMQP's name for one delivery.
    pub fn reject(&self, requeue: bool) -> SettleFuture {
        match self.refuse_auto_acked("reject") {
            Ok(()) => self.settle(Settle::Reject { requeue }),
            Err(e) => SettleFuture::ready(Err(e)),
        }
    }

    fn refuse_auto_acked(&self, what: &str) -> Result<(), ClientError> {
        if self.auto_ack {
            return Err(ClientError::InvalidArgument(format!(
                "cannot {what} delivery {}: it was auto-acked",
                self.raw.delivery_tag
            )));
        }
        Ok(())
    }

    fn settle(&self, kind: Settle) -> SettleFuture {
        SettleFuture::send(&self.conn, kind, vec![self.raw.delivery_tag])
    }
}

/// The broker's answer to an ack, nack or reject that was already sent.
#[must_use = "the settlement is sent already; await this for the broker's answer, or drop it"]
pub struct SettleFuture {
    state: SettleState,
}

enum SettleState {
    Ready(Option<Result<(), ClientError>>),
    Waiting(
        oneshot::Receiver<Result<weir_protocol::InFrame, ClientError>>,
        ConnHandle,
    ),
}

impl SettleFuture {
    fn ready(result: Result<(), ClientError>) -> SettleFuture {
        SettleFuture {
            state: SettleState::Ready(Some(result)),
        }
    }

    /// Sends the settlement of `tags` now, asking for the broker's answer.
    fn send(conn: &ConnHandle, kind: Settle, tags: Vec<u64>) -> SettleFuture {
        let (reply, rx) = oneshot::channel();
        match conn.send(Command::Settle {
            kind,
            tags,
            reply: Some(reply),
        }) {
            Ok(()) => SettleFuture {
                state: SettleState::Waiting(rx, conn.clone()),
            },
            Err(e) => SettleFuture::ready(Err(e)),
        }
    }
}

impl std::future::Future for SettleFuture {
    type Output = Result<(), ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            SettleState::Ready(result) => Poll::Ready(result.take().unwrap_or(Ok(()))),
            SettleState::Waiting(rx, conn) => {
                let answer = match std::task::ready!(Pin::new(rx).poll(cx)) {
                    Ok(answer) => answer,
                    Err(_) => Err(conn.closed_error()),
                };
                Poll::Ready(answer.and_then(|frame| match frame.body_type() {
                    wire::Body::Ok => Ok(()),
                    other => Err(ClientError::UnexpectedReply(format!(
                        "{other:?} in answer to a settlement"
                    ))),
                }))
            }
        }
    }
}

impl std::fmt::Debug for SettleFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ready = matches!(self.state, SettleState::Ready(_));
        f.debug_struct("SettleFuture")
            .field("ready", &ready)
            .finish()
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("delivery_tag", &self.raw.delivery_tag)
            .field("redelivered", &self.raw.redelivered)
            .field("delivery_count", &self.raw.delivery_count)
            .field("exchange", &self.raw.exchange)
            .field("routing_key", &self.raw.routing_key)
            .field("message_bytes", &self.raw.message.len())
            .field("auto_ack", &self.auto_ack)
            .finish()
    }
}

/// A running consumer: a `Stream` of deliveries in queue order.
///
/// It ends after yielding one error: `ConsumerCancelled` when the broker cancelled it, `Closed`
/// when its connection died. Dropping it cancels it (fire-and-forget); `cancel` waits for the
/// broker.
pub struct Consumer {
    conn: ConnHandle,
    tag: String,
    queue: String,
    shard: u16,
    auto_ack: bool,
    deliveries: mpsc::UnboundedReceiver<Result<RawDelivery, ClientError>>,
    /// The broker no longer knows this consumer (cancelled, or the connection is gone).
    done: bool,
    /// The stream's ending error, when `recv_many` took it along with deliveries: the next call
    /// returns it.
    ended: Option<ClientError>,
    /// `recv_many`'s scratch, kept for its allocation.
    scratch: Vec<Result<RawDelivery, ClientError>>,
}

impl Consumer {
    pub(crate) fn new(
        conn: ConnHandle,
        tag: String,
        queue: String,
        shard: u16,
        auto_ack: bool,
        deliveries: mpsc::UnboundedReceiver<Result<RawDelivery, ClientError>>,
    ) -> Consumer {
        Consumer {
            conn,
            tag,
            queue,
            shard,
            auto_ack,
            deliveries,
            done: false,
            ended: None,
            scratch: Vec::new(),
        }
    }

    /// The consumer tag (chosen by the client when `ConsumeOptions::tag` was empty).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The queue it consumes.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The shard that owns the queue (from `ConsumeOk`).
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Changes this consumer's prefetch (its window of unacknowledged deliveries) while it
    /// runs; a wider window lets more deliveries come at once.
    pub async fn set_prefetch(&self, prefetch: u32) -> Result<(), ClientError> {
        crate::error::check_limit(
            "prefetch",
            prefetch as usize,
            self.conn.limits().prefetch_max,
        )?;
        let mut sp = wire::SetPrefetchT::default();
        sp.consumer_tag = self.tag.clone();
        sp.prefetch = prefetch;
        let reply = self
            .conn
            .request(wire::BodyT::SetPrefetch(Box::new(sp)))
            .await?;
        match reply.body_type() {
            wire::Body::Ok => Ok(()),
            other => Err(ClientError::UnexpectedReply(format!(
                "{other:?} in answer to SetPrefetch"
            ))),
        }
    }

    /// The next delivery; `None` once the stream has ended. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Delivery, ClientError>> {
        std::future::poll_fn(|cx| self.poll_delivery(cx)).await
    }

    /// Every delivery already arrived, up to `max`, appended to `buf` in queue order; waits
    /// only while none has. Returns how many it appended: 0 once the stream has ended (or with
    /// `max` 0). The error that ends the stream comes alone, after the deliveries before it.
    /// Cancel-safe. Settle what it took in one frame with [`Delivery::ack_all`], or one by one:
    /// `ack` calls made together are merged into one frame anyway.
    pub async fn recv_many(
        &mut self,
        buf: &mut Vec<Delivery>,
        max: usize,
    ) -> Result<usize, ClientError> {
        if let Some(e) = self.ended.take() {
            return Err(e);
        }
        if max == 0 {
            return Ok(0);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        // `recv_many` is cancel-safe: nothing is taken unless it returns.
        let n = self.deliveries.recv_many(&mut scratch, max).await;
        if n == 0 {
            self.done = true;
            self.scratch = scratch;
            return Ok(0);
        }
        let before = buf.len();
        for item in scratch.drain(..) {
            match item {
                Ok(raw) => buf.push(Delivery::new(self.conn.clone(), raw, self.auto_ack)),
                Err(e) => {
                    // Nothing follows the error that ends a stream.
                    self.done = true;
                    self.ended = Some(e);
                    break;
                }
            }
        }
        self.scratch = scratch;
        let taken = buf.len() - before;
        match self.ended.take() {
            Some(e) if taken == 0 => Err(e),
            ended => {
                self.ended = ended;
                Ok(taken)
            }
        }
    }

    fn poll_delivery(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Delivery, ClientError>>> {
        if let Some(e) = self.ended.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let item = std::task::ready!(self.deliveries.poll_recv(cx));
        if matches!(item, Some(Err(_)) | None) {
            self.done = true;
        }
        Poll::Ready(item.map(|r| r.map(|raw| Delivery::new(self.conn.clone(), raw, self.auto_ack))))
    }

    /// Stops the consumer and waits for the broker to confirm. Deliveries received but not yet
    /// taken from this stream go back to the queue; deliveries already taken stay unacked until
    /// settled.
    pub async fn cancel(mut self) -> Result<(), ClientError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let (reply, rx) = oneshot::channel();
        let requeue = self.take_unseen();
        self.conn.send(Command::Cancel {
            tag: self.tag.clone(),
            requeue,
            reply: Some(reply),
        })?;
        match self.conn.wait(rx).await {
            Ok(frame) if frame.body_type() == wire::Body::Ok => Ok(()),
            Ok(frame) => Err(ClientError::UnexpectedReply(format!(
                "{:?} in answer to Cancel",
                frame.body_type()
            ))),
            // The broker cancelled it meanwhile (its queue was deleted): it is gone all the same.
            Err(ClientError::Refused { code, .. }) if code == ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Closes the channel and returns the tags of the deliveries left in it.
    fn take_unseen(&mut self) -> Vec<u64> {
        // After `close`, the driver's sends fail and it requeues those itself.
        self.deliveries.close();
        let mut tags = Vec::new();
        while let Ok(item) = self.deliveries.try_recv() {
            if let Ok(d) = item {
                if !self.auto_ack {
                    tags.push(d.delivery_tag);
                }
            }
        }
        tags
    }
}

impl futures_core::Stream for Consumer {
    type Item = Result<Delivery, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_delivery(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.done || self.conn.is_closed() {
            return;
        }
        let requeue = self.take_unseen();
        let _ = self.conn.send(Command::Cancel {
            tag: self.tag.clone(),
            requeue,
            reply: None,
        });
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("tag", &self.tag)
            .field("queue", &self.queue)
            .field("shard", &self.shard)
            .field("auto_ack", &self.auto_ack)
            .finish()
    }
}

/// One line of a delivery's dead-letter history (the wire's `Death`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Death {
    /// The queue it was dead-lettered from.
    pub queue: String,
    /// Why (rejected, expired, ...).
    pub reason: weir_protocol::wire::DeathReason,
    /// Times it was dead-lettered from that queue for that reason.
    pub count: u32,
    /// The exchange it had been published to when it entered that queue.
    pub exchange: String,
    /// The routing key it had when it entered that queue.
    pub routing_key: String,
    /// When it was first dead-lettered from that queue for that reason, ms since the Unix epoch.
    pub first_time_ms: i64,
    /// When it was last dead-lettered from that queue for that reason, ms since the Unix epoch.
    pub last_time_ms: i64,
}

impl Death {
    pub(crate) fn from_wire(d: &weir_protocol::wire::Death<'_>) -> Death {
        Death {
            queue: d.queue().unwrap_or("").to_string(),
            reason: d.reason(),
            count: d.count(),
            exchange: d.exchange().unwrap_or("").to_string(),
            routing_key: d.routing_key().unwrap_or("").to_string(),
            first_time_ms: d.first_time_ms(),
            last_time_ms: d.last_time_ms(),
        }
    }

    /// The reason as RabbitMQ's `x-death` names it: `rejected`, `expired`, `maxlen`,
    /// `delivery_limit`, or weir's own `retries_exhausted`.
    pub fn reason_name(&self) -> &'static str {
        use weir_protocol::wire::DeathReason as R;
        match self.reason {
            R::Rejected => "rejected",
            R::Expired => "expired",
            R::MaxLength => "maxlen",
            R::DeliveryLimit => "delivery_limit",
            R::RetriesExhausted => "retries_exhausted",
            _ => "unknown",
        }
    }
}
