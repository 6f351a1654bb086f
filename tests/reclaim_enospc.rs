//! A full disk must not cost a durable queue: the real broker with its data on a small ext4
//! image, loop-mounted. Needs root, a loop device, mkfs.ext4 and mount; where any is missing the
//! test prints why and skips (the rule itself is unit-tested in `broker::reclaim`).
//!
//! The scenario: the disk fills while the queue's declaration sits only in the oldest segment;
//! then the messages there are taken with auto-ack (settled while dispatching, at least once: the
//! settle records cannot be journaled; an ack would be refused on the full disk), so a
//! reclaim round finds old segments free but cannot restate the catalog. It must delete nothing.

mod common;
mod loop_mount;

use std::time::{Duration, Instant};

use common::{temp_dir, Client, TIMEOUT};
use loop_mount::small_filesystem;
use weir_protocol::wire::{self, BodyT, ErrorCode};

fn start(
    data: &std::path::Path,
    config: &std::path::Path,
    log: &std::path::Path,
) -> weir_testkit::Broker {
    weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(data)
        .args(["--config", config.to_str().unwrap()])
        .rust_log("warn")
        .stderr_to_file(log)
        .ready_timeout(TIMEOUT)
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Publishes `bodies` from `first`; returns whether all were confirmed (false: refused for a
/// full disk).
fn publish_batch(c: &mut Client, first: u64, bodies: &[&[u8]]) -> bool {
    c.publish("q", first, bodies, false);
    let last = first + bodies.len() as u64 - 1;
    let mut settled = std::collections::BTreeSet::new();
    let mut full = false;
    while (first..=last).any(|s| !settled.contains(&s)) {
        let f = c.recv().expect("closed while publishing");
        let (ranges, refused) = match f.body {
            BodyT::Confirm(cf) => (cf.ranges, false),
            BodyT::Error(e) if e.code == ErrorCode::DiskFull => {
                (e.sequences.unwrap_or_default(), true)
            }
            other => panic!("publishing: {other:?}"),
        };
        full |= refused;
        for r in ranges {
            settled.extend(r.first..=r.last);
        }
    }
    !full
}

#[test]
fn a_reclaim_round_on_a_full_disk_keeps_the_durable_queue_and_its_messages() {
    let fs = match small_filesystem() {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED (nothing tested): no loop-mounted filesystem for the full-disk reclaim test: {why}");
            return;
        }
    };
    let outside = temp_dir("reclaim-enospc");
    let config = outside.join("weir.toml");
    // No disk reserve: the restatement must find the disk full too (with the default reserve it
    // spends it and succeeds: tests/disk_full_drain.rs).
    std::fs::write(
        &config,
        "cpus = [0]\n[limits]\nsegment_size_bytes_max = 2097152\nreserve_bytes = 0\n",
    )
    .unwrap();
    let log = outside.join("weir.log");
    // Room given back before the restart: opening the journal starts a fresh segment.
    let ballast = fs.mount.join("ballast");
    std::fs::write(&ballast, vec![1u8; 5 << 20]).expect("ballast");
    let data = fs.mount.join("data");
    let mut broker = start(&data, &config, &log);
    let mut c = Client::connect(broker.listen);
    c.handshake();
    c.declare("q"); // only in the first segment: no round restates while every segment is live

    let body = vec![b'x'; 1024];
    let bodies: Vec<&[u8]> = (0..200).map(|_| body.as_slice()).collect();
    let mut next = 1u64;
    let mut confirmed_batches = 0u64;
    loop {
        assert!(next < 100_000, "the 24 MiB filesystem never filled");
        let ok = publish_batch(&mut c, next, &bodies);
        next += bodies.len() as u64;
        if !ok {
            break;
        }
        confirmed_batches += 1;
    }
    let confirmed = confirmed_batches * bodies.len() as u64;
    let segments = c.journal_segments();
    assert!(segments >= 3, "the disk filled after {segments} segments");

    // Take all but the last batch's messages with auto-ack: settled as they are dispatched (at
    // least once: their settle records cannot be journaled), so the old segments hold nothing
    // live any more. (A client's ack would be refused on the full disk, and change nothing.)
    let kept = bodies.len() as u64;
    let mut taken = 0;
    while taken < confirmed - kept {
        let n = (confirmed - kept - taken).min(1000);
        for _ in 0..n {
            let mut g = wire::GetT::default();
            g.queue = "q".into();
            g.auto_ack = true;
            c.send(BodyT::Get(Box::new(g)));
        }
        for _ in 0..n {
            match c.recv().map(|f| f.body) {
                Some(BodyT::GetOk(ok)) if ok.delivery.is_some() => {}
                other => panic!("get: {other:?}"),
            }
        }
        taken += n;
    }

    // Wait, bounded, until a reclaim round has dealt with it: segments were deleted, or two
    // rounds in a row could not restate the catalog (so the first one finished).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let refusals = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("reclaim: cannot restate the catalog")
            .count();
        if c.journal_segments() < segments || refusals >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reclaim round ran on the full disk"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    broker.kill();
    broker.keep_data();
    drop(c);
    drop(broker);
    std::fs::remove_file(&ballast).expect("ballast");
    let broker = start(&data, &config, &log);
    let mut c = Client::connect(broker.listen);
    c.handshake();
    let BodyT::QueueInfo(info) = c.info("q") else {
        panic!("the durable queue was lost: its declaration was reclaimed without a restatement")
    };
    assert!(
        info.messages_ready >= kept,
        "{} of the {kept} confirmed, unacked messages came back",
        info.messages_ready
    );
}
