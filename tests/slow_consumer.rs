//! A consumer that never reads its socket, and one that never acks: neither may hold the
//! broker's memory or its queue's messages. Memory is read as the broker's RSS from
//! `/proc/<pid>/status` and held to a bound derived from the configured limits
//! (`cache_bytes_max`, `outbox_bytes_max` per connection), with generous slack; liveness is
//! another consumer on the same queue getting the messages.

mod common;

use common::{temp_dir, Broker, Client};
use weir_protocol::wire::BodyT;

const MIB: u64 = 1 << 20;

/// The broker's resident set, bytes.
fn rss_bytes(broker: &Broker) -> u64 {
    broker.memory().expect("the broker's memory").rss_bytes
}

fn start(name: &str, limits: &str) -> Broker {
    let dir = temp_dir(name);
    let config = dir.join("weir.toml");
    std::fs::write(&config, format!("cpus = [0]\n[limits]\n{limits}")).unwrap();
    Broker::start(&dir, &["--config", config.to_str().unwrap()])
}

fn connect(broker: &Broker) -> Client {
    let mut c = broker.connect();
    c.handshake();
    c
}

/// Says the broker's RSS when dropped, the test passing or not: the note's "before" figure is
/// this line from a run without the outbox bound.
struct RssReport<'a>(&'a Broker, u64, &'static str);

impl Drop for RssReport<'_> {
    fn drop(&mut self) {
        eprintln!(
            "{}: broker RSS {} MiB, {} MiB more than before the stuck consumer",
            self.2,
            rss_bytes(self.0) / MIB,
            rss_bytes(self.0).saturating_sub(self.1) / MIB
        );
    }
}

/// Reads at least `n` deliveries and acks them (with a reply); returns how many it read.
fn take_and_ack(c: &mut Client, n: usize) -> usize {
    let got = c.deliveries(n);
    let tags: Vec<u64> = got.iter().map(|g| g.delivery_tag).collect();
    c.ack(&tags);
    got.len()
}

/// 50 MiB of 64 KiB persistent messages, a cache of 8 MiB and outboxes of 2 MiB: a consumer
/// that asks for the whole backlog at once (prefetch 10,000) and then never reads gets about
/// one outbox of it, and so does an auto-ack one; the rest waits in the journal, and a third
/// consumer drains it. Before
/// the outbox bound the stuck consumer was handed the whole backlog (read back, then encoded a
/// second time into its outbox: RSS grew by about twice the backlog) and the second consumer
/// got nothing.
#[test]
fn a_consumer_that_never_reads_holds_neither_the_brokers_memory_nor_the_queue() {
    const CACHE: u64 = 8 * MIB;
    const OUTBOX: u64 = 2 * MIB;
    const BODY: usize = 64 * 1024;
    const MESSAGES: u64 = 800;
    let broker = start(
        "slow-consumer",
        &format!(
            "message_size_max = 131072\ncache_bytes_max = {CACHE}\noutbox_bytes_max = {OUTBOX}\n"
        ),
    );
    let mut producer = connect(&broker);
    producer.declare("backlog");
    let body = vec![b'x'; BODY];
    let batch: Vec<&[u8]> = (0..100).map(|_| body.as_slice()).collect();
    for first in (1..=MESSAGES).step_by(100) {
        producer.publish("backlog", first, &batch, false);
        producer.await_confirms(first, first + 99);
    }
    let before = rss_bytes(&broker);
    let _report = RssReport(&broker, before, "at the end");

    let mut stuck = connect(&broker);
    stuck.consume("backlog", "stuck", 10_000, false);
    // Auto-ack: no prefetch bound at all.
    let mut stuck_auto = connect(&broker);
    stuck_auto.consume("backlog", "stuck-auto", 10_000, true);
    // From here on neither reads its socket.

    let mut other = connect(&broker);
    other.consume("backlog", "other", 64, false);
    let mut taken = 0;
    while taken < 400 {
        taken += take_and_ack(&mut other, 64);
    }
    let after = rss_bytes(&broker);
    eprintln!(
        "RSS with a backlog of {} MiB: {} MiB before the stuck consumer, {} MiB after it and \
         {taken} messages to another consumer",
        MESSAGES * BODY as u64 / MIB,
        before / MIB,
        after / MIB
    );
    // Four connections, each with at most one outbox in flight; the slack covers the encoded
    // copies of what is in flight and the allocator.
    let bound = CACHE + 4 * OUTBOX + 24 * MIB;
    assert!(
        after <= before + bound,
        "the broker grew by {} MiB (bound {} MiB) while a consumer did not read",
        (after.saturating_sub(before)) / MIB,
        bound / MIB
    );
}

/// A consumer that takes its deliveries and never acks them is cancelled after
/// `consumer_timeout_ms`, told why, and what it held goes to another consumer, marked
/// redelivered. Before the timeout existed the other consumer got nothing, ever.
#[test]
fn a_consumer_past_its_timeout_is_cancelled_and_its_deliveries_go_to_another() {
    let broker = start(
        "consumer-timeout",
        "consumer_timeout_ms = 300\nmessage_size_max = 65536\n",
    );
    let mut producer = connect(&broker);
    producer.declare("work");
    let bodies: Vec<Vec<u8>> = (0..10).map(|i| format!("job {i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = bodies.iter().map(|b| b.as_slice()).collect();
    producer.publish("work", 1, &refs, false);
    producer.await_confirms(1, 10);

    let mut stuck = connect(&broker);
    stuck.consume("work", "stuck", 100, false);
    let held = stuck.deliveries(10);
    assert_eq!(held.len(), 10);

    let mut other = connect(&broker);
    other.consume("work", "other", 100, false);
    let got = other.deliveries(10);
    let mut seen: Vec<Vec<u8>> = got.iter().map(|g| g.body.clone()).collect();
    seen.sort();
    let mut want = bodies.clone();
    want.sort();
    assert_eq!(seen, want, "the stuck consumer's deliveries, all of them");
    assert!(got.iter().all(|g| g.redelivered && g.delivery_count == 2));

    match stuck.recv().map(|f| f.body) {
        Some(BodyT::ConsumerCancelled(c)) => {
            assert_eq!(c.consumer_tag.as_deref(), Some("stuck"));
            let why = c.message.unwrap_or_default();
            assert!(why.contains("consumer_timeout_ms"), "{why}");
        }
        other => panic!("expected the stuck consumer to be cancelled, got {other:?}"),
    }
    // Its tags were taken back: acking one now settles nothing.
    let mut ack = weir_protocol::wire::AckT::default();
    ack.ranges = vec![weir_protocol::wire::RangeT {
        first: held[0].delivery_tag,
        last: held[0].delivery_tag,
    }];
    match stuck.request(BodyT::Ack(Box::new(ack))) {
        BodyT::Error(e) => assert_eq!(e.code, weir_protocol::wire::ErrorCode::UnknownDeliveryTag),
        other => panic!("an ack of a taken-back delivery was answered {other:?}"),
    }
    let tags: Vec<u64> = got.iter().map(|g| g.delivery_tag).collect();
    other.ack(&tags);
}

/// A `Get` delivery held unacked past `consumer_timeout_ms` goes back to its queue, to another
/// consumer, marked redelivered; the connection that got it has no consumer to cancel and is
/// told nothing, and its late ack of it is `UnknownDeliveryTag`. Before, a `Get` delivery was
/// never timed out: the other consumer got nothing while the getter's connection lived.
#[test]
fn a_get_held_past_the_timeout_goes_to_another_consumer() {
    let broker = start(
        "get-timeout",
        "consumer_timeout_ms = 300\nmessage_size_max = 65536\n",
    );
    let mut producer = connect(&broker);
    producer.declare("work");
    producer.publish("work", 1, &[b"the job".as_slice()], false);
    producer.await_confirms(1, 1);

    let mut getter = connect(&broker);
    let mut g = weir_protocol::wire::GetT::default();
    g.queue = "work".into();
    let tag = match getter.request(BodyT::Get(Box::new(g))) {
        BodyT::GetOk(ok) => ok.delivery.expect("the job").delivery_tag,
        other => panic!("get: {other:?}"),
    };

    let mut other = connect(&broker);
    other.consume("work", "other", 10, false);
    let got = other.deliveries(1);
    assert_eq!(got[0].body, b"the job");
    assert!(got[0].redelivered && got[0].delivery_count == 2);

    let mut ack = weir_protocol::wire::AckT::default();
    ack.ranges = vec![weir_protocol::wire::RangeT {
        first: tag,
        last: tag,
    }];
    match getter.request(BodyT::Ack(Box::new(ack))) {
        BodyT::Error(e) => assert_eq!(e.code, weir_protocol::wire::ErrorCode::UnknownDeliveryTag),
        other => panic!("an ack of a timed-out Get was answered {other:?}"),
    }
    other.ack(&[got[0].delivery_tag]);
}
