//! Durability black-box tests: the real broker, a real data directory, SIGKILL, restart.
//!
//! The contract (DESIGN.md §5): after a confirm with `Durability::Always`, the message survives a
//! crash at any moment; a message acked (with a reply, so the ack is durable) is not delivered
//! again; durable declarations come back; transient queues and non-persistent messages do not.

mod common;

use common::{queue_on, temp_dir, Broker, Client};
use weir_protocol::wire::{self, BodyT, ErrorCode};

fn bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix} {i}").into_bytes())
        .collect()
}

fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(|b| b.as_slice()).collect()
}

fn connect(broker: &Broker) -> Client {
    let mut c = broker.connect();
    c.handshake();
    c
}

/// Kills the broker with SIGKILL (no shutdown at all) and starts it again on the same data.
fn crash_and_restart(broker: Broker, args: &[&str]) -> Broker {
    let dir = broker.crash(); // SIGKILL
    Broker::start(&dir, args)
}

#[test]
fn confirmed_messages_survive_sigkill_and_acked_ones_do_not_return() {
    let args = ["--cpus", "0,1"];
    let broker = Broker::start(&temp_dir("dur-kill"), &args);
    // One queue on each shard, so both journals are exercised.
    let queues = [queue_on(0, 2, "durable"), queue_on(1, 2, "durable")];
    let mut p = connect(&broker);
    let msgs = bodies("persistent", 120);
    for (i, q) in queues.iter().enumerate() {
        p.declare(q);
        let first = 1 + (i as u64) * 1000;
        p.publish(q, first, &refs(&msgs), false);
        let (_, durability) = p.await_confirms_with(first, first + 119);
        assert!(
            durability.iter().all(|d| *d == wire::Durability::Always),
            "{durability:?}"
        );
    }
    // Ack the first 40 of each queue, durably (the ack asks for a reply).
    let mut c = connect(&broker);
    for q in &queues {
        c.consume(q, q, 40, false);
        let got = c.deliveries(40);
        // Cancel first: with room freed by the acks, the consumer would be sent the next 40.
        let mut cancel = wire::CancelT::default();
        cancel.consumer_tag = q.clone();
        assert!(matches!(
            c.request(BodyT::Cancel(Box::new(cancel))),
            BodyT::Ok(_)
        ));
        c.ack(&got.iter().map(|g| g.delivery_tag).collect::<Vec<_>>());
    }

    let broker = crash_and_restart(broker, &args);
    let mut c = connect(&broker);
    for q in &queues {
        let BodyT::QueueInfo(info) = c.info(q) else {
            panic!("durable queue {q} did not come back")
        };
        assert_eq!(info.messages_ready, 80, "{q}: confirmed minus acked");
        c.consume(q, q, 200, false);
        let got = c.deliveries(80);
        let expected: Vec<Vec<u8>> = msgs[40..].to_vec();
        assert_eq!(
            got.iter().map(|g| g.body.clone()).collect::<Vec<_>>(),
            expected,
            "{q}: in publish order"
        );
        // They may have been delivered before the crash: marked so.
        assert!(got.iter().all(|g| g.redelivered), "{q}");
    }
}

#[test]
fn declarations_and_deletions_survive_but_transient_things_do_not() {
    let broker = Broker::start(&temp_dir("dur-decl"), &[]);
    let mut c = connect(&broker);
    c.declare("kept");
    c.declare("deleted");
    let mut t = wire::DeclareQueueT::default();
    t.name = Some("transient".into());
    t.durable = false;
    assert!(matches!(c.declare_with(t), BodyT::QueueInfo(_)));
    let mut d = wire::DeleteQueueT::default();
    d.name = "deleted".into();
    assert!(matches!(
        c.request(BodyT::DeleteQueue(Box::new(d))),
        BodyT::QueueDeleted(_)
    ));

    // A non-persistent message to a durable queue: confirmed as transient, lost on a crash.
    c.publish_with("kept", 1, &[b"in memory only"], false, false);
    let (_, durability) = c.await_confirms_with(1, 1);
    assert_eq!(durability, vec![wire::Durability::Transient]);
    c.publish_with("kept", 2, &[b"on disk"], false, true);
    let (_, durability) = c.await_confirms_with(2, 2);
    assert_eq!(durability, vec![wire::Durability::Always]);
    // A purge is durable too: purge, then publish one more that must survive.
    let mut purge = wire::PurgeQueueT::default();
    purge.name = "kept".into();
    assert!(
        matches!(c.request(BodyT::PurgeQueue(Box::new(purge))), BodyT::QueuePurged(p) if p.messages == 2)
    );
    c.publish_with("kept", 3, &[b"after the purge"], false, true);
    c.await_confirms(3, 3);

    let broker = crash_and_restart(broker, &[]);
    let mut c = connect(&broker);
    let BodyT::QueueInfo(kept) = c.info("kept") else {
        panic!("the durable queue is gone")
    };
    assert_eq!(kept.messages_ready, 1);
    assert!(matches!(c.info("deleted"), BodyT::Error(e) if e.code == ErrorCode::NotFound));
    assert!(matches!(c.info("transient"), BodyT::Error(e) if e.code == ErrorCode::NotFound));
    let mut g = wire::GetT::default();
    g.queue = "kept".into();
    g.auto_ack = true;
    let BodyT::GetOk(ok) = c.request(BodyT::Get(Box::new(g))) else {
        panic!()
    };
    let m = weir_protocol::verify_message(
        &ok.delivery.unwrap().message,
        &weir_protocol::WireLimits::DEFAULT,
    )
    .unwrap()
    .unpack();
    assert_eq!(m.body.as_deref(), Some(&b"after the purge"[..]));
}

#[test]
fn a_clean_shutdown_and_restart_keeps_everything_too() {
    let broker = Broker::start(&temp_dir("dur-clean"), &[]);
    let mut c = connect(&broker);
    c.declare("q");
    let msgs = bodies("m", 10);
    c.publish("q", 1, &refs(&msgs), false);
    c.await_confirms(1, 10);
    let dir = broker.data_dir.clone();
    let (status, _) = broker.terminate();
    assert!(status.success());
    let broker = Broker::start(&dir, &[]);
    let mut c = connect(&broker);
    c.consume("q", "t", 100, true);
    let got = c.deliveries(10);
    assert_eq!(got.iter().map(|g| g.body.clone()).collect::<Vec<_>>(), msgs);
}

#[test]
fn confirms_say_which_fsync_policy_they_were_given_under() {
    let broker = Broker::start(&temp_dir("dur-interval"), &["--fsync", "interval:5"]);
    let mut c = broker.connect();
    assert_eq!(c.handshake().durability, wire::Durability::Interval);
    c.declare("q");
    c.publish("q", 1, &[b"a", b"b"], false);
    let (_, durability) = c.await_confirms_with(1, 2);
    assert_eq!(durability, vec![wire::Durability::Interval; 2]);
    // Not persistent: in memory only, whatever the policy.
    c.publish_with("q", 3, &[b"c"], false, false);
    assert_eq!(
        c.await_confirms_with(3, 3).1,
        vec![wire::Durability::Transient]
    );
}

#[test]
fn settled_segments_are_reclaimed_and_what_they_declared_survives_a_crash() {
    let dir = temp_dir("dur-reclaim");
    let config = dir.join("weir.toml");
    std::fs::write(
        &config,
        "cpus = [0]\n[limits]\nsegment_size_bytes_max = 2097152\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let broker = Broker::start(&dir, &args);
    let mut c = connect(&broker);
    c.declare("r"); // its declaration lands in the first segment, which will be reclaimed
                    // So do an exchange and a binding (shard 0 is the control-plane writer).
    let mut x = wire::DeclareExchangeT::default();
    x.name = "rx".into();
    x.kind = wire::ExchangeKind::Topic;
    x.durable = true;
    assert!(matches!(
        c.request(BodyT::DeclareExchange(Box::new(x))),
        BodyT::Ok(_)
    ));
    let mut b = wire::BindT::default();
    b.exchange = "rx".into();
    b.queue = "r".into();
    b.binding_key = Some("r.#".into());
    assert!(matches!(c.request(BodyT::Bind(Box::new(b))), BodyT::Ok(_)));
    let body = vec![b'x'; 1024];
    for batch in 0..12u64 {
        let bodies: Vec<&[u8]> = (0..500).map(|_| body.as_slice()).collect();
        c.publish("r", 1 + batch * 500, &bodies, false);
        c.await_confirms(1 + batch * 500, 500 + batch * 500);
    }
    let before = c.journal_segments();
    assert!(
        before >= 3,
        "6 MB in 2 MiB segments made only {before} segments"
    );

    // Hold every delivery until the messages to keep are published: then the segments free up,
    // and the re-stated declaration lands after those messages (as when publishes race reclaim).
    c.consume("r", "all", 6000, false);
    let held = c.deliveries(6000);
    let mut cancel = wire::CancelT::default();
    cancel.consumer_tag = "all".into();
    assert!(matches!(
        c.request(BodyT::Cancel(Box::new(cancel))),
        BodyT::Ok(_)
    ));
    c.publish("r", 10_001, &[b"keep 0", b"keep 1", b"keep 2"], false);
    c.await_confirms(10_001, 10_003);
    for chunk in held.chunks(1000) {
        c.ack(&chunk.iter().map(|g| g.delivery_tag).collect::<Vec<_>>());
    }

    // Reclaim is housekeeping on a timer: wait for it, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut after = c.journal_segments();
    while after > 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        after = c.journal_segments();
    }
    assert!(
        after <= 2,
        "segments went from {before} to {after}: settled segments were not reclaimed"
    );
    let files = std::fs::read_dir(dir.join("shard-0"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count() as u64;
    assert_eq!(files, after, "segment files on disk");

    let broker = crash_and_restart(broker, &args);
    let mut c = connect(&broker);
    let BodyT::QueueInfo(info) = c.info("r") else {
        panic!("the queue's declaration was reclaimed with its segment")
    };
    assert_eq!(info.messages_ready, 3);
    let BodyT::BindingList(list) = c.request(BodyT::ListBindings(Box::default())) else {
        panic!("no binding list")
    };
    let bindings: Vec<(String, String, String)> = list
        .bindings
        .unwrap_or_default()
        .into_iter()
        .map(|b| {
            let text = |s: Option<String>| s.unwrap_or_default();
            (text(b.exchange), text(b.queue), text(b.binding_key))
        })
        .collect();
    assert_eq!(
        bindings,
        [("rx".to_string(), "r".to_string(), "r.#".to_string())],
        "the exchange and its binding were reclaimed with their segment"
    );
    c.consume("r", "rest", 10, true);
    let got: Vec<Vec<u8>> = c.deliveries(3).into_iter().map(|g| g.body).collect();
    assert_eq!(
        got,
        vec![b"keep 0".to_vec(), b"keep 1".to_vec(), b"keep 2".to_vec()]
    );
}
