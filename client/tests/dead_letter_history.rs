//! Dead-letter history and cycles against the real broker (two shards): a dead-lettered
//! message is delivered with a line per (queue, reason) it was dead-lettered from, counted and
//! timed, like RabbitMQ's `x-death`; the history is journaled with the copy, so it survives
//! SIGKILL and is read back with a cold message; a copy that would go round a cycle of
//! expiries nobody consumes in is dropped and counted, while a cycle through a consumer's
//! rejection goes on.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{queue_on, within, Broker};
use weir_client::protocol::wire::DeathReason;
use weir_client::{Client, ConsumeOptions, Death, Delivery, Message, QueueArguments, QueueOptions};

const SHARDS: u16 = 2;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// Declares durable `name` dead-lettering through the default exchange to `to`, with `more`.
async fn declare(c: &Client, name: &str, to: &str, more: QueueArguments) {
    let options = QueueOptions {
        arguments: QueueArguments {
            dead_letter_exchange: Some(String::new()),
            dead_letter_routing_key: Some(to.to_string()),
            ..more
        },
        ..QueueOptions::default()
    };
    within("declare", c.declare(name, options))
        .await
        .expect("declare");
}

fn ttl(ms: u32) -> QueueArguments {
    QueueArguments {
        message_ttl_ms: Some(ms),
        ..QueueArguments::default()
    }
}

/// A broker on two shards; "work" on shard 0 dead-letters (with `more` arguments) into "dlq" on
/// shard 1. Returns the broker, a client, and the two queues' names.
async fn work_into_dlq(name: &str, more: QueueArguments) -> (Broker, Client, String, String) {
    let broker = Broker::start(name, &["--cpus", "0,1"]);
    let c = broker.client().await;
    let work = queue_on(0, SHARDS, "work");
    let dlq = queue_on(1, SHARDS, "dlq");
    within("declare", c.declare(&dlq, QueueOptions::default()))
        .await
        .expect("declare");
    declare(&c, &work, &dlq, more).await;
    (broker, c, work, dlq)
}

/// Publishes `bodies` to `queue` in batches, each confirmed.
async fn publish_all(c: &Client, queue: &str, bodies: &[String]) {
    for chunk in bodies.chunks(100) {
        let messages = chunk.iter().map(|b| Message::new(b.clone()));
        for f in within("publish", c.publish_batch(queue, messages))
            .await
            .expect("queued")
        {
            within("confirm", f).await.expect("confirmed");
        }
    }
}

async fn publish(c: &Client, queue: &str, body: &str) {
    let f = within("publish", c.publish(queue, Message::new(body.to_string())))
        .await
        .expect("queued");
    within("confirm", f).await.expect("confirmed");
}

/// Waits for the next message of `queue` (dead-lettering is asynchronous) with a `get`.
async fn next(c: &Client, queue: &str) -> Delivery {
    let mut consumer = within("consume", c.consume(queue, ConsumeOptions::default()))
        .await
        .expect("consume");
    let d = within("a dead letter", consumer.recv())
        .await
        .expect("open")
        .expect("delivery");
    within("cancel", consumer.cancel()).await.expect("cancel");
    d
}

fn lines(d: &Delivery) -> Vec<(String, DeathReason, u32, String)> {
    d.deaths()
        .iter()
        .map(|x: &Death| (x.queue.clone(), x.reason, x.count, x.routing_key.clone()))
        .collect()
}

fn counter(status: &weir_client::BrokerStatus, suffix: &str) -> u64 {
    status
        .counters
        .iter()
        .filter(|(k, _)| k.ends_with(suffix))
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test]
async fn a_rejected_message_carries_its_history_across_shards_and_a_restart() {
    let broker = Broker::start("dlh-history", &["--cpus", "0,1"]);
    let c = broker.client().await;
    // work (shard 0) rejects into retry (shard 1), whose consumer rejects back into work.
    let work = queue_on(0, SHARDS, "work");
    let retry = queue_on(1, SHARDS, "retry");
    declare(&c, &work, &retry, QueueArguments::default()).await;
    declare(&c, &retry, &work, QueueArguments::default()).await;
    let before = now_ms();
    publish(&c, &work, "job").await;

    let d = next(&c, &work).await;
    assert!(d.deaths().is_empty(), "never dead-lettered yet");
    within("reject", d.reject(false)).await.expect("reject");
    let d = next(&c, &retry).await;
    assert_eq!(d.body(), b"job", "the producer's bytes, untouched");
    assert_eq!(
        lines(&d),
        [(work.clone(), DeathReason::Rejected, 1, work.clone())],
        "one line: from work, rejected, with the key it entered work with"
    );
    let first = d.deaths()[0].clone();
    assert!(first.first_time_ms >= before && first.first_time_ms == first.last_time_ms);
    assert_eq!(first.reason_name(), "rejected");
    within("reject", d.reject(false)).await.expect("reject");
    let d = next(&c, &work).await;
    within("reject", d.reject(false)).await.expect("reject");

    // In retry now, twice out of work: work's line counts 2 and is the newest.
    let d = next(&c, &retry).await;
    assert_eq!(
        lines(&d),
        [
            (work.clone(), DeathReason::Rejected, 2, work.clone()),
            (retry.clone(), DeathReason::Rejected, 1, retry.clone()),
        ]
    );
    assert_eq!(d.deaths()[0].first_time_ms, first.first_time_ms);
    assert!(d.deaths()[0].last_time_ms >= first.last_time_ms);
    drop(d); // unacked: back to ready when the connection goes
    drop(c);

    // The history is journaled with the copy: after SIGKILL it is read back with the record.
    let broker = broker.restart();
    let c = broker.client().await;
    let d = next(&c, &retry).await;
    assert_eq!(d.body(), b"job");
    assert_eq!(
        lines(&d),
        [
            (work.clone(), DeathReason::Rejected, 2, work.clone()),
            (retry.clone(), DeathReason::Rejected, 1, retry.clone()),
        ],
        "the same history after a restart"
    );
    within("ack", d.ack()).await.expect("ack");
}

#[tokio::test]
async fn a_cycle_of_expiries_is_dropped_and_counted_once_round() {
    let broker = Broker::start("dlh-cycle", &["--cpus", "0,1"]);
    let c = broker.client().await;
    // a and b expire into each other, and nobody consumes either: without cycle detection the
    // message would go round for ever.
    let a = queue_on(0, SHARDS, "a");
    let b = queue_on(1, SHARDS, "b");
    declare(&c, &a, &b, ttl(20)).await;
    declare(&c, &b, &a, ttl(20)).await;
    publish(&c, &a, "round").await;
    within("the copy dropped at the cycle", async {
        loop {
            let status = c.status().await.expect("status");
            if counter(&status, ".dead_letter.cycles") > 0 {
                return status;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let status = within("status", c.status()).await.expect("status");
    assert_eq!(counter(&status, ".dead_letter.cycles"), 1);
    assert_eq!(
        counter(&status, ".messages_dead_lettered"),
        2,
        "out of a into b, then out of b, where the copy back to a was dropped"
    );
    for q in [&a, &b] {
        let info = within("info", c.queue_info(q)).await.expect("info");
        assert_eq!(info.messages_ready + info.messages_unacked, 0, "{q}");
    }
}

#[tokio::test]
async fn a_message_expired_while_cold_keeps_its_history() {
    // 256 KiB of payloads in memory, 600 KiB published: most copies are cold in "parked" and
    // their histories come back from their records.
    let toml = "cpus = [0]\n[limits]\nmessage_size_max = 65536\ncache_bytes_max = 262144\n";
    let broker = Broker::start_with_config("dlh-cold", toml, &[]);
    let c = broker.client().await;
    within("declare", c.declare("parked", QueueOptions::default()))
        .await
        .expect("declare");
    declare(&c, "waiting", "parked", ttl(100)).await;
    let bodies: Vec<String> = (0..600).map(|i| format!("{i:04}").repeat(256)).collect();
    publish_all(&c, "waiting", &bodies).await;
    let mut consumer = within("consume", c.consume("parked", ConsumeOptions::default()))
        .await
        .expect("consume");
    for body in &bodies {
        let d = within("a dead letter", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        assert_eq!(d.body(), body.as_bytes());
        assert_eq!(
            lines(&d),
            [(
                "waiting".to_string(),
                DeathReason::Expired,
                1,
                "waiting".to_string()
            )]
        );
        within("ack", d.ack()).await.expect("ack");
    }
}

/// Takes every ready message of `queue` (auto-acked: one settle record per batch, not per
/// message), returning their bodies.
async fn drain(c: &Client, queue: &str) -> Vec<String> {
    let info = within("info", c.queue_info(queue)).await.expect("info");
    let options = ConsumeOptions {
        auto_ack: true,
        ..ConsumeOptions::default()
    };
    let mut consumer = within("consume", c.consume(queue, options))
        .await
        .expect("consume");
    let mut got = Vec::new();
    while (got.len() as u64) < info.messages_ready {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        got.push(String::from_utf8_lossy(d.body()).into_owned());
    }
    got
}

#[tokio::test]
async fn messages_rejected_into_a_dead_letter_queue_survive_sigkill_at_least_once() {
    let (broker, c, work, dlq) = work_into_dlq("dlh-kill", QueueArguments::default()).await;
    let n = 2_000;
    let bodies: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    publish_all(&c, &work, &bodies).await;
    // Reject every message, and kill the broker while the last of the copies and the
    // originals' settlements are still on their way.
    let mut consumer = within("consume", c.consume(&work, ConsumeOptions::default()))
        .await
        .expect("consume");
    for i in 0..n {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        if i + 1 == n {
            within("reject", d.reject(false)).await.expect("reject");
        } else {
            drop(d.reject(false));
        }
    }
    drop(consumer);
    drop(c);
    let broker = broker.restart();
    let c = broker.client().await;
    let mut seen = drain(&c, &work).await;
    seen.extend(drain(&c, &dlq).await);
    let before = seen.len();
    let seen: std::collections::BTreeSet<String> = seen.into_iter().collect();
    let lost: Vec<&String> = bodies.iter().filter(|b| !seen.contains(*b)).collect();
    assert!(
        lost.is_empty(),
        "every message is in its queue or in the dead-letter queue; lost {}: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(seen.len(), n, "and nothing else");
    assert!(before >= n, "at least once ({before} copies of {n})");
}

#[tokio::test]
async fn a_message_that_fails_past_its_retries_says_so_in_its_history() {
    let retries = QueueArguments {
        retry_delays_ms: vec![1],
        ..QueueArguments::default()
    };
    let (_broker, c, work, dlq) = work_into_dlq("dlh-retries", retries).await;
    publish(&c, &work, "flaky").await;
    let mut consumer = within("consume", c.consume(&work, ConsumeOptions::default()))
        .await
        .expect("consume");
    // The first failure is retried after 1 ms; the second is past the policy.
    for _ in 0..2 {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        within("nack", d.nack(true)).await.expect("nack");
    }
    let d = next(&c, &dlq).await;
    assert_eq!(
        lines(&d),
        [(work.clone(), DeathReason::RetriesExhausted, 1, work.clone())]
    );
    assert_eq!(d.deaths()[0].reason_name(), "retries_exhausted");
}
