//! Idempotent producers over the raw protocol: a (producer_id, sequence) re-sent on another
//! connection, or after a SIGKILL and restart, is confirmed as a duplicate and stored once, on
//! two shards, through the mesh and a fanout to both; one older than the window is refused
//! (`SequenceOutOfWindow`); and the windows outlive the segments that built them (reclaim).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{queue_on, temp_dir, Broker, Client};
use weir_protocol::wire::{self, BodyT, ErrorCode};
use weir_protocol::{Encoder, MessageProps, PublishItem, WireLimits};

fn connect(broker: &Broker, shard: usize) -> Client {
    let mut c = broker.connect_shard(shard);
    c.handshake();
    c
}

fn config(dir: &std::path::Path, limits: &str) -> Vec<String> {
    let path = dir.join("weir.toml");
    std::fs::write(&path, format!("cpus = [0, 1]\n[limits]\n{limits}\n")).unwrap();
    vec!["--config".into(), path.to_str().unwrap().into()]
}

fn start(dir: &std::path::Path, args: &[String]) -> Broker {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Broker::start(dir, &args)
}

/// One `Publish` frame of producer `producer`, one persistent message per sequence.
fn publish_as(
    c: &mut Client,
    producer: u64,
    exchange: &str,
    key: &str,
    seqs: impl IntoIterator<Item = u64>,
) {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let props = MessageProps {
        persistent: true,
        ..Default::default()
    };
    let seqs: Vec<u64> = seqs.into_iter().collect();
    let messages: Vec<Bytes> = seqs
        .iter()
        .map(|s| enc.message(&props, format!("m{s}").as_bytes()).unwrap())
        .collect();
    let items = seqs.iter().zip(&messages).map(|(s, m)| PublishItem {
        sequence: *s,
        exchange,
        routing_key: key,
        mandatory: false,
        message: m,
    });
    let mut out = BytesMut::new();
    enc.publish(&mut out, 0, Some(producer), true, items)
        .unwrap();
    c.stream.write_all(&out).unwrap();
}

/// What became of each sequence: confirmed (and whether as a duplicate), or refused with a code.
#[derive(Debug, Default)]
struct Outcomes {
    duplicates: BTreeSet<u64>,
    confirmed: BTreeSet<u64>,
    refused: BTreeMap<u64, ErrorCode>,
}

fn outcomes(c: &mut Client, seqs: impl IntoIterator<Item = u64>) -> Outcomes {
    let want: BTreeSet<u64> = seqs.into_iter().collect();
    let mut o = Outcomes::default();
    while want
        .iter()
        .any(|s| !o.confirmed.contains(s) && !o.refused.contains_key(s))
    {
        let f = c.recv().expect("closed while waiting for confirms");
        match f.body {
            BodyT::Confirm(conf) => {
                for r in &conf.ranges {
                    o.confirmed.extend(r.first..=r.last);
                }
                for r in conf.duplicates.iter().flatten() {
                    o.duplicates.extend(r.first..=r.last);
                }
            }
            BodyT::Error(e) => {
                for r in e.sequences.iter().flatten() {
                    for s in r.first..=r.last {
                        o.refused.insert(s, e.code);
                    }
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    o
}

fn ready(c: &mut Client, queue: &str) -> u64 {
    match c.info(queue) {
        BodyT::QueueInfo(i) => i.messages_ready,
        other => panic!("info {queue}: {other:?}"),
    }
}

fn fanout(c: &mut Client, name: &str, queues: &[&str]) {
    let mut x = wire::DeclareExchangeT::default();
    x.name = name.into();
    x.kind = wire::ExchangeKind::Fanout;
    x.durable = true;
    assert!(matches!(
        c.request(BodyT::DeclareExchange(Box::new(x))),
        BodyT::Ok(_)
    ));
    for q in queues {
        let mut b = wire::BindT::default();
        b.exchange = name.into();
        b.queue = (*q).into();
        assert!(matches!(c.request(BodyT::Bind(Box::new(b))), BodyT::Ok(_)));
    }
}

#[test]
fn exactly_once_resends_on_another_connection_and_after_sigkill_are_duplicates() {
    let dir = temp_dir("exactly-once-raw");
    let args = config(&dir, "producer_window_max = 64");
    let broker = start(&dir, &args);
    let (qa, qb) = (queue_on(0, 2, "eo-a"), queue_on(1, 2, "eo-b"));
    let mut a = connect(&broker, 1);
    a.declare(&qa);
    a.declare(&qb);
    fanout(&mut a, "eo-fan", &[&qa, &qb]);

    // From shard 1's connection: 1..=10 to qa (on shard 0: through the mesh), 11..=20 to the
    // fanout (both shards).
    publish_as(&mut a, 7, "", &qa, 1..=10);
    publish_as(&mut a, 7, "eo-fan", "", 11..=20);
    let first = outcomes(&mut a, 1..=20);
    assert!(first.refused.is_empty(), "{first:?}");
    assert!(
        first.duplicates.is_empty(),
        "new publishes called duplicates"
    );
    assert_eq!((ready(&mut a, &qa), ready(&mut a, &qb)), (20, 10));

    // The same sequences again, from the other shard's connection, and one new one.
    let mut b = connect(&broker, 0);
    publish_as(&mut b, 7, "", &qa, 1..=10);
    publish_as(&mut b, 7, "eo-fan", "", 11..=21);
    let again = outcomes(&mut b, 1..=21);
    assert!(again.refused.is_empty(), "{again:?}");
    assert_eq!(
        again.duplicates,
        (1..=20).collect(),
        "re-sends not duplicates"
    );
    assert_eq!(
        (ready(&mut b, &qa), ready(&mut b, &qb)),
        (21, 11),
        "a re-send was stored twice"
    );
    // Another producer's sequence 1 is its own message (on a connection of its own: a
    // connection's sequences must increase, whatever the producer).
    let mut b8 = connect(&broker, 0);
    publish_as(&mut b8, 8, "", &qa, [1]);
    let o = outcomes(&mut b8, [1]);
    assert!(o.refused.is_empty() && o.duplicates.is_empty(), "{o:?}");
    assert_eq!(ready(&mut b8, &qa), 22);

    // SIGKILL: the windows come back from the journal.
    let dir = broker.crash();
    let broker = start(&dir, &args);
    let mut c = connect(&broker, 1);
    publish_as(&mut c, 7, "", &qa, 1..=10);
    publish_as(&mut c, 7, "eo-fan", "", 11..=21);
    let after = outcomes(&mut c, 1..=21);
    assert!(after.refused.is_empty(), "{after:?}");
    assert_eq!(
        after.duplicates,
        (1..=21).collect(),
        "forgotten by the crash"
    );
    let mut c8 = connect(&broker, 0);
    publish_as(&mut c8, 8, "", &qa, [1]);
    assert_eq!(outcomes(&mut c8, [1]).duplicates, BTreeSet::from([1]));
    assert_eq!((ready(&mut c, &qa), ready(&mut c, &qb)), (22, 11));

    // Older than the window (64 below the highest): refused, not stored.
    let mut d = connect(&broker, 0);
    publish_as(&mut d, 7, "", &qa, [1000]);
    assert!(outcomes(&mut d, [1000]).refused.is_empty());
    publish_as(&mut d, 7, "", &qa, [1001]);
    outcomes(&mut d, [1001]);
    let mut e = connect(&broker, 1);
    // The window is the 64 sequences up to 1001: (937, 1001].
    publish_as(&mut e, 7, "", &qa, [900, 937, 938, 1000]);
    let o = outcomes(&mut e, [900, 937, 938, 1000]);
    assert_eq!(
        o.refused,
        BTreeMap::from([
            (900, ErrorCode::SequenceOutOfWindow),
            (937, ErrorCode::SequenceOutOfWindow)
        ])
    );
    // Inside the window: 938 was never stored (new), 1000 was (a duplicate).
    assert_eq!(o.duplicates, BTreeSet::from([1000]));
    assert_eq!(ready(&mut e, &qa), 22 + 3);
}

#[test]
fn exactly_once_a_full_producer_table_refuses_a_new_producer_by_name() {
    let dir = temp_dir("exactly-once-full");
    let args = config(&dir, "producers_per_shard_max = 2");
    let broker = start(&dir, &args);
    let q = queue_on(0, 2, "eo-full");
    let mut c = connect(&broker, 0);
    c.declare(&q);
    for (i, producer) in [1u64, 2].into_iter().enumerate() {
        publish_as(&mut c, producer, "", &q, [i as u64 + 1]);
        assert!(outcomes(&mut c, [i as u64 + 1]).refused.is_empty());
    }
    publish_as(&mut c, 3, "", &q, [3]);
    let mut refusal = None;
    while refusal.is_none() {
        match c.recv().expect("closed").body {
            BodyT::Error(e) => refusal = Some(e),
            other => panic!("{other:?}"),
        }
    }
    let e = refusal.unwrap();
    assert_eq!(e.code, ErrorCode::LimitExceeded);
    assert!(
        e.message
            .as_deref()
            .unwrap_or("")
            .contains("producers_per_shard_max"),
        "{e:?}"
    );
    assert_eq!(ready(&mut c, &q), 2);
}

#[test]
fn exactly_once_windows_survive_reclaim_of_their_segments_and_a_crash() {
    let dir = temp_dir("exactly-once-reclaim");
    let path = dir.join("weir.toml");
    std::fs::write(
        &path,
        "cpus = [0]\n[limits]\nsegment_size_bytes_max = 2097152\n",
    )
    .unwrap();
    let args = vec!["--config".to_string(), path.to_str().unwrap().to_string()];
    let broker = start(&dir, &args);
    let mut c = connect(&broker, 0);
    c.declare("eo-r");
    // 6 MB of stamped messages over 2 MiB segments, then all consumed and acked: the segments
    // holding every stamp go, and only the re-statement can keep the window.
    let body = vec![b'x'; 1024];
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let props = MessageProps {
        persistent: true,
        ..Default::default()
    };
    let message = enc.message(&props, &body).unwrap();
    for batch in 0..12u64 {
        let seqs = 1 + batch * 500..=500 + batch * 500;
        let items = seqs.clone().map(|s| PublishItem {
            sequence: s,
            exchange: "",
            routing_key: "eo-r",
            mandatory: false,
            message: &message,
        });
        let mut out = BytesMut::new();
        enc.publish(&mut out, 0, Some(5), true, items).unwrap();
        c.stream.write_all(&out).unwrap();
        assert!(outcomes(&mut c, seqs).refused.is_empty());
    }
    let before = c.journal_segments();
    assert!(before >= 3, "only {before} segments");
    c.consume("eo-r", "all", 6000, false);
    let held = c.deliveries(6000);
    for chunk in held.chunks(1000) {
        c.ack(&chunk.iter().map(|g| g.delivery_tag).collect::<Vec<_>>());
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = c.journal_segments();
    while after > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = c.journal_segments();
    }
    assert!(
        after <= 2,
        "segments went from {before} to {after}: not reclaimed"
    );
    drop(c);

    let dir = broker.crash();
    let broker = start(&dir, &args);
    let mut c = connect(&broker, 0);
    // The newest of the window (4096 by default, below 6000), re-sent: duplicates; 6001: new.
    publish_as(&mut c, 5, "", "eo-r", [5000, 5999, 6000, 6001]);
    let o = outcomes(&mut c, [5000, 5999, 6000, 6001]);
    assert!(o.refused.is_empty(), "{o:?}");
    assert_eq!(
        o.duplicates,
        BTreeSet::from([5000, 5999, 6000]),
        "the window was reclaimed with its segments"
    );
    assert_eq!(ready(&mut c, "eo-r"), 1);
}
