use weir_protocol::wire::Body;
use weir_protocol::{samples, FrameDecoder};

/// The time every test runs at: the session never reads a clock, so tests are deterministic.
const NOW_MS: u64 = 1_700_000_000_000;

use super::*;
use crate::broker::routing::ExchangeKind;
use crate::mesh::msg::{PublishItem, PublishOutcome, Pushed, PushedDelivery};
use crate::mesh::types::ExchangeDecl;
use crate::net::command::broker_only;

fn ctx() -> SessionCtx {
    SessionCtx {
        broker_version: "0.1.0",
        shard: 1,
        shard_ports: vec![7001, 7002],
        durability: wire::Durability::Always,
        limits: WireLimits::DEFAULT,
        publishes_in_flight_max: 100,
        prefetch_default: 10,
        prefetch_max: 1000,
        targets_per_message_max: 128,
        delay_ms_max: 1000,
        connection_id: 42,
        started_ms: 0,
        accepted_ms: NOW_MS,
        handshake_timeout_ms: 10_000,
        requests_in_flight_max: 1000,
        consumers_per_connection_max: 1000,
        gets_unacked_max: 1000,
        publish_bytes_in_flight_max: 1 << 20,
        message_copy_bytes_max: 1024,
        outbox_bytes_max: 1 << 20,
        retry_delays_count_max: 3,
    }
}

fn frame(body: BodyT) -> InFrame {
    let mut buf = BytesMut::new();
    Encoder::new(WireLimits::DEFAULT)
        .encode(&weir_protocol::frame(9, body), &mut buf)
        .unwrap();
    FrameDecoder::new(WireLimits::DEFAULT)
        .decode(&mut buf)
        .unwrap()
        .unwrap()
}

fn hello(version: u16) -> InFrame {
    let mut h = wire::HelloT::default();
    h.protocol_version = version;
    frame(BodyT::Hello(Box::new(h)))
}

fn replies(out: &mut BytesMut) -> Vec<wire::FrameT> {
    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    std::iter::from_fn(|| decoder.decode(out).unwrap())
        .map(|f| f.frame().unpack())
        .collect()
}

fn error_of(f: &wire::FrameT) -> (ErrorCode, bool) {
    match &f.body {
        BodyT::Error(e) => (e.code, e.close),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn hello_gets_a_welcome_with_the_shard_layout_and_limits() {
    let mut s = Session::new(ctx(), Rc::default());
    let mut out = BytesMut::new();
    assert_eq!(
        s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut Vec::new()),
        Flow::Continue
    );
    let r = replies(&mut out);
    assert_eq!(r[0].request_id, 9);
    let BodyT::Welcome(w) = &r[0].body else {
        panic!("{:?}", r[0])
    };
    assert_eq!((w.shard, w.shard_count, w.connection_id), (1, 2, 42));
    assert_eq!(w.shard_ports.as_deref(), Some(&[7001, 7002][..]));
    assert_eq!(w.limits.as_ref().unwrap().publishes_in_flight_max, 100);
    assert!(s.is_open());
}

#[test]
fn no_hello_by_the_deadline_is_refused_and_closed() {
    let mut s = Session::new(ctx(), Rc::default());
    let mut out = BytesMut::new();
    let deadline = NOW_MS + 10_000;
    assert_eq!(s.handshake_deadline(), Some(deadline));
    assert_eq!(s.on_tick_at(deadline - 1, &mut out), Flow::Continue);
    assert!(out.is_empty());
    assert_eq!(s.on_tick_at(deadline, &mut out), Flow::Close);
    let r = replies(&mut out);
    assert_eq!(r.len(), 1);
    assert_eq!(error_of(&r[0]), (ErrorCode::ConnectionLimit, true));
    let BodyT::Error(e) = &r[0].body else {
        unreachable!()
    };
    assert_eq!(e.message.as_deref(), Some("no Hello within 10000 ms"));
    // Closing: no second error, no timer.
    assert_eq!(s.handshake_deadline(), None);
    assert_eq!(s.on_tick_at(deadline + 1, &mut out), Flow::Continue);
    assert!(out.is_empty());
}

#[test]
fn after_hello_the_handshake_deadline_is_gone() {
    let mut s = Session::new(ctx(), Rc::default());
    let mut out = BytesMut::new();
    s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
    out.clear();
    assert_eq!(s.handshake_deadline(), None);
    assert_eq!(s.on_tick_at(NOW_MS + 60_000, &mut out), Flow::Continue);
    assert!(out.is_empty());
    assert!(s.is_open());
}

#[test]
fn a_wrong_protocol_version_is_refused_and_closed() {
    let mut s = Session::new(ctx(), Rc::default());
    let mut out = BytesMut::new();
    assert_eq!(
        s.on_frame_at(
            NOW_MS,
            &hello(PROTOCOL_VERSION + 1),
            &mut out,
            &mut Vec::new()
        ),
        Flow::Close
    );
    assert_eq!(
        error_of(&replies(&mut out)[0]),
        (ErrorCode::ProtocolVersion, true)
    );
}

#[test]
fn anything_before_hello_or_a_second_hello_is_refused_and_closed() {
    let mut s = Session::new(ctx(), Rc::default());
    let mut out = BytesMut::new();
    assert_eq!(
        s.on_frame_at(
            NOW_MS,
            &frame(BodyT::Ping(Box::default())),
            &mut out,
            &mut Vec::new()
        ),
        Flow::Close
    );
    assert_eq!(
        error_of(&replies(&mut out)[0]),
        (ErrorCode::UnexpectedFrame, true)
    );

    let mut s = Session::new(ctx(), Rc::default());
    s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
    replies(&mut out);
    assert_eq!(
        s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut Vec::new()),
        Flow::Close
    );
    assert_eq!(
        error_of(&replies(&mut out)[0]),
        (ErrorCode::UnexpectedFrame, true)
    );
}

#[test]
fn every_frame_is_routed_or_answered_and_broker_only_frames_close() {
    for body in samples::bodies() {
        let kind = body.body_type();
        if matches!(kind, Body::Hello | Body::Close) {
            continue;
        }
        let mut s = Session::new(ctx(), Rc::default());
        let mut out = BytesMut::new();
        s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
        replies(&mut out);
        let mut outbound = Vec::new();
        let flow = s.on_frame_at(NOW_MS, &frame(body), &mut out, &mut outbound);
        let r = replies(&mut out);
        if !outbound.is_empty() {
            // Served by the queue's owning shard: nothing is answered until it replies.
            assert!(r.is_empty(), "{kind:?} answered before its owner replied");
            assert_eq!(flow, Flow::Continue);
            continue;
        }
        assert_eq!(r.len(), 1, "{kind:?} got {} replies", r.len());
        if kind == Body::Publish {
            // Publishes are answered by sequence, not request id: the sample is an idempotent
            // producer's (served, so not what is refused) with delivery times past this
            // session's delay_ms_max, so both its entries are refused in one error for that.
            let BodyT::Error(e) = &r[0].body else {
                panic!("{:?}", r[0])
            };
            assert_eq!((r[0].request_id, e.code), (0, ErrorCode::InvalidArgument));
            let message = e.message.as_deref().unwrap_or_default();
            assert!(message.starts_with("deliver_at_ms"), "{message}");
            assert_eq!(
                e.sequences.as_deref(),
                Some(&[wire::RangeT { first: 1, last: 2 }][..])
            );
            continue;
        }
        assert_eq!(r[0].request_id, 9, "{kind:?}");
        if broker_only(kind) {
            assert_eq!(
                (flow, error_of(&r[0])),
                (Flow::Close, (ErrorCode::UnexpectedFrame, true)),
                "{kind:?}"
            );
        } else if kind == Body::Ping {
            assert!(matches!(r[0].body, BodyT::Pong(ref p) if p.payload == 123_456_789));
        } else {
            assert_eq!(flow, Flow::Continue, "{kind:?}");
        }
    }
}

#[test]
fn close_is_answered_then_closes() {
    let mut s = Session::new(ctx(), Rc::default());
    let mut out = BytesMut::new();
    s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
    replies(&mut out);
    assert_eq!(
        s.on_frame_at(
            NOW_MS,
            &frame(BodyT::Close(Box::default())),
            &mut out,
            &mut Vec::new()
        ),
        Flow::Close
    );
    assert!(matches!(replies(&mut out)[0].body, BodyT::Ok(_)));
}

/// A session that said hello, with a routing copy holding a topic exchange `x` bound to
/// `queues`.
fn routed_session(queues: &[&str]) -> Session {
    use crate::broker::routing::RoutingTable;
    let mut table = RoutingTable::new();
    table
        .declare_exchange(ExchangeDecl {
            name: "x".into(),
            kind: ExchangeKind::Topic,
            durable: true,
            auto_delete: false,
        })
        .unwrap();
    for q in queues {
        table
            .bind(Binding {
                exchange: "x".into(),
                queue: q.to_string(),
                key: "a.#".into(),
                durable: true,
            })
            .unwrap();
    }
    let copy = RoutingCopy::default();
    *copy.table.borrow_mut() = table;
    let mut s = Session::new(ctx(), Rc::new(copy));
    let mut out = BytesMut::new();
    s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
    s
}

fn publish_to_x(sequence: u64, key: &str, mandatory: bool) -> InFrame {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let message = enc
        .message(&weir_protocol::MessageProps::default(), b"body")
        .unwrap();
    let mut buf = BytesMut::new();
    let item = weir_protocol::PublishItem {
        sequence,
        exchange: "x",
        routing_key: key,
        mandatory,
        message: &message,
    };
    enc.publish(&mut buf, 0, None, true, [item]).unwrap();
    FrameDecoder::new(WireLimits::DEFAULT)
        .decode(&mut buf)
        .unwrap()
        .unwrap()
}

fn taken(p: &PublishItem, journaled: bool) -> Reply {
    Reply::Published(vec![PublishOutcome {
        sequence: p.sequence,
        confirm: true,
        journaled,
        result: Ok(()),
        returned: None,
        duplicate: false,
    }])
}

#[test]
fn a_message_routed_to_two_shards_is_confirmed_once_both_took_it() {
    let shards = 2;
    let (q0, q1) = (
        (0..)
            .map(|i| format!("q{i}"))
            .find(|q| placement(q, shards) == 0)
            .unwrap(),
        (0..)
            .map(|i| format!("q{i}"))
            .find(|q| placement(q, shards) == 1)
            .unwrap(),
    );
    let mut s = routed_session(&[&q0, &q1, "q-gone-later"]);
    let mut out = BytesMut::new();
    let mut outbound = Vec::new();
    s.on_frame_at(
        NOW_MS,
        &publish_to_x(7, "a.b", false),
        &mut out,
        &mut outbound,
    );
    assert!(
        replies(&mut out).is_empty(),
        "nothing is confirmed before the owners answer"
    );
    // One item per owning shard; the one holding two queues names both (stored once).
    assert_eq!(outbound.len(), 2);
    let items: Vec<PublishItem> = outbound
        .iter()
        .map(|r| match &r.op {
            Op::Publish(items) => items[0].clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let targets: usize = items.iter().map(|i| 1 + i.also.len()).sum();
    assert_eq!(targets, 3);
    assert!(items
        .iter()
        .all(|i| i.bytes == items[0].bytes && i.exchange == "x"));
    s.on_reply_at(
        NOW_MS,
        outbound[0].id,
        taken(&items[0], true),
        &mut out,
        &mut Vec::new(),
    );
    assert!(replies(&mut out).is_empty(), "one part of two");
    s.on_reply_at(
        NOW_MS,
        outbound[1].id,
        taken(&items[1], false),
        &mut out,
        &mut Vec::new(),
    );
    let r = replies(&mut out);
    assert_eq!(r.len(), 1);
    let BodyT::Confirm(c) = &r[0].body else {
        panic!("{:?}", r[0])
    };
    assert_eq!(c.ranges, vec![wire::RangeT { first: 7, last: 7 }]);
    assert_eq!(
        c.durability,
        wire::Durability::Always,
        "journaled on one shard"
    );
}

#[test]
fn unroutable_messages_are_returned_if_mandatory_else_counted_and_both_confirmed() {
    let mut s = routed_session(&["q"]);
    let mut out = BytesMut::new();
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &publish_to_x(7, "b", true), &mut out, &mut outbound);
    assert!(outbound.is_empty());
    let r = replies(&mut out);
    assert!(matches!(r[0].body, BodyT::Return(_)), "{:?}", r[0]);
    assert!(matches!(r[1].body, BodyT::Confirm(_)), "{:?}", r[1]);
    assert_eq!(s.routing.unroutable.get(), 0);
    s.on_frame_at(
        NOW_MS,
        &publish_to_x(8, "b", false),
        &mut out,
        &mut outbound,
    );
    let r = replies(&mut out);
    assert_eq!(r.len(), 1);
    assert!(matches!(r[0].body, BodyT::Confirm(_)), "{:?}", r[0]);
    assert_eq!(s.routing.unroutable.get(), 1);
}

/// A session that said hello.
fn open_session() -> Session {
    let mut s = Session::new(ctx(), Rc::default());
    let mut out = BytesMut::new();
    s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut Vec::new());
    s
}

#[test]
fn an_unknown_exchange_kind_is_refused_and_the_connection_goes_on() {
    let mut d = wire::DeclareExchangeT::default();
    d.name = "x".into();
    d.kind = wire::ExchangeKind(99);
    let declare = frame(BodyT::DeclareExchange(Box::new(d)));

    let mut s = open_session();
    let mut out = BytesMut::new();
    replies(&mut out);
    let mut outbound = Vec::new();
    assert_eq!(
        s.on_frame_at(NOW_MS, &declare, &mut out, &mut outbound),
        Flow::Continue
    );
    assert!(outbound.is_empty());
    let r = replies(&mut out);
    assert_eq!(r[0].request_id, 9);
    assert_eq!(error_of(&r[0]), (ErrorCode::InvalidArgument, false));
    assert!(s.is_open());

    // Before Hello it is just a frame that is not Hello.
    let mut s = Session::new(ctx(), Rc::default());
    assert_eq!(
        s.on_frame_at(NOW_MS, &declare, &mut out, &mut Vec::new()),
        Flow::Close
    );
    assert_eq!(
        error_of(&replies(&mut out)[0]),
        (ErrorCode::UnexpectedFrame, true)
    );
}

/// A `Publish` to queue `q` on the default exchange, one entry per sequence.
fn publish_to_q(sequences: &[u64], props: &weir_protocol::MessageProps) -> InFrame {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let message = enc.message(props, b"body").unwrap();
    let mut buf = BytesMut::new();
    let items = sequences
        .iter()
        .map(|&sequence| weir_protocol::PublishItem {
            sequence,
            exchange: "",
            routing_key: "q",
            mandatory: false,
            message: &message,
        });
    enc.publish(&mut buf, 0, None, true, items).unwrap();
    FrameDecoder::new(WireLimits::DEFAULT)
        .decode(&mut buf)
        .unwrap()
        .unwrap()
}

#[test]
fn a_delivery_time_is_judged_against_the_time_passed_in() {
    let props = weir_protocol::MessageProps {
        deliver_at_ms: Some(10_000),
        ..Default::default()
    };

    // delay_ms_max is 1000: within it at 9000, past it at 8999.
    let mut s = open_session();
    let mut out = BytesMut::new();
    replies(&mut out);
    let mut outbound = Vec::new();
    s.on_frame_at(9_000, &publish_to_q(&[6], &props), &mut out, &mut outbound);
    assert_eq!(outbound.len(), 1);
    assert!(replies(&mut out).is_empty());

    let mut outbound = Vec::new();
    s.on_frame_at(8_999, &publish_to_q(&[7], &props), &mut out, &mut outbound);
    assert!(outbound.is_empty());
    let r = replies(&mut out);
    let BodyT::Error(e) = &r[0].body else {
        panic!("{:?}", r[0])
    };
    assert_eq!((r[0].request_id, e.code), (0, ErrorCode::InvalidArgument));
    assert_eq!(
        e.sequences.as_deref(),
        Some(&[wire::RangeT { first: 7, last: 7 }][..])
    );
    assert!(
        e.message.as_deref().unwrap().contains("deliver_at_ms"),
        "{e:?}"
    );
}

/// An `Ack` (request id 9) of the inclusive tag ranges given.
fn ack(ranges: &[(u64, u64)]) -> InFrame {
    let mut a = wire::AckT::default();
    a.ranges = ranges
        .iter()
        .map(|&(first, last)| wire::RangeT { first, last })
        .collect();
    frame(BodyT::Ack(Box::new(a)))
}

/// A session holding one outstanding delivery, tag 1: a `Get` of queue `q`, seq 5, answered.
fn session_holding_tag_1() -> Session {
    let mut s = open_session();
    let mut out = BytesMut::new();
    let mut outbound = Vec::new();
    let mut g = wire::GetT::default();
    g.queue = "q".into();
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::Get(Box::new(g))),
        &mut out,
        &mut outbound,
    );
    let d = PushedDelivery {
        deaths: None,
        queue: "q".into(),
        holder: 3,
        seq: 5,
        delivery_count: 1,
        auto_ack: false,
        exchange: String::new(),
        routing_key: "q".into(),
        bytes: Encoder::new(WireLimits::DEFAULT)
            .message(&Default::default(), b"m")
            .unwrap(),
        cold: None,
        charge: 0,
    };
    let reply = Reply::Got(Some(Box::new(d)), 0);
    s.on_reply_at(NOW_MS, outbound[0].id, reply, &mut out, &mut Vec::new());
    let r = replies(&mut out);
    assert!(
        matches!(&r[..], [f] if matches!(&f.body, BodyT::GetOk(ok) if ok.delivery.as_ref().unwrap().delivery_tag == 1)),
        "{r:?}"
    );
    s
}

#[test]
fn a_settle_naming_an_unknown_tag_settles_nothing_and_the_known_one_stays_outstanding() {
    let mut s = session_holding_tag_1();
    let mut out = BytesMut::new();

    // Tag 1 is held, 99 is not: the whole frame is refused, as an unknown tag always was.
    let mut outbound = Vec::new();
    let flow = s.on_frame_at(NOW_MS, &ack(&[(1, 1), (99, 99)]), &mut out, &mut outbound);
    assert_eq!(flow, Flow::Continue);
    assert!(outbound.is_empty(), "nothing settled: {outbound:?}");
    let r = replies(&mut out);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].request_id, error_of(&r[0])),
        (9, (ErrorCode::UnknownDeliveryTag, false))
    );

    // Tag 1 is still held: acked now, it goes to its owner once and is answered.
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &ack(&[(1, 1)]), &mut out, &mut outbound);
    assert!(replies(&mut out).is_empty(), "answered once the owner is");
    let [Addressed {
        shard,
        id,
        op: Op::Settle(items),
    }] = &outbound[..]
    else {
        panic!("{outbound:?}")
    };
    assert_eq!(*shard, placement("q", 2));
    assert_eq!(
        items
            .iter()
            .map(|i| (i.queue.as_str(), i.holder, i.seq, i.ack))
            .collect::<Vec<_>>(),
        vec![("q", 3, 5, true)]
    );
    let done = Reply::Settled(Default::default());
    s.on_reply_at(NOW_MS, *id, done, &mut out, &mut Vec::new());
    let r = replies(&mut out);
    assert!(
        matches!(r[..], [ref f] if matches!(f.body, BodyT::Ok(_))),
        "{r:?}"
    );

    // Settled exactly once: a second ack of it is an unknown tag.
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &ack(&[(1, 1)]), &mut out, &mut outbound);
    assert!(outbound.is_empty());
    assert_eq!(
        error_of(&replies(&mut out)[0]),
        (ErrorCode::UnknownDeliveryTag, false)
    );
}

/// The owner's answer to a publish: every item it was sent taken (journaled).
fn all_taken(op: &Op) -> Reply {
    let Op::Publish(items) = op else {
        panic!("{op:?}")
    };
    Reply::Published(
        items
            .iter()
            .map(|p| PublishOutcome {
                sequence: p.sequence,
                confirm: true,
                journaled: true,
                result: Ok(()),
                returned: None,
                duplicate: false,
            })
            .collect(),
    )
}

fn sequences_of(f: &wire::FrameT) -> Vec<(u64, u64)> {
    let ranges = match &f.body {
        BodyT::Confirm(c) => &c.ranges,
        BodyT::Error(e) => e.sequences.as_ref().unwrap(),
        other => panic!("{other:?}"),
    };
    ranges.iter().map(|r| (r.first, r.last)).collect()
}

#[test]
fn a_repeated_or_decreasing_publish_sequence_is_refused_and_the_others_are_confirmed() {
    let mut s = open_session();
    let mut out = BytesMut::new();
    replies(&mut out);
    let props = weir_protocol::MessageProps::default();

    // 3 repeats the one before it in its own frame; 4 is fine.
    let mut outbound = Vec::new();
    s.on_frame_at(
        NOW_MS,
        &publish_to_q(&[3, 3, 4], &props),
        &mut out,
        &mut outbound,
    );
    // 4 repeats the last frame's, 2 is below it, 5 is fine.
    s.on_frame_at(
        NOW_MS,
        &publish_to_q(&[4, 2, 5], &props),
        &mut out,
        &mut outbound,
    );
    let r = replies(&mut out);
    assert_eq!(r.len(), 2, "{r:?}");
    for (f, (seqs, first, last)) in r
        .iter()
        .zip([(vec![(3, 3)], 3, 3), (vec![(2, 2), (4, 4)], 4, 4)])
    {
        let BodyT::Error(e) = &f.body else {
            panic!("{f:?}")
        };
        assert_eq!(
            (f.request_id, e.code, e.close),
            (0, ErrorCode::InvalidArgument, false)
        );
        assert_eq!(sequences_of(f), seqs);
        let message = e.message.as_deref().unwrap();
        assert!(
            message.contains(&format!(
                "publish sequence {first} is not above the last one, {last}"
            )),
            "{message}"
        );
    }
    // Only the accepted ones went to the owner, each once.
    let sent: Vec<u64> = outbound
        .iter()
        .flat_map(|a| match &a.op {
            Op::Publish(items) => items.iter().map(|i| i.sequence).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sent, vec![3, 4, 5]);
    for a in &outbound {
        s.on_reply_at(NOW_MS, a.id, all_taken(&a.op), &mut out, &mut Vec::new());
    }
    let confirmed: Vec<(u64, u64)> = replies(&mut out).iter().flat_map(sequences_of).collect();
    assert_eq!(confirmed, vec![(3, 4), (5, 5)]);
    assert!(s.wants_input());
}

/// A reused sequence on a message split across shards must not count as one of the parts of
/// the split that holds that sequence.
#[test]
fn a_reused_sequence_does_not_complete_a_split_publish() {
    let (q0, q1) = (
        (0..)
            .map(|i| format!("q{i}"))
            .find(|q| placement(q, 2) == 0)
            .unwrap(),
        (0..)
            .map(|i| format!("q{i}"))
            .find(|q| placement(q, 2) == 1)
            .unwrap(),
    );
    let mut s = routed_session(&[&q0, &q1]);
    let mut out = BytesMut::new();
    replies(&mut out);
    let mut first = Vec::new();
    s.on_frame_at(NOW_MS, &publish_to_x(7, "a.b", false), &mut out, &mut first);
    assert_eq!(first.len(), 2, "split across both shards");
    let mut again = Vec::new();
    s.on_frame_at(NOW_MS, &publish_to_x(7, "a.b", false), &mut out, &mut again);
    assert!(again.is_empty(), "the reuse of 7 is not sent: {again:?}");
    let r = replies(&mut out);
    assert_eq!(error_of(&r[0]), (ErrorCode::InvalidArgument, false));
    assert_eq!(sequences_of(&r[0]), vec![(7, 7)]);
    // One part of the first publish in: not confirmed yet.
    s.on_reply_at(
        NOW_MS,
        first[0].id,
        all_taken(&first[0].op),
        &mut out,
        &mut Vec::new(),
    );
    assert!(replies(&mut out).is_empty());
    s.on_reply_at(
        NOW_MS,
        first[1].id,
        all_taken(&first[1].op),
        &mut out,
        &mut Vec::new(),
    );
    let r = replies(&mut out);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(sequences_of(&r[0]), vec![(7, 7)]);
    assert!(matches!(r[0].body, BodyT::Confirm(_)));
}

#[test]
fn status_uptime_is_counted_to_the_time_passed_in() {
    let mut s = open_session();
    let mut out = BytesMut::new();
    replies(&mut out);
    let mut outbound = Vec::new();
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::GetStatus(Box::default())),
        &mut out,
        &mut outbound,
    );
    assert_eq!(outbound.len(), 2, "one per shard");
    for (i, r) in outbound.iter().enumerate() {
        let st = crate::mesh::types::ShardStatus {
            shard: 1 - i as u16,
            queues: 3,
            ..Default::default()
        };
        let reply = Reply::ShardStatus(Box::new(st));
        s.on_reply_at(5_000, r.id, reply, &mut out, &mut Vec::new());
    }
    let r = replies(&mut out);
    assert_eq!(r.len(), 1, "answered once, when both shards did");
    let BodyT::Status(st) = &r[0].body else {
        panic!("{:?}", r[0])
    };
    assert_eq!((st.uptime_ms, st.queues, st.shard_count), (5_000, 6, 2));
    let names: Vec<&str> = st
        .counters
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names[0], "shard.0.connections", "shards in order");
}

#[test]
fn a_push_several_frames_large_leaves_whole_in_frames_within_the_limit_and_in_order() {
    // Small frames, so a push several frames large stays small in memory.
    let limits = WireLimits {
        frame_size_max: 256 * 1024,
        message_size_max: 192 * 1024,
        ..WireLimits::DEFAULT
    };
    let mut s = Session::new(SessionCtx { limits, ..ctx() }, Rc::default());
    let mut out = BytesMut::new();
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut outbound);
    let mut c = wire::ConsumeT::default();
    c.queue = "q".into();
    c.consumer_tag = Some("c".into());
    c.prefetch = 100;
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::Consume(Box::new(c))),
        &mut out,
        &mut outbound,
    );
    let (owner, consume) = (outbound[0].shard, outbound[0].id);
    s.on_reply_at(NOW_MS, consume, Reply::Consumed(3), &mut out, &mut outbound);
    out.clear();
    outbound.clear();

    // 30 messages of 100 KB: about 12 frames' worth, pushed at once.
    let messages: Vec<Vec<u8>> = (0..30).map(|_| samples::message_bytes(100_000)).collect();
    let deliveries = messages
        .iter()
        .enumerate()
        .map(|(i, m)| PushedDelivery {
            deaths: None,
            queue: "q".into(),
            holder: 3,
            seq: 1000 + i as u64,
            delivery_count: 1,
            auto_ack: false,
            exchange: String::new(),
            routing_key: "q".into(),
            bytes: bytes::Bytes::copy_from_slice(m),
            cold: None,
            charge: 100,
        })
        .collect();
    let pushed = Pushed::Deliver {
        to: crate::mesh::types::ConnRef { shard: 1, conn: 42 },
        consumer_tag: "c".into(),
        deliveries,
    };
    s.on_push(owner, pushed, &mut out, &mut outbound);

    let decoder = FrameDecoder::new(limits);
    let mut frames = 0;
    let mut tags = Vec::new();
    while !out.is_empty() {
        let whole = out.len();
        let f = decoder.decode(&mut out).unwrap().expect("a whole frame");
        let len = whole - out.len() - weir_protocol::limits::FRAME_PREFIX_BYTES;
        assert!(
            len <= limits.frame_size_max as usize,
            "a frame of {len} bytes"
        );
        frames += 1;
        for (d, message) in f.deliveries() {
            let i = tags.len();
            assert_eq!(message.as_ref(), messages[i].as_slice(), "delivery {i}");
            tags.push(d.delivery_tag());
        }
    }
    assert!(frames > 4, "{frames} frames");
    assert_eq!(
        tags,
        (1..=30).collect::<Vec<u64>>(),
        "every delivery, in order"
    );

    // Every tag shown is held: acking them all settles every message at its owner.
    let mut ack = wire::AckT::default();
    ack.ranges = vec![wire::RangeT { first: 1, last: 30 }];
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::Ack(Box::new(ack))),
        &mut out,
        &mut outbound,
    );
    let settled: Vec<u64> = outbound
        .iter()
        .flat_map(|a| match &a.op {
            Op::Settle(items) => items.iter().map(|i| i.seq).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(settled, (1000..1030).collect::<Vec<u64>>());
}

/// A session with consumer "c" (holder 3) on queue "q", its `ConsumeOk` sent; returns the
/// session and the consumer's owning shard.
fn consuming() -> (Session, u16) {
    let mut s = Session::new(ctx(), Rc::default());
    let (mut out, mut outbound) = (BytesMut::new(), Vec::new());
    s.on_frame_at(NOW_MS, &hello(PROTOCOL_VERSION), &mut out, &mut outbound);
    let mut c = wire::ConsumeT::default();
    c.queue = "q".into();
    c.consumer_tag = Some("c".into());
    c.prefetch = 100;
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::Consume(Box::new(c))),
        &mut out,
        &mut outbound,
    );
    let (owner, consume) = (outbound[0].shard, outbound[0].id);
    s.on_reply_at(NOW_MS, consume, Reply::Consumed(3), &mut out, &mut outbound);
    (s, owner)
}

fn pushed(seqs: std::ops::Range<u64>, charge: u32) -> Pushed {
    let deliveries = seqs
        .map(|seq| PushedDelivery {
            deaths: None,
            queue: "q".into(),
            holder: 3,
            seq,
            delivery_count: 1,
            auto_ack: false,
            exchange: String::new(),
            routing_key: "q".into(),
            bytes: Encoder::new(WireLimits::DEFAULT)
                .message(&Default::default(), b"m")
                .unwrap(),
            cold: None,
            charge,
        })
        .collect();
    Pushed::Deliver {
        to: crate::mesh::types::ConnRef { shard: 0, conn: 42 },
        consumer_tag: "c".into(),
        deliveries,
    }
}

fn handed_back(outbound: &[Addressed]) -> Vec<(u16, u64)> {
    outbound
        .iter()
        .filter_map(|a| match a.op {
            Op::DeliveriesWritten { bytes } => Some((a.shard, bytes)),
            _ => None,
        })
        .collect()
}

#[test]
fn delivery_charges_go_back_to_their_owner_only_once_written() {
    let (mut s, owner) = consuming();
    // ctx(): outbox_bytes_max = 1 MiB, so charges go back in amounts of 64 KiB.
    let (mut out, mut outbound) = (BytesMut::new(), Vec::new());
    s.on_push(owner, pushed(10..13, 16 << 10), &mut out, &mut outbound);
    assert!(handed_back(&outbound).is_empty(), "encoded is not written");
    let charges = s.take_unwritten();
    s.on_push(owner, pushed(13..14, 16 << 10), &mut out, &mut outbound);
    s.on_written(charges, &mut outbound);
    assert!(
        handed_back(&outbound).is_empty(),
        "48 KiB written: held until 64 KiB add up, not one hand-back per write"
    );
    let charges = s.take_unwritten();
    s.on_written(charges, &mut outbound);
    assert_eq!(handed_back(&outbound), vec![(owner, 64 << 10)]);
    assert!(outbound.iter().all(|a| a.id == 0), "nobody waits for it");
}

#[test]
fn a_consumer_timed_out_by_its_owner_loses_its_tags_and_is_told_why() {
    let (mut s, owner) = consuming();
    let (mut out, mut outbound) = (BytesMut::new(), Vec::new());
    s.on_push(owner, pushed(10..12, 1), &mut out, &mut outbound);
    out.clear();
    let cancelled = crate::mesh::types::Cancelled {
        to: crate::mesh::types::ConnRef { shard: 0, conn: 42 },
        consumer_tag: "c".into(),
        message: "not acked within consumer_timeout_ms = 5".into(),
    };
    s.on_push(owner, Pushed::TimedOut(cancelled), &mut out, &mut outbound);
    let r = replies(&mut out);
    match &r[0].body {
        BodyT::ConsumerCancelled(c) => {
            assert_eq!(c.code, ErrorCode::LimitExceeded);
            assert!(c
                .message
                .as_deref()
                .unwrap()
                .contains("consumer_timeout_ms"));
        }
        other => panic!("{other:?}"),
    }
    outbound.clear();
    let mut ack = wire::AckT::default();
    ack.ranges = vec![wire::RangeT { first: 1, last: 2 }];
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::Ack(Box::new(ack))),
        &mut out,
        &mut outbound,
    );
    assert!(outbound.is_empty(), "nothing to settle: {outbound:?}");
    assert!(
        matches!(&replies(&mut out)[0].body, BodyT::Error(e) if e.code == ErrorCode::UnknownDeliveryTag)
    );
    // A delivery still on its way for it goes back, and so does its charge.
    s.on_push(owner, pushed(20..21, 7), &mut out, &mut outbound);
    assert_eq!(handed_back(&outbound), vec![(owner, 7)]);
}

fn get_q() -> InFrame {
    let mut g = wire::GetT::default();
    g.queue = "q".into();
    frame(BodyT::Get(Box::new(g)))
}

fn info_q() -> InFrame {
    let mut g = wire::GetQueueInfoT::default();
    g.name = "q".into();
    frame(BodyT::GetQueueInfo(Box::new(g)))
}

fn consume_q(tag: &str) -> InFrame {
    let mut c = wire::ConsumeT::default();
    c.queue = "q".into();
    c.consumer_tag = Some(tag.into());
    frame(BodyT::Consume(Box::new(c)))
}

fn session_with(ctx: SessionCtx) -> Session {
    let mut s = Session::new(ctx, Rc::default());
    s.on_frame_at(
        NOW_MS,
        &hello(PROTOCOL_VERSION),
        &mut BytesMut::new(),
        &mut Vec::new(),
    );
    s
}

#[test]
fn past_requests_in_flight_max_the_connection_is_not_read_until_one_is_answered() {
    let mut s = session_with(SessionCtx {
        requests_in_flight_max: 2,
        ..ctx()
    });
    let (mut out, mut outbound) = (BytesMut::new(), Vec::new());
    s.on_frame_at(NOW_MS, &info_q(), &mut out, &mut outbound);
    assert!(s.wants_input(), "one request of two in flight");
    // Publishes in flight are bounded by publishes_in_flight_max, not by this.
    s.on_frame_at(
        NOW_MS,
        &publish_to_q(&[1], &Default::default()),
        &mut out,
        &mut outbound,
    );
    assert!(s.wants_input(), "a publish is not a request in flight");
    s.on_frame_at(NOW_MS, &info_q(), &mut out, &mut outbound);
    assert!(!s.wants_input(), "two requests in flight: stop reading");
    let info = outbound
        .iter()
        .find(|a| matches!(a.op, Op::Info { .. }))
        .unwrap()
        .id;
    let reply = Reply::Info(Box::default());
    s.on_reply_at(NOW_MS, info, reply, &mut out, &mut Vec::new());
    assert!(s.wants_input(), "one answered: read again");
}

#[test]
fn a_consume_past_consumers_per_connection_max_is_refused_naming_the_limit() {
    let mut s = session_with(SessionCtx {
        consumers_per_connection_max: 1,
        ..ctx()
    });
    let (mut out, mut outbound) = (BytesMut::new(), Vec::new());
    s.on_frame_at(NOW_MS, &consume_q("a"), &mut out, &mut outbound);
    assert_eq!(outbound.len(), 1, "the first consumer goes to its owner");
    s.on_frame_at(NOW_MS, &consume_q("b"), &mut out, &mut outbound);
    assert_eq!(outbound.len(), 1, "the second is refused here");
    let r = replies(&mut out);
    assert_eq!(error_of(&r[0]), (ErrorCode::LimitExceeded, false));
    let BodyT::Error(e) = &r[0].body else {
        unreachable!()
    };
    assert!(
        e.message
            .as_deref()
            .unwrap()
            .contains("consumers_per_connection_max = 1"),
        "{e:?}"
    );
    // The owner refused the first: its place is free again.
    let refused = Reply::Refused(Refusal {
        code: ErrorCode::NotFound,
        message: "no queue".into(),
    });
    s.on_reply_at(NOW_MS, outbound[0].id, refused, &mut out, &mut Vec::new());
    s.on_frame_at(NOW_MS, &consume_q("b"), &mut out, &mut outbound);
    assert_eq!(outbound.len(), 2, "{:?}", replies(&mut out));
}

#[test]
fn a_get_past_gets_unacked_max_is_refused_until_one_is_settled() {
    let mut s = session_holding_tag_1();
    s.ctx.gets_unacked_max = 2;
    let (mut out, mut outbound) = (BytesMut::new(), Vec::new());
    // One held unacked, one asked and not answered: the window is full.
    s.on_frame_at(NOW_MS, &get_q(), &mut out, &mut outbound);
    assert_eq!(outbound.len(), 1);
    s.on_frame_at(NOW_MS, &get_q(), &mut out, &mut outbound);
    assert_eq!(outbound.len(), 1, "refused, not sent");
    let r = replies(&mut out);
    assert_eq!(error_of(&r[0]), (ErrorCode::LimitExceeded, false));
    let BodyT::Error(e) = &r[0].body else {
        unreachable!()
    };
    assert!(
        e.message
            .as_deref()
            .unwrap()
            .contains("gets_unacked_max = 2"),
        "{e:?}"
    );
    // The asked one finds the queue empty: one place frees.
    s.on_reply_at(
        NOW_MS,
        outbound[0].id,
        Reply::Got(None, 0),
        &mut out,
        &mut Vec::new(),
    );
    s.on_frame_at(NOW_MS, &get_q(), &mut out, &mut outbound);
    assert_eq!(outbound.len(), 2, "{:?}", replies(&mut out));
    s.on_frame_at(NOW_MS, &get_q(), &mut out, &mut outbound);
    assert_eq!(outbound.len(), 2, "full again");
    // Acking tag 1 frees another.
    s.on_frame_at(NOW_MS, &ack(&[(1, 1)]), &mut out, &mut outbound);
    s.on_frame_at(NOW_MS, &get_q(), &mut out, &mut outbound);
    assert!(
        matches!(outbound.last().unwrap().op, Op::Get { .. }),
        "{outbound:?}"
    );
}

/// A publish frame of one message of `size` bytes to queue `q`.
fn publish_sized(sequence: u64, size: usize) -> InFrame {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let message = enc
        .message(&weir_protocol::MessageProps::default(), &vec![7u8; size])
        .unwrap();
    let mut buf = BytesMut::new();
    let item = weir_protocol::PublishItem {
        sequence,
        exchange: "",
        routing_key: "q",
        mandatory: false,
        message: &message,
    };
    enc.publish(&mut buf, 0, None, true, std::iter::once(item))
        .unwrap();
    FrameDecoder::new(WireLimits::DEFAULT)
        .decode(&mut buf)
        .unwrap()
        .unwrap()
}

#[test]
fn unconfirmed_publish_bytes_stop_input_until_their_outcomes_come_back() {
    // publish_bytes_in_flight_max is 1 MiB, publishes_in_flight_max 100: bytes bind first.
    let mut s = open_session();
    let mut out = BytesMut::new();
    let mut outbound = Vec::new();
    for seq in 1..=3 {
        s.on_frame_at(
            NOW_MS,
            &publish_sized(seq, 300 << 10),
            &mut out,
            &mut outbound,
        );
        assert!(s.wants_input(), "{seq} x 300 KiB is within 1 MiB");
    }
    s.on_frame_at(
        NOW_MS,
        &publish_sized(4, 300 << 10),
        &mut out,
        &mut outbound,
    );
    assert!(!s.wants_input(), "1.2 MiB unconfirmed is over the bound");
    let first = outbound.remove(0);
    s.on_reply_at(
        NOW_MS,
        first.id,
        all_taken(&first.op),
        &mut out,
        &mut Vec::new(),
    );
    assert!(s.wants_input(), "900 KiB unconfirmed again");
}

#[test]
fn small_messages_are_copied_out_of_the_frame_and_large_ones_stay_slices_of_it() {
    // message_copy_bytes_max is 1024.
    let mut s = open_session();
    let mut out = BytesMut::new();
    for (seq, size, copied) in [(1, 100, true), (2, 4096, false)] {
        let frame = publish_sized(seq, size);
        let mut outbound = Vec::new();
        s.on_frame_at(NOW_MS, &frame, &mut out, &mut outbound);
        let Op::Publish(items) = &outbound[0].op else {
            panic!("{:?}", outbound[0].op)
        };
        let whole = frame.bytes().as_ptr_range();
        let inside = whole.contains(&items[0].bytes.as_ptr());
        assert_eq!(inside, !copied, "message of {size} B");
    }
}

#[test]
fn past_outbox_bytes_max_of_unwritten_answers_the_connection_is_not_read() {
    let mut s = session_with(SessionCtx {
        outbox_bytes_max: 4096,
        ..ctx()
    });
    let (mut out, mut outbound) = (BytesMut::new(), Vec::new());
    // Listings are answered here, at once: nothing is in flight, only the outbox grows.
    let mut frames = 0;
    while s.wants_input_beside(out.len()) {
        let list = frame(BodyT::ListExchanges(Box::default()));
        s.on_frame_at(NOW_MS, &list, &mut out, &mut outbound);
        frames += 1;
        assert!(frames < 10_000, "never stopped reading");
    }
    assert!(outbound.is_empty());
    assert!(s.wants_input(), "nothing else holds it back");
    assert!(out.len() > 4096, "stops only past the bound");
    // Written: read again.
    out.clear();
    assert!(s.wants_input_beside(out.len()));
}

/// The seqs of the one `Settle` in `outbound`, and its id.
fn settle_sent(outbound: &[Addressed]) -> (u64, Vec<u64>) {
    let [Addressed {
        id,
        op: Op::Settle(items),
        ..
    }] = outbound
    else {
        panic!("{outbound:?}")
    };
    (*id, items.iter().map(|i| i.seq).collect())
}

#[test]
fn tags_an_owner_refused_for_a_storage_reason_can_be_settled_again() {
    let (mut s, owner) = consuming();
    let (mut out, mut outbound) = (BytesMut::new(), Vec::new());
    s.on_push(owner, pushed(10..13, 0), &mut out, &mut outbound);
    replies(&mut out);
    // Tags 1..=3 acked in one frame; the owner journals 11's record, refuses 10's and 12's
    // (a full disk), which it keeps outstanding.
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &ack(&[(1, 3)]), &mut out, &mut outbound);
    let (id, seqs) = settle_sent(&outbound);
    assert_eq!(seqs, vec![10, 11, 12]);
    let full = Refusal {
        code: ErrorCode::DiskFull,
        message: "out of disk space".into(),
    };
    let reply = Reply::Settled(crate::mesh::msg::SettleOutcome {
        refusals: vec![full.clone(), full],
        kept: vec![0, 2],
        waiting: vec![],
    });
    s.on_reply_at(NOW_MS, id, reply, &mut out, &mut Vec::new());
    let r = replies(&mut out);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0].request_id, error_of(&r[0])),
        (9, (ErrorCode::DiskFull, false))
    );

    // Tag 2 was settled: an unknown tag now.
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &ack(&[(2, 2)]), &mut out, &mut outbound);
    assert!(outbound.is_empty(), "{outbound:?}");
    assert_eq!(
        error_of(&replies(&mut out)[0]),
        (ErrorCode::UnknownDeliveryTag, false)
    );
    // Tags 1 and 3 are held again: the retry under the same tags goes to the owner.
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &ack(&[(1, 3)]), &mut out, &mut outbound);
    let (id, seqs) = settle_sent(&outbound);
    assert_eq!(seqs, vec![10, 12]);
    let done = Reply::Settled(Default::default());
    s.on_reply_at(NOW_MS, id, done, &mut out, &mut Vec::new());
    let r = replies(&mut out);
    assert!(
        matches!(r[..], [ref f] if matches!(f.body, BodyT::Ok(_))),
        "{r:?}"
    );
    // Applied this time: nothing is left to settle.
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &ack(&[(1, 3)]), &mut out, &mut outbound);
    assert!(outbound.is_empty(), "{outbound:?}");
}

/// An idempotent producer's publish to exchange `x`.
fn publish_as_to_x(producer: u64, sequence: u64) -> InFrame {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let message = enc
        .message(&weir_protocol::MessageProps::default(), b"body")
        .unwrap();
    let mut buf = BytesMut::new();
    let item = weir_protocol::PublishItem {
        sequence,
        exchange: "x",
        routing_key: "a.b",
        mandatory: false,
        message: &message,
    };
    enc.publish(&mut buf, 0, Some(producer), true, [item])
        .unwrap();
    FrameDecoder::new(WireLimits::DEFAULT)
        .decode(&mut buf)
        .unwrap()
        .unwrap()
}

#[test]
fn an_idempotent_split_publish_is_a_duplicate_only_if_every_part_was() {
    let on = |shard| {
        (0..)
            .map(|i| format!("q{i}"))
            .find(|q| placement(q, 2) == shard)
            .unwrap()
    };
    let (q0, q1) = (on(0), on(1));
    let mut s = routed_session(&[&q0, &q1]);
    let mut out = BytesMut::new();
    replies(&mut out);
    // Each part names its producer, for its owner to judge.
    let mut both = Vec::new();
    s.on_frame_at(NOW_MS, &publish_as_to_x(5, 7), &mut out, &mut both);
    let mut one = Vec::new();
    s.on_frame_at(NOW_MS, &publish_as_to_x(5, 8), &mut out, &mut one);
    assert_eq!((both.len(), one.len()), (2, 2), "split across both shards");
    for a in both.iter().chain(&one) {
        let Op::Publish(items) = &a.op else {
            panic!("{:?}", a.op)
        };
        assert!(items.iter().all(|i| i.producer_id == Some(5)), "{items:?}");
    }
    let answer = |op: &Op, duplicate: bool| {
        let Reply::Published(mut o) = all_taken(op) else {
            unreachable!()
        };
        o.iter_mut().for_each(|o| o.duplicate = duplicate);
        Reply::Published(o)
    };
    // 7: a duplicate on both shards; 8: on one only (the other stored it: not a duplicate).
    for (a, dup) in [
        (&both[0], true),
        (&both[1], true),
        (&one[0], true),
        (&one[1], false),
    ] {
        s.on_reply_at(NOW_MS, a.id, answer(&a.op, dup), &mut out, &mut Vec::new());
    }
    let r = replies(&mut out);
    type Ranges = Vec<(u64, u64)>;
    let confirms: Vec<(Ranges, Ranges)> = r
        .iter()
        .map(|f| {
            let BodyT::Confirm(c) = &f.body else {
                panic!("{f:?}")
            };
            let dups = c.duplicates.iter().flatten().map(|r| (r.first, r.last));
            (sequences_of(f), dups.collect())
        })
        .collect();
    assert_eq!(
        confirms,
        vec![(vec![(7, 7)], vec![(7, 7)]), (vec![(8, 8)], vec![])],
        "{r:?}"
    );
}

#[test]
fn an_idempotent_publish_one_shard_would_store_in_parts_is_refused_by_name() {
    // More than targets_per_message_max (128) queues on one shard: stored in parts, which a
    // re-send could not tell apart.
    let queues: Vec<String> = (0..)
        .map(|i| format!("q{i}"))
        .filter(|q| placement(q, 2) == 0)
        .take(130)
        .collect();
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    let mut s = routed_session(&names);
    let mut out = BytesMut::new();
    replies(&mut out);
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &publish_as_to_x(5, 1), &mut out, &mut outbound);
    assert!(outbound.is_empty(), "sent in parts: {outbound:?}");
    let r = replies(&mut out);
    assert_eq!(error_of(&r[0]), (ErrorCode::LimitExceeded, false));
    assert_eq!(sequences_of(&r[0]), vec![(1, 1)]);
    // Without a producer it is stored in parts, as before.
    s.on_frame_at(
        NOW_MS,
        &publish_to_x(2, "a.b", false),
        &mut out,
        &mut outbound,
    );
    assert_eq!(outbound.len(), 1, "one op for shard 0 holding both parts");
    let Op::Publish(items) = &outbound[0].op else {
        panic!()
    };
    assert_eq!(items.len(), 2);
}

fn nack(tag: u64, requeue: bool, delay_ms: Option<u32>) -> InFrame {
    let mut n = wire::NackT::default();
    n.ranges = vec![wire::RangeT {
        first: tag,
        last: tag,
    }];
    n.requeue = requeue;
    n.delay_ms = delay_ms;
    frame(BodyT::Nack(Box::new(n)))
}

#[test]
fn retry_a_nack_delay_is_refused_without_requeue_or_past_delay_ms_max_and_carried_within() {
    let mut s = session_holding_tag_1();
    let mut out = BytesMut::new();
    // delay_ms_max is 1000 in these tests.
    for (frame, field) in [
        (nack(1, false, Some(10)), "only with requeue"),
        (nack(1, true, Some(1001)), "delay_ms_max"),
    ] {
        let mut outbound = Vec::new();
        s.on_frame_at(NOW_MS, &frame, &mut out, &mut outbound);
        assert!(outbound.is_empty(), "nothing settled: {outbound:?}");
        let r = replies(&mut out);
        assert_eq!(error_of(&r[0]), (ErrorCode::InvalidArgument, false));
        let BodyT::Error(e) = &r[0].body else {
            unreachable!()
        };
        assert!(e.message.as_deref().unwrap_or("").contains(field), "{e:?}");
    }
    let mut outbound = Vec::new();
    s.on_frame_at(NOW_MS, &nack(1, true, Some(1000)), &mut out, &mut outbound);
    let [Addressed {
        op: Op::Settle(items),
        ..
    }] = &outbound[..]
    else {
        panic!("{outbound:?}")
    };
    assert_eq!(
        items
            .iter()
            .map(|i| (i.seq, i.requeue, i.failed, i.delay_ms))
            .collect::<Vec<_>>(),
        vec![(5, true, true, Some(1000))]
    );
}

#[test]
fn status_marks_gauges_carries_histograms_and_counts_the_shards_that_answered() {
    let mut s = open_session();
    let mut out = BytesMut::new();
    replies(&mut out);
    let mut outbound = Vec::new();
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::GetStatus(Box::default())),
        &mut out,
        &mut outbound,
    );
    let st = crate::mesh::types::ShardStatus {
        shard: 1,
        connections: 2,
        messages_published: 100,
        limit_hits: vec![("consumers_per_connection_max", 3)],
        histograms: vec![crate::mesh::types::HistogramSnapshot {
            name: "journal.commit_latency_us",
            count: 4,
            sum: 900,
            buckets: vec![(100, 1), (1_000, 4), (u64::MAX, 4)],
            p50: 200,
            p99: 400,
            p999: 400,
            max: 400,
        }],
        ..Default::default()
    };
    s.on_reply_at(
        0,
        outbound[1].id,
        Reply::ShardStatus(Box::new(st)),
        &mut out,
        &mut Vec::new(),
    );
    // Shard 0 answers with something else: its part is left out, and it is not counted ready.
    s.on_reply_at(0, outbound[0].id, Reply::Done, &mut out, &mut Vec::new());
    let r = replies(&mut out);
    let BodyT::Status(st) = &r[0].body else {
        panic!("{:?}", r[0])
    };
    assert_eq!(st.shards_ready, 1);
    let counters: BTreeMap<&str, (u64, bool)> = st
        .counters
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), (c.value, c.gauge)))
        .collect();
    assert_eq!(counters["shard.1.connections"], (2, true));
    assert_eq!(counters["shard.1.messages_published"], (100, false));
    assert_eq!(counters["shard.1.journal.disk_bytes"], (0, true));
    assert!(counters["shard.1.mesh_outgoing_bytes"].1);
    assert!(counters["shard.1.work_bytes"].1);
    assert!(!counters["shard.1.journal.commits"].1);
    assert_eq!(
        counters["shard.1.limit_hit.consumers_per_connection_max"],
        (3, false)
    );
    assert!(
        !counters
            .keys()
            .any(|k| k.contains("limit_hit.queues_per_shard_max")),
        "only the limits hit"
    );
    let h = &st.histograms.as_ref().unwrap()[0];
    assert_eq!(
        (h.name.as_str(), h.shard, h.count),
        ("journal.commit_latency_us", 1, 4)
    );
    assert_eq!(h.bucket_le.as_deref(), Some(&[100, 1_000, u64::MAX][..]));
    assert_eq!(h.bucket_count.as_deref(), Some(&[1, 4, 4][..]));
}

#[test]
fn confirms_and_refusals_over_a_limit_are_tallied_for_the_shard() {
    let tally = Rc::new(Tally::default());
    let mut s = open_session();
    s.count_into(tally.clone());
    let mut out = BytesMut::new();
    s.fail_sequences(
        &mut out,
        ErrorCode::LimitExceeded,
        "this shard's queues hold queued_messages_max = 4 messages".into(),
        vec![1, 2],
    );
    s.confirm_with(
        &mut out,
        vec![3, 4, 5],
        wire::Durability::Always,
        Vec::new(),
    );
    assert_eq!(tally.limit_hits(), vec![("queued_messages_max", 1)]);
    assert_eq!(tally.confirms(), 3);
}

fn connection(id: u64, shard: u16) -> wire::ConnectionInfoT {
    let mut c = wire::ConnectionInfoT::default();
    c.id = id;
    c.shard = shard;
    c
}

#[test]
fn connections_are_gathered_from_every_shard_in_id_order_and_cut_to_the_page() {
    let mut s = open_session();
    let mut out = BytesMut::new();
    replies(&mut out);
    let mut l = wire::ListConnectionsT::default();
    l.after = Some(3);
    l.limit = 3;
    let mut outbound = Vec::new();
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::ListConnections(Box::new(l))),
        &mut out,
        &mut outbound,
    );
    assert_eq!(outbound.len(), 2, "one per shard");
    for a in &outbound {
        let Op::ListConnections { after, limit } = &a.op else {
            panic!("{:?}", a.op)
        };
        assert_eq!((*after, *limit), (Some(3), 4), "one more than the page");
    }
    let shard0 = vec![connection(4, 0), connection(8, 0)];
    let shard1 = vec![connection(5, 1), connection(6, 1), connection(9, 1)];
    s.on_reply_at(
        NOW_MS,
        outbound[1].id,
        Reply::Connections(shard1),
        &mut out,
        &mut Vec::new(),
    );
    assert!(
        replies(&mut out).is_empty(),
        "not before every shard answered"
    );
    s.on_reply_at(
        NOW_MS,
        outbound[0].id,
        Reply::Connections(shard0),
        &mut out,
        &mut Vec::new(),
    );
    let r = replies(&mut out);
    let BodyT::ConnectionList(list) = &r[0].body else {
        panic!("{:?}", r[0])
    };
    let ids: Vec<u64> = list.connections.iter().flatten().map(|c| c.id).collect();
    assert_eq!(ids, vec![4, 5, 6]);
    assert!(list.more);
}

#[test]
fn consumers_are_gathered_in_queue_and_tag_order_and_the_last_page_says_no_more() {
    let mut s = open_session();
    let mut out = BytesMut::new();
    replies(&mut out);
    let mut l = wire::ListConsumersT::default();
    l.prefix = Some("q".into());
    let mut outbound = Vec::new();
    s.on_frame_at(
        NOW_MS,
        &frame(BodyT::ListConsumers(Box::new(l))),
        &mut out,
        &mut outbound,
    );
    let consumer = |queue: &str, tag: &str| {
        let mut c = wire::ConsumerInfoT::default();
        c.queue = Some(queue.into());
        c.tag = Some(tag.into());
        c
    };
    let Op::ListConsumers { limit, .. } = &outbound[0].op else {
        panic!("{:?}", outbound[0].op)
    };
    assert_eq!(
        *limit,
        super::replies::LIST_PAGE_MAX + 1,
        "0 is the broker's page"
    );
    let one = vec![consumer("q2", "a")];
    let two = vec![consumer("q1", "b"), consumer("q2", "0")];
    s.on_reply_at(
        NOW_MS,
        outbound[0].id,
        Reply::Consumers(one),
        &mut out,
        &mut Vec::new(),
    );
    s.on_reply_at(
        NOW_MS,
        outbound[1].id,
        Reply::Consumers(two),
        &mut out,
        &mut Vec::new(),
    );
    let r = replies(&mut out);
    let BodyT::ConsumerList(list) = &r[0].body else {
        panic!("{:?}", r[0])
    };
    let keys: Vec<(String, String)> = list
        .consumers
        .iter()
        .flatten()
        .map(|c| (c.queue.clone().unwrap(), c.tag.clone().unwrap()))
        .collect();
    let want = [("q1", "b"), ("q2", "0"), ("q2", "a")];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(q, t)| (q.to_string(), t.to_string()))
        .collect();
    assert_eq!(keys, want);
    assert!(!list.more);
}
