//! A backlog drained from disk after a restart: every message comes back exactly once and in
//! order, read in windows (far fewer disk reads than messages), and the shard's worker does not
//! wait for those reads: a publish pipelined behind the consume that starts the drain is
//! answered before the first of the drained deliveries goes out.

mod common;

use common::{temp_dir, Broker, Client};
use weir_protocol::wire::{self, BodyT};

const QUEUE: &str = "backlog";

/// Message `i` of a backlog: its number, then filler to 1 KiB.
fn body(i: usize) -> Vec<u8> {
    let mut b = format!("{i:08}").into_bytes();
    b.resize(1024, b'.');
    b
}

/// A one-shard broker on `dir` (its config file beside the data), with `extra` arguments.
fn start(dir: &std::path::Path, extra: &[&str]) -> Broker {
    let config = dir.join("weir.toml");
    std::fs::write(&config, "cpus = [0]\n").unwrap();
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    Broker::start(dir, &args)
}

/// Publishes `n` persistent 1 KiB messages to the durable queue `QUEUE` and waits for every
/// confirm (after fsync).
fn publish_backlog(c: &mut Client, n: usize) {
    c.declare(QUEUE);
    let bodies: Vec<Vec<u8>> = (0..n).map(body).collect();
    for (i, chunk) in bodies.chunks(500).enumerate() {
        let refs: Vec<&[u8]> = chunk.iter().map(|b| b.as_slice()).collect();
        let first = 1 + (i * 500) as u64;
        c.publish(QUEUE, first, &refs, false);
        c.await_confirms(first, first + chunk.len() as u64 - 1);
    }
}

/// The shard's read-back counters: (disk reads, records read back).
fn read_back_counters(c: &mut Client) -> (u64, u64) {
    let BodyT::Status(st) = c.request(BodyT::GetStatus(Box::default())) else {
        panic!("no Status")
    };
    let counters = st.counters.expect("Status carries counters");
    let sum = |suffix: &str| {
        counters
            .iter()
            .filter(|c| c.name.ends_with(suffix))
            .map(|c| c.value)
            .sum::<u64>()
    };
    (sum(".read_back.reads"), sum(".read_back.records"))
}

/// The message number a delivery's body starts with.
fn number(body: &[u8]) -> usize {
    std::str::from_utf8(&body[..8]).unwrap().parse().unwrap()
}

#[test]
fn a_backlog_drained_after_a_restart_comes_back_once_in_order_read_in_windows() {
    const N: usize = 5000;
    let dir = temp_dir("drain-restart");
    let broker = start(&dir, &[]);
    let mut c = broker.connect();
    c.handshake();
    publish_backlog(&mut c, N);
    drop(c);
    let dir = broker.crash();

    // After the restart every message is only on disk (recovery restores them cold).
    let broker = start(&dir, &[]);
    let mut c = broker.connect();
    c.handshake();
    c.consume(QUEUE, "drain", 1000, false);
    let mut seen = Vec::with_capacity(N);
    while seen.len() < N {
        let got = c.deliveries(1);
        let tags: Vec<u64> = got.iter().map(|g| g.delivery_tag).collect();
        for g in got {
            assert!(g.redelivered, "recovered messages are marked redelivered");
            seen.push(number(&g.body));
            assert_eq!(g.body, body(*seen.last().unwrap()));
        }
        // One range per delivery: each acked on its own.
        c.ack(&tags);
    }
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "each once, in order");

    let (reads, records) = read_back_counters(&mut c);
    eprintln!("read back: {records} records in {reads} disk reads");
    assert!(records >= N as u64, "{records} records read back");
    // One read per message without read-ahead; a 1 MiB window holds about 900 of them.
    assert!(
        reads < records / 10,
        "{reads} disk reads for {records} records"
    );
}

#[test]
fn a_publish_behind_a_cold_drain_is_answered_before_the_drain_is_read() {
    const N: usize = 2000;
    let dir = temp_dir("drain-not-blocked");
    let broker = start(&dir, &[]);
    let mut c = broker.connect();
    c.handshake();
    publish_backlog(&mut c, N);
    drop(c);
    let (status, _) = broker.terminate();
    assert!(status.success());

    // fsync = never: the confirm goes when the record is staged, so no disk wait orders it
    // against the reads; what orders them is the worker alone.
    let broker = start(&dir, &["--fsync", "never"]);
    let mut c = broker.connect();
    c.handshake();
    // One write: the consume (whose dispatch hands the whole cold backlog to be read back) and
    // a publish on the same shard right behind it. The worker executes both in one go; had it
    // waited for the reads, the confirm would follow all N deliveries.
    let mut consume = wire::ConsumeT::default();
    consume.queue = QUEUE.to_string();
    consume.consumer_tag = Some("drain".into());
    consume.prefetch = N as u32 + 1;
    let mut encoder = weir_protocol::Encoder::new(weir_protocol::WireLimits::DEFAULT);
    let mut out = bytes::BytesMut::new();
    encoder
        .encode(
            &weir_protocol::frame(100, BodyT::Consume(Box::new(consume))),
            &mut out,
        )
        .unwrap();
    let message = encoder
        .message(
            &weir_protocol::MessageProps {
                persistent: true,
                ..Default::default()
            },
            &body(N),
        )
        .unwrap();
    let item = weir_protocol::PublishItem {
        sequence: 1,
        exchange: "",
        routing_key: QUEUE,
        mandatory: false,
        message: &message,
    };
    encoder
        .publish(&mut out, 0, None, true, std::iter::once(item))
        .unwrap();
    c.send_raw(&out);

    let mut order = Vec::new();
    let mut delivered = Vec::new();
    while delivered.len() < N + 1 {
        let f = c.recv().expect("open");
        match f.body {
            BodyT::ConsumeOk(_) => order.push("consume-ok"),
            BodyT::Confirm(cf) => {
                assert_eq!((cf.ranges[0].first, cf.ranges[0].last), (1, 1));
                order.push("confirm");
            }
            BodyT::Deliver(d) => {
                if order.last() != Some(&"deliver") {
                    order.push("deliver");
                }
                for x in d.deliveries {
                    let m = weir_protocol::verify_message(
                        &x.message,
                        &weir_protocol::WireLimits::DEFAULT,
                    )
                    .unwrap()
                    .unpack();
                    delivered.push(number(&m.body.unwrap()));
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        order,
        ["consume-ok", "confirm", "deliver"],
        "the publish was answered before the cold deliveries were read"
    );
    // The new message, published while the backlog was read, still comes after it.
    assert_eq!(delivered, (0..=N).collect::<Vec<_>>());
}
