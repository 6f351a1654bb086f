//! A full disk empties itself as consumers drain it: the real broker with its data on a small
//! ext4 image, loop-mounted, under the default `fsync = always` and the default disk reserve
//! (two segments). Needs root, a loop device, mkfs.ext4 and mount; where any is missing the test
//! prints why and skips (the reserve's decisions are tested on the fault layer in
//! tests/journal_reserve.rs).
//!
//! Publishing until `DiskFull`, then consuming the queue that filled the disk and acking every
//! message: every ack is answered `Ok` (the settle records spend the reserve), every confirmed
//! message is delivered exactly once and no refused one ever, reclaim deletes the drained
//! segments, publishes are taken again without a restart (the reserve made again), and after a
//! SIGKILL and restart nothing acked comes back.

mod common;
mod loop_mount;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Client, TIMEOUT};
use loop_mount::seq_of;
use weir_protocol::wire::{self, BodyT, ErrorCode};

const BODY_BYTES: usize = 4096;
const BATCH: u64 = 250;
/// Of the 24 MiB filesystem, what is taken before the broker starts: less to fill.
const BALLAST_BYTES: usize = 8 << 20;
/// Deliveries acked per ack request.
const ACK_TAGS: usize = 20;

fn start(data: &std::path::Path, dir: &str) -> weir_testkit::Broker {
    // The reserve is left at its default: two segments (4 MiB here).
    common::start_on_data_dir(data, dir, "segment_size_bytes_max = 2097152")
}

fn body(seq: u64) -> Vec<u8> {
    loop_mount::numbered_body(seq, BODY_BYTES)
}

/// Publishes `count` messages to `queue` from sequence `first`; returns the confirmed ones and
/// whether any was refused (always `DiskFull`).
fn publish_batch(c: &mut Client, queue: &str, first: u64, count: u64) -> (BTreeSet<u64>, bool) {
    let bodies: Vec<Vec<u8>> = (first..first + count).map(body).collect();
    let refs: Vec<&[u8]> = bodies.iter().map(|b| b.as_slice()).collect();
    c.publish(queue, first, &refs, false);
    let mut confirmed = BTreeSet::new();
    let mut refused = BTreeSet::new();
    while confirmed.len() + refused.len() < count as usize {
        let f = c.recv().expect("closed while publishing");
        match f.body {
            BodyT::Confirm(cf) => {
                for r in cf.ranges {
                    confirmed.extend(r.first..=r.last);
                }
            }
            BodyT::Error(e) => {
                assert_eq!(e.code, ErrorCode::DiskFull, "{e:?}");
                for r in e.sequences.unwrap_or_default() {
                    refused.extend(r.first..=r.last);
                }
            }
            other => panic!("publishing: {other:?}"),
        }
    }
    (confirmed, !refused.is_empty())
}

#[test]
fn on_a_full_disk_consumers_drain_the_queue_every_ack_is_ok_and_publishes_come_back() {
    let Some(fs) = loop_mount::with_ballast("the full-disk drain test", BALLAST_BYTES) else {
        return;
    };
    let data = fs.mount.join("data");
    let mut broker = start(&data, "disk-full-drain");
    let mut producer = Client::connect(broker.listen);
    producer.handshake();
    producer.declare("q");

    // Fill the disk.
    let mut confirmed = BTreeSet::new();
    let mut next = 1;
    loop {
        assert!(next < 100_000, "the 24 MiB filesystem never filled");
        let (ok, refused) = publish_batch(&mut producer, "q", next, BATCH);
        confirmed.extend(ok);
        next += BATCH;
        if refused {
            break;
        }
    }
    assert!(!confirmed.is_empty());
    let full_segments = producer.journal_segments();

    // Drain it, acking every delivery with a reply: each ack is answered Ok.
    let mut consumer = Client::connect(broker.listen);
    consumer.handshake();
    consumer.consume("q", "drain", 1000, false);
    let mut delivered = BTreeSet::new();
    let mut acks = 0;
    let mut unacked = std::collections::VecDeque::new();
    while delivered.len() < confirmed.len() || !unacked.is_empty() {
        if unacked.is_empty() {
            unacked.extend(consumer.deliveries(1));
        }
        // Acks of ACK_TAGS deliveries each: a burst of settle records, many commits.
        let mut ack = wire::AckT::default();
        let n = unacked.len().min(ACK_TAGS);
        for g in unacked.drain(..n) {
            let seq = seq_of(&g.body);
            assert!(
                confirmed.contains(&seq),
                "message {seq} was refused and delivered"
            );
            assert!(delivered.insert(seq), "message {seq} delivered twice");
            assert!(!g.redelivered, "message {seq} redelivered");
            ack.ranges.push(wire::RangeT {
                first: g.delivery_tag,
                last: g.delivery_tag,
            });
        }
        match consumer.request(BodyT::Ack(Box::new(ack))) {
            BodyT::Ok(_) => acks += 1,
            other => panic!(
                "ack {} on a full disk, after {acks} answered Ok and {} of {} delivered: {other:?}",
                acks + 1,
                delivered.len(),
                confirmed.len()
            ),
        }
    }
    drop(consumer);

    // Reclaim deletes the drained segments (bounded wait: it runs on a timer).
    let deadline = Instant::now() + TIMEOUT;
    let mut segments = producer.journal_segments();
    while segments >= full_segments {
        assert!(
            Instant::now() < deadline,
            "the drained segments were never reclaimed: {segments} of {full_segments} remain"
        );
        std::thread::sleep(Duration::from_millis(100));
        segments = producer.journal_segments();
    }

    // Publishes are taken again, without a restart, once the reserve is made again (bounded
    // wait: that happens after a reclaim round).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (ok, _) = publish_batch(&mut producer, "q", next, 1);
        next += 1;
        if !ok.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publishes are still refused after the disk was drained and reclaimed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, refused) = publish_batch(&mut producer, "q", next, 50);
    assert!(!refused && ok.len() == 50, "{} of 50 confirmed", ok.len());
    let after = 1 + 50;
    println!(
        "{} confirmed on the full disk, drained with {acks} acks, all Ok; segments {full_segments} \
         -> {segments}; {after} published after",
        confirmed.len()
    );

    // Nothing acked comes back after a crash: the queue holds just what was published after.
    broker.kill();
    broker.keep_data();
    drop(producer);
    drop(broker);
    let broker = start(&data, "disk-full-drain-restarted");
    let mut c = Client::connect(broker.listen);
    c.handshake();
    let BodyT::QueueInfo(info) = c.info("q") else {
        panic!("the durable queue is gone")
    };
    assert_eq!(
        (info.messages_ready, info.messages_unacked),
        (after, 0),
        "acked messages came back after the restart"
    );
}
