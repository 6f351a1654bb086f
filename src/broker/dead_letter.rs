//! Dead-lettering as a plan: which letters need their record read back, where each one routes,
//! and which shards its copies are addressed to.
//!
//! Contract: plain data on the shard that dead-lettered the messages; no I/O (the shell reads
//! cold records and sends the publishes). A copy is the message as its producer sent it (a cold
//! one read back from its record), never re-encoded; its own expiration no longer applies. At
//! most once: the original's settlement and the copy's acceptance are not one atomic step (as
//! RabbitMQ's classic queues), and a copy that routes nowhere is dropped and counted by the
//! shell as unroutable.

use std::collections::BTreeMap;

use bytes::Bytes;
use weir_protocol::WireLimits;

use crate::broker::host::DeadLetter;

use crate::broker::ops;
use crate::broker::routing::RoutingTable;
use crate::broker::stored::MsgRef;
use crate::mesh::msg::PublishItem;
use crate::storage::Position;

/// Where a dead letter's bytes are.
pub enum LetterBody {
    /// In memory: the bytes and the message's own routing key.
    Hot(Bytes, String),
    /// Only in the journal: the record to read back.
    Cold { position: Position, record_len: u32 },
}

/// Whether `d` can be published as it is, or its record must be read first.
pub fn body(d: &DeadLetter) -> LetterBody {
    match &d.msg {
        MsgRef::Hot(s) => LetterBody::Hot(s.payload(), s.routing_key.clone()),
        MsgRef::Cold {
            position,
            record_len,
        } => LetterBody::Cold {
            position: *position,
            record_len: *record_len,
        },
    }
}

/// A cold letter's record, read back: its bytes and its own routing key.
pub fn read_back(position: Position, record: &[u8]) -> (Bytes, String) {
    let (envelope, message) = crate::broker::read_back::decode_message(position, record);
    let key = String::from_utf8_lossy(envelope.routing_key).into_owned();
    (Bytes::copy_from_slice(message), key)
}

/// The publishes one batch of dead letters becomes, by owning shard: sent as the shard's own
/// publishes (nobody waits for a confirm).
pub struct DeadLetterPlan {
    shards: u16,
    targets_max: usize,
    wire: WireLimits,
    by_shard: BTreeMap<u16, Vec<PublishItem>>,
}

impl DeadLetterPlan {
    pub fn new(shards: u16, targets_max: usize, wire: WireLimits) -> DeadLetterPlan {
        DeadLetterPlan {
            shards,
            targets_max,
            wire,
            by_shard: BTreeMap::new(),
        }
    }

    /// Routes letter `d` (its bytes and original key now known) by `table` and addresses it to
    /// the shards owning the queues it reaches. Returns false when it reaches none: the copy is
    /// dropped, and the caller counts it as unroutable.
    pub fn add(
        &mut self,
        d: &DeadLetter,
        bytes: Bytes,
        original_key: String,
        table: &RoutingTable,
    ) -> bool {
        let key = d.routing_key.clone().unwrap_or(original_key);
        let mut queues: Vec<String> = if d.exchange.is_empty() {
            vec![key.clone()]
        } else {
            let mut matched = Vec::new();
            let _ = table.route(&d.exchange, &key, &mut matched);
            matched.into_iter().map(str::to_string).collect()
        };
        if queues.is_empty() {
            return false;
        }
        let item = PublishItem {
            sequence: 0,
            queue: String::new(),
            also: Vec::new(),
            exchange: d.exchange.clone(),
            routing_key: key,
            mandatory: false,
            confirm: false,
            // Verified when it arrived; verified again here rather than read unchecked, as dead
            // letters are few.
            persistent: weir_protocol::verify_message(&bytes, &self.wire)
                .map_or(true, |m| m.persistent()),
            // A priority dead-letter queue orders the copies by the producer's priority.
            priority: weir_protocol::verify_message(&bytes, &self.wire).map_or(0, |m| m.priority()),
            bytes,
            expiration_ms: None,
            deliver_at_ms: None,
        };
        for (shard, part) in ops::address(item, &mut queues, self.shards, self.targets_max) {
            self.by_shard.entry(shard).or_default().push(part);
        }
        true
    }

    /// The publishes, one per shard that owns a target.
    pub fn into_publishes(self) -> impl Iterator<Item = (u16, Vec<PublishItem>)> {
        self.by_shard.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::stored::Stored;
    use crate::mesh::types::placement;
    use std::rc::Rc;

    fn letter(exchange: &str, key: Option<&str>, msg: MsgRef) -> DeadLetter {
        DeadLetter {
            queue: "src".into(),
            exchange: exchange.into(),
            routing_key: key.map(str::to_string),
            msg,
        }
    }

    fn hot(key: &str) -> MsgRef {
        MsgRef::Hot(Rc::new(Stored::new(
            Bytes::from_static(b"not a frame"),
            String::new(),
            key.into(),
            false,
            None,
        )))
    }

    #[test]
    fn a_hot_letter_needs_no_read_and_a_cold_one_names_its_record() {
        let LetterBody::Hot(bytes, key) = body(&letter("", None, hot("k"))) else {
            panic!("hot");
        };
        assert_eq!((&bytes[..], &*key), (&b"not a frame"[..], "k"));
        let at = Position::new(3, 4096);
        let cold = MsgRef::Cold {
            position: at,
            record_len: 99,
        };
        assert!(matches!(
            body(&letter("", None, cold)),
            LetterBody::Cold { position, record_len: 99 } if position == at
        ));
        let record = crate::broker::read_back::tests::record("x", "orig", &[("q", 1)], b"m");
        let (bytes, key) = read_back(at, &record);
        assert_eq!((&bytes[..], &*key), (&b"m"[..], "orig"));
    }

    #[test]
    fn the_default_exchange_addresses_the_queue_its_key_names() {
        let table = RoutingTable::default();
        let mut plan = DeadLetterPlan::new(4, 8, WireLimits::DEFAULT);
        let d = letter("", Some("dlq"), hot("orig"));
        assert!(plan.add(&d, Bytes::from_static(b"m"), "orig".into(), &table));
        let d = letter("", None, hot("orig"));
        assert!(plan.add(&d, Bytes::from_static(b"m"), "orig".into(), &table));
        let mut sent: Vec<(u16, String, String)> = plan
            .into_publishes()
            .flat_map(|(s, items)| items.into_iter().map(move |i| (s, i.queue, i.routing_key)))
            .collect();
        sent.sort();
        let mut want = vec![
            (placement("dlq", 4), "dlq".to_string(), "dlq".to_string()),
            (placement("orig", 4), "orig".to_string(), "orig".to_string()),
        ];
        want.sort();
        assert_eq!(sent, want);
    }

    #[test]
    fn a_letter_that_routes_nowhere_is_not_published() {
        let table = RoutingTable::default();
        let mut plan = DeadLetterPlan::new(2, 8, WireLimits::DEFAULT);
        let d = letter("no-such-exchange", None, hot("k"));
        assert!(!plan.add(&d, Bytes::from_static(b"m"), "k".into(), &table));
        assert_eq!(plan.into_publishes().count(), 0);
    }
}
