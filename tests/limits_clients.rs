//! What grows with clients and backlog is bounded by configuration (issue 11, items 14 and 15):
//! each limit configured small here, reached by a client, and answered with backpressure or a
//! clear error naming it; memory during a deep purge read from the broker's /proc status.
//!
//! `connections_per_shard_max` and `handshake_timeout_ms` are tested in `tests/serve.rs`.

mod common;

use common::{temp_dir, Broker, Client};
use weir_protocol::wire::{self, BodyT, ErrorCode};

/// A one-shard broker with `limits` (TOML lines of the `[limits]` table).
fn broker(name: &str, limits: &str) -> Broker {
    let dir = temp_dir(name);
    let config = dir.join("weir.toml");
    std::fs::write(&config, format!("cpus = [0]\n[limits]\n{limits}\n")).unwrap();
    Broker::start(&dir, &["--config", config.to_str().unwrap()])
}

fn open(broker: &Broker) -> Client {
    let mut c = broker.connect();
    c.handshake();
    c
}

/// The refusal's message, checked to be `LimitExceeded` and to name `limit`.
fn limit_refusal(body: BodyT, limit: &str) -> String {
    match body {
        BodyT::Error(e) => {
            let message = e.message.unwrap_or_default();
            assert_eq!(e.code, ErrorCode::LimitExceeded, "{message}");
            assert!(!e.close, "a refusal, not a close: {message}");
            assert!(message.contains(limit), "{message} does not name {limit}");
            message
        }
        other => panic!("expected a refusal naming {limit}, got {other:?}"),
    }
}

fn get(c: &mut Client, queue: &str) -> BodyT {
    let mut g = wire::GetT::default();
    g.queue = queue.into();
    c.request(BodyT::Get(Box::new(g)))
}

fn consume(c: &mut Client, queue: &str, tag: &str) -> BodyT {
    let mut m = wire::ConsumeT::default();
    m.queue = queue.into();
    m.consumer_tag = Some(tag.into());
    m.prefetch = 1;
    c.request(BodyT::Consume(Box::new(m)))
}

#[test]
fn a_declare_past_queues_per_shard_max_is_refused_until_a_queue_goes() {
    let broker = broker("lim-queues", "queues_per_shard_max = 3");
    let mut c = open(&broker);
    for name in ["a", "b", "c"] {
        c.declare(name);
    }
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("d".into());
    d.durable = true;
    limit_refusal(c.declare_with(d.clone()), "queues_per_shard_max = 3");
    // A server-named queue is a queue too.
    limit_refusal(
        c.declare_with(wire::DeclareQueueT::default()),
        "queues_per_shard_max",
    );
    c.declare("a"); // declaring an existing queue adds none
    let mut del = wire::DeleteQueueT::default();
    del.name = "b".into();
    assert!(matches!(
        c.request(BodyT::DeleteQueue(Box::new(del))),
        BodyT::QueueDeleted(_)
    ));
    assert!(matches!(c.declare_with(d), BodyT::QueueInfo(_)));
}

#[test]
fn a_consume_past_consumers_per_connection_max_is_refused_and_others_still_consume() {
    let broker = broker("lim-consumers", "consumers_per_connection_max = 2");
    let mut c = open(&broker);
    c.declare("q");
    c.consume("q", "one", 1, false);
    c.consume("q", "two", 1, false);
    limit_refusal(
        consume(&mut c, "q", "three"),
        "consumers_per_connection_max = 2",
    );
    // The limit is per connection: another one consumes.
    let mut other = open(&broker);
    other.consume("q", "three", 1, false);
    // Cancelling one frees its place.
    let mut cancel = wire::CancelT::default();
    cancel.consumer_tag = "one".into();
    assert!(matches!(
        c.request(BodyT::Cancel(Box::new(cancel))),
        BodyT::Ok(_)
    ));
    c.consume("q", "three", 1, false);
}

#[test]
fn a_get_past_gets_unacked_max_is_refused_until_one_is_acked() {
    let broker = broker("lim-gets", "gets_unacked_max = 2");
    let mut c = open(&broker);
    c.declare("q");
    let bodies: Vec<&[u8]> = vec![b"m"; 5];
    c.publish("q", 1, &bodies, false);
    c.await_confirms(1, 5);
    let mut tags = Vec::new();
    for _ in 0..2 {
        match get(&mut c, "q") {
            BodyT::GetOk(ok) => tags.push(ok.delivery.expect("a message").delivery_tag),
            other => panic!("{other:?}"),
        }
    }
    limit_refusal(get(&mut c, "q"), "gets_unacked_max = 2");
    c.ack(&tags[..1]);
    assert!(matches!(get(&mut c, "q"), BodyT::GetOk(ok) if ok.delivery.is_some()));
    limit_refusal(get(&mut c, "q"), "gets_unacked_max = 2");
    // The queue still holds the other two: nothing was lost to the refusals.
    match c.info("q") {
        BodyT::QueueInfo(i) => assert_eq!((i.messages_ready, i.messages_unacked), (2, 2)),
        other => panic!("{other:?}"),
    }
}

/// Sequences an `Error` refuses, summed.
fn refused(e: &wire::ErrorT) -> u64 {
    e.sequences
        .iter()
        .flatten()
        .map(|r| r.last - r.first + 1)
        .sum()
}

#[test]
fn a_publish_past_queued_messages_max_is_refused_by_sequence_and_taken_once_drained() {
    let broker = broker("lim-index", "queued_messages_max = 100");
    let mut c = open(&broker);
    c.declare("a");
    c.declare("b");
    let bodies: Vec<&[u8]> = vec![b"m"; 60];
    c.publish("a", 1, &bodies, false);
    c.await_confirms(1, 60);
    // The bound is the shard's: 40 more fit, in any of its queues, and the rest are refused.
    c.publish("b", 61, &bodies, false);
    let (mut confirmed, mut refusals) = (0, 0);
    while confirmed + refusals < 60 {
        match c.recv().expect("open").body {
            BodyT::Confirm(cf) => {
                confirmed += cf.ranges.iter().map(|r| r.last - r.first + 1).sum::<u64>()
            }
            BodyT::Error(e) => {
                refusals += refused(&e);
                limit_refusal(BodyT::Error(e), "queued_messages_max = 100");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((confirmed, refusals), (40, 20));
    // Draining a queue makes room again.
    let mut p = wire::PurgeQueueT::default();
    p.name = "a".into();
    assert!(matches!(
        c.request(BodyT::PurgeQueue(Box::new(p))),
        BodyT::QueuePurged(p) if p.messages == 60
    ));
    c.publish("b", 121, &bodies, false);
    c.await_confirms(121, 180);
    match c.info("b") {
        BodyT::QueueInfo(i) => assert_eq!(i.messages_ready, 100),
        other => panic!("{other:?}"),
    }
}

/// The broker's VmRSS and VmHWM (peak since the last `reset_peak`), bytes.
fn rss(broker: &weir_testkit::Broker) -> (u64, u64) {
    let m = broker.memory().expect("the broker's memory");
    (m.rss_bytes, m.peak_rss_bytes)
}

/// Sends `count` requests made by `body` in one write on `c` and never reads their answers; then
/// another connection's request is answered (after whatever the shard took from `c` before it).
/// Returns the broker's RSS then.
fn pipelined_unread(broker: &Broker, c: &mut Client, count: u64, body: fn() -> BodyT) -> u64 {
    let mut encoder = weir_protocol::Encoder::new(weir_protocol::WireLimits::DEFAULT);
    let mut out = bytes::BytesMut::new();
    for id in 1_000..1_000 + count {
        encoder
            .encode(&weir_protocol::frame(id, body()), &mut out)
            .unwrap();
    }
    c.send_raw(&out);
    let mut other = open(broker);
    assert!(matches!(
        other.request(BodyT::GetStatus(Box::default())),
        BodyT::Status(_)
    ));
    rss(broker).0
}

/// Resets the broker's peak RSS (VmHWM) to its current RSS (`clear_refs`, value 5).
fn reset_peak(broker: &weir_testkit::Broker) {
    broker.reset_peak_memory().expect("clear_refs");
}

fn publish_backlog(c: &mut Client, queue: &str, n: u64) {
    let bodies: Vec<&[u8]> = vec![b"0123456789abcdef"; 4096];
    let mut first = 1;
    while first <= n {
        let count = (n - first + 1).min(4096);
        c.publish(queue, first, &bodies[..count as usize], false);
        c.await_confirms(first, first + count - 1);
        first += count;
    }
}

const MIB: u64 = 1 << 20;

/// A broker whose allocator serves every allocation over 128 KiB by its own mapping, given back
/// when freed (a fixed glibc `mmap_threshold`): a large buffer shows in RSS while it lives,
/// instead of hiding in memory an earlier phase (a recovery) freed.
fn start_plain_malloc(dir: &std::path::Path) -> weir_testkit::Broker {
    let config = dir.join("weir.toml");
    weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(dir)
        .args(["--config", config.to_str().unwrap()])
        .env("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
        .ready_timeout(common::TIMEOUT)
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A purge of a deep queue goes in steps: its peak memory is one step's settlements, not one
/// entry per message (before: every entry gathered at once, about 64 bytes a message more).
#[test]
fn a_purge_of_a_deep_queue_stays_within_a_bounded_step() {
    const N: u64 = 150_000;
    let dir = temp_dir("lim-purge");
    std::fs::write(dir.join("weir.toml"), "cpus = [0]\n").unwrap();
    let mut broker = start_plain_malloc(&dir);
    let mut c = Client::connect(broker.listen);
    c.handshake();
    c.declare("deep");
    publish_backlog(&mut c, "deep", N);
    // After a restart every message is cold: the broker holds the index and little else.
    drop(c);
    broker.kill();
    broker.keep_data();
    drop(broker);
    let broker = start_plain_malloc(&dir);
    let mut c = Client::connect(broker.listen);
    c.handshake();
    let (before, _) = rss(&broker);
    reset_peak(&broker);
    let mut p = wire::PurgeQueueT::default();
    p.name = "deep".into();
    assert!(matches!(
        c.request(BodyT::PurgeQueue(Box::new(p))),
        BodyT::QueuePurged(p) if p.messages == N
    ));
    let (after, peak) = rss(&broker);
    eprintln!(
        "purge of {N}: RSS before {} KiB, peak during {} KiB, after {} KiB",
        before / 1024,
        peak / 1024,
        after / 1024
    );
    // Gathering every entry at once costs about 64 bytes a message (about 5 MiB measured here, more with the
    // vectors' doubling); a step, about 1 MiB.
    assert!(
        peak.saturating_sub(before) < 2 * MIB,
        "a purge of {N} raised RSS from {before} to a peak of {peak}"
    );
    match c.info("deep") {
        BodyT::QueueInfo(i) => assert_eq!(i.messages_ready, 0),
        other => panic!("{other:?}"),
    }
}

/// A client that pipelines requests and never reads its answers: the broker reads no further
/// than `requests_in_flight_max` requests ahead, so the answers it holds for that client are
/// bounded (before: it read every listing asked for, and held every answer, ~100 KiB each).
#[test]
fn a_client_pipelining_requests_without_reading_costs_at_most_its_requests_in_flight() {
    let broker = broker("lim-requests", "requests_in_flight_max = 2");
    let mut c = open(&broker);
    // 300 queues with long names: one listing answers about 100 KiB.
    for i in 0..300 {
        let mut d = wire::DeclareQueueT::default();
        d.name = Some(format!("{i:03}-{}", "x".repeat(240)));
        assert!(matches!(c.declare_with(d), BodyT::QueueInfo(_)));
    }
    let (before, _) = rss(&broker);
    // 1000 listings in one write (about 50 KiB), and their answers never read.
    let after = pipelined_unread(&broker, &mut c, 1000, || BodyT::ListQueues(Box::default()));
    eprintln!(
        "1000 pipelined listings, unread: RSS before {} KiB, after {} KiB",
        before / 1024,
        after / 1024
    );
    // Two answers in flight and what the sockets hold: a few MiB; every answer: about 100 MiB.
    assert!(
        after.saturating_sub(before) < 32 * MIB,
        "RSS grew from {before} to {after} for one client that does not read"
    );
}

/// A client that pipelines listings the session answers at once (no shard is asked, so
/// `requests_in_flight_max` does not stop it) and never reads them: the connection stops
/// decoding while its outbox holds more than `outbox_bytes_max`, so what the broker holds for it
/// is about that bound (before: every answer of one 64 KiB read, about 1400 listings of
/// 84 KiB each, some 115 MiB, and gigabytes for larger answers).
#[test]
fn a_client_pipelining_local_listings_without_reading_costs_at_most_its_outbox_bound() {
    const OUTBOX: u64 = 2 * MIB;
    let broker = broker("lim-outbox", &format!("outbox_bytes_max = {OUTBOX}"));
    let mut c = open(&broker);
    // 300 exchanges with long names: one listing answers about 84 KiB.
    for i in 0..300 {
        let mut x = wire::DeclareExchangeT::default();
        x.name = format!("{i:03}-{}", "x".repeat(240));
        x.kind = wire::ExchangeKind::Direct;
        assert!(matches!(
            c.request(BodyT::DeclareExchange(Box::new(x))),
            BodyT::Ok(_)
        ));
    }
    let (before, _) = rss(&broker);
    // 3000 listings in one write (about 120 KiB), and their answers never read.
    let after = pipelined_unread(&broker, &mut c, 3000, || {
        BodyT::ListExchanges(Box::default())
    });
    eprintln!(
        "3000 pipelined exchange listings of ~84 KiB, unread, outbox_bytes_max {} KiB: RSS \
         before {} KiB, after {} KiB",
        OUTBOX / 1024,
        before / 1024,
        after / 1024
    );
    // The outbox bound, one answer past it, what the sockets hold, and the encoder's buffer.
    assert!(
        after.saturating_sub(before) < 4 * OUTBOX + 16 * MIB,
        "RSS grew from {before} to {after} for one client that does not read"
    );
}

/// The number behind `queued_messages_max`'s reason: RSS per queued message, cold (after a
/// restart) and hot. A measurement, not a check: `cargo test -p weir --test limits_clients
/// measure_ -- --ignored --nocapture` (a debug broker takes about a minute per million).
#[test]
#[ignore]
fn measure_index_bytes_per_queued_message() {
    let n: u64 = std::env::var("WEIR_MEASURE_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = temp_dir("lim-measure");
    let config = dir.join("weir.toml");
    std::fs::write(&config, "cpus = [0]\n").unwrap();
    // `WEIR_MEASURE_BIN`: another build of weir to measure (an older one, for a before/after).
    let bin = std::env::var("WEIR_MEASURE_BIN").unwrap_or(env!("CARGO_BIN_EXE_weir").into());
    let start = || {
        weir_testkit::Serve::new(&bin)
            .data_dir(&dir)
            .args(["--config", config.to_str().unwrap()])
            .ready_timeout(std::time::Duration::from_secs(300))
            .start()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let mut broker = start();
    let mut c = Client::connect(broker.listen);
    c.handshake();
    c.declare("deep");
    let (empty, _) = rss(&broker);
    publish_backlog(&mut c, "deep", n);
    let (hot, _) = rss(&broker);
    eprintln!(
        "{n} messages of 16 B, one shard, one durable queue: RSS empty {} KiB; hot (as published) {} KiB = {} B/message",
        empty / 1024,
        hot / 1024,
        hot.saturating_sub(empty) / n
    );
    drop(c);
    broker.kill();
    broker.keep_data();
    drop(broker);
    let broker = start();
    let mut c = Client::connect(broker.listen);
    c.handshake();
    let (cold, _) = rss(&broker);
    reset_peak(&broker);
    let mut p = wire::PurgeQueueT::default();
    p.name = "deep".into();
    assert!(matches!(
        c.request(BodyT::PurgeQueue(Box::new(p))),
        BodyT::QueuePurged(p) if p.messages == n
    ));
    let (after, peak) = rss(&broker);
    eprintln!(
        "cold (after a restart) {} KiB = {} B/message over empty; purge peak {} KiB, after {} KiB",
        cold / 1024,
        cold.saturating_sub(empty) / n,
        peak / 1024,
        after / 1024
    );
}
