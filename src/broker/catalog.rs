//! Catalog records: durable queue declarations and deletions, and the control plane's durable
//! exchanges and bindings, as the journal stores them.
//!
//! Contract: pure encoding and decoding, no I/O. A catalog record is the body of a journal
//! `Control` record: one tag byte, then a flatbuffer of the wire schema's own table for the
//! change (`DeclareQueue` with every property resolved, `DeleteQueue`, `DeclareExchange`,
//! `DeleteExchange`, `Bind`, `Unbind`; an idempotent producer's window is plain bytes), so the
//! journal speaks
//! the same vocabulary as the protocol and needs no second format. Bytes read back from the
//! journal passed its CRC and were written by `encode`, but they are still verified here:
//! catalog records are few and small, and a broker that misreads its catalog loses queues.

use weir_protocol::wire::{self, BodyT};
use weir_protocol::WireLimits;

use crate::mesh::types::{Binding, ExchangeDecl};

use crate::broker::producers::ProducerState;
use crate::broker::routing::ExchangeKind;
use crate::mesh::types::Declare;

const TAG_DECLARE_QUEUE: u8 = 1;
const TAG_DELETE_QUEUE: u8 = 2;
const TAG_QUEUE_SEQ: u8 = 3;
// Control-plane records: only shard 0's journal (the control-plane writer's) holds them.
const TAG_DECLARE_EXCHANGE: u8 = 4;
const TAG_DELETE_EXCHANGE: u8 = 5;
const TAG_BIND: u8 = 6;
const TAG_UNBIND: u8 = 7;
const TAG_QUEUE_USAGE: u8 = 8;
/// `QueueUsage`'s "in use" on disk.
const IN_USE: u64 = u64::MAX;
/// An idempotent producer's window, re-stated before reclaim (`broker::producers`).
const TAG_PRODUCER: u8 = 9;

#[derive(Clone, Debug, PartialEq)]
pub enum CatalogRecord {
    DeclareQueue(Declare),
    DeleteQueue(String),
    /// A queue's next sequence number, re-stated before the segments that held its history are
    /// reclaimed, so numbers are never reused. Body: u64 LE, then the name.
    QueueSeq {
        name: String,
        next_seq: u64,
    },
    /// A durable exchange.
    DeclareExchange(ExchangeDecl),
    /// A durable exchange deleted (its bindings with it).
    DeleteExchange(String),
    /// A durable binding: a durable exchange to a durable queue.
    Bind(Binding),
    Unbind(Binding),
    /// A queue with `expires_ms`: in use (`None`: it has consumers), or unused since no
    /// earlier than this wall-clock time, ms (`broker::expiry`). The last one in the log stands.
    /// Body: u64 LE (`u64::MAX`: in use), then the name.
    QueueUsage {
        name: String,
        unused_since_ms: Option<u64>,
    },
    /// An idempotent producer's window on this shard, re-stated before the segments holding the
    /// stamped messages that built it are reclaimed. Body: u64 LE producer id, u64 LE last use
    /// (ms), u32 LE range count, then (u64 LE first, u64 LE last) inclusive ranges of the
    /// sequences stored.
    Producer(ProducerState),
}

impl CatalogRecord {
    pub fn encode(&self) -> Vec<u8> {
        if let CatalogRecord::Producer(p) = self {
            let mut out = Vec::with_capacity(21 + 16 * p.ranges.len());
            out.push(TAG_PRODUCER);
            out.extend_from_slice(&p.producer_id.to_le_bytes());
            out.extend_from_slice(&p.last_used_ms.to_le_bytes());
            out.extend_from_slice(&(p.ranges.len() as u32).to_le_bytes());
            for (first, last) in &p.ranges {
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&last.to_le_bytes());
            }
            return out;
        }
        if let CatalogRecord::QueueSeq { name, next_seq } = self {
            let mut out = Vec::with_capacity(9 + name.len());
            out.push(TAG_QUEUE_SEQ);
            out.extend_from_slice(&next_seq.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            return out;
        }
        if let CatalogRecord::QueueUsage {
            name,
            unused_since_ms,
        } = self
        {
            let mut out = Vec::with_capacity(9 + name.len());
            out.push(TAG_QUEUE_USAGE);
            out.extend_from_slice(&unused_since_ms.unwrap_or(IN_USE).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            return out;
        }
        let (tag, body) = match self {
            CatalogRecord::DeclareQueue(d) => {
                let mut t = wire::DeclareQueueT::default();
                t.name = Some(d.name.clone());
                t.durable = d.durable;
                t.exclusive = d.exclusive;
                t.auto_delete = d.auto_delete;
                t.arguments = Some(Box::new(d.arguments.clone()));
                (TAG_DECLARE_QUEUE, BodyT::DeclareQueue(Box::new(t)))
            }
            CatalogRecord::DeleteQueue(name) => {
                let mut t = wire::DeleteQueueT::default();
                t.name = name.clone();
                (TAG_DELETE_QUEUE, BodyT::DeleteQueue(Box::new(t)))
            }
            CatalogRecord::DeclareExchange(e) => {
                let mut t = wire::DeclareExchangeT::default();
                t.name = e.name.clone();
                t.kind = e.kind.to_wire();
                t.durable = e.durable;
                t.auto_delete = e.auto_delete;
                (TAG_DECLARE_EXCHANGE, BodyT::DeclareExchange(Box::new(t)))
            }
            CatalogRecord::DeleteExchange(name) => {
                let mut t = wire::DeleteExchangeT::default();
                t.name = name.clone();
                (TAG_DELETE_EXCHANGE, BodyT::DeleteExchange(Box::new(t)))
            }
            CatalogRecord::Bind(b) => {
                let mut t = wire::BindT::default();
                t.exchange = b.exchange.clone();
                t.queue = b.queue.clone();
                t.binding_key = Some(b.key.clone());
                (TAG_BIND, BodyT::Bind(Box::new(t)))
            }
            CatalogRecord::Unbind(b) => {
                let mut t = wire::UnbindT::default();
                t.exchange = b.exchange.clone();
                t.queue = b.queue.clone();
                t.binding_key = Some(b.key.clone());
                (TAG_UNBIND, BodyT::Unbind(Box::new(t)))
            }
            CatalogRecord::QueueSeq { .. }
            | CatalogRecord::QueueUsage { .. }
            | CatalogRecord::Producer(_) => {
                unreachable!("encoded above")
            }
        };
        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let root = weir_protocol::frame(0, body).pack(&mut fbb);
        fbb.finish(root, None);
        let mut out = Vec::with_capacity(1 + fbb.finished_data().len());
        out.push(tag);
        out.extend_from_slice(fbb.finished_data());
        out
    }

    pub fn decode(body: &[u8]) -> Result<CatalogRecord, String> {
        let (&tag, rest) = body.split_first().ok_or("empty catalog record")?;
        if tag == TAG_PRODUCER {
            return decode_producer(rest).map(CatalogRecord::Producer);
        }
        if tag == TAG_QUEUE_SEQ {
            let (seq, name) = rest
                .split_first_chunk::<8>()
                .ok_or("queue sequence record too short")?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| "queue name is not UTF-8")?;
            return Ok(CatalogRecord::QueueSeq {
                name,
                next_seq: u64::from_le_bytes(*seq),
            });
        }
        if tag == TAG_QUEUE_USAGE {
            let (since, name) = rest
                .split_first_chunk::<8>()
                .ok_or("queue usage record too short")?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| "queue name is not UTF-8")?;
            let since = u64::from_le_bytes(*since);
            return Ok(CatalogRecord::QueueUsage {
                name,
                unused_since_ms: (since != IN_USE).then_some(since),
            });
        }
        let opts = flatbuffers::VerifierOptions {
            max_apparent_size: WireLimits::DEFAULT.frame_size_max as usize,
            ..Default::default()
        };
        let frame = flatbuffers::root_with_opts::<wire::Frame>(&opts, rest)
            .map_err(|e| format!("catalog record does not verify: {e}"))?
            .unpack();
        match (tag, frame.body) {
            (TAG_DECLARE_QUEUE, BodyT::DeclareQueue(d)) => {
                Ok(CatalogRecord::DeclareQueue(Declare {
                    name: d.name.unwrap_or_default(),
                    passive: false,
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    arguments: d.arguments.map(|a| *a).unwrap_or_default(),
                }))
            }
            (TAG_DELETE_QUEUE, BodyT::DeleteQueue(d)) => Ok(CatalogRecord::DeleteQueue(d.name)),
            (TAG_DECLARE_EXCHANGE, BodyT::DeclareExchange(d)) => {
                let kind = ExchangeKind::from_wire(d.kind).ok_or_else(|| {
                    format!("exchange '{}' has unknown kind {}", d.name, d.kind.0)
                })?;
                Ok(CatalogRecord::DeclareExchange(ExchangeDecl {
                    name: d.name,
                    kind,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                }))
            }
            (TAG_DELETE_EXCHANGE, BodyT::DeleteExchange(d)) => {
                Ok(CatalogRecord::DeleteExchange(d.name))
            }
            (TAG_BIND, BodyT::Bind(b)) => Ok(CatalogRecord::Bind(Binding {
                exchange: b.exchange,
                queue: b.queue,
                key: b.binding_key.unwrap_or_default(),
                durable: true,
            })),
            (TAG_UNBIND, BodyT::Unbind(b)) => Ok(CatalogRecord::Unbind(Binding {
                exchange: b.exchange,
                queue: b.queue,
                key: b.binding_key.unwrap_or_default(),
                durable: true,
            })),
            (tag, body) => Err(format!(
                "catalog record tag {tag} does not match its body {:?}",
                body.body_type()
            )),
        }
    }
}

fn decode_producer(b: &[u8]) -> Result<ProducerState, String> {
    let short = || "producer record too short".to_string();
    let u64_at = |at: usize| -> Result<u64, String> {
        let bytes = b.get(at..at + 8).ok_or_else(short)?;
        Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| short())?))
    };
    let count = b.get(16..20).ok_or_else(short)?;
    let count = u32::from_le_bytes(count.try_into().map_err(|_| short())?) as usize;
    if b.len() != 20 + 16 * count {
        return Err(format!(
            "producer record of {} bytes does not hold {count} ranges",
            b.len()
        ));
    }
    let mut ranges = Vec::with_capacity(count);
    for i in 0..count {
        let (first, last) = (u64_at(20 + 16 * i)?, u64_at(28 + 16 * i)?);
        if first > last {
            return Err(format!("producer range {first}..={last} is reversed"));
        }
        ranges.push((first, last));
    }
    Ok(ProducerState {
        producer_id: u64_at(0)?,
        last_used_ms: u64_at(8)?,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_records_round_trip_and_damage_is_refused() {
        let mut arguments = wire::QueueArgumentsT::default();
        arguments.max_length = Some(10);
        arguments.message_ttl_ms = Some(5);
        let d = Declare {
            name: "orders".into(),
            durable: true,
            auto_delete: true,
            arguments,
            ..Default::default()
        };
        let binding = Binding {
            exchange: "logs".into(),
            queue: "orders".into(),
            key: "a.*.#".into(),
            durable: true,
        };
        for r in [
            CatalogRecord::DeclareQueue(d),
            CatalogRecord::DeleteQueue("orders".into()),
            CatalogRecord::DeclareExchange(ExchangeDecl {
                name: "logs".into(),
                kind: ExchangeKind::Topic,
                durable: true,
                auto_delete: true,
            }),
            CatalogRecord::DeleteExchange("logs".into()),
            CatalogRecord::Bind(binding.clone()),
            CatalogRecord::Unbind(binding),
            CatalogRecord::QueueUsage {
                name: "orders".into(),
                unused_since_ms: Some(1_700_000_000_000),
            },
            CatalogRecord::QueueUsage {
                name: "orders".into(),
                unused_since_ms: None,
            },
            CatalogRecord::Producer(ProducerState {
                producer_id: 42,
                last_used_ms: 1_700_000_000_000,
                ranges: vec![(1, 5), (9, 9)],
            }),
        ] {
            let bytes = r.encode();
            assert_eq!(CatalogRecord::decode(&bytes).unwrap(), r);
            let mut wrong_tag = bytes.clone();
            wrong_tag[0] = 10;
            assert!(CatalogRecord::decode(&wrong_tag).is_err());
            assert!(CatalogRecord::decode(&bytes[..bytes.len() / 2]).is_err());
        }
        assert!(CatalogRecord::decode(&[]).is_err());
    }
}
