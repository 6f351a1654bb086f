//! The `Client`: one broker, one connection per shard (or one in all), each queue's traffic on
//! the connection of the shard that owns it.
//!
//! Contract: a `Client` is a cheap `Arc` handle, shareable across tasks. It owns its connections:
//! when the last clone is dropped every connection is shut down (consumers and deliveries still
//! held then fail with `Closed`, and the broker requeues what they held). Routing is a pure
//! function of the queue name (`placement`, the broker's own), so no routing table needs
//! refreshing and every request about a queue, its publishes and its consumers share one
//! connection, which keeps publish order per queue and makes exclusive queues usable.
//!
//! Faults handled: a version mismatch at the handshake (`ProtocolVersion` with the broker's
//! sentence), a broker that never answers the handshake (`ClientOptions::connect_timeout`),
//! requests that would break the broker's announced limits (refused locally with
//! `LimitExceeded`, before anything is sent), a connection that dies (its operations fail with
//! `Closed`; the client does not reconnect by itself: redelivery and idempotent publishing
//! make reconnect policy the application's call).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::ToSocketAddrs;
use tokio::sync::{mpsc, oneshot};
use weir_protocol::wire::{self, BodyT};
use weir_protocol::{InFrame, PROTOCOL_VERSION};

use crate::conn::{self, Command, Confirmation, ConnHandle, RawDelivery, ServerInfo};
use crate::consumer::{ConsumeOptions, Consumer, Delivery};
use crate::error::{check_limit, ClientError};
use crate::message::Message;
use crate::queue::{QueueInfo, QueueOptions};

/// The shard that owns the queue `name` among `shard_count` shards: CRC-32 of the name modulo
/// the count. The protocol's one definition, which the broker uses too.
pub use weir_protocol::placement;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Shown in the broker's logs.
    pub name: String,
    /// Open one connection per shard and send each queue's traffic to its owner. Off: one
    /// connection, and the broker forwards work to owning shards itself.
    pub shard_aware: bool,
    /// Longest wait for TCP connect plus handshake, per connection.
    pub connect_timeout: Duration,
    /// The protocol version sent in `Hello`. Leave it: other values exist to test a broker's
    /// refusal.
    pub protocol_version: u16,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            name: "weir-client".into(),
            shard_aware: true,
            connect_timeout: Duration::from_secs(10),
            protocol_version: PROTOCOL_VERSION,
        }
    }
}

impl ClientOptions {
    /// One connection for everything.
    pub fn single_connection() -> Self {
        ClientOptions {
            shard_aware: false,
            ..ClientOptions::default()
        }
    }
}

/// Where and how a message is published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Empty: the default exchange, where the routing key names the queue.
    pub exchange: String,
    /// Send the message back (`ClientError::Returned`) if it routes to no queue, instead of
    /// dropping it.
    pub mandatory: bool,
}

/// A message on its way: resolves once the broker confirms it (`Ok`), refuses it
/// (`Err(Refused)`), returns it (`Err(Returned)`), or the connection dies (`Err(Closed)`).
/// Dropping it does not withdraw the message.
pub struct PublishFuture {
    rx: oneshot::Receiver<Result<Confirmation, ClientError>>,
    conn: ConnHandle,
}

impl Future for PublishFuture {
    type Output = Result<Confirmation, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            Poll::Ready(Err(_)) => Poll::Ready(Err(self.conn.closed_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl PublishFuture {
    pub(crate) fn new(
        rx: oneshot::Receiver<Result<Confirmation, ClientError>>,
        conn: ConnHandle,
    ) -> PublishFuture {
        PublishFuture { rx, conn }
    }
}

impl std::fmt::Debug for PublishFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishFuture")
            .field("conn", &self.conn)
            .finish()
    }
}

struct Inner {
    /// Indexed by shard in shard-aware mode; one entry otherwise.
    conns: Vec<ConnHandle>,
    shard_aware: bool,
    shard_count: u16,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for c in &self.conns {
            c.shutdown();
        }
    }
}

/// A connected client. Clone it freely: clones share the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

static NEXT_CONSUMER: AtomicU64 = AtomicU64::new(1);

impl Client {
    /// Connects, shakes hands, and in shard-aware mode connects to every other shard's port (on
    /// the same IP address) before returning.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
        let mut last_error = None;
        let mut first = None;
        for a in addrs {
            match Self::open(a, &options).await {
                Ok(c) => {
                    first = Some((a, c));
                    break;
                }
                // A refusal is the broker's answer, not an unreachable address: report it.
                Err(e @ (ClientError::ProtocolVersion { .. } | ClientError::Refused { .. })) => {
                    return Err(e)
                }
                Err(e) => last_error = Some(e),
            }
        }
        let Some((addr, first)) = first else {
            return Err(last_error.unwrap_or_else(|| {
                ClientError::InvalidArgument("the address resolved to nothing".into())
            }));
        };
        let info = first.info().clone();
        if !options.shard_aware || info.shard_count <= 1 {
            return Ok(Client {
                inner: Arc::new(Inner {
                    conns: vec![first],
                    shard_aware: false,
                    shard_count: info.shard_count,
                }),
            });
        }
        // The connection that landed on the main listener serves its own shard; the others are
        // opened on the shards' own ports, all at once.
        let mut opening = Vec::new();
        for (shard, port) in info.shard_ports.iter().enumerate() {
            if shard == usize::from(info.shard) {
                continue;
            }
            let a = SocketAddr::new(addr.ip(), *port);
            let options = options.clone();
            opening.push((
                shard,
                tokio::spawn(async move { Self::open(a, &options).await }),
            ));
        }
        let mut conns: Vec<Option<ConnHandle>> = vec![None; info.shard_ports.len()];
        conns[usize::from(info.shard)] = Some(first.clone());
        let mut failure = None;
        for (shard, task) in opening {
            let opened = task.await.map_err(|e| {
                ClientError::InvalidArgument(format!("connecting to shard {shard}: {e}"))
            });
            match opened.and_then(|r| r) {
                Ok(c) if c.info().shard == shard as u16 => conns[shard] = Some(c),
                Ok(c) => {
                    c.shutdown();
                    failure.get_or_insert(ClientError::UnexpectedReply(format!(
                        "the port of shard {shard} is served by shard {}",
                        c.info().shard
                    )));
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let conns: Vec<ConnHandle> = conns.into_iter().flatten().collect();
        if let Some(e) = failure {
            for c in &conns {
                c.shutdown();
            }
            return Err(e);
        }
        Ok(Client {
            inner: Arc::new(Inner {
                conns,
                shard_aware: true,
                shard_count: info.shard_count,
            }),
        })
    }

    async fn open(addr: SocketAddr, options: &ClientOptions) -> Result<ConnHandle, ClientError> {
        let opening = conn::open(addr, &options.name, options.protocol_version);
        match tokio::time::timeout(options.connect_timeout, opening).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no Welcome from {addr} within {:?}",
                    options.connect_timeout
                ),
            ))),
        }
    }

    /// What the broker announced on the first connection.
    pub fn server(&self) -> &ServerInfo {
        self.inner.conns[0].info()
    }

    /// True when each queue's traffic goes to its owning shard's connection.
    pub fn is_shard_aware(&self) -> bool {
        self.inner.shard_aware
    }

    /// The connections, one per shard in shard-aware mode: (shard, broker connection id).
    pub fn connections(&self) -> Vec<(u16, u64)> {
        self.inner
            .conns
            .iter()
            .map(|c| (c.info().shard, c.info().connection_id))
            .collect()
    }

    /// Publishes not yet confirmed (or refused, or returned), over all connections. Each
    /// connection holds at most `Limits::publishes_in_flight_max`; `publish` waits beyond that.
    pub fn unconfirmed_publishes(&self) -> usize {
        self.inner.conns.iter().map(ConnHandle::unconfirmed).sum()
    }

    /// Frames this client has sent the broker, over all its connections (handshakes excluded).
    /// Adjacent publishes and settlements queued while a connection was busy leave merged, so
    /// under load this grows far slower than the number of calls: the cost coalescing saves.
    pub fn frames_sent(&self) -> u64 {
        self.inner.conns.iter().map(ConnHandle::frames_sent).sum()
    }

    /// Frames this client has sent that asked the broker for an answer (requests, and the
    /// settlements some caller still awaited), over all its connections. An `ack` whose future
    /// was dropped before it left asks none, as in AMQP.
    pub fn answers_asked(&self) -> u64 {
        self.inner.conns.iter().map(ConnHandle::answers_asked).sum()
    }

    /// The shard whose connection carries traffic for `queue`: its owner in shard-aware mode.
    pub fn connection_shard_for(&self, queue: &str) -> u16 {
        self.conn_for(queue).info().shard
    }

    /// Any connection, for requests every shard answers alike.
    pub(crate) fn any_conn(&self) -> &ConnHandle {
        &self.inner.conns[0]
    }

    pub(crate) fn conn_for(&self, queue: &str) -> &ConnHandle {
        let inner = &*self.inner;
        if inner.shard_aware {
            &inner.conns[usize::from(placement(queue, inner.shard_count))]
        } else {
            &inner.conns[0]
        }
    }

    /// Declares a queue (creates it, or checks that an identical one exists). An empty name asks
    /// the broker to choose one; it is in the returned `QueueInfo`.
    pub async fn declare(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> Result<QueueInfo, ClientError> {
        let conn = self.conn_for(name);
        conn.limits().check_name("queue name length", name)?;
        let mut d = wire::DeclareQueueT::default();
        d.name = Some(name.to_string()).filter(|n| !n.is_empty());
        d.passive = options.passive;
        d.durable = options.durable;
        d.exclusive = options.exclusive;
        d.auto_delete = options.auto_delete;
        d.arguments = Some(Box::new(options.arguments.to_wire()));
        let reply = conn.request(BodyT::DeclareQueue(Box::new(d))).await?;
        queue_info(&reply)
    }

    /// Deletes a queue and its messages; returns how many messages went with it.
    pub async fn delete(
        &self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u64, ClientError> {
        let conn = self.conn_for(name);
        conn.limits().check_name("queue name length", name)?;
        let mut d = wire::DeleteQueueT::default();
        d.name = name.to_string();
        d.if_unused = if_unused;
        d.if_empty = if_empty;
        let reply = conn.request(BodyT::DeleteQueue(Box::new(d))).await?;
        match reply.frame().body_as_queue_deleted() {
            Some(d) => Ok(d.messages()),
            None => Err(unexpected(&reply, "DeleteQueue")),
        }
    }

    /// Settles every ready message of a queue as purged; returns how many.
    pub async fn purge(&self, name: &str) -> Result<u64, ClientError> {
        let conn = self.conn_for(name);
        conn.limits().check_name("queue name length", name)?;
        let mut p = wire::PurgeQueueT::default();
        p.name = name.to_string();
        let reply = conn.request(BodyT::PurgeQueue(Box::new(p))).await?;
        match reply.frame().body_as_queue_purged() {
            Some(p) => Ok(p.messages()),
            None => Err(unexpected(&reply, "PurgeQueue")),
        }
    }

    /// Describes a queue: its options, owning shard, depths and consumers (`NotFound` if it
    /// does not exist).
    pub async fn queue_info(&self, name: &str) -> Result<QueueInfo, ClientError> {
        let conn = self.conn_for(name);
        conn.limits().check_name("queue name length", name)?;
        let mut g = wire::GetQueueInfoT::default();
        g.name = name.to_string();
        let reply = conn.request(BodyT::GetQueueInfo(Box::new(g))).await?;
        queue_info(&reply)
    }

    /// The broker's counters (`GetStatus`): version, uptime, connections, queues, and every
    /// shard's named counters (`shard.N.what`: depths, consumers, payload cache, journal).
    /// A broker that predates `GetStatus` answers `Refused { code: UnsupportedFrame, .. }`.
    pub async fn status(&self) -> Result<BrokerStatus, ClientError> {
        let conn = &self.inner.conns[0];
        let reply = conn.request(BodyT::GetStatus(Box::default())).await?;
        let Some(s) = reply.frame().body_as_status() else {
            return Err(unexpected(&reply, "GetStatus"));
        };
        Ok(BrokerStatus {
            broker_version: s.broker_version().unwrap_or_default().to_string(),
            shard_count: s.shard_count(),
            uptime_ms: s.uptime_ms(),
            connections: s.connections(),
            queues: s.queues(),
            counters: s
                .counters()
                .map(|v| {
                    v.iter()
                        .map(|c| (c.name().to_string(), c.value()))
                        .collect()
                })
                .unwrap_or_default(),
            gauges: s
                .counters()
                .map(|v| {
                    v.iter()
                        .filter(|c| c.gauge())
                        .map(|c| c.name().to_string())
                        .collect()
                })
                .unwrap_or_default(),
            histograms: s
                .histograms()
                .map(|v| v.iter().map(|h| crate::Histogram::from_wire(&h)).collect())
                .unwrap_or_default(),
            shards_ready: s.shards_ready(),
        })
    }

    /// Every queue whose name starts with `prefix`, in name order (all pages).
    pub async fn list_queues(&self, prefix: &str) -> Result<Vec<QueueInfo>, ClientError> {
        let conn = &self.inner.conns[0];
        conn.limits()
            .check_name("queue name prefix length", prefix)?;
        list_pages(
            conn,
            "ListQueues",
            |after| {
                let mut l = wire::ListQueuesT::default();
                l.prefix = Some(prefix.to_string()).filter(|p| !p.is_empty());
                l.after = after;
                l.limit = LIST_PAGE;
                BodyT::ListQueues(Box::new(l))
            },
            |reply| {
                let list = reply.frame().body_as_queue_list()?.unpack();
                let page = list
                    .queues
                    .iter()
                    .flatten()
                    .map(QueueInfo::from_wire)
                    .collect();
                Some((page, list.more))
            },
            |q| &q.name,
        )
        .await
    }

    /// Publishes one message to the default exchange, `queue` as the routing key. Returns once
    /// the message is queued for sending (waiting while the connection has
    /// `publishes_in_flight_max` publishes unconfirmed); the returned future resolves on its
    /// confirm. `client.publish(q, m).await?.await?` waits for both.
    pub async fn publish(
        &self,
        queue: &str,
        message: impl Into<Message>,
    ) -> Result<PublishFuture, ClientError> {
        self.publish_with(&PublishOptions::default(), queue, message)
            .await
    }

    /// Publishes one message with an exchange and the mandatory flag.
    pub async fn publish_with(
        &self,
        options: &PublishOptions,
        routing_key: &str,
        message: impl Into<Message>,
    ) -> Result<PublishFuture, ClientError> {
        let mut futures = self
            .publish_batch_with(options, routing_key, [message.into()])
            .await?;
        futures
            .pop()
            .ok_or_else(|| ClientError::UnexpectedReply("an empty batch".into()))
    }

    /// Publishes messages in one `Publish` frame to the default exchange; one future per
    /// message, in order.
    pub async fn publish_batch(
        &self,
        queue: &str,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<PublishFuture>, ClientError> {
        self.publish_batch_with(&PublishOptions::default(), queue, messages)
            .await
    }

    /// Publishes messages in one `Publish` frame; one future per message, in order.
    pub async fn publish_batch_with(
        &self,
        options: &PublishOptions,
        routing_key: &str,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<PublishFuture>, ClientError> {
        // The default exchange routes by queue name, so the queue's owner takes it. A named
        // exchange routes on the broker: any connection will do.
        let conn = if options.exchange.is_empty() {
            self.conn_for(routing_key)
        } else {
            &self.inner.conns[0]
        };
        let limits = *conn.limits();
        limits.check_name("routing key length", routing_key)?;
        limits.check_name("exchange name length", &options.exchange)?;
        let messages = messages
            .into_iter()
            .map(|m| m.encode(&limits))
            .collect::<Result<Vec<_>, _>>()?;
        if messages.is_empty() {
            return Err(ClientError::InvalidArgument(
                "an empty publish batch".into(),
            ));
        }
        check_limit(
            "publish batch size",
            messages.len(),
            limits.publish_batch_max,
        )?;
        check_limit(
            "publish batch size",
            messages.len(),
            limits.publishes_in_flight_max,
        )?;
        // The frame's own tables cost well under this per entry (measured: about 100 bytes
        // beside the names); the encoder checks the exact size and refuses if this was short.
        let per_entry = 128 + routing_key.len() + options.exchange.len();
        let frame_bytes: usize = messages.iter().map(|m| m.len() + per_entry).sum::<usize>() + 256;
        check_limit("publish frame bytes", frame_bytes, limits.frame_size_max)?;

        conn.take_permits(messages.len() as u32).await?;
        let (confirms, futures): (Vec<_>, Vec<_>) = (0..messages.len())
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                (
                    tx,
                    PublishFuture {
                        rx,
                        conn: conn.clone(),
                    },
                )
            })
            .unzip();
        conn.send(Command::Publish {
            exchange: options.exchange.clone(),
            routing_key: routing_key.to_string(),
            mandatory: options.mandatory,
            messages,
            confirms,
        })?;
        Ok(futures)
    }

    /// Starts consuming a queue; deliveries arrive on its owner's connection.
    pub async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, ClientError> {
        let conn = self.conn_for(queue);
        let limits = conn.limits();
        limits.check_name("queue name length", queue)?;
        limits.check_name("consumer tag length", &options.tag)?;
        check_limit("prefetch", options.prefetch as usize, limits.prefetch_max)?;
        // The client names the consumer when the caller did not, so that it is registered under
        // its final tag before any delivery for it can arrive.
        let tag = if options.tag.is_empty() {
            format!(
                "weir-client-{}-{}",
                std::process::id(),
                NEXT_CONSUMER.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            options.tag
        };
        let mut c = wire::ConsumeT::default();
        c.queue = queue.to_string();
        c.consumer_tag = Some(tag.clone());
        c.prefetch = options.prefetch;
        c.auto_ack = options.auto_ack;
        c.exclusive = options.exclusive;
        c.priority = options.priority;
        let (deliveries, stream) = mpsc::unbounded_channel();
        let (reply, rx) = oneshot::channel();
        conn.send(Command::Consume {
            body: c,
            deliveries,
            reply,
        })?;
        let frame = conn.wait(rx).await?;
        let Some(ok) = frame.frame().body_as_consume_ok() else {
            return Err(unexpected(&frame, "Consume"));
        };
        Ok(Consumer::new(
            conn.clone(),
            tag,
            queue.to_string(),
            ok.shard(),
            options.auto_ack,
            stream,
        ))
    }

    /// Takes one ready message from a queue, if there is one. Without `auto_ack` it must be
    /// settled like any delivery.
    pub async fn get(&self, queue: &str, auto_ack: bool) -> Result<Option<Delivery>, ClientError> {
        let conn = self.conn_for(queue);
        conn.limits().check_name("queue name length", queue)?;
        let mut g = wire::GetT::default();
        g.queue = queue.to_string();
        g.auto_ack = auto_ack;
        let reply = conn.request(BodyT::Get(Box::new(g))).await?;
        let Some(ok) = reply.frame().body_as_get_ok() else {
            return Err(unexpected(&reply, "Get"));
        };
        Ok(ok.delivery().map(|d| {
            let message = reply.message_bytes(d.message());
            Delivery::new(conn.clone(), RawDelivery::new(&d, message), auto_ack)
        }))
    }

    /// Says goodbye on every connection and waits for the broker's answers. Unacked deliveries
    /// go back to their queues.
    pub async fn close(self) -> Result<(), ClientError> {
        let mut waits = Vec::new();
        for conn in &self.inner.conns {
            let (reply, rx) = oneshot::channel();
            if conn.send(Command::Close { reply }).is_ok() {
                waits.push((conn.clone(), rx));
            }
        }
        let mut result = Ok(());
        for (conn, rx) in waits {
            if let Err(e) = conn.wait(rx).await {
                result = result.and(Err(e));
            }
        }
        result
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("shard_aware", &self.inner.shard_aware)
            .field("connections", &self.inner.conns)
            .finish()
    }
}

fn queue_info(reply: &InFrame) -> Result<QueueInfo, ClientError> {
    match reply.frame().body_as_queue_info() {
        Some(i) => Ok(QueueInfo::from_wire(&i.unpack())),
        None => Err(unexpected(reply, "a queue request")),
    }
}

/// The broker's answer to `Client::status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    /// The broker's version, e.g. "0.1.0".
    pub broker_version: String,
    /// Shards (pinned cores) it runs.
    pub shard_count: u16,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// Open connections, all shards.
    pub connections: u32,
    /// Queues, all shards.
    pub queues: u32,
    /// Named counters, e.g. ("shard.0.messages_ready", 12), in shard order.
    pub counters: Vec<(String, u64)>,
    /// The names in `counters` that are gauges (levels that go up and down, such as
    /// "shard.0.connections"); the others count events since the broker started.
    pub gauges: std::collections::BTreeSet<String>,
    /// Every shard's latency distributions (journal commit and fdatasync), in shard order.
    pub histograms: Vec<crate::Histogram>,
    /// Shards that have recovered their journals and serve.
    pub shards_ready: u16,
}

/// Entries per page of a listing: small enough that a page of `QueueInfo` (two tables per
/// queue) or `ExchangeInfo` tables fits the verifier's table budget with room to spare.
pub(crate) const LIST_PAGE: u32 = 500;

/// Reads a paged listing to its end: `request(after)` asks for the page after the cursor,
/// `page` reads a reply into its entries and whether more follow (`None`: not the reply
/// expected), and the last entry's `name` is the next page's cursor.
pub(crate) async fn list_pages<T>(
    conn: &ConnHandle,
    request_name: &str,
    request: impl Fn(Option<String>) -> BodyT,
    page: impl Fn(&InFrame) -> Option<(Vec<T>, bool)>,
    name: impl Fn(&T) -> &String,
) -> Result<Vec<T>, ClientError> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let reply = conn.request(request(after.take())).await?;
        let Some((entries, more)) = page(&reply) else {
            return Err(unexpected(&reply, request_name));
        };
        let last = entries.last().map(|e| name(e).clone());
        all.extend(entries);
        match last {
            Some(last) if more => after = Some(last),
            _ => return Ok(all),
        }
    }
}

pub(crate) fn unexpected(reply: &InFrame, request: &str) -> ClientError {
    ClientError::UnexpectedReply(format!(
        "{} in answer to {request}",
        reply
            .body_type()
            .variant_name()
            .unwrap_or("an unknown frame")
    ))
}

#[cfg(test)]
mod tests {
    use super::placement;

    #[test]
    fn placement_is_crc32_modulo_the_shard_count() {
        // crc32("orders") = 0x2f1c10ba (IEEE), as the broker computes it.
        assert_eq!(placement("orders", 1), 0);
        assert_eq!(
            placement("orders", 7),
            (crc32fast::hash(b"orders") % 7) as u16
        );
        assert_eq!(placement("anything", 0), 0, "no shards reads as one");
    }
}
