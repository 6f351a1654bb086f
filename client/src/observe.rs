//! Observation beyond `status` and the listings of queues and exchanges: every open connection,
//! every consumer, and the shards' latency histograms (what `weir top` and the admin listener
//! show).
//!
//! Contract: read-only requests on the client's first connection; the broker gathers the answer
//! from every shard. Listings are read page by page to the end, so a caller gets one consistent
//! `Vec` per call (each page is a snapshot of its moment, not the whole listing's).

use weir_protocol::wire::{self, BodyT};

use crate::client::{unexpected, Client, LIST_PAGE};
use crate::error::ClientError;

/// One open connection of the broker (`Client::list_connections`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Unique among the broker's connections until it restarts.
    pub id: u64,
    /// The shard serving it.
    pub shard: u16,
    /// The client's address, "ip:port".
    pub peer: String,
    /// The name it gave in its handshake (`ClientOptions::client_name`), if any.
    pub client_name: Option<String>,
    /// Milliseconds since it connected.
    pub connected_ms: u64,
    /// Consumers it has open.
    pub consumers: u32,
    /// Deliveries it holds unsettled (its consumers' and its `Get`s').
    pub deliveries_unacked: u64,
    /// Publishes it sent that are not confirmed yet.
    pub publishes_unconfirmed: u64,
    /// Bytes waiting to be written to it.
    pub outbox_bytes: u64,
    /// Bytes it sent to the broker, and the broker sent to it.
    pub bytes_received: u64,
    /// Bytes the broker sent to it.
    pub bytes_sent: u64,
}

/// One consumer of a queue (`Client::list_consumers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// The queue it consumes from.
    pub queue: String,
    /// Its consumer tag.
    pub tag: String,
    /// The queue's owning shard.
    pub shard: u16,
    /// The connection it delivers to ([`ConnectionInfo::id`]).
    pub connection: u64,
    /// Most deliveries it may hold unsettled.
    pub prefetch: u32,
    /// Deliveries it holds unsettled.
    pub unacked: u32,
    /// Deliveries are settled as they are sent.
    pub auto_ack: bool,
    /// Its consumer priority.
    pub priority: i32,
    /// False only for a waiting consumer of a single-active-consumer queue.
    pub active: bool,
}

/// A latency distribution one shard records, everything since the broker started
/// ([`BrokerStatus::histograms`](crate::BrokerStatus::histograms)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    /// What it measures, its unit last, e.g. "journal.commit_latency_us".
    pub name: String,
    /// The shard that recorded it.
    pub shard: u16,
    /// Values recorded.
    pub count: u64,
    /// Their sum.
    pub sum: u64,
    /// (upper bound, values at most that bound), ascending: cumulative, as Prometheus counts.
    pub buckets: Vec<(u64, u64)>,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value recorded.
    pub max: u64,
}

impl Histogram {
    pub(crate) fn from_wire(h: &wire::Histogram<'_>) -> Histogram {
        let le = h.bucket_le().map(|v| v.iter().collect::<Vec<_>>());
        let counts = h.bucket_count().map(|v| v.iter().collect::<Vec<_>>());
        Histogram {
            name: h.name().to_string(),
            shard: h.shard(),
            count: h.count(),
            sum: h.sum(),
            buckets: le
                .unwrap_or_default()
                .into_iter()
                .zip(counts.unwrap_or_default())
                .collect(),
            p50: h.p50(),
            p99: h.p99(),
            p999: h.p999(),
            max: h.max(),
        }
    }
}

impl ConnectionInfo {
    fn from_wire(c: &wire::ConnectionInfo<'_>) -> ConnectionInfo {
        ConnectionInfo {
            id: c.id(),
            shard: c.shard(),
            peer: c.peer().unwrap_or_default().to_string(),
            client_name: c.client_name().map(str::to_string),
            connected_ms: c.connected_ms(),
            consumers: c.consumers(),
            deliveries_unacked: c.deliveries_unacked(),
            publishes_unconfirmed: c.publishes_unconfirmed(),
            outbox_bytes: c.outbox_bytes(),
            bytes_received: c.bytes_received(),
            bytes_sent: c.bytes_sent(),
        }
    }
}

impl ConsumerInfo {
    fn from_wire(c: &wire::ConsumerInfo<'_>) -> ConsumerInfo {
        ConsumerInfo {
            queue: c.queue().unwrap_or_default().to_string(),
            tag: c.tag().unwrap_or_default().to_string(),
            shard: c.shard(),
            connection: c.connection(),
            prefetch: c.prefetch(),
            unacked: c.unacked(),
            auto_ack: c.auto_ack(),
            priority: c.priority(),
            active: c.active(),
        }
    }
}

impl Client {
    /// Every open connection of the broker, in id order (all pages). This client's own
    /// connections are among them.
    ///
    /// ```no_run
    /// # async fn f(client: &weir_client::Client) -> Result<(), weir_client::ClientError> {
    /// for c in client.list_connections().await? {
    ///     println!("{} shard {} {} unacked {}", c.id, c.shard, c.peer, c.deliveries_unacked);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_connections(&self) -> Result<Vec<ConnectionInfo>, ClientError> {
        let conn = self.any_conn();
        let mut all: Vec<ConnectionInfo> = Vec::new();
        loop {
            let mut l = wire::ListConnectionsT::default();
            l.after = all.last().map(|c| c.id);
            l.limit = LIST_PAGE;
            let reply = conn.request(BodyT::ListConnections(Box::new(l))).await?;
            let Some(list) = reply.frame().body_as_connection_list() else {
                return Err(unexpected(&reply, "ListConnections"));
            };
            let page: Vec<ConnectionInfo> = list
                .connections()
                .map(|v| v.iter().map(|c| ConnectionInfo::from_wire(&c)).collect())
                .unwrap_or_default();
            let done = !list.more() || page.is_empty();
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Every consumer of the queues whose names start with `prefix`, in (queue, tag) order (all
    /// pages).
    ///
    /// ```no_run
    /// # async fn f(client: &weir_client::Client) -> Result<(), weir_client::ClientError> {
    /// for c in client.list_consumers("orders").await? {
    ///     println!("{} {} prefetch {} unacked {}", c.queue, c.tag, c.prefetch, c.unacked);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_consumers(&self, prefix: &str) -> Result<Vec<ConsumerInfo>, ClientError> {
        let conn = self.any_conn();
        conn.limits()
            .check_name("queue name prefix length", prefix)?;
        let mut all: Vec<ConsumerInfo> = Vec::new();
        loop {
            let mut l = wire::ListConsumersT::default();
            l.prefix = Some(prefix.to_string()).filter(|p| !p.is_empty());
            if let Some(last) = all.last() {
                l.after_queue = Some(last.queue.clone());
                l.after_tag = Some(last.tag.clone());
            }
            l.limit = LIST_PAGE;
            let reply = conn.request(BodyT::ListConsumers(Box::new(l))).await?;
            let Some(list) = reply.frame().body_as_consumer_list() else {
                return Err(unexpected(&reply, "ListConsumers"));
            };
            let page: Vec<ConsumerInfo> = list
                .consumers()
                .map(|v| v.iter().map(|c| ConsumerInfo::from_wire(&c)).collect())
                .unwrap_or_default();
            let done = !list.more() || page.is_empty();
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }
}
