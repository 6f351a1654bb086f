//! Black-box tests of queues over the wire: declare, publish with confirms, consume with prefetch
//! and acks, redelivery when a consumer's connection dies, and the same across shards.

mod common;

use common::{queue_on, temp_dir, Broker};
use weir_protocol::wire::{self, BodyT, ErrorCode};

fn bodies(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("message {i}").into_bytes())
        .collect()
}

fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(|b| b.as_slice()).collect()
}

#[test]
fn declare_is_idempotent_and_refuses_mismatches_and_reserved_names() {
    let broker = Broker::start(&temp_dir("q-declare"), &[]);
    let mut c = broker.connect();
    c.handshake();
    let info = c.declare("orders");
    assert_eq!(info.name.as_deref(), Some("orders"));
    assert_eq!(
        usize::from(info.shard),
        usize::from(weir::mesh::types::placement(
            "orders",
            broker.shard_ports.len() as u16
        ))
    );
    assert_eq!(c.declare("orders").messages_ready, 0);

    let mut d = wire::DeclareQueueT::default();
    d.name = Some("orders".into());
    d.auto_delete = true;
    d.durable = true;
    assert!(
        matches!(c.declare_with(d), BodyT::Error(e) if e.code == ErrorCode::PreconditionFailed)
    );

    let mut d = wire::DeclareQueueT::default();
    d.name = Some("weir.mine".into());
    assert!(matches!(c.declare_with(d), BodyT::Error(e) if e.code == ErrorCode::AccessRefused));

    let mut d = wire::DeclareQueueT::default();
    d.name = Some("missing".into());
    d.passive = true;
    assert!(matches!(c.declare_with(d), BodyT::Error(e) if e.code == ErrorCode::NotFound));

    let BodyT::QueueInfo(named) = c.declare_with(wire::DeclareQueueT::default()) else {
        panic!()
    };
    assert!(
        named.name.unwrap().starts_with("weir.gen-"),
        "server-named queue"
    );
}

#[test]
fn publishes_are_confirmed_and_delivered_in_order_within_prefetch() {
    let broker = Broker::start(&temp_dir("q-publish"), &[]);
    let mut p = broker.connect();
    p.handshake();
    p.declare("work");
    let msgs = bodies(10);
    p.publish("work", 1, &refs(&msgs), false);
    assert!(p.await_confirms(1, 10).is_empty());
    let BodyT::QueueInfo(i) = p.info("work") else {
        panic!()
    };
    assert_eq!(i.messages_ready, 10);

    let mut c = broker.connect();
    c.handshake();
    c.consume("work", "w1", 4, false);
    let first = c.deliveries(4);
    assert_eq!(
        first.iter().map(|g| g.body.clone()).collect::<Vec<_>>(),
        msgs[..4].to_vec()
    );
    assert!(first
        .iter()
        .all(|g| !g.redelivered && g.delivery_count == 1));
    // Prefetch 4: nothing more until acks. The info round trip proves nothing else was sent.
    let BodyT::QueueInfo(i) = c.info("work") else {
        panic!("a delivery beyond prefetch arrived")
    };
    assert_eq!((i.messages_ready, i.messages_unacked), (6, 4));
    c.ack(&first.iter().map(|g| g.delivery_tag).collect::<Vec<_>>());
    let rest = c.deliveries(4);
    assert_eq!(
        rest.iter().map(|g| g.body.clone()).collect::<Vec<_>>(),
        msgs[4..8].to_vec()
    );
}

#[test]
fn unknown_queues_are_refused_by_sequence_and_mandatory_ones_return() {
    let broker = Broker::start(&temp_dir("q-unknown"), &[]);
    let mut p = broker.connect();
    p.handshake();
    p.publish("nowhere", 1, &[b"a", b"b"], false);
    let f = p.recv().unwrap();
    let BodyT::Error(e) = f.body else {
        panic!("{f:?}")
    };
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(e.sequences, Some(vec![wire::RangeT { first: 1, last: 2 }]));
    assert!(!e.close);

    p.publish("nowhere", 3, &[b"c"], true);
    let others = p.await_confirms(3, 3);
    assert!(
        matches!(&others[..], [f] if matches!(&f.body, BodyT::Return(r) if r.entries[0].sequence == 3 && r.entries[0].code == ErrorCode::NoRoute)),
        "{others:?}"
    );
}

#[test]
fn competing_consumers_share_and_a_dead_consumers_messages_are_redelivered() {
    let broker = Broker::start(&temp_dir("q-compete"), &[]);
    let mut p = broker.connect();
    p.handshake();
    p.declare("jobs");
    let mut a = broker.connect();
    a.handshake();
    a.consume("jobs", "a", 2, false);
    let mut b = broker.connect();
    b.handshake();
    b.consume("jobs", "b", 2, false);
    let msgs = bodies(4);
    p.publish("jobs", 1, &refs(&msgs), false);
    p.await_confirms(1, 4);
    let got_a = a.deliveries(2);
    let got_b = b.deliveries(2);
    let mut all: Vec<_> = got_a.iter().chain(&got_b).map(|g| g.body.clone()).collect();
    all.sort();
    assert_eq!(
        all,
        {
            let mut m = msgs.clone();
            m.sort();
            m
        },
        "each message to exactly one consumer"
    );

    // A dies holding its two: they go to B, marked redelivered, as B frees room.
    drop(a);
    b.ack(&got_b.iter().map(|g| g.delivery_tag).collect::<Vec<_>>());
    let again = b.deliveries(2);
    let mut bodies_again: Vec<_> = again.iter().map(|g| g.body.clone()).collect();
    bodies_again.sort();
    let mut bodies_a: Vec<_> = got_a.iter().map(|g| g.body.clone()).collect();
    bodies_a.sort();
    assert_eq!(bodies_again, bodies_a);
    assert!(
        again.iter().all(|g| g.redelivered && g.delivery_count == 2),
        "{again:?}"
    );
}

#[test]
fn nack_requeues_reject_drops_and_get_pulls_one() {
    let broker = Broker::start(&temp_dir("q-nack"), &[]);
    let mut c = broker.connect();
    c.handshake();
    c.declare("q");
    c.publish("q", 1, &[b"one", b"two"], false);
    c.await_confirms(1, 2);

    let mut g = wire::GetT::default();
    g.queue = "q".into();
    let BodyT::GetOk(ok) = c.request(BodyT::Get(Box::new(g.clone()))) else {
        panic!()
    };
    let d = ok.delivery.expect("a message");
    assert_eq!(ok.messages_ready, 1);
    let mut n = wire::NackT::default();
    n.ranges = vec![wire::RangeT {
        first: d.delivery_tag,
        last: d.delivery_tag,
    }];
    n.requeue = true;
    assert!(matches!(c.request(BodyT::Nack(Box::new(n))), BodyT::Ok(_)));

    let BodyT::GetOk(ok) = c.request(BodyT::Get(Box::new(g.clone()))) else {
        panic!()
    };
    let d = ok.delivery.expect("the requeued message comes first");
    assert!(d.redelivered);
    let m = weir_protocol::verify_message(&d.message, &weir_protocol::WireLimits::DEFAULT)
        .unwrap()
        .unpack();
    assert_eq!(m.body.as_deref(), Some(&b"one"[..]));
    let mut r = wire::RejectT::default();
    r.delivery_tag = d.delivery_tag;
    r.requeue = false;
    assert!(matches!(
        c.request(BodyT::Reject(Box::new(r))),
        BodyT::Ok(_)
    ));
    let BodyT::QueueInfo(i) = c.info("q") else {
        panic!()
    };
    assert_eq!(
        (i.messages_ready, i.messages_unacked),
        (1, 0),
        "the rejected message is gone"
    );

    let mut a = wire::AckT::default();
    a.ranges = vec![wire::RangeT {
        first: 999,
        last: 999,
    }];
    assert!(
        matches!(c.request(BodyT::Ack(Box::new(a))), BodyT::Error(e) if e.code == ErrorCode::UnknownDeliveryTag)
    );

    let mut p = wire::PurgeQueueT::default();
    p.name = "q".into();
    assert!(
        matches!(c.request(BodyT::PurgeQueue(Box::new(p))), BodyT::QueuePurged(p) if p.messages == 1)
    );
    let mut del = wire::DeleteQueueT::default();
    del.name = "q".into();
    assert!(matches!(
        c.request(BodyT::DeleteQueue(Box::new(del))),
        BodyT::QueueDeleted(_)
    ));
    assert!(matches!(c.info("q"), BodyT::Error(e) if e.code == ErrorCode::NotFound));
}

#[test]
fn a_queue_on_another_shard_works_through_the_mesh() {
    let broker = Broker::start(&temp_dir("q-mesh"), &["--cpus", "0,1"]);
    let queue = queue_on(1, 2, "remote");
    let mut p = broker.connect_shard(0);
    assert_eq!(p.handshake().shard, 0);
    let info = p.declare(&queue);
    assert_eq!(info.shard, 1);
    let msgs = bodies(50);
    p.publish(&queue, 1, &refs(&msgs), false);
    p.await_confirms(1, 50);

    let mut c = broker.connect_shard(0);
    c.handshake();
    c.consume(&queue, "far", 100, false);
    let got = c.deliveries(50);
    assert_eq!(got.iter().map(|g| g.body.clone()).collect::<Vec<_>>(), msgs);
    c.ack(&got.iter().map(|g| g.delivery_tag).collect::<Vec<_>>());
    let BodyT::QueueInfo(i) = c.info(&queue) else {
        panic!()
    };
    assert_eq!((i.messages_ready, i.messages_unacked), (0, 0));

    let mut l = wire::ListQueuesT::default();
    l.prefix = Some("remote".into());
    let BodyT::QueueList(list) = c.request(BodyT::ListQueues(Box::new(l))) else {
        panic!()
    };
    assert_eq!(
        list.queues
            .unwrap()
            .iter()
            .map(|q| q.name.clone().unwrap())
            .collect::<Vec<_>>(),
        vec![queue]
    );
}

#[test]
fn an_exclusive_queue_belongs_to_its_connection() {
    let broker = Broker::start(&temp_dir("q-exclusive"), &[]);
    let mut owner = broker.connect();
    owner.handshake();
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("private".into());
    d.exclusive = true;
    d.durable = false;
    assert!(matches!(owner.declare_with(d), BodyT::QueueInfo(i) if i.exclusive));
    let mut other = broker.connect();
    other.handshake();
    // Another connection may publish to it (that is how replies reach a private reply queue)
    // but not consume from it.
    other.publish("private", 1, &[b"x"], false);
    other.await_confirms(1, 1);
    let mut c = wire::ConsumeT::default();
    c.queue = "private".into();
    assert!(
        matches!(other.request(BodyT::Consume(Box::new(c))), BodyT::Error(e) if e.code == ErrorCode::ResourceLocked)
    );
}

#[test]
fn status_reports_shards_queues_depths_and_the_journal() {
    let broker = Broker::start(&temp_dir("q-status"), &["--cpus", "0,1"]);
    let mut c = broker.connect();
    c.handshake();
    let (a, b) = (queue_on(0, 2, "st"), queue_on(1, 2, "st"));
    c.declare(&a);
    c.declare(&b);
    c.publish(&a, 1, &[b"1", b"2", b"3"], false);
    c.publish(&b, 4, &[b"4"], false);
    c.await_confirms(1, 4);
    let BodyT::Status(st) = c.request(BodyT::GetStatus(Box::default())) else {
        panic!("no Status")
    };
    assert_eq!(st.shard_count, 2);
    assert_eq!(st.queues, 2);
    assert!(st.connections >= 1);
    assert_eq!(
        st.broker_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let counters: std::collections::HashMap<String, u64> = st
        .counters
        .unwrap()
        .into_iter()
        .map(|c| (c.name, c.value))
        .collect();
    assert_eq!(counters["shard.0.messages_ready"], 3);
    assert_eq!(counters["shard.1.messages_ready"], 1);
    assert!(counters["shard.0.journal.commits"] >= 1, "{counters:?}");
    assert!(
        counters["shard.1.journal.records"] >= 2,
        "a declaration and a message: {counters:?}"
    );
}

#[test]
fn an_auto_delete_queue_goes_when_its_last_consumer_is_cancelled_not_before() {
    let broker = Broker::start(&temp_dir("q-autodelete"), &[]);
    let mut c = broker.connect();
    c.handshake();
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("scratch".into());
    d.auto_delete = true;
    d.durable = false;
    assert!(matches!(c.declare_with(d), BodyT::QueueInfo(i) if i.auto_delete));
    // Never consumed: it stays (auto-delete acts on the last consumer going, not on none).
    assert!(matches!(c.info("scratch"), BodyT::QueueInfo(_)));
    c.consume("scratch", "a", 1, false);
    c.consume("scratch", "b", 1, false);
    for tag in ["a", "b"] {
        let mut cancel = wire::CancelT::default();
        cancel.consumer_tag = tag.into();
        assert!(matches!(
            c.request(BodyT::Cancel(Box::new(cancel))),
            BodyT::Ok(_)
        ));
        let gone = matches!(c.info("scratch"), BodyT::Error(e) if e.code == ErrorCode::NotFound);
        assert_eq!(gone, tag == "b", "after cancelling {tag}");
    }
}

#[test]
fn delayed_messages_past_the_limit_are_refused_and_idempotent_producers_are_honoured() {
    let broker = Broker::start(&temp_dir("q-unserved"), &[]);
    let mut c = broker.connect();
    c.handshake();
    c.declare("q");
    let mut enc = weir_protocol::Encoder::new(weir_protocol::WireLimits::DEFAULT);
    let delayed = enc
        .message(
            &weir_protocol::MessageProps {
                deliver_at_ms: Some(4_000_000_000_000),
                ..Default::default()
            },
            b"later",
        )
        .unwrap();
    let now = enc.message(&Default::default(), b"now").unwrap();
    fn item(sequence: u64, message: &[u8]) -> weir_protocol::PublishItem<'_> {
        weir_protocol::PublishItem {
            sequence,
            exchange: "",
            routing_key: "q",
            mandatory: false,
            message,
        }
    }
    let mut out = bytes::BytesMut::new();
    enc.publish(&mut out, 0, None, true, [item(1, &delayed), item(2, &now)])
        .unwrap();
    c.send_raw(&out);
    let f = c.recv().unwrap();
    let BodyT::Error(e) = f.body else {
        panic!("{f:?}")
    };
    assert_eq!(
        (e.code, e.sequences.clone()),
        (
            ErrorCode::InvalidArgument,
            Some(vec![wire::RangeT { first: 1, last: 1 }])
        )
    );
    assert!(e.message.unwrap().contains("deliver_at_ms"));
    c.await_confirms(2, 2);

    // An idempotent producer's publish is honoured now (tests/exactly_once.rs has the rest):
    // taken once, and its re-send on another connection confirmed as a duplicate.
    let mut out = bytes::BytesMut::new();
    enc.publish(&mut out, 0, Some(7), true, [item(3, &now)])
        .unwrap();
    c.send_raw(&out);
    c.await_confirms(3, 3);
    let mut again = broker.connect();
    again.handshake();
    again.send_raw(&out);
    let f = again.recv().unwrap();
    let BodyT::Confirm(confirm) = f.body else {
        panic!("{f:?}")
    };
    assert_eq!(
        confirm.duplicates,
        Some(vec![wire::RangeT { first: 3, last: 3 }])
    );
    let BodyT::QueueInfo(i) = c.info("q") else {
        panic!()
    };
    assert_eq!(
        i.messages_ready, 2,
        "the message for now and the idempotent one, once"
    );
}

#[test]
fn a_refused_settle_or_reused_sequence_changes_nothing_the_client_can_see() {
    let broker = Broker::start(&temp_dir("q-atomic"), &[]);
    let mut c = broker.connect();
    c.handshake();
    c.declare("q");
    c.publish("q", 1, &[b"one", b"two"], false);
    c.await_confirms(1, 2);

    // 2 again: refused by sequence, the connection goes on and 3 is taken.
    c.publish("q", 2, &[b"two again", b"three"], false);
    let others = c.await_confirms(3, 3);
    let [f] = &others[..] else {
        panic!("{others:?}")
    };
    let BodyT::Error(e) = &f.body else {
        panic!("{f:?}")
    };
    assert_eq!(
        (e.code, e.sequences.clone(), e.close),
        (
            ErrorCode::InvalidArgument,
            Some(vec![wire::RangeT { first: 2, last: 2 }]),
            false
        )
    );
    assert!(
        e.message
            .as_deref()
            .unwrap()
            .contains("publish sequence 2 is not above the last one, 2"),
        "{e:?}"
    );

    let mut g = wire::GetT::default();
    g.queue = "q".into();
    let BodyT::GetOk(ok) = c.request(BodyT::Get(Box::new(g))) else {
        panic!()
    };
    assert_eq!(ok.messages_ready, 2, "two again was not stored");
    let tag = ok.delivery.expect("a message").delivery_tag;

    // A known tag beside an unknown one: the frame is refused whole and the known one is held.
    let mut a = wire::AckT::default();
    a.ranges = [tag, 999]
        .map(|t| wire::RangeT { first: t, last: t })
        .to_vec();
    assert!(
        matches!(c.request(BodyT::Ack(Box::new(a))), BodyT::Error(e) if e.code == ErrorCode::UnknownDeliveryTag && !e.close)
    );
    let BodyT::QueueInfo(i) = c.info("q") else {
        panic!()
    };
    assert_eq!((i.messages_ready, i.messages_unacked), (2, 1));
    c.ack(&[tag]);
    let BodyT::QueueInfo(i) = c.info("q") else {
        panic!()
    };
    assert_eq!((i.messages_ready, i.messages_unacked), (2, 0), "acked once");
}
