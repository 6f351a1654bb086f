//! Dead-lettering as a plan: which letters need their record read back, where each one routes,
//! which shards its copies are addressed to, and which originals wait for their copies.
//!
//! Contract: plain data on the shard that dead-lettered the messages; no I/O (the shell reads
//! cold records, sends the publishes and journals the settlements). A copy is the message as its
//! producer sent it (a cold one read back from its record), never re-encoded; its own expiration
//! no longer applies. It carries the message's dead-letter history with one more death
//! (`broker::deaths`), journaled as an annotation of its record and delivered beside it.
//!
//! At least once for journaled messages: the original's settle record is not journaled until
//! every shard its copies went to has confirmed them (durable there under `fsync = always`), so
//! a crash in between leaves the original in its queue, to be dead-lettered again: a copy may be
//! doubled, never lost (`DeadLetterWaits`). A copy that routes nowhere, or only round a cycle
//! (`deaths::is_cycle`), is dropped and counted; one a target refuses (a full queue under
//! `reject-publish`, a full disk) is dropped and counted as refused, its original settled: the
//! broker does not hold a letter back until room returns.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use weir_protocol::WireLimits;

use crate::broker::deaths::{self, Death};
use crate::broker::host::DeadLetter;

use crate::broker::ops;
use crate::broker::routing::RoutingTable;
use crate::broker::stored::MsgRef;
use crate::mesh::msg::{PublishItem, PublishOutcome};
use crate::storage::Position;

/// A dead letter's message: its bytes and what its envelope said.
#[derive(Debug)]
pub struct Letter {
    pub bytes: Bytes,
    /// The exchange and routing key it entered its queue with.
    pub exchange: String,
    pub routing_key: String,
    /// Its history so far.
    pub deaths: Option<Bytes>,
}

/// Where a dead letter's bytes are.
pub enum LetterBody {
    /// In memory.
    Hot(Letter),
    /// Only in the journal: the record to read back.
    Cold { position: Position, record_len: u32 },
}

/// Whether `d` can be published as it is, or its record must be read first.
pub fn body(d: &DeadLetter) -> LetterBody {
    match &d.msg {
        MsgRef::Hot(s) => LetterBody::Hot(Letter {
            bytes: s.payload(),
            exchange: s.exchange.clone(),
            routing_key: s.routing_key.clone(),
            deaths: s.deaths.clone(),
        }),
        MsgRef::Cold {
            position,
            record_len,
        } => LetterBody::Cold {
            position: *position,
            record_len: *record_len,
        },
    }
}

/// A cold letter's record, read back.
pub fn read_back(position: Position, record: &[u8]) -> Letter {
    let (envelope, message) = crate::broker::read_back::decode_message(position, record);
    Letter {
        bytes: Bytes::copy_from_slice(message),
        exchange: String::from_utf8_lossy(envelope.exchange).into_owned(),
        routing_key: String::from_utf8_lossy(envelope.routing_key).into_owned(),
        deaths: (!envelope.deaths.is_empty()).then(|| Bytes::copy_from_slice(envelope.deaths)),
    }
}

/// What became of one letter in the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planned {
    /// Addressed to at least one queue.
    Sent,
    /// Its dead-letter exchange routes it nowhere: dropped.
    Unroutable,
    /// Every queue it routes to would close a cycle nobody consumed in: dropped.
    Cycle,
}

/// The publishes one batch of dead letters becomes, by owning shard: sent as the shard's own
/// publishes, with confirms asked for (the originals wait for them).
pub struct DeadLetterPlan {
    shards: u16,
    targets_max: usize,
    wire: WireLimits,
    now_ms: i64,
    by_shard: BTreeMap<u16, Vec<PublishItem>>,
}

impl DeadLetterPlan {
    pub fn new(shards: u16, targets_max: usize, wire: WireLimits, now_ms: u64) -> DeadLetterPlan {
        DeadLetterPlan {
            shards,
            targets_max,
            wire,
            now_ms: now_ms as i64,
            by_shard: BTreeMap::new(),
        }
    }

    /// Routes letter `d` (its message now known) by `table`, adds its death to its history, and
    /// addresses it to the shards owning the queues it reaches, less those it would go round a
    /// cycle to.
    pub fn add(&mut self, d: &DeadLetter, letter: Letter, table: &RoutingTable) -> Planned {
        let key = d.routing_key.clone().unwrap_or(letter.routing_key.clone());
        let mut queues: Vec<String> = if d.exchange.is_empty() {
            vec![key.clone()]
        } else {
            let mut matched = Vec::new();
            let _ = table.route(&d.exchange, &key, &mut matched);
            matched.into_iter().map(str::to_string).collect()
        };
        if queues.is_empty() {
            return Planned::Unroutable;
        }
        let prev = letter
            .deaths
            .as_deref()
            .map(deaths::for_delivery)
            .unwrap_or_default();
        let history = deaths::add(
            &prev,
            Death {
                queue: &d.queue,
                reason: d.why,
                exchange: &letter.exchange,
                routing_key: &letter.routing_key,
                now_ms: self.now_ms,
            },
        );
        let lines = deaths::for_delivery(&history);
        queues.retain(|q| !deaths::is_cycle(&lines, q));
        if queues.is_empty() {
            return Planned::Cycle;
        }
        // Verified when it arrived; verified again here rather than read unchecked, as dead
        // letters are few.
        let (persistent, priority) = weir_protocol::verify_message(&letter.bytes, &self.wire)
            .map_or((true, 0), |m| (m.persistent(), m.priority()));
        let item = PublishItem {
            sequence: 0,
            queue: String::new(),
            also: Vec::new(),
            exchange: d.exchange.clone(),
            routing_key: key,
            mandatory: false,
            confirm: true,
            persistent,
            // A priority dead-letter queue orders the copies by the producer's priority.
            priority,
            bytes: letter.bytes,
            expiration_ms: None,
            deliver_at_ms: None,
            deaths: Some(history.clone()),
            // A dead letter is the broker's own publish, not the producer's re-send.
            producer_id: None,
        };
        for (shard, part) in ops::address(item, &mut queues, self.shards, self.targets_max) {
            self.by_shard.entry(shard).or_default().push(part);
        }
        Planned::Sent
    }

    /// The publishes, one per shard that owns a target.
    pub fn into_publishes(self) -> impl Iterator<Item = (u16, Vec<PublishItem>)> {
        self.by_shard.into_iter()
    }
}

/// The bit that marks a control-connection request id as a dead-letter wait's (the
/// control-plane writer's waits count up from 1 and never reach it).
pub const DEAD_LETTER_WAIT: u64 = 1 << 63;

/// Dead letters whose originals are settled in the journal only once every shard their copies
/// went to has answered.
#[derive(Debug, Default)]
pub struct DeadLetterWaits {
    next: u64,
    waits: HashMap<u64, Wait>,
}

#[derive(Debug)]
struct Wait {
    answers_left: usize,
    letters: Vec<DeadLetter>,
    refused: u64,
}

/// A wait whose every answer is in: settle `letters`' originals; `refused` copies were not
/// taken.
#[derive(Debug)]
pub struct WaitDone {
    pub letters: Vec<DeadLetter>,
    pub refused: u64,
}

impl DeadLetterWaits {
    /// Opens a wait for `answers` publish replies, holding `letters` (and so their records'
    /// segments) until they are in. Returns the request id to send the publishes under.
    pub fn open(&mut self, answers: usize, letters: Vec<DeadLetter>) -> u64 {
        assert!(answers > 0, "a wait waits for something");
        self.next += 1;
        let id = DEAD_LETTER_WAIT | self.next;
        self.waits.insert(
            id,
            Wait {
                answers_left: answers,
                letters,
                refused: 0,
            },
        );
        id
    }

    /// One shard answered wait `id`'s publish with `outcomes`. Returns the wait once it is whole.
    pub fn answered(&mut self, id: u64, outcomes: Option<&[PublishOutcome]>) -> Option<WaitDone> {
        let wait = self.waits.get_mut(&id)?;
        wait.answers_left -= 1;
        wait.refused += match outcomes {
            Some(o) => o.iter().filter(|o| o.result.is_err()).count() as u64,
            // Refused whole (the shard could not take the publish at all).
            None => 1,
        };
        if wait.answers_left > 0 {
            return None;
        }
        let wait = self.waits.remove(&id).expect("present");
        Some(WaitDone {
            letters: wait.letters,
            refused: wait.refused,
        })
    }

    /// Waits open.
    pub fn len(&self) -> usize {
        self.waits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waits.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::deaths;
    use crate::broker::stored::Stored;
    use crate::mesh::types::placement;
    use std::rc::Rc;
    use weir_protocol::wire::DeathReason;

    fn letter(exchange: &str, key: Option<&str>, msg: MsgRef) -> DeadLetter {
        DeadLetter {
            queue: "src".into(),
            exchange: exchange.into(),
            routing_key: key.map(str::to_string),
            msg,
            why: DeathReason::Expired,
            settle: Some(7),
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

    fn message(key: &str, deaths: Option<Bytes>) -> Letter {
        Letter {
            bytes: Bytes::from_static(b"m"),
            exchange: "orig-ex".into(),
            routing_key: key.into(),
            deaths,
        }
    }

    #[test]
    fn a_hot_letter_needs_no_read_and_a_cold_one_names_its_record() {
        let LetterBody::Hot(l) = body(&letter("", None, hot("k"))) else {
            panic!("hot");
        };
        assert_eq!((&l.bytes[..], &*l.routing_key), (&b"not a frame"[..], "k"));
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
        let l = read_back(at, &record);
        assert_eq!(
            (&l.bytes[..], &*l.exchange, &*l.routing_key, l.deaths),
            (&b"m"[..], "x", "orig", None)
        );
    }

    #[test]
    fn the_default_exchange_addresses_the_queue_its_key_names_with_one_more_death() {
        let table = RoutingTable::default();
        let mut plan = DeadLetterPlan::new(4, 8, WireLimits::DEFAULT, 1_000);
        let d = letter("", Some("dlq"), hot("orig"));
        assert_eq!(plan.add(&d, message("orig", None), &table), Planned::Sent);
        let d = letter("", None, hot("orig"));
        assert_eq!(plan.add(&d, message("orig", None), &table), Planned::Sent);
        let items: Vec<(u16, PublishItem)> = plan
            .into_publishes()
            .flat_map(|(s, items)| items.into_iter().map(move |i| (s, i)))
            .collect();
        let mut sent: Vec<(u16, String, String)> = items
            .iter()
            .map(|(s, i)| (*s, i.queue.clone(), i.routing_key.clone()))
            .collect();
        sent.sort();
        let mut want = vec![
            (placement("dlq", 4), "dlq".to_string(), "dlq".to_string()),
            (placement("orig", 4), "orig".to_string(), "orig".to_string()),
        ];
        want.sort();
        assert_eq!(sent, want);
        for (_, i) in &items {
            assert!(i.confirm, "the original waits for its copy's confirm");
            let h = i.deaths.as_ref().expect("a history");
            let lines = deaths::decode(h).unwrap();
            assert_eq!(lines.len(), 1);
            let l = lines[0];
            assert_eq!(
                (l.queue, l.reason, l.count, l.exchange, l.routing_key),
                ("src", DeathReason::Expired, 1, "orig-ex", "orig")
            );
            assert_eq!((l.first_time_ms, l.last_time_ms), (1_000, 1_000));
        }
    }

    #[test]
    fn a_letter_that_routes_nowhere_or_only_round_a_cycle_is_not_published() {
        let table = RoutingTable::default();
        let mut plan = DeadLetterPlan::new(2, 8, WireLimits::DEFAULT, 0);
        let d = letter("no-such-exchange", None, hot("k"));
        assert_eq!(
            plan.add(&d, message("k", None), &table),
            Planned::Unroutable
        );
        // It expired out of "dlq" before, and now out of "src" back to "dlq": a cycle.
        let before = deaths::add(
            &[],
            deaths::Death {
                queue: "dlq",
                reason: DeathReason::Expired,
                exchange: "",
                routing_key: "k",
                now_ms: 0,
            },
        );
        let d = letter("", Some("dlq"), hot("k"));
        assert_eq!(
            plan.add(&d, message("k", Some(before.clone())), &table),
            Planned::Cycle
        );
        // Rejected out of "src": a consumer is in the loop, so it is not a cycle.
        let mut d = letter("", Some("dlq"), hot("k"));
        d.why = DeathReason::Rejected;
        assert_eq!(
            plan.add(&d, message("k", Some(before)), &table),
            Planned::Sent
        );
        assert_eq!(plan.into_publishes().count(), 1);
    }

    #[test]
    fn a_wait_is_done_when_every_shard_has_answered() {
        let mut waits = DeadLetterWaits::default();
        let id = waits.open(2, vec![letter("", None, hot("k"))]);
        assert_ne!(id & DEAD_LETTER_WAIT, 0);
        let ok = PublishOutcome {
            sequence: 0,
            confirm: true,
            journaled: true,
            result: Ok(()),
            returned: None,
            duplicate: false,
        };
        assert!(waits
            .answered(id, Some(std::slice::from_ref(&ok)))
            .is_none());
        let refused = PublishOutcome {
            result: Err(crate::mesh::types::Refusal {
                code: weir_protocol::wire::ErrorCode::QueueFull,
                message: "full".into(),
            }),
            ..ok
        };
        let done = waits.answered(id, Some(&[refused])).expect("done");
        assert_eq!((done.letters.len(), done.refused), (1, 1));
        assert!(waits.is_empty());
        assert!(waits.answered(id, None).is_none(), "answered once");
    }
}
