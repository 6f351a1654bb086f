//! Memory on the publish side is bounded by configuration, not by load: measured as the broker's
//! resident set (VmRSS in `/proc/<pid>/status`), with bounds derived from the configured limits
//! and the traffic, and generous slack (the allocator keeps freed memory; a test asserts orders
//! of magnitude, not kilobytes). Each test prints what it measured (`--nocapture`).

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use common::{temp_dir, Broker, Client};
use weir_protocol::wire::{self, BodyT, Overflow};
use weir_protocol::{Encoder, MessageProps, WireLimits};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The broker's resident set, bytes.
fn rss(broker: &Broker) -> u64 {
    let pid = broker.pid().expect("the broker runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kib * KIB
}

fn start(name: &str, limits: &str, extra: &[&str]) -> Broker {
    let dir = temp_dir(name);
    let config = dir.join("weir.toml");
    std::fs::write(&config, format!("cpus = [0]\n[limits]\n{limits}")).unwrap();
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    Broker::start(&dir, &args)
}

/// Before the fix each of these messages, arriving one per read, kept its whole 64 KiB receive
/// chunk alive while queued (and every chunk was zero-filled, so resident): 5000 messages of
/// 100 bytes held over 300 MiB. Copied out, they hold about their own size plus the index.
#[test]
fn small_messages_held_in_a_queue_do_not_pin_their_receive_chunks() {
    const COUNT: u64 = 5000;
    const SIZE: u64 = 100;
    let broker = start("mem-small", "", &["--fsync", "never"]);
    let mut c = broker.connect();
    c.handshake();
    c.declare("small");
    let body = vec![b's'; SIZE as usize];
    // One message per frame, each confirmed before the next is sent: one read per message.
    let mut seq = 1;
    let mut publish_one_by_one = |c: &mut Client, n: u64| {
        for _ in 0..n {
            c.publish("small", seq, &[&body], false);
            c.await_confirms(seq, seq);
            seq += 1;
        }
    };
    publish_one_by_one(&mut c, 200); // the allocator's first arenas, the queue's first blocks
    let before = rss(&broker);
    publish_one_by_one(&mut c, COUNT);
    let after = rss(&broker);
    let BodyT::QueueInfo(info) = c.info("small") else {
        panic!("no QueueInfo")
    };
    assert_eq!(info.messages_ready, 200 + COUNT, "every message is held");
    let growth = after.saturating_sub(before);
    eprintln!(
        "{COUNT} persistent messages of {SIZE} B, one per read: RSS {} KiB -> {} KiB \
         (+{} KiB, {} B per message)",
        before / KIB,
        after / KIB,
        growth / KIB,
        growth / COUNT
    );
    // Per message: its bytes, its `Stored`, its index entry and allocator overhead, well under
    // 2 KiB; the chunks it used to pin were 64 KiB each.
    let bound = COUNT * (SIZE + 2 * KIB) + 16 * MIB;
    assert!(
        growth < bound,
        "RSS grew by {growth} bytes for {COUNT} messages of {SIZE} B (bound {bound}): \
         messages pin their receive buffers"
    );
}

/// Before the fix an idle connection held a zero-filled 64 KiB receive buffer (about 70 KiB of
/// RSS each); now it holds none while no bytes are pending.
#[test]
fn an_idle_connection_holds_no_receive_buffer() {
    const CONNECTIONS: u64 = 1000;
    let broker = start("mem-idle", "", &[]);
    let mut warm: Vec<Client> = (0..50).map(|_| broker.connect()).collect();
    for c in &mut warm {
        c.handshake();
    }
    let before = rss(&broker);
    let mut idle: Vec<Client> = (0..CONNECTIONS).map(|_| broker.connect()).collect();
    for c in &mut idle {
        c.handshake();
    }
    // Each answered its handshake, so the broker served each before this reading.
    let after = rss(&broker);
    let per = after.saturating_sub(before) / CONNECTIONS;
    eprintln!(
        "{CONNECTIONS} idle connections: RSS {} KiB -> {} KiB ({} B each)",
        before / KIB,
        after / KIB,
        per
    );
    // The session (its encoder's 4 KiB builder included), the outbox, the task: under 16 KiB.
    assert!(
        per < 16 * KIB,
        "an idle connection costs {per} bytes of RSS: it holds a receive buffer"
    );
    drop(idle);
}

/// One publish frame of a 64 KiB non-persistent message to `flood`, and where its sequence
/// number's 8 bytes are.
fn flood_frame() -> (Vec<u8>, usize) {
    const MARK: u64 = 0x5e90_c0de_f100_d5e9;
    let mut encoder = Encoder::new(WireLimits::DEFAULT);
    let props = MessageProps {
        persistent: false,
        ..Default::default()
    };
    let message = encoder.message(&props, &vec![b'f'; 64 * 1024]).unwrap();
    let item = weir_protocol::PublishItem {
        sequence: MARK,
        exchange: "",
        routing_key: "flood",
        mandatory: false,
        message: &message,
    };
    let mut out = BytesMut::new();
    encoder
        .publish(&mut out, 0, None, true, std::iter::once(item))
        .unwrap();
    let mark = MARK.to_le_bytes();
    let at: Vec<usize> = (0..out.len() - 8)
        .filter(|&i| out[i..i + 8] == mark)
        .collect();
    assert_eq!(at.len(), 1, "the sequence is in the frame once");
    (out.to_vec(), at[0])
}

/// A producer floods 64 KiB publishes and never reads its confirms, while another client on the
/// same shard publishes one message at a time and waits for each confirm. Before the fix the
/// flooder's task found every read ready and never yielded: it filled the work queue up to
/// `publishes_in_flight_max` messages (4096 here: 256 MiB of them) while the worker, and the
/// other client, waited. Now its unconfirmed bytes stop at `publish_bytes_in_flight_max`, and
/// it yields after every read, so the other client is served throughout.
#[test]
fn a_producer_that_never_reads_its_confirms_holds_bounded_memory_and_others_are_served() {
    const IN_FLIGHT_BYTES: u64 = 2 * MIB;
    const WORK_BYTES: u64 = 4 * MIB;
    const ROUNDS: usize = 200;
    let broker = start(
        "mem-flood",
        &format!(
            "publishes_in_flight_max = 4096\npublish_bytes_in_flight_max = {IN_FLIGHT_BYTES}\n\
             work_bytes_max = {WORK_BYTES}\n"
        ),
        &[],
    );
    // The flood goes to a short transient queue: no disk, and the queue itself stays small.
    let mut setup = broker.connect();
    setup.handshake();
    let mut args = wire::QueueArgumentsT::default();
    args.max_length = Some(8);
    args.overflow = Overflow::DropHead;
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("flood".into());
    d.arguments = Some(Box::new(args));
    assert!(matches!(setup.declare_with(d), BodyT::QueueInfo(_)));
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("calm".into());
    assert!(matches!(setup.declare_with(d), BodyT::QueueInfo(_)));

    let mut victim = broker.connect();
    victim.handshake();
    let mut flooder = broker.connect();
    flooder.handshake();
    let before = rss(&broker);

    let stop = flooder.stream.try_clone().unwrap();
    let mut stream = flooder.stream.try_clone().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let flood = std::thread::spawn({
        let sent = sent.clone();
        move || {
            // One frame encoded once, its sequence patched in place for each copy: a debug-built
            // encoder would be slower than the broker, and the point is a producer that is not.
            let (template, at) = flood_frame();
            let mut out = BytesMut::new();
            for seq in (1u64..).step_by(8) {
                out.clear();
                for s in seq..seq + 8 {
                    let start = out.len();
                    out.extend_from_slice(&template);
                    out[start + at..start + at + 8].copy_from_slice(&s.to_le_bytes());
                }
                if stream.write_all(&out).is_err() {
                    break; // the test shut the socket down
                }
                sent.fetch_add(8, Ordering::Relaxed);
            }
        }
    });

    // The other client goes on until the flooder has sent twice what `publishes_in_flight_max`
    // let the broker hold before the fix.
    let mut latencies = Vec::new();
    let mut seq = 0;
    while latencies.len() < ROUNDS || sent.load(Ordering::Relaxed) < 2 * 4096 {
        seq += 1;
        let t = Instant::now();
        victim.publish_with("calm", seq, &[b"calm"], false, false);
        victim.await_confirms(seq, seq);
        latencies.push(t.elapsed());
    }
    let during = rss(&broker);
    stop.shutdown(Shutdown::Both).unwrap();
    flood.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);
    let rounds = latencies.len();
    latencies.sort();
    let growth = during.saturating_sub(before);
    eprintln!(
        "flood of {sent} publishes of 64 KiB, never reading confirms: RSS {} KiB -> {} KiB \
         (+{} KiB); the other client's confirms over {rounds} publishes: p50 {:?}, p99 {:?}, \
         max {:?}",
        before / KIB,
        during / KIB,
        growth / KIB,
        latencies[rounds / 2],
        latencies[rounds * 99 / 100],
        latencies[rounds - 1]
    );
    assert!(sent > 0);
    // What the bounds let the flooder hold: its unconfirmed bytes (one frame over at most), the
    // work queue, two receive chunks, the short queue; plus slack for the allocator.
    let bound = IN_FLIGHT_BYTES + WORK_BYTES + 8 * 64 * KIB + 32 * MIB;
    assert!(
        growth < bound,
        "RSS grew by {growth} bytes under the flood (bound {bound})"
    );
}
