//! A full disk never breaks an answer: the real broker with its data on a small ext4 image,
//! loop-mounted, under the default `fsync = always`. Needs root, a loop device, mkfs.ext4 and
//! mount; where any is missing each test prints why and skips (the rules themselves are
//! unit-tested in `broker::ops` and `broker::durability`).
//!
//! - An ack whose settle record cannot be journaled is answered `DiskFull`, not `Ok`, and its
//!   delivery stays with its consumer: nobody else gets it while that consumer's connection
//!   lives, it is redelivered when it closes, and it is still there after a restart. Its tag
//!   stays the client's: a retry of the same ack is judged again (refused again while the
//!   journal has no room), not answered `UnknownDeliveryTag`.
//! - Publishing to a consumed queue until the disk fills: every refusal is `DiskFull`, no
//!   refused message is ever delivered or left in the queue, every confirmed one is delivered.

mod common;
mod loop_mount;

use std::collections::{BTreeMap, BTreeSet};

use common::Client;
use loop_mount::{seq_of, Mounted};
use weir_protocol::wire::{self, BodyT, ErrorCode};
use weir_protocol::WireLimits;

const BODY_BYTES: usize = 4096;
const BATCH: u64 = 250;

/// Of the 24 MiB filesystem, what is taken before the broker starts: less to fill (a faster
/// test), and room to give back before a restart.
const BALLAST_BYTES: usize = 12 << 20;

/// The small filesystem with `BALLAST_BYTES` taken in `ballast`; or none, said loudly.
fn filesystem(test: &str) -> Option<Mounted> {
    loop_mount::with_ballast(test, BALLAST_BYTES)
}

fn start(data: &std::path::Path, dir: &str) -> weir_testkit::Broker {
    // No disk reserve: these tests are about a disk full for every record, acks included (with
    // the default reserve, acks spend it: tests/disk_full_drain.rs).
    common::start_on_data_dir(
        data,
        dir,
        "segment_size_bytes_max = 2097152\nreserve_bytes = 0",
    )
}

fn body(seq: u64) -> Vec<u8> {
    loop_mount::numbered_body(seq, BODY_BYTES)
}

/// What became of each publish sequence: confirmed, or refused with a code.
#[derive(Default)]
struct Answers {
    confirmed: BTreeSet<u64>,
    refused: BTreeMap<u64, ErrorCode>,
}

/// Publishes `BATCH` messages to `queue` from sequence `first` and reads every answer; returns
/// whether any was refused.
fn publish_batch(c: &mut Client, queue: &str, first: u64, answers: &mut Answers) -> bool {
    let bodies: Vec<Vec<u8>> = (first..first + BATCH).map(body).collect();
    let refs: Vec<&[u8]> = bodies.iter().map(|b| b.as_slice()).collect();
    c.publish(queue, first, &refs, false);
    let mut refused = false;
    let answered = |a: &Answers| {
        (first..first + BATCH).all(|s| a.confirmed.contains(&s) || a.refused.contains_key(&s))
    };
    while !answered(answers) {
        let f = c.recv().expect("closed while publishing");
        match f.body {
            BodyT::Confirm(cf) => {
                for r in cf.ranges {
                    answers.confirmed.extend(r.first..=r.last);
                }
            }
            BodyT::Error(e) => {
                refused = true;
                for r in e.sequences.unwrap_or_default() {
                    for s in r.first..=r.last {
                        answers.refused.insert(s, e.code);
                    }
                }
            }
            other => panic!("publishing: {other:?}"),
        }
    }
    refused
}

/// Publishes to `queue` until the disk is full (a batch had refusals), then one batch more;
/// returns every answer.
fn fill(c: &mut Client, queue: &str) -> Answers {
    let mut answers = Answers::default();
    let mut next = 1;
    loop {
        assert!(next < 100_000, "the 24 MiB filesystem never filled");
        let refused = publish_batch(c, queue, next, &mut answers);
        next += BATCH;
        if refused {
            break;
        }
    }
    publish_batch(c, queue, next, &mut answers);
    answers
}

fn get(c: &mut Client, queue: &str) -> wire::GetOkT {
    let mut g = wire::GetT::default();
    g.queue = queue.to_string();
    match c.request(BodyT::Get(Box::new(g))) {
        BodyT::GetOk(ok) => *ok,
        other => panic!("get: {other:?}"),
    }
}

#[test]
fn an_ack_on_a_full_disk_is_refused_and_its_delivery_stays_with_its_consumer() {
    let Some(fs) = filesystem("the full-disk ack test") else {
        return;
    };
    // Room given back before the restart: opening the journal starts a fresh segment.
    let ballast = fs.mount.join("ballast");
    let data = fs.mount.join("data");
    let mut broker = start(&data, "disk-full-ack");

    let mut first = Client::connect(broker.listen);
    first.handshake();
    first.declare("q");
    first.declare("fill");
    let held = body(0);
    first.publish("q", 1, &[held.as_slice()], false);
    first.await_confirms(1, 1);
    first.consume("q", "first", 10, false);
    let got = first.deliveries(1);
    assert_eq!(got[0].body, held);

    let mut filler = Client::connect(broker.listen);
    filler.handshake();
    let answers = fill(&mut filler, "fill");
    assert!(!answers.refused.is_empty());

    // The ack cannot be journaled: it is refused, not answered Ok.
    let mut ack = wire::AckT::default();
    ack.ranges = vec![wire::RangeT {
        first: got[0].delivery_tag,
        last: got[0].delivery_tag,
    }];
    match first.request(BodyT::Ack(Box::new(ack.clone()))) {
        BodyT::Error(e) => assert_eq!(e.code, ErrorCode::DiskFull, "{e:?}"),
        other => panic!("an ack that could not be journaled was answered {other:?}"),
    }
    // Its tag is still this connection's: the same ack retried goes to the queue's owner again
    // and is refused for the same reason (before: the session had dropped the tag with the
    // refused settlement, so a retry was an unknown tag and the delivery could never be acked).
    match first.request(BodyT::Ack(Box::new(ack))) {
        BodyT::Error(e) => assert_eq!(e.code, ErrorCode::DiskFull, "the retry: {e:?}"),
        other => panic!("the retried ack was answered {other:?}"),
    }

    // Still the first consumer's: nobody else gets it while its connection lives...
    let mut second = Client::connect(broker.listen);
    second.handshake();
    let ok = get(&mut second, "q");
    assert!(ok.delivery.is_none(), "handed out while still held");
    let BodyT::QueueInfo(info) = second.info("q") else {
        panic!("no info")
    };
    assert_eq!(info.messages_unacked, 1, "the refused ack was applied");
    // ...and it is redelivered once that connection closes.
    second.consume("q", "second", 10, false);
    drop(first);
    let again = second.deliveries(1);
    assert_eq!(again[0].body, held);
    assert!(again[0].redelivered);

    // Never acked, so it survives a restart.
    broker.kill();
    broker.keep_data();
    drop((second, filler));
    drop(broker);
    std::fs::remove_file(&ballast).expect("ballast");
    let broker = start(&data, "disk-full-ack-restarted");
    let mut c = Client::connect(broker.listen);
    c.handshake();
    let BodyT::QueueInfo(info) = c.info("q") else {
        panic!("the durable queue is gone")
    };
    assert_eq!(
        info.messages_ready, 1,
        "the unacked message did not survive"
    );
}

#[test]
fn on_a_full_disk_no_refused_publish_is_delivered_and_every_confirmed_one_is() {
    let Some(fs) = filesystem("the full-disk publish test") else {
        return;
    };
    let data = fs.mount.join("data");
    let broker = start(&data, "disk-full-publish");
    let mut consumer = Client::connect(broker.listen);
    consumer.handshake();
    consumer.declare("q");
    consumer.consume("q", "c", 65_535, false);

    let mut producer = Client::connect(broker.listen);
    producer.handshake();
    let answers = fill(&mut producer, "q");
    let codes: BTreeSet<_> = answers.refused.values().map(|c| format!("{c:?}")).collect();
    assert!(
        answers.refused.values().all(|c| *c == ErrorCode::DiskFull),
        "a full disk must always be DiskFull, got {codes:?}"
    );
    assert!(!answers.confirmed.is_empty());

    // Every confirmed message reaches the consumer; no refused one ever does.
    let mut delivered = BTreeSet::new();
    while !answers.confirmed.is_subset(&delivered) {
        let f = consumer.recv().expect("closed while consuming");
        let BodyT::Deliver(d) = f.body else {
            panic!("expected deliveries, got {f:?}")
        };
        for x in d.deliveries {
            let m = weir_protocol::verify_message(&x.message, &WireLimits::DEFAULT)
                .unwrap()
                .unpack();
            let seq = seq_of(&m.body.unwrap_or_default());
            assert!(
                !answers.refused.contains_key(&seq),
                "message {seq} was refused ({:?}) and delivered",
                answers.refused[&seq]
            );
            assert!(delivered.insert(seq), "message {seq} delivered twice");
        }
    }
    // And the queue holds exactly the confirmed ones (all delivered, unacked): no refused one
    // waits in it to be delivered later.
    let BodyT::QueueInfo(info) = producer.info("q") else {
        panic!("no info")
    };
    assert_eq!(
        (info.messages_ready, info.messages_unacked),
        (0, answers.confirmed.len() as u64),
        "{} confirmed, {} refused",
        answers.confirmed.len(),
        answers.refused.len()
    );
}

#[test]
fn once_room_is_freed_outside_the_broker_a_refused_ack_retried_under_its_tag_is_kept() {
    let Some(fs) = filesystem("the full-disk ack retry test") else {
        return;
    };
    let ballast = fs.mount.join("ballast");
    let data = fs.mount.join("data");
    let mut broker = start(&data, "disk-full-ack-retry");

    let mut c = Client::connect(broker.listen);
    c.handshake();
    c.declare("q");
    c.declare("fill");
    c.publish("q", 1, &[body(0).as_slice()], false);
    c.await_confirms(1, 1);
    c.consume("q", "c", 10, false);
    let got = c.deliveries(1);
    let mut filler = Client::connect(broker.listen);
    filler.handshake();
    assert!(!fill(&mut filler, "fill").refused.is_empty());

    let mut ack = wire::AckT::default();
    ack.ranges = vec![wire::RangeT {
        first: got[0].delivery_tag,
        last: got[0].delivery_tag,
    }];
    match c.request(BodyT::Ack(Box::new(ack.clone()))) {
        BodyT::Error(e) => assert_eq!(e.code, ErrorCode::DiskFull, "{e:?}"),
        other => panic!("an ack that could not be journaled was answered {other:?}"),
    }
    // An operator frees room. The broker notices on its own (its reclaim timer tells the journal
    // to try the disk again), so the same ack, retried under the same tag, is kept: answered Ok.
    std::fs::remove_file(&ballast).expect("ballast");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match c.request(BodyT::Ack(Box::new(ack.clone()))) {
            BodyT::Ok(_) => break,
            BodyT::Error(e) if e.code == ErrorCode::DiskFull => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "room was freed, yet the ack is still refused: {e:?}"
                );
                // Polling an answer that changes on the broker's own timer, not synchronising.
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            other => panic!("the retried ack was answered {other:?}"),
        }
    }
    // Answered Ok, so it is on disk: not redelivered after a crash.
    broker.kill();
    broker.keep_data();
    drop((c, filler));
    drop(broker);
    let broker = start(&data, "disk-full-ack-retry-restarted");
    let mut c = Client::connect(broker.listen);
    c.handshake();
    let BodyT::QueueInfo(info) = c.info("q") else {
        panic!("the durable queue is gone")
    };
    assert_eq!(
        (info.messages_ready, info.messages_unacked),
        (0, 0),
        "an ack answered Ok came back after a restart"
    );
}
