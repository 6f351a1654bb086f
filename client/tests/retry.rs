//! Retries with backoff against the real broker, on two shards: a nack with a delay is not
//! redelivered before it and is after it (delivery count one higher); a queue's retry policy
//! delays each failure by its own delay and dead-letters the failure after the last one (drops
//! it without a dead-letter exchange); across SIGKILL a message waiting out its retry keeps its
//! due time and its failures; bad values are refused naming the field.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{queue_on, within, Broker};
use weir_client::{
    Client, ConsumeOptions, Consumer, Delivery, ErrorCode, Message, QueueArguments, QueueOptions,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

async fn declare(c: &Client, name: &str, arguments: QueueArguments) {
    let options = QueueOptions {
        arguments,
        ..QueueOptions::default()
    };
    within("declare", c.declare(name, options))
        .await
        .expect("declare");
}

async fn publish(c: &Client, queue: &str, body: &str) {
    let f = within("publish", c.publish(queue, Message::new(body.to_string())))
        .await
        .expect("queued");
    within("confirm", f).await.expect("confirmed");
}

async fn next(consumer: &mut Consumer) -> Delivery {
    within("delivery", consumer.recv())
        .await
        .expect("consumer open")
        .expect("delivery")
}

/// Polls the queue's info until `done` holds for it (bounded by the harness timeout).
async fn until(
    c: &Client,
    queue: &str,
    what: &str,
    done: impl Fn(&weir_client::QueueInfo) -> bool,
) {
    within(what, async {
        loop {
            let info = c.queue_info(queue).await.expect("info");
            if done(&info) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn retry_a_nack_with_delay_is_redelivered_no_sooner_than_its_delay() {
    let broker = Broker::start("retry-delay", &["--cpus", "0,1"]);
    assert_eq!(broker.shard_count(), 2);
    let c = broker.client().await;
    for shard in 0..2 {
        let q = queue_on(shard, 2, "retry-delay");
        declare(&c, &q, QueueArguments::default()).await;
        publish(&c, &q, "first").await;
        let mut consumer = within("consume", c.consume(&q, ConsumeOptions::default()))
            .await
            .expect("consume");
        let d = next(&mut consumer).await;
        assert_eq!((d.body(), d.delivery_count()), (&b"first"[..], 1));
        let before = now_ms();
        within("nack", d.nack_with_delay(Duration::from_millis(600)))
            .await
            .expect("nack with delay");
        let info = within("info", c.queue_info(&q)).await.expect("info");
        if now_ms() < before + 600 {
            assert_eq!(
                (
                    info.messages_ready,
                    info.messages_delayed,
                    info.messages_retrying
                ),
                (0, 1, 1),
                "waiting out its retry"
            );
        }
        // A message published meanwhile is not held up behind the retry.
        publish(&c, &q, "second").await;
        let d = next(&mut consumer).await;
        assert_eq!(d.body(), b"second");
        within("ack", d.ack()).await.expect("ack");
        let d = next(&mut consumer).await;
        let at = now_ms();
        assert_eq!(d.body(), b"first");
        assert!(
            at >= before + 600,
            "shard {shard}: redelivered {} ms after a 600 ms retry delay",
            at - before
        );
        assert_eq!(d.delivery_count(), 2);
        assert!(d.redelivered());
        within("ack", d.ack()).await.expect("ack");
        let info = within("info", c.queue_info(&q)).await.expect("info");
        assert_eq!((info.messages_delayed, info.messages_retrying), (0, 0));
    }
}

#[tokio::test]
async fn retry_policy_delays_each_failure_then_dead_letters_or_drops() {
    let broker = Broker::start("retry-policy", &["--cpus", "0,1"]);
    let c = broker.client().await;
    let delays = [150u32, 300, 450];
    // The source on shard 0, its dead-letter queue on shard 1: the dead letter crosses shards.
    let source = queue_on(0, 2, "retry-policy");
    let failed = queue_on(1, 2, "retry-failed");
    declare(&c, &failed, QueueArguments::default()).await;
    declare(
        &c,
        &source,
        QueueArguments {
            retry_delays_ms: delays.to_vec(),
            dead_letter_exchange: Some(String::new()),
            dead_letter_routing_key: Some(failed.clone()),
            ..QueueArguments::default()
        },
    )
    .await;
    let info = within("info", c.queue_info(&source)).await.expect("info");
    assert_eq!(info.arguments.retry_delays_ms, delays);
    // Without a dead-letter exchange the failure after the last delay drops it.
    let dropping = queue_on(1, 2, "retry-dropping");
    declare(
        &c,
        &dropping,
        QueueArguments {
            retry_delays_ms: vec![100],
            ..QueueArguments::default()
        },
    )
    .await;

    publish(&c, &source, "flaky").await;
    let mut consumer = within("consume", c.consume(&source, ConsumeOptions::default()))
        .await
        .expect("consume");
    let mut d = next(&mut consumer).await;
    for (n, delay) in delays.iter().enumerate() {
        assert_eq!(d.delivery_count(), n as u32 + 1);
        let before = now_ms();
        within("nack", d.nack(true)).await.expect("nack");
        d = next(&mut consumer).await;
        let waited = now_ms() - before;
        assert!(
            waited >= u64::from(*delay),
            "failure {}: redelivered after {waited} ms, its delay is {delay} ms",
            n + 1
        );
    }
    // The fourth failure: retries exhausted, dead-lettered to the other shard's queue.
    within("nack", d.nack(true)).await.expect("nack");
    let mut dead = within("consume", c.consume(&failed, ConsumeOptions::default()))
        .await
        .expect("consume");
    let letter = next(&mut dead).await;
    assert_eq!(letter.body(), b"flaky");
    within("ack", letter.ack()).await.expect("ack");
    until(&c, &source, "the source to be empty", |i| {
        i.messages_ready + i.messages_unacked + i.messages_delayed == 0
    })
    .await;

    publish(&c, &dropping, "doomed").await;
    let mut consumer = within("consume", c.consume(&dropping, ConsumeOptions::default()))
        .await
        .expect("consume");
    let d = next(&mut consumer).await;
    within("nack", d.nack(true)).await.expect("nack");
    let d = next(&mut consumer).await;
    assert_eq!(d.delivery_count(), 2);
    within("nack", d.reject(true)).await.expect("reject");
    until(&c, &dropping, "the message to be dropped", |i| {
        i.messages_ready + i.messages_unacked + i.messages_delayed == 0
    })
    .await;
}

#[tokio::test]
async fn retry_survives_sigkill_with_its_due_time_and_failure_count() {
    let broker = Broker::start("retry-crash", &["--cpus", "0,1"]);
    let c = broker.client().await;
    let source = queue_on(1, 2, "retry-crash");
    let failed = queue_on(0, 2, "retry-crash-failed");
    declare(&c, &failed, QueueArguments::default()).await;
    declare(
        &c,
        &source,
        QueueArguments {
            retry_delays_ms: vec![100, 2500],
            dead_letter_exchange: Some(String::new()),
            dead_letter_routing_key: Some(failed.clone()),
            ..QueueArguments::default()
        },
    )
    .await;
    publish(&c, &source, "job").await;
    let mut consumer = within("consume", c.consume(&source, ConsumeOptions::default()))
        .await
        .expect("consume");
    let d = next(&mut consumer).await;
    within("nack", d.nack(true)).await.expect("first failure");
    let d = next(&mut consumer).await;
    assert_eq!(d.delivery_count(), 2);
    let before = now_ms();
    // Answered once its retry record is durable (fsync = always).
    within("nack", d.nack(true)).await.expect("second failure");
    drop(consumer);
    drop(c);

    let broker = broker.restart();
    let c = broker.client().await;
    let info = within("info", c.queue_info(&source)).await.expect("info");
    if now_ms() < before + 2500 {
        assert_eq!(
            (
                info.messages_ready,
                info.messages_delayed,
                info.messages_retrying
            ),
            (0, 1, 1),
            "recovered still waiting out its retry"
        );
    }
    let mut consumer = within("consume", c.consume(&source, ConsumeOptions::default()))
        .await
        .expect("consume");
    let d = next(&mut consumer).await;
    let waited = now_ms() - before;
    assert!(
        waited >= 2500,
        "redelivered {waited} ms after a 2500 ms retry, across a restart"
    );
    assert_eq!(d.body(), b"job");
    assert_eq!(d.delivery_count(), 3, "its deliveries counted on");
    // Its third failure is past the policy's two delays: the count survived the restart.
    within("nack", d.nack(true)).await.expect("third failure");
    let mut dead = within("consume", c.consume(&failed, ConsumeOptions::default()))
        .await
        .expect("consume");
    assert_eq!(next(&mut dead).await.body(), b"job");
}

#[tokio::test]
async fn retry_values_past_the_limits_are_refused_naming_the_field() {
    let toml = "cpus = [0]\n[limits]\ndelay_ms_max = 60000\nretry_delays_count_max = 2\n";
    let broker = Broker::start_with_config("retry-limits", toml, &[]);
    let c = broker.client().await;
    for (delays, field) in [
        (vec![10, 20, 30], "retry_delays_count_max"),
        (vec![10, 60_001], "retry_delays_ms[1]"),
    ] {
        let options = QueueOptions {
            arguments: QueueArguments {
                retry_delays_ms: delays,
                ..QueueArguments::default()
            },
            ..QueueOptions::default()
        };
        let e = within("declare", c.declare("refused", options))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
        assert!(e.to_string().contains(field), "{e}");
    }
    declare(&c, "jobs", QueueArguments::default()).await;
    publish(&c, "jobs", "x").await;
    let mut consumer = within("consume", c.consume("jobs", ConsumeOptions::default()))
        .await
        .expect("consume");
    let d = next(&mut consumer).await;
    let e = within("nack", d.nack_with_delay(Duration::from_secs(61)))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    assert!(e.to_string().contains("delay_ms"), "{e}");
    // Refused whole: the delivery is still held, and a delay within the bound is taken.
    within("nack", d.nack_with_delay(Duration::from_millis(50)))
        .await
        .expect("nack within delay_ms_max");
    assert_eq!(next(&mut consumer).await.delivery_count(), 2);
}
