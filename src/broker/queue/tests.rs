//! The queue state machine's tests: unit cases for each rule, and a property test that checks
//! every message is in exactly one place (ready, delayed, outstanding, settled) after every event.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn publish_n(q: &mut Queue<u64>, n: u64, now: u64) -> Vec<Settled<u64>> {
    let mut settled = Vec::new();
    for i in 0..n {
        q.publish(i, 10, now, None, None, &mut settled).unwrap();
    }
    settled
}

#[test]
fn competing_consumers_get_a_fair_share_in_publish_order() {
    let mut q = Queue::new(QueuePolicy::default(), 0);
    publish_n(&mut q, 9, 0);
    for id in 1..=3 {
        q.add_consumer(id, 100, false).unwrap();
    }
    let (mut out, mut settled) = (Vec::new(), Vec::new());
    q.dispatch(0, usize::MAX, &mut out, &mut settled);
    let holders: Vec<_> = out.iter().map(|d| d.holder).collect();
    assert_eq!(holders, vec![1, 2, 3, 1, 2, 3, 1, 2, 3]);
    let seqs: Vec<_> = out.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, (0..9).collect::<Vec<_>>());
    assert!(settled.is_empty());
}

#[test]
fn prefetch_bounds_what_a_consumer_holds_and_acks_restore_credit() {
    let mut q = Queue::new(QueuePolicy::default(), 0);
    publish_n(&mut q, 10, 0);
    q.add_consumer(7, 3, false).unwrap();
    let (mut out, mut settled) = (Vec::new(), Vec::new());
    q.dispatch(0, usize::MAX, &mut out, &mut settled);
    assert_eq!(out.len(), 3);
    q.dispatch(0, usize::MAX, &mut out, &mut settled);
    assert_eq!(out.len(), 3, "delivered past prefetch");
    assert_eq!(q.ack(7, 1).unwrap().reason, SettleReason::Acked);
    q.dispatch(0, usize::MAX, &mut out, &mut settled);
    assert_eq!(
        out.iter().map(|d| d.seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(q.stats().outstanding, 3);
    assert_eq!(
        q.ack(8, 0),
        Err(QueueError::NotOutstanding { holder: 8, seq: 0 })
    );
    assert_eq!(
        q.ack(7, 1),
        Err(QueueError::NotOutstanding { holder: 7, seq: 1 }),
        "acked twice"
    );
}

#[test]
fn a_vanished_consumer_returns_its_deliveries_for_redelivery_in_order() {
    let mut q = Queue::new(QueuePolicy::default(), 0);
    publish_n(&mut q, 4, 0);
    q.add_consumer(1, 2, false).unwrap();
    let (mut out, mut settled) = (Vec::new(), Vec::new());
    q.dispatch(0, usize::MAX, &mut out, &mut settled);
    assert_eq!(q.release(1, &mut settled), 2);
    q.add_consumer(2, 10, false).unwrap();
    out.clear();
    q.dispatch(0, usize::MAX, &mut out, &mut settled);
    let got: Vec<_> = out.iter().map(|d| (d.seq, d.delivery_count)).collect();
    assert_eq!(got, vec![(0, 2), (1, 2), (2, 1), (3, 1)]);
}

#[test]
fn poison_messages_are_dead_lettered_after_max_deliveries() {
    let policy = QueuePolicy {
        max_deliveries: Some(2),
        dead_letter: true,
        ..Default::default()
    };
    let mut q = Queue::new(policy, 0);
    publish_n(&mut q, 1, 0);
    q.add_consumer(1, 1, false).unwrap();
    let (mut out, mut settled) = (Vec::new(), Vec::new());
    q.dispatch(0, 1, &mut out, &mut settled);
    q.nack(1, 0, true, &mut settled).unwrap();
    q.dispatch(0, 1, &mut out, &mut settled);
    assert_eq!(out[1].delivery_count, 2);
    q.nack(1, 0, true, &mut settled).unwrap();
    assert_eq!(settled.len(), 1);
    assert_eq!(
        (settled[0].seq, settled[0].reason),
        (0, SettleReason::DeadLettered)
    );
    assert_eq!(q.stats().ready, 0);
}

#[test]
fn overflow_drops_the_head_or_refuses_the_publish() {
    let mut q = Queue::new(
        QueuePolicy {
            max_length: Some(3),
            ..Default::default()
        },
        0,
    );
    let settled = publish_n(&mut q, 5, 0);
    assert_eq!(
        settled
            .iter()
            .map(|s| (s.seq, s.reason))
            .collect::<Vec<_>>(),
        vec![(0, SettleReason::Dropped), (1, SettleReason::Dropped)]
    );
    assert_eq!(q.stats().ready, 3);

    let policy = QueuePolicy {
        max_length_bytes: Some(25),
        overflow: Overflow::RejectPublish,
        ..Default::default()
    };
    let mut q = Queue::new(policy, 0);
    let mut settled = Vec::new();
    q.publish(0u64, 10, 0, None, None, &mut settled).unwrap();
    q.publish(1, 10, 0, None, None, &mut settled).unwrap();
    assert_eq!(
        q.publish(2, 10, 0, None, None, &mut settled),
        Err(QueueError::Full("max_length_bytes"))
    );
    assert_eq!(q.stats().ready_bytes, 20);
    assert_eq!(
        q.next_seq(),
        2,
        "a refused publish used up a sequence number"
    );
}

#[test]
fn delayed_messages_wait_outside_ready_and_join_it_in_sequence_order() {
    let mut q: Queue<u64> = Queue::new(
        QueuePolicy {
            message_ttl_ms: Some(100),
            ..QueuePolicy::default()
        },
        0,
    );
    let mut settled = Vec::new();
    q.publish(0, 1, 1_000, None, None, &mut settled).unwrap();
    q.publish(1, 1, 1_000, None, Some(1_500), &mut settled)
        .unwrap(); // delayed
    q.publish(2, 1, 1_000, None, Some(900), &mut settled)
        .unwrap(); // due already
    assert_eq!((q.stats().ready, q.stats().delayed), (2, 1));
    q.add_consumer(7, 10, true).unwrap();
    let mut out = Vec::new();
    q.dispatch(1_050, 10, &mut out, &mut settled);
    assert_eq!(out.iter().map(|d| d.msg).collect::<Vec<_>>(), [0, 2]);
    out.clear();
    // Its TTL counts from its delivery time: still alive at 1_550.
    q.dispatch(1_550, 10, &mut out, &mut settled);
    assert_eq!(out.iter().map(|d| d.msg).collect::<Vec<_>>(), [1]);
    assert!(
        settled.iter().all(|s| s.reason == SettleReason::Acked),
        "auto-acked, none expired: {settled:?}"
    );
    settled.clear();
    assert_eq!(q.stats().delayed, 0);

    // Purge takes delayed ones too; a publish that could not be made durable is retracted.
    let seq = q
        .publish(3, 1, 2_000, None, Some(9_000), &mut settled)
        .unwrap();
    assert!(q.retract_newest(seq));
    q.publish(4, 1, 2_000, None, Some(9_000), &mut settled)
        .unwrap();
    assert_eq!(q.purge(&mut settled), 1);
    assert_eq!(settled.len(), 1);
    assert_eq!(q.stats().delayed, 0);
    assert_eq!(q.expire(10_000, &mut settled), 0, "nothing left to promote");
}

#[test]
fn expired_messages_are_settled_not_delivered() {
    let policy = QueuePolicy {
        message_ttl_ms: Some(100),
        ..Default::default()
    };
    let mut q = Queue::new(policy, 0);
    let mut settled = Vec::new();
    q.publish(0u64, 1, 1_000, None, None, &mut settled).unwrap(); // expires at 1100
    q.publish(1, 1, 1_050, Some(10), None, &mut settled)
        .unwrap(); // per-message ttl: 1060
    q.publish(2, 1, 1_050, None, None, &mut settled).unwrap(); // 1150
    q.add_consumer(1, 10, false).unwrap();
    let mut out = Vec::new();
    q.dispatch(1_120, usize::MAX, &mut out, &mut settled);
    assert_eq!(out.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![2]);
    assert_eq!(
        settled
            .iter()
            .map(|s| (s.seq, s.reason))
            .collect::<Vec<_>>(),
        vec![(0, SettleReason::Expired), (1, SettleReason::Expired)]
    );
}

#[test]
fn auto_ack_and_get_settle_at_once() {
    let mut q = Queue::new(QueuePolicy::default(), 5);
    publish_n(&mut q, 3, 0);
    let mut settled = Vec::new();
    let d = q.get(99, true, 0, &mut settled).unwrap();
    assert_eq!((d.seq, d.delivery_count, d.auto_ack), (5, 1, true));
    assert_eq!(settled.len(), 1);
    let d = q.get(99, false, 0, &mut settled).unwrap();
    assert_eq!(q.stats().outstanding, 1);
    assert_eq!(
        q.release(99, &mut settled),
        1,
        "a dead connection's gets come back"
    );
    assert_eq!(q.get(99, false, 0, &mut settled).unwrap().seq, d.seq);
}

#[derive(Debug, Clone)]
enum Op {
    Publish,
    /// Published to be delivered this many ms from now.
    PublishDelayed(u8),
    /// The clock moves on by this many ms, and the expiry tick runs.
    Tick(u8),
    /// Consumer id, prefetch, consumer priority.
    AddConsumer(u8, u8, u8),
    Release(u8),
    Dispatch(u8),
    Ack(u8),
    Nack(u8, bool),
    Get(bool),
    Purge,
    /// A client's nack with requeue (a failure), with a retry delay of its own or not.
    Fail(u8, Option<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Publish),
        1 => (1u8..50).prop_map(Op::PublishDelayed),
        1 => any::<u8>().prop_map(Op::Tick),
        1 => (0u8..4, 1u8..4, 0u8..3).prop_map(|(c, p, r)| Op::AddConsumer(c, p, r)),
        1 => (0u8..5).prop_map(Op::Release),
        3 => (1u8..8).prop_map(Op::Dispatch),
        3 => any::<u8>().prop_map(Op::Ack),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(i, r)| Op::Nack(i, r)),
        1 => any::<bool>().prop_map(Op::Get),
        1 => Just(Op::Purge),
        2 => (any::<u8>(), proptest::option::of(0u8..60)).prop_map(|(i, d)| Op::Fail(i, d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Against a model: each accepted message is in exactly one of ready, delayed,
    /// outstanding and settled; nothing is settled twice; consumers never exceed their
    /// prefetch; first deliveries come in publish order (while nothing was delayed: a
    /// delayed message is first delivered after later ones, by design). Consumer selection:
    /// a delivery never goes to a consumer while one of higher priority has credit; under
    /// single active consumer every delivery goes to the active one, at most one consumer
    /// holds deliveries at a time, and an active one holding nothing is the first in line.
    /// Retries: a failed message is never delivered before its retry is due; `retrying`
    /// counts exactly those waiting; the failure after the policy's last delay, and only that
    /// one, gives it up as retries exhausted (unless `max_deliveries` gave it up first).
    #[test]
    fn every_message_is_in_exactly_one_place(ops in proptest::collection::vec(op(), 1..200), max_deliveries in 1u32..4, max_length in 2u64..12, single_active in any::<bool>(), limited in any::<bool>(), retry_delays_ms in proptest::collection::vec(0u32..40, 0..4), dead_letter in any::<bool>()) {
        let policy = QueuePolicy {
            max_length: Some(max_length),
            max_deliveries: (limited || retry_delays_ms.is_empty()).then_some(max_deliveries),
            retry_delays_ms: retry_delays_ms.clone(),
            dead_letter,
            single_active_consumer: single_active,
            ..Default::default()
        };
        let (delays, max_deliveries) = (retry_delays_ms, policy.max_deliveries);
        // Each consumer's (priority, attach order).
        let mut rank: BTreeMap<HolderId, (i32, usize)> = BTreeMap::new();
        let mut attached = 0usize;
        let index = IndexCount::default();
        let mut q: Queue<u64> = Queue::counted(policy, 0, index.clone());
        let mut published = BTreeSet::new();
        let mut settled_seqs = BTreeSet::new();
        let mut outstanding: BTreeMap<Seq, HolderId> = BTreeMap::new();
        let mut prefetch: BTreeMap<HolderId, u32> = BTreeMap::new();
        let mut last_first_delivery = None;
        let mut settled = Vec::new();
        let mut out = Vec::new();
        let mut now = 0u64;
        let mut any_delayed = false;
        // The retry model: failures per message, and the retries waiting, with their due times.
        let mut failures: BTreeMap<Seq, u32> = BTreeMap::new();
        let mut not_before: BTreeMap<Seq, u64> = BTreeMap::new();
        let mut delivery_counts: BTreeMap<Seq, u32> = BTreeMap::new();
        let mut exhausted = None;
        for op in ops {
            let op_kind = op.clone();
            settled.clear();
            out.clear();
            match op_kind {
                Op::Publish => {
                    let seq = q.publish(q.next_seq(), 1, now, None, None, &mut settled).unwrap();
                    prop_assert!(published.insert(seq));
                }
                Op::PublishDelayed(d) => {
                    any_delayed = true;
                    let at = Some(now + u64::from(d));
                    let seq = q.publish(q.next_seq(), 1, now, None, at, &mut settled).unwrap();
                    prop_assert!(published.insert(seq));
                }
                Op::Tick(d) => {
                    now += u64::from(d);
                    q.expire(now, &mut settled);
                }
                Op::AddConsumer(c, p, r) => {
                    let added = q.add_consumer_with(u64::from(c), u32::from(p), false, i32::from(r));
                    prop_assert_eq!(added.is_ok(), !prefetch.contains_key(&u64::from(c)));
                    prefetch.entry(u64::from(c)).or_insert(u32::from(p));
                    attached += 1;
                    rank.entry(u64::from(c)).or_insert((i32::from(r), attached));
                }
                Op::Release(c) => {
                    q.release(u64::from(c), &mut settled);
                    prefetch.remove(&u64::from(c));
                    rank.remove(&u64::from(c));
                    outstanding.retain(|_, o| *o != u64::from(c));
                }
                Op::Dispatch(n) => q.dispatch(now, usize::from(n), &mut out, &mut settled),
                Op::Ack(i) | Op::Nack(i, _) | Op::Fail(i, _) if outstanding.is_empty() => {
                    prop_assert!(q.ack(0, u64::from(i) + 10_000).is_err());
                }
                Op::Ack(i) => {
                    let (&seq, &holder) = outstanding.iter().nth(usize::from(i) % outstanding.len()).unwrap();
                    let s = q.ack(holder, seq).unwrap();
                    settled.push(s);
                    outstanding.remove(&seq);
                }
                Op::Nack(i, requeue) => {
                    let (&seq, &holder) = outstanding.iter().nth(usize::from(i) % outstanding.len()).unwrap();
                    q.nack(holder, seq, requeue, &mut settled).unwrap();
                    outstanding.remove(&seq);
                }
                Op::Get(auto_ack) => {
                    if let Some(d) = q.get(1_000, auto_ack, now, &mut settled) {
                        out.push(d);
                    }
                }
                // In steps, as the host purges a deep queue.
                Op::Purge => while q.purge_some(3, &mut settled) == 3 {},
                Op::Fail(i, delay) => {
                    let (&seq, &holder) = outstanding.iter().nth(usize::from(i) % outstanding.len()).unwrap();
                    let delay = delay.map(u32::from);
                    let decision = q.fail(holder, seq, delay, now, &mut settled).unwrap();
                    outstanding.remove(&seq);
                    let count = delivery_counts[&seq];
                    let before = failures.get(&seq).copied().unwrap_or(0);
                    let want = if max_deliveries.is_some_and(|m| count >= m) || delay == Some(0) {
                        RetryDecision::Requeue
                    } else if delays.is_empty() {
                        match delay {
                            Some(d) if d > 0 => RetryDecision::Delay { due_ms: now + u64::from(d) + 1, failures: 0 },
                            _ => RetryDecision::Requeue,
                        }
                    } else if before as usize >= delays.len() {
                        RetryDecision::Exhausted
                    } else {
                        let d = u64::from(delay.unwrap_or(delays[before as usize]));
                        let due_ms = if d == 0 { now } else { now + d + 1 };
                        RetryDecision::Delay { due_ms, failures: before + 1 }
                    };
                    prop_assert_eq!(decision, want);
                    match decision {
                        RetryDecision::Delay { due_ms, failures: n } => {
                            if n > 0 {
                                failures.insert(seq, n);
                            }
                            not_before.insert(seq, due_ms);
                        }
                        RetryDecision::Exhausted => {
                            exhausted = Some(seq);
                            failures.remove(&seq);
                        }
                        RetryDecision::Requeue => {
                            if settled.iter().any(|s| s.seq == seq) {
                                failures.remove(&seq); // past max_deliveries: given up
                            }
                        }
                    }
                    prop_assert_eq!(q.failures(seq), failures.get(&seq).copied().unwrap_or(0));
                }
            }
            if matches!(op, Op::Dispatch(_)) {
                let mut held: BTreeMap<HolderId, u32> = BTreeMap::new();
                for o in outstanding.values() {
                    *held.entry(*o).or_default() += 1;
                }
                for d in &out {
                    let (p, _) = rank[&d.holder];
                    if single_active {
                        prop_assert_eq!(Some(d.holder), q.active_consumer());
                    }
                    for (other, (r, _)) in &rank {
                        let credit = held.get(other).copied().unwrap_or(0) < prefetch[other];
                        prop_assert!(single_active || *r <= p || !credit, "consumer {} (priority {}) served while {} (priority {}) had credit", d.holder, p, other, r);
                    }
                    *held.entry(d.holder).or_default() += 1;
                }
            }
            for d in &out {
                if let Some(due) = not_before.get(&d.seq) {
                    prop_assert!(now >= *due, "message {} delivered at {} before its retry at {}", d.seq, now, due);
                }
                delivery_counts.insert(d.seq, d.delivery_count);
                if !d.auto_ack {
                    prop_assert!(outstanding.insert(d.seq, d.holder).is_none(), "delivered twice at once");
                }
                if d.delivery_count == 1 && !any_delayed {
                    prop_assert!(last_first_delivery < Some(d.seq), "first deliveries out of order");
                    last_first_delivery = Some(d.seq);
                }
            }
            for s in &settled {
                prop_assert_eq!(s.why == DeathReason::RetriesExhausted, exhausted == Some(s.seq), "retries exhausted is {}'s alone", s.seq);
                if s.why == DeathReason::RetriesExhausted {
                    let want = if dead_letter { SettleReason::DeadLettered } else { SettleReason::Dropped };
                    prop_assert_eq!(s.reason, want);
                }
                failures.remove(&s.seq);
                not_before.remove(&s.seq);
                prop_assert!(published.contains(&s.seq));
                prop_assert!(settled_seqs.insert(s.seq), "settled twice: {}", s.seq);
                prop_assert!(!outstanding.contains_key(&s.seq));
            }
            for (holder, limit) in &prefetch {
                let held = outstanding.values().filter(|o| *o == holder).count() as u32;
                prop_assert!(held <= *limit, "consumer {} holds {} over prefetch {}", holder, held, limit);
            }
            if single_active {
                let holding: BTreeSet<HolderId> = outstanding.values().copied().filter(|h| rank.contains_key(h)).collect();
                prop_assert!(holding.len() <= 1, "several consumers hold deliveries at once: {:?}", holding);
                let first_in_line = rank.iter().max_by_key(|(_, (r, order))| (*r, std::cmp::Reverse(*order))).map(|(id, _)| *id);
                let active = q.active_consumer();
                prop_assert_eq!(active.is_some(), !rank.is_empty());
                if active.is_some_and(|a| !holding.contains(&a)) {
                    prop_assert_eq!(active, first_in_line, "an idle active consumer is the first in line");
                }
            }
            exhausted = None;
            let stats = q.stats();
            // Waiting retries: those not yet due (one due is promoted by the next tick, dispatch
            // or get, so the count may lag the clock until then, never run ahead of it).
            let waiting = not_before.iter().filter(|(s, due)| **due > now && !outstanding.contains_key(s)).count() as u64;
            prop_assert!(stats.retrying >= waiting && stats.retrying <= stats.delayed, "retrying {} for {} waiting", stats.retrying, waiting);
            if matches!(op, Op::Tick(_) | Op::Dispatch(_) | Op::Get(_)) {
                prop_assert_eq!(stats.retrying, waiting, "retries due were promoted");
            }
            prop_assert_eq!(stats.outstanding, outstanding.len() as u64);
            prop_assert_eq!(stats.ready + stats.delayed + stats.outstanding + settled_seqs.len() as u64, published.len() as u64);
            prop_assert_eq!(index.get(), stats.ready + stats.delayed + stats.outstanding, "the shard's index count");
            let counts = q.counts();
            prop_assert_eq!(counts.bytes_unacked, stats.outstanding, "unacked bytes (1 a message)");
            prop_assert_eq!(counts.published, published.len() as u64);
            prop_assert_eq!(counts.acked + counts.dead_lettered + counts.dropped + counts.expired, settled_seqs.len() as u64, "every settlement counted once: {:?}", counts);
            if matches!(op, Op::Publish) {
                prop_assert!(stats.ready <= max_length, "a publish left {} ready over max_length {}", stats.ready, max_length);
            }
        }
        drop(q);
        prop_assert_eq!(index.get(), 0, "a dropped queue leaves the index count");
    }
}

#[test]
fn a_consumer_whose_connection_has_no_room_is_skipped_for_the_others() {
    let mut q = Queue::new(QueuePolicy::default(), 0);
    publish_n(&mut q, 6, 0);
    q.add_consumer(1, 100, true).unwrap();
    q.add_consumer(2, 100, false).unwrap();
    let (mut out, mut settled) = (Vec::new(), Vec::new());
    // Consumer 1 (auto-ack: no prefetch bound at all) has room for one message only.
    let mut room_of_1 = 1;
    let take = |holder: HolderId, _: &u64| {
        if holder != 1 {
            return true;
        }
        let ok = room_of_1 > 0;
        room_of_1 -= i32::from(ok);
        ok
    };
    q.dispatch_within(0, usize::MAX, take, &mut out, &mut settled);
    let holders: Vec<_> = out.iter().map(|d| d.holder).collect();
    assert_eq!(holders, vec![1, 2, 2, 2, 2, 2]);
}

#[test]
fn a_holder_is_overdue_once_a_delivery_is_older_than_the_timeout() {
    let mut q = Queue::new(QueuePolicy::default(), 0);
    publish_n(&mut q, 3, 0);
    q.add_consumer(1, 1, false).unwrap();
    q.add_consumer(2, 1, false).unwrap();
    let (mut out, mut settled) = (Vec::new(), Vec::new());
    q.dispatch(1_000, usize::MAX, &mut out, &mut settled);
    assert_eq!(q.overdue(1_500, 500), vec![]);
    q.ack(2, 1).unwrap();
    q.dispatch(1_400, usize::MAX, &mut out, &mut settled);
    // Consumer 1's delivery is 501 ms old; consumer 2's newer one only 101.
    assert_eq!(q.overdue(1_501, 500), vec![(1, 0)]);
    assert_eq!(q.release(1, &mut settled), 1);
    assert_eq!(q.overdue(2_000, 500), vec![(2, 2)]);
}

// Priority queues: the ready list against a model of its order (its own ops: priorities and
// holds, no retries or consumer priorities, whose own test is the one above).

#[derive(Debug, Clone)]
enum PrioOp {
    /// Published with this priority.
    Publish(u8),
    /// Published to be delivered this many ms from now, with this priority.
    PublishDelayed(u8, u8),
    /// The clock moves on by this many ms, and the expiry tick runs.
    Tick(u8),
    AddConsumer(u8, u8),
    Release(u8),
    Dispatch(u8),
    Ack(u8),
    Nack(u8, bool),
    Get(bool),
    Purge,
    /// Every message published from now on is held (its commit not durable yet), or (false)
    /// the hold is lifted.
    Hold(bool),
}

fn prio_op() -> impl Strategy<Value = PrioOp> {
    prop_oneof![
        4 => (0u8..6).prop_map(PrioOp::Publish),
        1 => (1u8..50, 0u8..6).prop_map(|(d, p)| PrioOp::PublishDelayed(d, p)),
        1 => any::<u8>().prop_map(PrioOp::Tick),
        1 => (0u8..4, 1u8..4).prop_map(|(c, p)| PrioOp::AddConsumer(c, p)),
        1 => (0u8..5).prop_map(PrioOp::Release),
        3 => (1u8..8).prop_map(PrioOp::Dispatch),
        3 => any::<u8>().prop_map(PrioOp::Ack),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(i, r)| PrioOp::Nack(i, r)),
        1 => any::<bool>().prop_map(PrioOp::Get),
        1 => Just(PrioOp::Purge),
        1 => any::<bool>().prop_map(PrioOp::Hold),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Against a model: each accepted message is in exactly one of ready, delayed,
    /// outstanding and settled; nothing is settled twice; consumers never exceed their
    /// prefetch; first deliveries come in publish order (while nothing was delayed: a
    /// delayed message is first delivered after later ones, by design; and in a plain
    /// queue). And the ready list is, after every event, the model's: by level (the
    /// message's priority capped at `priority_max`, highest first), then sequence number;
    /// `DropHead` takes the oldest of the lowest level at or below the newcomer's.
    #[test]
    fn a_priority_queue_hands_out_what_its_model_does(ops in proptest::collection::vec(prio_op(), 1..200), max_deliveries in 1u32..4, max_length in 2u64..12, priority_max in prop_oneof![Just(0u8), 1u8..4]) {
        let policy = QueuePolicy { max_length: Some(max_length), max_deliveries: Some(max_deliveries), priority_max, ..Default::default() };
        let index = IndexCount::default();
        let mut q: Queue<u64> = Queue::counted(policy, 0, index.clone());
        let mut published = BTreeSet::new();
        let mut settled_seqs = BTreeSet::new();
        let mut outstanding: BTreeMap<Seq, HolderId> = BTreeMap::new();
        let mut prefetch: BTreeMap<HolderId, u32> = BTreeMap::new();
        let mut last_first_delivery = None;
        let mut settled = Vec::new();
        let mut out = Vec::new();
        let mut now = 0u64;
        let mut any_delayed = false;
        let mut model = ReadyModel { max_length, ..ReadyModel::default() };
        let mut expected: BTreeSet<Seq> = BTreeSet::new();
        let mut deliveries: BTreeMap<Seq, u32> = BTreeMap::new();
        let mut hold: Option<Seq> = None;
        for op in ops {
            let op_kind = op.clone();
            settled.clear();
            out.clear();
            expected.clear();
            match op_kind {
                PrioOp::Publish(p) => {
                    let seq = q.publish_prioritized(q.next_seq(), 1, p, now, None, None, &mut settled).unwrap();
                    prop_assert!(published.insert(seq));
                    model.level.insert(seq, p.min(priority_max));
                    model.admit(seq, &mut expected);
                }
                PrioOp::PublishDelayed(d, p) => {
                    any_delayed = true;
                    let at = now + u64::from(d);
                    let seq = q.publish_prioritized(q.next_seq(), 1, p, now, None, Some(at), &mut settled).unwrap();
                    prop_assert!(published.insert(seq));
                    model.level.insert(seq, p.min(priority_max));
                    model.due.insert((at, seq));
                }
                PrioOp::Tick(d) => {
                    now += u64::from(d);
                    model.promote(now, &mut expected);
                    q.expire(now, &mut settled);
                }
                PrioOp::AddConsumer(c, p) => {
                    let r = q.add_consumer(u64::from(c), u32::from(p), false);
                    prop_assert_eq!(r.is_ok(), !prefetch.contains_key(&u64::from(c)));
                    prefetch.entry(u64::from(c)).or_insert(u32::from(p));
                }
                PrioOp::Release(c) => {
                    q.release(u64::from(c), &mut settled);
                    prefetch.remove(&u64::from(c));
                    for (seq, _) in outstanding.iter().filter(|(_, o)| **o == u64::from(c)) {
                        model.requeue(*seq, deliveries[seq] < max_deliveries, &mut expected);
                    }
                    outstanding.retain(|_, o| *o != u64::from(c));
                }
                PrioOp::Dispatch(n) => {
                    model.promote(now, &mut expected);
                    q.dispatch(now, usize::from(n), &mut out, &mut settled);
                }
                PrioOp::Ack(i) | PrioOp::Nack(i, _) if outstanding.is_empty() => {
                    prop_assert!(q.ack(0, u64::from(i) + 10_000).is_err());
                }
                PrioOp::Ack(i) => {
                    let (&seq, &holder) = outstanding.iter().nth(usize::from(i) % outstanding.len()).unwrap();
                    let s = q.ack(holder, seq).unwrap();
                    settled.push(s);
                    expected.insert(seq);
                    outstanding.remove(&seq);
                }
                PrioOp::Nack(i, requeue) => {
                    let (&seq, &holder) = outstanding.iter().nth(usize::from(i) % outstanding.len()).unwrap();
                    q.nack(holder, seq, requeue, &mut settled).unwrap();
                    model.requeue(seq, requeue && deliveries[&seq] < max_deliveries, &mut expected);
                    outstanding.remove(&seq);
                }
                PrioOp::Get(auto_ack) => {
                    model.promote(now, &mut expected);
                    if let Some(d) = q.get(1_000, auto_ack, now, &mut settled) {
                        out.push(d);
                    }
                }
                // In steps, as the host purges a deep queue.
                PrioOp::Purge => {
                    expected.extend(model.due.iter().map(|(_, s)| *s));
                    expected.extend(model.ready.iter().map(|(_, s)| *s));
                    model.due.clear();
                    model.ready.clear();
                    while q.purge_some(3, &mut settled) == 3 {}
                }
                PrioOp::Hold(on) => {
                    hold = on.then(|| hold.unwrap_or(q.next_seq()));
                    q.set_hold(hold);
                }
            }
            for d in &out {
                // The first in order that is not held: a held level is passed over (in a plain
                // queue nothing behind a held head is older, so that is "stop at the head").
                let head = model.ready.iter().find(|(_, s)| hold.is_none_or(|h| *s < h)).copied();
                prop_assert_eq!(head.map(|(_, s)| s), Some(d.seq), "handed out out of the model's order");
                model.ready.remove(&head.unwrap());
                deliveries.insert(d.seq, d.delivery_count);
                if d.auto_ack {
                    expected.insert(d.seq);
                }
                if !d.auto_ack {
                    prop_assert!(outstanding.insert(d.seq, d.holder).is_none(), "delivered twice at once");
                }
                if d.delivery_count == 1 && !any_delayed && priority_max == 0 {
                    prop_assert!(last_first_delivery < Some(d.seq), "first deliveries out of order");
                    last_first_delivery = Some(d.seq);
                }
            }
            prop_assert_eq!(&settled.iter().map(|s| s.seq).collect::<BTreeSet<_>>(), &expected, "settled, against the model");
            prop_assert_eq!(q.ready.in_order(), model.ready.iter().map(|(l, s)| (l.0, *s)).collect::<Vec<_>>(), "the ready list, against the model");
            for s in &settled {
                prop_assert!(published.contains(&s.seq));
                prop_assert!(settled_seqs.insert(s.seq), "settled twice: {}", s.seq);
                prop_assert!(!outstanding.contains_key(&s.seq));
            }
            for (holder, limit) in &prefetch {
                let held = outstanding.values().filter(|o| *o == holder).count() as u32;
                prop_assert!(held <= *limit, "consumer {} holds {} over prefetch {}", holder, held, limit);
            }
            let stats = q.stats();
            prop_assert_eq!(stats.outstanding, outstanding.len() as u64);
            prop_assert_eq!(stats.ready + stats.delayed + stats.outstanding + settled_seqs.len() as u64, published.len() as u64);
            prop_assert_eq!(index.get(), stats.ready + stats.delayed + stats.outstanding, "the shard's index count");
            if matches!(op, PrioOp::Publish(_)) {
                prop_assert!(stats.ready <= max_length, "a publish left {} ready over max_length {}", stats.ready, max_length);
            }
        }
        drop(q);
        prop_assert_eq!(index.get(), 0, "a dropped queue leaves the index count");
    }
}

/// The ready list as the property test expects it: (level, seq) in hand-out order, highest level
/// first (`Reverse`), then sequence number.
#[derive(Default)]
struct ReadyModel {
    ready: BTreeSet<(std::cmp::Reverse<u8>, Seq)>,
    /// Delayed messages, by (delivery time, seq): the order `promote` takes them in.
    due: BTreeSet<(u64, Seq)>,
    level: BTreeMap<Seq, u8>,
    max_length: u64,
}

impl ReadyModel {
    /// A message joins ready under `DropHead`: while the queue is full, the oldest message of
    /// the lowest level goes if that level is not above the newcomer's; otherwise the newcomer
    /// goes, and the queue is trimmed from its lowest level back to `max_length`. What goes is
    /// added to `settled`.
    fn admit(&mut self, seq: Seq, settled: &mut BTreeSet<Seq>) {
        let level = self.level[&seq];
        while self.ready.len() as u64 >= self.max_length {
            let lowest = self.ready.last().expect("full").0 .0;
            if lowest > level {
                settled.insert(seq);
                while self.ready.len() as u64 > self.max_length {
                    let lowest = self.ready.last().expect("over").0 .0;
                    let oldest = *self
                        .ready
                        .range((std::cmp::Reverse(lowest), 0)..)
                        .next()
                        .expect("not empty");
                    self.ready.remove(&oldest);
                    settled.insert(oldest.1);
                }
                return;
            }
            let oldest = *self
                .ready
                .range((std::cmp::Reverse(lowest), 0)..)
                .next()
                .expect("the level is not empty");
            self.ready.remove(&oldest);
            settled.insert(oldest.1);
        }
        self.ready.insert((std::cmp::Reverse(level), seq));
    }

    fn promote(&mut self, now: u64, settled: &mut BTreeSet<Seq>) {
        while let Some(&(at, seq)) = self.due.first() {
            if at > now {
                return;
            }
            self.due.pop_first();
            self.admit(seq, settled);
        }
    }

    /// An outstanding message comes back (past `max_length` too), or is settled.
    fn requeue(&mut self, seq: Seq, back: bool, settled: &mut BTreeSet<Seq>) {
        if back {
            self.ready
                .insert((std::cmp::Reverse(self.level[&seq]), seq));
        } else {
            settled.insert(seq);
        }
    }
}

fn prioritized(priority_max: u8) -> Queue<u64> {
    Queue::new(
        QueuePolicy {
            priority_max,
            ..Default::default()
        },
        0,
    )
}

#[test]
fn a_priority_queue_hands_out_higher_priorities_first_and_fifo_within_one() {
    let mut q = prioritized(5);
    let mut settled = Vec::new();
    // (message, priority): 9 is capped at 5, so it ranks with the 5s, after them.
    for (m, p) in [(0, 0), (1, 5), (2, 1), (3, 9), (4, 1), (5, 0)] {
        q.publish_prioritized(m, 1, p, 0, None, None, &mut settled)
            .unwrap();
    }
    q.add_consumer(1, 100, false).unwrap();
    let mut out = Vec::new();
    q.dispatch(0, usize::MAX, &mut out, &mut settled);
    assert_eq!(
        out.iter().map(|d| d.msg).collect::<Vec<_>>(),
        [1, 3, 2, 4, 0, 5]
    );
    // Nacked with requeue, 4 and 2 go back to the front of their level, in sequence order,
    // ahead of a newer message of the same priority and behind a higher one.
    q.nack(1, 4, true, &mut settled).unwrap();
    q.nack(1, 2, true, &mut settled).unwrap();
    q.publish_prioritized(6, 1, 1, 0, None, None, &mut settled)
        .unwrap();
    q.publish_prioritized(7, 1, 2, 0, None, None, &mut settled)
        .unwrap();
    let got: Vec<_> = std::iter::from_fn(|| q.get(2, true, 0, &mut settled))
        .map(|d| (d.msg, d.delivery_count))
        .collect();
    assert_eq!(got, [(7, 1), (2, 2), (4, 2), (6, 1)]);
    assert!(settled.iter().all(|s| s.reason == SettleReason::Acked));
}

#[test]
fn drop_head_in_a_priority_queue_drops_the_oldest_of_the_lowest_priority() {
    let mut q = Queue::new(
        QueuePolicy {
            priority_max: 3,
            max_length: Some(3),
            ..Default::default()
        },
        0,
    );
    let mut settled = Vec::new();
    for (m, p) in [(0, 2), (1, 1), (2, 1)] {
        q.publish_prioritized(m, 1, p, 0, None, None, &mut settled)
            .unwrap();
    }
    // Full: a 3 pushes out the oldest 1; a 0, lower than everything held, is itself dropped.
    q.publish_prioritized(3, 1, 3, 0, None, None, &mut settled)
        .unwrap();
    q.publish_prioritized(4, 1, 0, 0, None, None, &mut settled)
        .unwrap();
    let dropped: Vec<_> = settled.iter().map(|s| (s.seq, s.reason)).collect();
    assert_eq!(
        dropped,
        [(1, SettleReason::Dropped), (4, SettleReason::Dropped)]
    );
    assert_eq!(q.ready.in_order(), [(3, 3), (2, 0), (1, 2)]);
}

#[test]
fn expiry_sweeps_every_level_and_holds_stop_a_priority_queue_at_its_head() {
    let mut q = Queue::new(
        QueuePolicy {
            priority_max: 2,
            message_ttl_ms: Some(100),
            ..Default::default()
        },
        0,
    );
    let mut settled = Vec::new();
    q.publish_prioritized(0, 1, 0, 1_000, None, None, &mut settled)
        .unwrap(); // expires at 1_100
    q.publish_prioritized(1, 1, 2, 1_050, None, None, &mut settled)
        .unwrap(); // 1_150: a live head of a higher level does not shield level 0
    q.expire(1_120, &mut settled);
    assert_eq!(
        settled
            .iter()
            .map(|s| (s.seq, s.reason))
            .collect::<Vec<_>>(),
        [(0, SettleReason::Expired)]
    );
    assert_eq!(q.stats().ready, 1);

    // Held from seq 3 on (not durable yet): a held high-priority message has not arrived, so
    // the older low-priority one goes meanwhile; a newer one behind the hold waits too.
    q.publish_prioritized(2, 1, 0, 1_120, None, None, &mut settled)
        .unwrap();
    q.publish_prioritized(3, 1, 2, 1_120, None, None, &mut settled)
        .unwrap();
    q.publish_prioritized(4, 1, 0, 1_120, None, None, &mut settled)
        .unwrap();
    q.get(9, true, 1_120, &mut settled).unwrap(); // seq 1, before the hold
    q.set_hold(Some(3));
    assert_eq!(q.get(9, true, 1_120, &mut settled).map(|d| d.seq), Some(2));
    assert!(
        q.get(9, true, 1_120, &mut settled).is_none(),
        "3 and 4 held"
    );
    q.set_hold(None);
    let order: Vec<_> = std::iter::from_fn(|| q.get(9, true, 1_120, &mut settled))
        .map(|d| d.seq)
        .collect();
    assert_eq!(order, [3, 4]);
}

#[test]
fn a_queue_counts_what_it_did_and_the_bytes_it_has_out() {
    let policy = QueuePolicy {
        max_length: Some(5),
        overflow: Overflow::DropHead,
        message_ttl_ms: Some(100),
        ..Default::default()
    };
    let mut q = Queue::new(policy, 0);
    let mut settled = publish_n(&mut q, 7, 0);
    assert_eq!(settled.len(), 2, "two heads dropped over max_length");
    q.add_consumer(1, 3, false).unwrap();
    let mut out = Vec::new();
    q.dispatch(0, usize::MAX, &mut out, &mut settled);
    assert_eq!(q.counts().bytes_unacked, 30);
    q.ack(1, out[0].seq).unwrap();
    q.nack(1, out[1].seq, true, &mut settled).unwrap();
    let taken = q.take(1, out[2].seq).unwrap();
    assert_eq!(
        q.counts().bytes_unacked,
        0,
        "a taken delivery is out of the queue"
    );
    q.put_back(taken, false, &mut settled);
    assert_eq!(q.counts().bytes_unacked, 10, "put back: outstanding again");
    let taken = q.take(1, out[2].seq).unwrap();
    q.finish(taken, true);
    q.remove_consumer(1);
    let mut got = q.get(2, true, 0, &mut settled).unwrap();
    assert_eq!(got.delivery_count, 2, "the nacked one, redelivered");
    got = q.get(2, false, 0, &mut settled).unwrap();
    q.release(2, &mut settled);
    assert_eq!(q.counts().bytes_unacked, 0, "released");
    let _ = got;
    q.expire(1_000, &mut settled);
    let c = q.counts();
    assert_eq!(
        (c.published, c.delivered, c.redelivered, c.acked, c.nacked),
        (7, 5, 1, 3, 1),
        "{c:?}"
    );
    assert_eq!((c.dropped, c.expired, c.dead_lettered), (2, 2, 0), "{c:?}");
    let mut q: Queue<u64> = Queue::new(QueuePolicy::default(), 0);
    let seq = q.publish(0, 10, 0, None, None, &mut Vec::new()).unwrap();
    assert!(q.retract_newest(seq));
    assert_eq!(
        q.counts().published,
        0,
        "a retracted publish was never accepted"
    );
}
