//! The queue host's rules, each tested on its own, without a runtime.

use super::*;
use bytes::Bytes;
use weir_protocol::wire::DeathReason;

const A: ConnRef = ConnRef { shard: 0, conn: 1 };
const B: ConnRef = ConnRef { shard: 1, conn: 2 };

fn declare(name: &str) -> Declare {
    Declare {
        name: name.into(),
        durable: true,
        ..Default::default()
    }
}

fn msg(body: &'static [u8]) -> Rc<Stored> {
    Rc::new(Stored::new(
        Bytes::from_static(body),
        String::new(),
        "q".into(),
        true,
        None,
    ))
}

#[test]
fn declare_is_idempotent_and_a_mismatch_is_refused() {
    let mut h = QueueHost::new(0);
    h.declare(A, declare("q"), 0).unwrap();
    h.declare(B, declare("q"), 0).unwrap();
    let e = h
        .declare(
            A,
            Declare {
                auto_delete: true,
                ..declare("q")
            },
            0,
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::PreconditionFailed);
    assert_eq!(
        h.declare(
            A,
            Declare {
                passive: true,
                ..declare("nope")
            },
            0
        )
        .unwrap_err()
        .code,
        ErrorCode::NotFound
    );
}

#[test]
fn an_exclusive_queue_is_its_connections_alone_and_goes_with_it() {
    let mut h = QueueHost::new(0);
    h.declare(
        A,
        Declare {
            exclusive: true,
            ..declare("mine")
        },
        0,
    )
    .unwrap();
    // Others may publish to it (a reply queue), but not consume, inspect or delete it.
    h.publish(B, "mine", msg(b"x"), None, 0).unwrap();
    assert_eq!(
        h.consume(B, "mine", "t", 1, false, false).unwrap_err().code,
        ErrorCode::ResourceLocked
    );
    assert_eq!(
        h.info(B, "mine", 0).unwrap_err().code,
        ErrorCode::ResourceLocked
    );
    h.publish(A, "mine", msg(b"x"), None, 0).unwrap();
    h.connection_closed(A);
    assert_eq!(h.info(A, "mine", 0).unwrap_err().code, ErrorCode::NotFound);
}

#[test]
fn an_exclusive_consume_is_refused_on_a_queue_with_consumers() {
    let mut h = QueueHost::new(0);
    h.declare(A, declare("q"), 0).unwrap();
    h.consume(A, "q", "first", 1, false, false).unwrap();
    let e = h.consume(B, "q", "solo", 1, false, true).unwrap_err();
    assert_eq!(e.code, ErrorCode::ResourceLocked);
    assert!(e.message.contains("'q'"), "{}", e.message);
    assert_eq!(h.info(A, "q", 0).unwrap().consumers, 1, "nothing changed");
}

#[test]
fn an_exclusive_consumer_keeps_others_out_until_it_is_cancelled() {
    let mut h = QueueHost::new(0);
    h.declare(A, declare("q"), 0).unwrap();
    let solo = h.consume(A, "q", "solo", 1, false, true).unwrap();
    // Another connection, the same connection, exclusive or not: all refused, nothing changes.
    for (conn, tag, exclusive) in [(B, "b", false), (B, "b", true), (A, "a2", false)] {
        let e = h.consume(conn, "q", tag, 1, false, exclusive).unwrap_err();
        assert_eq!(
            e.code,
            ErrorCode::ResourceLocked,
            "{conn:?} {tag} {exclusive}"
        );
        assert!(
            e.message.contains("'q'") && e.message.contains("exclusive"),
            "{}",
            e.message
        );
    }
    assert_eq!(h.info(A, "q", 0).unwrap().consumers, 1);
    h.cancel(A, "q", solo).unwrap();
    h.consume(B, "q", "b", 1, false, false).unwrap();
}

#[test]
fn an_exclusive_consumer_lets_others_in_when_its_connection_closes() {
    let mut h = QueueHost::new(0);
    h.declare(A, declare("q"), 0).unwrap();
    h.consume(B, "q", "solo", 1, false, true).unwrap();
    assert_eq!(
        h.consume(A, "q", "a", 1, false, false).unwrap_err().code,
        ErrorCode::ResourceLocked
    );
    h.connection_closed(B);
    h.consume(A, "q", "a", 1, false, true).unwrap();
}

#[test]
fn deliveries_go_to_the_consumers_connection_and_come_back_when_it_dies() {
    let mut h = QueueHost::new(0);
    h.declare(A, declare("q"), 0).unwrap();
    for _ in 0..3 {
        h.publish(A, "q", msg(b"m"), None, 0).unwrap();
    }
    let c = h.consume(B, "q", "ctag", 2, false, false).unwrap();
    let mut out = Vec::new();
    h.take_deliveries(0, 100, &mut out);
    assert_eq!(out.len(), 2, "prefetch 2");
    assert!(out.iter().all(|o| o.to == B && &*o.consumer_tag == "ctag"));
    h.settle(B, "q", c, out[0].delivery.seq, true, false)
        .unwrap();
    assert_eq!(
        h.settle(B, "q", c, out[0].delivery.seq, true, false)
            .unwrap_err()
            .code,
        ErrorCode::UnknownDeliveryTag
    );
    h.connection_closed(B);
    let info = h.info(A, "q", 0).unwrap();
    assert_eq!(
        (info.messages_ready, info.messages_unacked, info.consumers),
        (2, 0, 0)
    );
    h.consume(A, "q", "again", 10, false, false).unwrap();
    out.clear();
    h.take_deliveries(0, 100, &mut out);
    assert_eq!(
        out.iter()
            .map(|o| o.delivery.delivery_count)
            .collect::<Vec<_>>(),
        vec![2, 1]
    );
}

#[test]
fn an_auto_delete_queue_goes_with_its_last_consumer() {
    let mut h = QueueHost::new(0);
    h.declare(
        A,
        Declare {
            auto_delete: true,
            ..declare("tmp")
        },
        0,
    )
    .unwrap();
    let c = h.consume(A, "tmp", "t", 1, false, false).unwrap();
    h.cancel(A, "tmp", c).unwrap();
    assert_eq!(h.info(A, "tmp", 0).unwrap_err().code, ErrorCode::NotFound);
}

#[test]
fn delete_if_unused_and_if_empty_are_preconditions() {
    let mut h = QueueHost::new(0);
    h.declare(A, declare("q"), 0).unwrap();
    h.publish(A, "q", msg(b"m"), None, 0).unwrap();
    assert_eq!(
        h.delete(A, "q", false, true).unwrap_err().code,
        ErrorCode::PreconditionFailed
    );
    h.consume(B, "q", "t", 1, false, false).unwrap();
    assert_eq!(
        h.delete(A, "q", true, false).unwrap_err().code,
        ErrorCode::PreconditionFailed
    );
    let (messages, cancelled) = h.delete(A, "q", false, false).unwrap();
    assert_eq!(messages, 1);
    assert_eq!(
        cancelled,
        vec![Cancelled {
            to: B,
            consumer_tag: "t".into(),
            message: "queue 'q' was deleted".into()
        }]
    );
}

#[test]
fn list_pages_in_name_order() {
    let mut h = QueueHost::new(0);
    for n in ["b", "a", "c", "x.1"] {
        h.declare(A, declare(n), 0).unwrap();
    }
    let names =
        |v: Vec<wire::QueueInfoT>| v.into_iter().map(|i| i.name.unwrap()).collect::<Vec<_>>();
    assert_eq!(names(h.list("", "", 2, 0)), vec!["a", "b"]);
    assert_eq!(names(h.list("", "b", 10, 0)), vec!["c", "x.1"]);
    assert_eq!(names(h.list("x.", "", 10, 0)), vec!["x.1"]);
}

#[test]
fn a_cancelled_consumers_deliveries_stay_ackable_until_its_connection_closes() {
    let mut h = QueueHost::new(0);
    h.declare(A, declare("q"), 0).unwrap();
    for _ in 0..3 {
        h.publish(A, "q", msg(b"m"), None, 0).unwrap();
    }
    let c = h.consume(B, "q", "t", 2, false, false).unwrap();
    let mut out = Vec::new();
    h.take_deliveries(0, 100, &mut out);
    h.cancel(B, "q", c).unwrap();
    h.settle(B, "q", c, out[0].delivery.seq, true, false)
        .unwrap();
    let info = h.info(A, "q", 0).unwrap();
    assert_eq!(
        (info.messages_ready, info.messages_unacked, info.consumers),
        (1, 1, 0)
    );
    h.connection_closed(B);
    let info = h.info(A, "q", 0).unwrap();
    assert_eq!(
        (info.messages_ready, info.messages_unacked),
        (2, 0),
        "released with its connection"
    );
}

#[test]
fn rejected_and_expired_messages_become_dead_letters_not_drops() {
    let mut h = QueueHost::new(0);
    let mut d = declare("src");
    d.arguments.dead_letter_exchange = Some("dlx".into());
    d.arguments.dead_letter_routing_key = Some("failed".into());
    d.arguments.message_ttl_ms = Some(100);
    h.declare(A, d, 0).unwrap();
    h.declare(A, declare("plain"), 0).unwrap();
    h.publish(A, "src", msg(b"r"), None, 0).unwrap();
    let c = h.consume(A, "src", "t", 1, false, false).unwrap();
    let mut out = Vec::new();
    h.take_deliveries(0, 10, &mut out);
    assert_eq!(out.len(), 1);
    h.settle(A, "src", c, out[0].delivery.seq, false, false)
        .unwrap();
    let dead = h.take_dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].exchange.as_str(), dead[0].routing_key.as_deref()),
        ("dlx", Some("failed"))
    );
    assert_eq!((h.dead_lettered, h.dropped), (1, 0));

    // Expiry without anyone consuming: the timer's `expire`, at the deadline and not before.
    h.cancel(A, "src", c).unwrap();
    h.publish(A, "src", msg(b"e"), None, 1_000).unwrap();
    h.publish(A, "plain", msg(b"p"), Some(50), 1_000).unwrap();
    h.expire(1_049);
    assert!(h.take_dead_letters().is_empty());
    h.expire(1_100);
    assert_eq!(
        h.take_dead_letters().len(),
        1,
        "src's message, dead-lettered"
    );
    assert_eq!(
        h.dropped, 1,
        "plain's message expired, with no dead-letter exchange: dropped"
    );
    assert_eq!(h.dead_lettered, 2);
}

#[test]
fn a_journaled_dead_letters_settle_record_waits_until_its_copy_is_done_with() {
    let mut h = QueueHost::new(0);
    let mut d = declare("src");
    d.arguments.dead_letter_exchange = Some("dlx".into());
    h.declare(A, d.clone(), 0).unwrap();
    let seq = h.publish(A, "src", msg(b"r"), None, 0).unwrap();
    let c = h.consume(A, "src", "t", 1, false, false).unwrap();
    let mut out = Vec::new();
    h.take_deliveries(0, 10, &mut out);
    // A nack without requeue needs no record first: the settlement's record waits for the copy.
    assert_eq!(
        h.settle_plan(A, "src", c, seq, false, false).unwrap(),
        SettlePlan::Now
    );
    h.settle(A, "src", c, seq, false, false).unwrap();
    let _ = h.take_journal_work();
    let dead = h.take_dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].settle, dead[0].why),
        (Some(seq), DeathReason::Rejected)
    );
    assert!(
        h.take_journal_work().settles.is_empty(),
        "not settled in the journal before its copy is confirmed: a crash now keeps the original"
    );
    h.finish_dead_letters(dead);
    assert_eq!(
        h.take_journal_work().settles,
        vec![(Rc::from("src"), seq, SettleReason::DeadLettered)]
    );

    // The queue deleted and declared again meanwhile: the old incarnation's settle record must
    // not settle the new one's message of the same sequence number.
    let seq = h.publish(A, "src", msg(b"s"), None, 0).unwrap();
    let mut out = Vec::new();
    h.take_deliveries(0, 10, &mut out);
    h.settle(A, "src", c, seq, false, false).unwrap();
    let dead = h.take_dead_letters();
    h.delete(A, "src", false, false).unwrap();
    h.declare(A, d, 0).unwrap();
    let _ = h.take_journal_work();
    h.finish_dead_letters(dead);
    assert!(h.take_journal_work().settles.is_empty());
}

/// A message out of memory costs its queue entry and nothing else: no heap allocation (the
/// entry lives in the queue's `VecDeque`), a fixed size asserted here so growth is a decision.
#[test]
fn a_cold_message_costs_one_inline_entry() {
    assert_eq!(std::mem::size_of::<MsgRef>(), 16);
    assert!(
        crate::broker::queue::entry_size::<MsgRef>() <= 48,
        "{}",
        crate::broker::queue::entry_size::<MsgRef>()
    );
}

fn bounded(queues: u32, messages: u64) -> QueueHost {
    let mut h = QueueHost::new(0);
    h.set_limits(HostLimits {
        queues_per_shard_max: queues,
        queued_messages_max: messages,
    });
    h
}

#[test]
fn a_declare_past_queues_per_shard_max_is_refused_and_a_redeclare_is_not() {
    let mut h = bounded(2, u64::MAX);
    h.declare(A, declare("a"), 0).unwrap();
    h.declare(A, declare("b"), 0).unwrap();
    let e = h.declare(A, declare("c"), 0).unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.message.contains("queues_per_shard_max = 2"), "{e:?}");
    h.declare(B, declare("a"), 0).unwrap();
    h.delete(A, "a", false, false).unwrap();
    h.declare(A, declare("c"), 0).unwrap();
}

#[test]
fn the_index_counts_every_entry_until_it_leaves_and_refuses_past_its_limit() {
    let mut h = bounded(10, 3);
    h.declare(A, declare("a"), 0).unwrap();
    h.declare(A, declare("b"), 0).unwrap();
    for _ in 0..2 {
        h.index_room(1).unwrap();
        h.publish(A, "a", msg(b"m"), None, 0).unwrap();
    }
    h.index_room(1).unwrap();
    h.publish(A, "b", msg(b"m"), None, 0).unwrap();
    let e = h.index_room(1).unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(e.message.contains("queued_messages_max = 3"), "{e:?}");
    // A Get holds its entry outstanding; its ack lets it go.
    let (d, _) = h.get(A, "a", false, 0).unwrap();
    assert_eq!(h.index_entries(), 3);
    h.settle(A, "a", A.conn, d.unwrap().seq, true, false)
        .unwrap();
    assert_eq!(h.index_entries(), 2);
    h.purge(A, "a").unwrap();
    assert_eq!(h.index_entries(), 1);
    h.delete(A, "b", false, false).unwrap();
    assert_eq!(h.index_entries(), 0);
    h.index_room(3).unwrap();
}

#[test]
fn a_purge_in_steps_settles_each_step_and_says_when_it_is_done() {
    let mut h = QueueHost::new(0);
    h.declare(A, declare("q"), 0).unwrap();
    for _ in 0..5 {
        h.publish(A, "q", msg(b"m"), None, 0).unwrap();
    }
    h.take_journal_work();
    assert_eq!(h.purge_step(A, "q", 2).unwrap(), (2, true));
    assert_eq!(h.take_journal_work().settles.len(), 2);
    assert_eq!(h.purge_step(A, "q", 2).unwrap(), (2, true));
    assert_eq!(h.purge_step(A, "q", 2).unwrap(), (1, false));
    assert_eq!(h.take_journal_work().settles.len(), 3);
    assert_eq!(h.index_entries(), 0);
}

#[test]
fn consumers_are_listed_in_queue_and_tag_order_a_page_after_another() {
    let mut h = QueueHost::new(3);
    h.declare(A, declare("a"), 0).unwrap();
    let mut arguments = wire::QueueArgumentsT::default();
    arguments.single_active_consumer = true;
    let sac = Declare {
        arguments,
        ..declare("b")
    };
    h.declare(A, sac, 0).unwrap();
    h.declare(A, declare("other"), 0).unwrap();
    h.consume_at(A, "a", "z", 5, false, false, 2, 0).unwrap();
    h.consume(B, "a", "m", 1, true, false).unwrap();
    h.consume(A, "b", "first", 1, false, false).unwrap();
    h.consume(B, "b", "next", 1, false, false).unwrap();
    h.consume(A, "other", "x", 1, false, false).unwrap();
    let key = |v: &[wire::ConsumerInfoT]| {
        v.iter()
            .map(|c| (c.queue.clone().unwrap(), c.tag.clone().unwrap()))
            .collect::<Vec<_>>()
    };
    let all = h.list_consumers("", "", "", 100);
    assert_eq!(all.len(), 5);
    let first = h.list_consumers("a", "", "", 2);
    assert_eq!(
        key(&first),
        vec![("a".into(), "m".into()), ("a".into(), "z".into())]
    );
    let z = &first[1];
    assert_eq!(
        (z.shard, z.connection, z.prefetch, z.priority),
        (3, 1, 5, 2)
    );
    assert!(!z.auto_ack && z.active);
    assert!(first[0].auto_ack);
    let rest = h.list_consumers("", "a", "z", 10);
    assert_eq!(
        key(&rest),
        vec![
            ("b".into(), "first".into()),
            ("b".into(), "next".into()),
            ("other".into(), "x".into())
        ]
    );
    assert!(
        rest[0].active && !rest[1].active,
        "the waiting single active one"
    );
    assert_eq!(
        key(&h.list_consumers("", "b", "first", 1)),
        vec![("b".into(), "next".into())]
    );
}
