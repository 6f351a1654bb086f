//! The small plain values every layer names, and which cross between shards inside mesh
//! messages: who asked (`ConnRef`), why it was refused (`Refusal`), what a queue declaration
//! says (`Declare`), a consumer the host cancelled (`Cancelled`), a shard's counters
//! (`ShardStatus`), a queue's sequence numbers (`Seq`) and who holds its deliveries
//! (`HolderId`), an exchange declaration (`ExchangeDecl`) and a binding (`Binding`), which
//! shard owns a queue (`placement`), the limits a refusal can name (`LIMIT_NAMES`) and a latency
//! histogram as a shard reports it (`HistogramSnapshot`).
//!
//! Contract: plain data, `Send`, depending on nothing else in the broker, so that the broker's
//! state machines, the session and the shard name them without depending on one another: the
//! bottom of the broker's layers, with `mesh::msg` on top. Owned strings, no `Rc`. No faults:
//! nothing here does anything.

use weir_protocol::wire::{self, ErrorCode};
use weir_protocol::ExchangeKind;

/// A connection, wherever it lives: its shard and its broker-unique id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnRef {
    pub shard: u16,
    pub conn: u64,
}

/// Why a request was refused: the code for the `Error` frame and a sentence naming what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// A declare request's parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Declare {
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: wire::QueueArgumentsT,
}

/// A consumer the host cancelled (its queue was deleted); its connection is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancelled {
    pub to: ConnRef,
    pub consumer_tag: String,
    pub message: String,
}

/// The shard that owns a queue: part of the wire contract (shard-aware clients compute it too),
/// so it has one definition, in the protocol crate.
pub use weir_protocol::placement;

/// One shard's counters, for `GetStatus`.
#[derive(Clone, Debug, Default)]
pub struct ShardStatus {
    pub shard: u16,
    pub connections: u64,
    pub queues: u64,
    pub messages_ready: u64,
    pub messages_unacked: u64,
    pub consumers: u64,
    /// Messages settled other than by a consumer's ack: dropped, expired, purged (not
    /// dead-lettered ones).
    pub dropped: u64,
    /// Messages handed to their queue's dead-letter exchange.
    pub dead_lettered: u64,
    /// Dead letters dropped for going round a cycle nobody consumed in.
    pub dead_letter_cycles: u64,
    /// Dead-letter copies their queues refused: dropped.
    pub dead_letter_refused: u64,
    /// Messages published on this shard that routed to no queue (not mandatory): dropped.
    pub unroutable: u64,
    /// The shard's routing copy: exchanges and bindings.
    pub exchanges: u64,
    pub bindings: u64,
    /// Payload bytes held in memory, and the budget.
    pub cache_bytes: u64,
    pub cache_bytes_max: u64,
    pub journal_commits: u64,
    pub journal_records: u64,
    pub journal_bytes_written: u64,
    pub journal_fdatasyncs: u64,
    /// Segment files in use (not reclaimed).
    pub journal_segments: u64,
    /// Disk reads issued to read records back by position (cold deliveries, `Get`s, dead
    /// letters), and the records they served: with read-ahead, far fewer reads than records.
    pub read_back_reads: u64,
    pub read_back_records: u64,
    /// Since the broker started, in this shard's queues (deleted ones' included): messages
    /// accepted, deliveries, acks, nacks and rejects, expiries.
    pub messages_published: u64,
    pub messages_delivered: u64,
    pub messages_acked: u64,
    pub messages_nacked: u64,
    pub messages_expired: u64,
    /// Publishes this shard's connections were sent a positive confirm for.
    pub confirms: u64,
    /// Bytes the shard has queued for its peers, and its work queue's bytes (gauges).
    pub mesh_outgoing_bytes: u64,
    pub work_bytes: u64,
    /// Refusals this shard's connections were sent, by the limit they named (`LIMIT_NAMES`);
    /// only the limits hit at least once.
    pub limit_hits: Vec<(&'static str, u64)>,
    /// Bytes of disk the journal's segment files hold (not reclaimed), and segments reclaimed.
    pub journal_disk_bytes: u64,
    pub journal_segments_reclaimed: u64,
    /// Latency distributions (journal commit, fdatasync), in µs.
    pub histograms: Vec<HistogramSnapshot>,
}

/// Every limit a refusal can name, as configuration and refusals spell it: the bounded set a
/// shard counts its connections' `LimitExceeded` refusals under (`shard.N.limit_hit.NAME`).
/// `other` takes a refusal that names none of them.
pub const LIMIT_NAMES: &[&str] = &[
    "connections_per_shard_max",
    "publishes_in_flight_max",
    "publish_bytes_in_flight_max",
    "requests_in_flight_max",
    "prefetch_max",
    "targets_per_message_max",
    "cache_bytes_max",
    "exchanges_max",
    "bindings_max",
    "delay_ms_max",
    "outbox_bytes_max",
    "consumer_timeout_ms",
    "queued_messages_max",
    "consumers_per_connection_max",
    "queues_per_shard_max",
    "gets_unacked_max",
    "producer_window_max",
    "producers_per_shard_max",
    "producer_idle_expiry_ms",
    "retry_delays_count_max",
    "message_size_max",
    "other",
];

/// One latency distribution as a shard reports it: fixed cumulative buckets and quantiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// What it measures, unit last: "journal.commit_latency_us".
    pub name: &'static str,
    pub count: u64,
    pub sum: u64,
    /// (upper bound, values at most it), ascending, cumulative.
    pub buckets: Vec<(u64, u64)>,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// A message's sequence number in its queue: assigned at publish, never reused (settle records in
/// the journal name ranges of them, so a reused number would settle the wrong message).
pub type Seq = u64;

/// Who holds outstanding deliveries: a consumer, or a connection's `Get`s. Chosen by the shard.
pub type HolderId = u64;

/// An exchange's declared properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeDecl {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    /// Deleted when its last binding goes (never merely for having none yet).
    pub auto_delete: bool,
}

/// A binding: (exchange, queue, binding key) is its identity. `durable` (its exchange and its
/// queue are both durable) is decided by the caller and stored with it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    pub key: String,
    pub durable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// They travel between shards: a non-`Send` field would only show up where a mesh message is
    /// built, far from here.
    #[test]
    fn they_are_send() {
        fn send<T: Send>() {}
        send::<ConnRef>();
        send::<Refusal>();
        send::<Declare>();
        send::<Cancelled>();
        send::<ShardStatus>();
    }

    #[test]
    fn placement_is_stable_and_spreads() {
        assert_eq!(placement("orders", 1), 0);
        let on_one = (0..100)
            .filter(|i| placement(&format!("q{i}"), 2) == 1)
            .count();
        assert!((30..70).contains(&on_one), "{on_one} of 100 on shard 1");
        assert_eq!(placement("orders", 2), placement("orders", 2));
    }
}
