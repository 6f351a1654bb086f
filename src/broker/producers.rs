//! Idempotent producers: per producer, the publish sequences this shard has stored, so a re-sent
//! one is confirmed again (a duplicate) instead of stored twice.
//!
//! Contract: plain data owned by one shard, used by its worker as it executes publishes to the
//! queues the shard owns; no I/O, time comes in as `now_ms`. Each owning shard judges what it
//! stores: a message routed to queues on two shards is judged by each of them, so it is stored
//! at most once per queue.
//!
//! The window. Per producer the table keeps its highest sequence stored here (`high`) and one bit
//! per sequence of the `window` sequences up to it (`producer_window_max`, a multiple of 64):
//!
//! | sequence `s` of producer `p`          | verdict                                           |
//! |---------------------------------------|---------------------------------------------------|
//! | `p` unknown, or `s > high`            | new: stored, becomes `high` (gaps are normal: a    |
//! |                                       | shard sees only the sequences routed to it)        |
//! | `high - window < s <= high`, bit set  | duplicate: confirmed again, not stored             |
//! | `high - window < s <= high`, bit clear| new (a reorder: never stored here, so not a        |
//! |                                       | duplicate; the producer's connections race)        |
//! | `s <= high - window`                  | refused, `SequenceOutOfWindow`: cannot be told     |
//! | `p` unknown and the table is full     | refused, `LimitExceeded` (`producers_per_shard_max`)|
//!
//! A duplicate's confirm means what the original's did: it waits for the commit round of the
//! producer's newest journaled message here (that round or a later one carries the original), and
//! a commit that fails takes its sequences out of the window again (`resolved`), since their
//! messages were taken out of their queues.
//!
//! Durable: a journaled message's record carries its (producer, sequence) stamp, so replay
//! rebuilds the windows from the records it reads anyway (`restore_stamp`); before reclaim deletes
//! segments, every window is re-stated as a `Producer` catalog record (`restatement`: the window
//! without the sequences whose commit is still in flight), so windows outlive the messages that
//! built them. A producer not seen for `producer_idle_expiry_ms` is forgotten (`expire`): after
//! that its re-sends are new messages. Recovery counts as a use (every recovered producer starts
//! a fresh idle period).

use std::collections::{BTreeSet, VecDeque};

use weir_protocol::wire::ErrorCode;

use crate::broker::routing::hash::FastMap;
use crate::mesh::msg::{PublishItem, PublishOutcome};
use crate::mesh::types::Refusal;
use crate::storage::CommitId;

/// The table's bounds (from `BrokerLimits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerLimits {
    /// Sequences per producer the window covers below its highest: a multiple of 64.
    pub window: u64,
    /// Producers the table holds.
    pub producers_max: usize,
    /// A producer unused this long is forgotten, ms.
    pub idle_expiry_ms: u64,
}

/// What to do with one sequence of an idempotent producer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not stored here yet: store it, then `taken`.
    New,
    /// Stored already: confirm it again. `journaled`: its record went to the journal (the confirm
    /// says the broker's policy); `round`: the commit to wait for before confirming (fsync always).
    Duplicate {
        journaled: bool,
        round: Option<CommitId>,
    },
    /// Refused (out of the window, or the table is full).
    Refused(Refusal),
}

/// One producer's window.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Producer {
    high: u64,
    /// Bit `s % window` for sequence `s` of `(high - window, high]`.
    bits: Box<[u64]>,
    last_used_ms: u64,
    /// The commit round of its newest journaled message here, fsync always.
    last_round: Option<CommitId>,
    /// Some message of it here was journaled (or it was recovered from the journal).
    journaled: bool,
}

impl Producer {
    fn new(window: u64, now_ms: u64) -> Producer {
        Producer {
            high: 0,
            bits: vec![0u64; (window / 64) as usize].into_boxed_slice(),
            last_used_ms: now_ms,
            last_round: None,
            journaled: false,
        }
    }

    fn window(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// Whether `s` is too old to judge.
    fn below(&self, s: u64) -> bool {
        self.high >= self.window() && s <= self.high - self.window()
    }

    fn bit(&self, s: u64) -> (usize, u64) {
        let i = s % self.window();
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn has(&self, s: u64) -> bool {
        if s > self.high || self.below(s) {
            return false;
        }
        let (w, b) = self.bit(s);
        self.bits[w] & b != 0
    }

    /// Marks `s` stored, moving the window up if `s` is above it. Too old: ignored.
    fn mark(&mut self, s: u64) {
        let fresh = self.high == 0 && self.bits.iter().all(|w| *w == 0);
        if s > self.high || fresh {
            // Clear the bits of the sequences the window now passes over.
            let from = if fresh { s } else { self.high + 1 };
            if s - from >= self.window() {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for x in from..=s {
                    let (w, b) = self.bit(x);
                    self.bits[w] &= !b;
                }
            }
            self.high = s;
        } else if self.below(s) {
            return;
        }
        let (w, b) = self.bit(s);
        self.bits[w] |= b;
    }

    fn unmark(&mut self, s: u64) {
        if s <= self.high && !self.below(s) {
            let (w, b) = self.bit(s);
            self.bits[w] &= !b;
        }
    }

    /// The stored sequences of the window, ascending: by set bit, not by sequence, so a sparse
    /// window costs its words, not its width.
    fn sequences(&self) -> Vec<u64> {
        let window = self.window();
        let top = self.high % window;
        let mut out = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let i = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                // The sequence of the window that bit `i` stands for.
                let back = (top + window - i) % window;
                if back <= self.high {
                    out.push(self.high - back);
                }
            }
        }
        out.sort_unstable();
        out
    }
}

/// A producer's window as the journal re-states it (`CatalogRecord::Producer`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerState {
    pub producer_id: u64,
    pub last_used_ms: u64,
    /// The stored sequences of its window, ascending, as inclusive ranges.
    pub ranges: Vec<(u64, u64)>,
}

/// A verdict the worker answers without storing anything: a duplicate (with the round its
/// confirm waits for) or a refusal, as the item's outcome. `None`: store it.
pub fn answered(
    item: &PublishItem,
    verdict: Verdict,
) -> Option<(PublishOutcome, Option<CommitId>)> {
    let outcome = |journaled, result, duplicate| PublishOutcome {
        sequence: item.sequence,
        confirm: item.confirm,
        journaled,
        result,
        returned: None,
        duplicate,
    };
    match verdict {
        Verdict::New => None,
        Verdict::Duplicate { journaled, round } => Some((outcome(journaled, Ok(()), true), round)),
        Verdict::Refused(r) => Some((outcome(false, Err(r), false), None)),
    }
}

/// Whether a publish's outcome left the message in some queue (or dropped it as unroutable,
/// which a re-send would be too): then its sequence is in the window.
pub fn stored(o: &PublishOutcome) -> bool {
    o.journaled || (o.result.is_ok() && o.returned.is_none())
}

/// The idempotent producers one shard has seen.
#[derive(Debug)]
pub struct ProducerTable {
    limits: ProducerLimits,
    producers: FastMap<u64, Producer>,
    /// (last use, producer): the least recently used first, for expiry.
    by_use: BTreeSet<(u64, u64)>,
    /// Sequences stored in commit rounds not yet resolved (fsync always), oldest round first.
    in_flight: VecDeque<(CommitId, u64, u64)>,
}

impl Default for ProducerTable {
    /// Unbounded but for the window: what a replay fills before the shard applies its limits.
    fn default() -> ProducerTable {
        ProducerTable::new(ProducerLimits {
            window: 4096,
            producers_max: usize::MAX,
            idle_expiry_ms: u64::MAX,
        })
    }
}

impl ProducerTable {
    pub fn new(limits: ProducerLimits) -> ProducerTable {
        assert!(
            limits.window >= 64 && limits.window.is_multiple_of(64),
            "producer window {} is not a positive multiple of 64",
            limits.window
        );
        ProducerTable {
            limits,
            producers: FastMap::default(),
            by_use: BTreeSet::new(),
            in_flight: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// The verdict on sequence `seq` of `producer`. A known producer's use is noted; an unknown
    /// one that would not fit first makes room by forgetting the least recently used producer if
    /// it has been idle for `idle_expiry_ms`.
    pub fn check(&mut self, producer: u64, seq: u64, now_ms: u64) -> Verdict {
        if let Some(p) = self.producers.get(&producer) {
            let verdict = if p.has(seq) {
                Verdict::Duplicate {
                    journaled: p.journaled,
                    round: p.last_round,
                }
            } else if p.below(seq) {
                Verdict::Refused(Refusal {
                    code: ErrorCode::SequenceOutOfWindow,
                    message: format!(
                        "producer {producer}: sequence {seq} is older than this shard's window \
                         (the {} sequences up to {}, producer_window_max): it cannot be told \
                         from a duplicate",
                        p.window(),
                        p.high
                    ),
                })
            } else {
                Verdict::New
            };
            self.touch(producer, now_ms);
            return verdict;
        }
        if self.producers.len() >= self.limits.producers_max {
            self.expire(now_ms);
        }
        if self.producers.len() >= self.limits.producers_max {
            return Verdict::Refused(Refusal {
                code: ErrorCode::LimitExceeded,
                message: format!(
                    "producer {producer}: this shard holds producers_per_shard_max = {} idempotent \
                     producers, none idle for producer_idle_expiry_ms = {} ms",
                    self.limits.producers_max, self.limits.idle_expiry_ms
                ),
            });
        }
        Verdict::New
    }

    /// Sequence `seq` of `producer` was stored: `journaled` if its record went to the journal,
    /// whose commit `round` must be durable first (fsync always).
    pub fn taken(
        &mut self,
        producer: u64,
        seq: u64,
        journaled: bool,
        round: Option<CommitId>,
        now_ms: u64,
    ) {
        let window = self.limits.window;
        let p = self.producers.entry(producer).or_insert_with(|| {
            self.by_use.insert((now_ms, producer));
            Producer::new(window, now_ms)
        });
        p.mark(seq);
        p.journaled |= journaled;
        if round.is_some() {
            p.last_round = p.last_round.max(round);
        }
        if let Some(round) = round {
            self.in_flight.push_back((round, producer, seq));
        }
        self.touch(producer, now_ms);
    }

    fn touch(&mut self, producer: u64, now_ms: u64) {
        let Some(p) = self.producers.get_mut(&producer) else {
            return;
        };
        if p.last_used_ms != now_ms {
            self.by_use.remove(&(p.last_used_ms, producer));
            p.last_used_ms = now_ms.max(p.last_used_ms);
            self.by_use.insert((p.last_used_ms, producer));
        }
    }

    /// Commit `round` finished (and every one before it): on failure its messages were taken
    /// out of their queues, so their sequences leave the windows (a re-send stores them).
    pub fn resolved(&mut self, round: CommitId, ok: bool) {
        while let Some(&(r, producer, seq)) = self.in_flight.front() {
            if r > round {
                break;
            }
            self.in_flight.pop_front();
            if !ok && r == round {
                if let Some(p) = self.producers.get_mut(&producer) {
                    p.unmark(seq);
                    // A duplicate of an older message must not wait for the failed round. (A
                    // finished round that succeeded may stay named: waiting for it is free.)
                    if p.last_round == Some(round) {
                        p.last_round = None;
                    }
                }
            }
        }
    }

    /// Forgets producers unused for `idle_expiry_ms`; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let cutoff = now_ms.saturating_sub(self.limits.idle_expiry_ms);
        let mut n = 0;
        while let Some(&(used, producer)) = self.by_use.first() {
            if used > cutoff || now_ms < self.limits.idle_expiry_ms {
                break;
            }
            self.by_use.pop_first();
            self.producers.remove(&producer);
            n += 1;
        }
        n
    }

    /// Every window, for the journal's re-statement before reclaim: without the sequences whose
    /// commit is still in flight (a re-statement must only repeat what is durable).
    pub fn restatement(&self) -> Vec<ProducerState> {
        let mut out: Vec<ProducerState> = Vec::with_capacity(self.producers.len());
        let mut ids: Vec<&u64> = self.producers.keys().collect();
        ids.sort_unstable();
        let in_flight: std::collections::HashSet<(u64, u64)> =
            self.in_flight.iter().map(|&(_, p, s)| (p, s)).collect();
        for id in ids {
            let p = &self.producers[id];
            if !p.journaled {
                continue;
            }
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for s in p
                .sequences()
                .into_iter()
                .filter(|&s| !in_flight.contains(&(*id, s)))
            {
                match ranges.last_mut() {
                    Some(last) if last.1 + 1 == s => last.1 = s,
                    _ => ranges.push((s, s)),
                }
            }
            if !ranges.is_empty() {
                out.push(ProducerState {
                    producer_id: *id,
                    last_used_ms: p.last_used_ms,
                    ranges,
                });
            }
        }
        out
    }

    /// Replay: a journaled message's stamp. Recovery restores every producer the journal holds,
    /// even past `producers_max`.
    pub fn restore_stamp(&mut self, producer: u64, seq: u64) {
        self.restore(producer, std::iter::once((seq, seq)));
    }

    /// Replay: a re-stated window (merged with what the log said before it: a re-statement
    /// repeats what is true, so merging is idempotent).
    pub fn restore_state(&mut self, state: &ProducerState) {
        self.restore(state.producer_id, state.ranges.iter().copied());
    }

    fn restore(&mut self, producer: u64, ranges: impl Iterator<Item = (u64, u64)>) {
        let window = self.limits.window;
        let p = self.producers.entry(producer).or_insert_with(|| {
            self.by_use.insert((0, producer));
            Producer::new(window, 0)
        });
        p.journaled = true;
        for (first, last) in ranges {
            // Only the newest `window` of a range can be in the window.
            let first = first.max(last.saturating_sub(window - 1));
            for s in first..=last {
                p.mark(s);
            }
        }
    }

    /// The table's bounds from now on (after a replay, which keeps every producer it finds).
    pub fn set_limits(&mut self, limits: ProducerLimits) {
        assert_eq!(
            limits.window, self.limits.window,
            "the window is fixed at creation"
        );
        self.limits = limits;
    }

    /// After replay: every recovered producer was used now (the crash hid how long it was idle).
    pub fn recovered(&mut self, now_ms: u64) {
        self.by_use.clear();
        for (id, p) in self.producers.iter_mut() {
            p.last_used_ms = now_ms;
            self.by_use.insert((now_ms, *id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(window: u64, max: usize) -> ProducerTable {
        ProducerTable::new(ProducerLimits {
            window,
            producers_max: max,
            idle_expiry_ms: 1000,
        })
    }

    fn take(t: &mut ProducerTable, p: u64, s: u64) {
        assert_eq!(t.check(p, s, 0), Verdict::New, "seq {s}");
        t.taken(p, s, true, None, 0);
    }

    fn is_dup(v: &Verdict) -> bool {
        matches!(v, Verdict::Duplicate { .. })
    }

    #[test]
    fn a_resent_sequence_is_a_duplicate_and_others_are_new() {
        let mut t = table(64, 10);
        for s in [1, 2, 3, 7] {
            take(&mut t, 9, s);
        }
        for s in [1, 2, 3, 7] {
            assert!(is_dup(&t.check(9, s, 0)), "seq {s}");
        }
        // A gap (routed elsewhere) and a reorder inside the window are new.
        assert_eq!(t.check(9, 5, 0), Verdict::New);
        assert_eq!(t.check(9, 8, 0), Verdict::New);
        // Another producer's sequence 1 is its own.
        assert_eq!(t.check(10, 1, 0), Verdict::New);
    }

    #[test]
    fn a_sequence_older_than_the_window_is_refused() {
        let mut t = table(64, 10);
        take(&mut t, 1, 10);
        take(&mut t, 1, 100);
        // The window is (36, 100]: 10 and 36 are out, 37 is in (and was never stored).
        for s in [10, 36] {
            match t.check(1, s, 0) {
                Verdict::Refused(r) => assert_eq!(r.code, ErrorCode::SequenceOutOfWindow),
                v => panic!("seq {s}: {v:?}"),
            }
        }
        assert_eq!(t.check(1, 37, 0), Verdict::New);
        assert!(is_dup(&t.check(1, 100, 0)));
        // Moving far up clears the bits passed over: 100 + 64 reuses 100's bit.
        take(&mut t, 1, 164);
        assert!(is_dup(&t.check(1, 164, 0)));
        assert!(matches!(t.check(1, 100, 0), Verdict::Refused(_)));
        take(&mut t, 1, 1_000_000);
        assert_eq!(t.check(1, 999_999, 0), Verdict::New);
    }

    #[test]
    fn a_full_table_refuses_new_producers_until_one_is_idle_long_enough() {
        let mut t = table(64, 2);
        t.taken(1, 1, false, None, 0);
        t.taken(2, 1, false, None, 500);
        match t.check(3, 1, 900) {
            Verdict::Refused(r) => {
                assert_eq!(r.code, ErrorCode::LimitExceeded);
                assert!(
                    r.message.contains("producers_per_shard_max"),
                    "{}",
                    r.message
                );
            }
            v => panic!("{v:?}"),
        }
        // Known producers still get their verdicts.
        assert!(is_dup(&t.check(2, 1, 900)));
        // Producer 1 has been idle 1000 ms at 1000: forgotten to make room.
        assert_eq!(t.check(3, 1, 1000), Verdict::New);
        t.taken(3, 1, false, None, 1000);
        assert_eq!(t.len(), 2);
        assert!(matches!(t.check(1, 1, 1000), Verdict::Refused(_)));
    }

    #[test]
    fn idle_producers_expire_and_their_resends_are_new() {
        let mut t = table(64, 10);
        t.taken(1, 5, false, None, 0);
        t.taken(2, 5, false, None, 600);
        assert_eq!(t.expire(999), 0);
        assert_eq!(t.expire(1000), 1);
        assert_eq!(t.check(1, 5, 1000), Verdict::New);
        assert!(is_dup(&t.check(2, 5, 1000)));
        // The check was a use: 2 is not idle at 1600.
        assert_eq!(t.expire(1600), 0);
    }

    #[test]
    fn a_duplicate_waits_for_the_round_and_a_failed_round_forgets_its_sequences() {
        let mut t = table(64, 10);
        t.check(1, 1, 0);
        t.taken(1, 1, true, Some(CommitId(4)), 0);
        t.taken(1, 2, true, Some(CommitId(5)), 0);
        assert_eq!(
            t.check(1, 1, 0),
            Verdict::Duplicate {
                journaled: true,
                round: Some(CommitId(5))
            }
        );
        // In flight: not re-stated.
        assert!(t.restatement().is_empty());
        t.resolved(CommitId(4), true);
        assert_eq!(t.restatement()[0].ranges, vec![(1, 1)]);
        t.resolved(CommitId(5), false);
        assert_eq!(t.check(1, 2, 0), Verdict::New);
        assert_eq!(
            t.check(1, 1, 0),
            Verdict::Duplicate {
                journaled: true,
                round: None
            }
        );
    }

    #[test]
    fn replay_of_stamps_and_restatements_rebuilds_the_windows() {
        let mut t = table(64, 10);
        for s in [3, 4, 5, 9, 70] {
            take(&mut t, 1, s);
        }
        take(&mut t, 2, 1);
        let states = t.restatement();
        assert_eq!(states[0].ranges, vec![(9, 9), (70, 70)]);
        // Replayed into a table with another window, and a stamp after the re-statement.
        let mut r = table(128, 1);
        for s in &states {
            r.restore_state(s);
        }
        r.restore_stamp(1, 71);
        r.restore_state(&states[0]); // merging twice changes nothing
        r.recovered(50);
        for s in [9, 70, 71] {
            assert!(is_dup(&r.check(1, s, 50)), "seq {s}");
        }
        assert!(is_dup(&r.check(2, 1, 50)));
        assert_eq!(r.check(1, 10, 50), Verdict::New);
        assert_eq!(r.len(), 2, "recovery keeps producers past producers_max");
        assert_eq!(r.expire(1049), 0);
        assert_eq!(r.expire(1050), 2);
    }

    #[test]
    fn the_restated_sequences_are_those_stored_in_the_window_wrapped_or_not() {
        let mut t = table(64, 10);
        let stored = [3u64, 40, 63, 64, 65, 100, 101, 126];
        for s in stored {
            take(&mut t, 1, s);
        }
        // The window is (62, 126]: 3 and 40 are out of it.
        let ranges = &t.restatement()[0].ranges;
        let got: Vec<u64> = ranges.iter().flat_map(|&(a, b)| a..=b).collect();
        assert_eq!(got, vec![63, 64, 65, 100, 101, 126]);
    }

    #[test]
    fn sequence_zero_and_huge_sequences_work() {
        let mut t = table(64, 10);
        take(&mut t, 1, 0);
        assert!(is_dup(&t.check(1, 0, 0)));
        take(&mut t, 1, u64::MAX - 1);
        assert!(is_dup(&t.check(1, u64::MAX - 1, 0)));
        assert!(matches!(t.check(1, 0, 0), Verdict::Refused(_)));
    }
}
