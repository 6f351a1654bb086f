//! Dead-letter exchanges against the real broker (two shards): a message a queue gives up on
//! (rejected without requeue, expired, pushed out by overflow, past `max_deliveries`) is
//! published to the queue's dead-letter exchange, with its dead-letter routing key or its own,
//! and reaches the queues bound there, on either shard; a queue nobody consumes still
//! dead-letters its expired messages.

mod common;

use common::{queue_on, within, Broker};
use weir_client::{
    Client, ConsumeOptions, ErrorCode, ExchangeKind, ExchangeOptions, Message, Overflow,
    QueueArguments, QueueOptions,
};

const SHARDS: u16 = 2;

async fn setup(name: &str) -> (Broker, Client) {
    let broker = Broker::start(name, &["--cpus", "0,1"]);
    let c = broker.client().await;
    within(
        "declare exchange",
        c.declare_exchange("dlx", ExchangeKind::Direct, ExchangeOptions::default()),
    )
    .await
    .expect("declare the dead-letter exchange");
    (broker, c)
}

/// A queue on `shard` whose dead letters go to `dlx` with `key` (None: their own key).
async fn source(
    c: &Client,
    shard: u16,
    prefix: &str,
    key: Option<&str>,
    more: QueueArguments,
) -> String {
    let name = queue_on(shard, SHARDS, prefix);
    let arguments = QueueArguments {
        dead_letter_exchange: Some("dlx".into()),
        dead_letter_routing_key: key.map(str::to_string),
        ..more
    };
    let options = QueueOptions {
        arguments,
        ..QueueOptions::default()
    };
    within("declare", c.declare(&name, options))
        .await
        .expect("declare the source queue");
    name
}

/// A queue on `shard` bound to `dlx` with `key`.
async fn dead_letter_queue(c: &Client, shard: u16, key: &str) -> String {
    let name = queue_on(shard, SHARDS, &format!("dlq-{key}"));
    within("declare", c.declare(&name, QueueOptions::default()))
        .await
        .expect("declare the dead-letter queue");
    within("bind", c.bind(&name, "dlx", key))
        .await
        .expect("bind");
    name
}

async fn publish(c: &Client, queue: &str, bodies: &[&str]) {
    let messages = bodies.iter().map(|b| Message::new(b.to_string()));
    for f in within("publish", c.publish_batch(queue, messages))
        .await
        .expect("queued")
    {
        within("confirm", f).await.expect("confirmed");
    }
}

/// Consumes `n` messages from `queue` (waiting for them: dead-lettering is asynchronous),
/// returning (body, exchange, routing key) of each.
async fn take(c: &Client, queue: &str, n: usize) -> Vec<(String, String, String)> {
    let mut consumer = within("consume", c.consume(queue, ConsumeOptions::default()))
        .await
        .expect("consume");
    let mut got = Vec::new();
    for _ in 0..n {
        let d = within("a dead letter", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        got.push((
            String::from_utf8_lossy(d.body()).into_owned(),
            d.exchange().to_string(),
            d.routing_key().to_string(),
        ));
        within("ack", d.ack()).await.expect("ack");
    }
    within("cancel", consumer.cancel()).await.expect("cancel");
    got
}

#[tokio::test]
async fn rejected_messages_go_to_the_dead_letter_exchange_on_another_shard() {
    let (_broker, c) = setup("dlx-reject").await;
    let src = source(&c, 0, "orders", Some("failed"), QueueArguments::default()).await;
    let dlq = dead_letter_queue(&c, 1, "failed").await;
    publish(&c, &src, &["good", "bad"]).await;
    let mut consumer = within("consume", c.consume(&src, ConsumeOptions::default()))
        .await
        .expect("consume");
    for _ in 0..2 {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        if d.body() == b"bad" {
            within("reject", d.reject(false)).await.expect("reject");
        } else {
            within("ack", d.ack()).await.expect("ack");
        }
    }
    assert_eq!(
        take(&c, &dlq, 1).await,
        [("bad".to_string(), "dlx".to_string(), "failed".to_string())],
        "the rejected message, under the dead-letter exchange and key"
    );
    let info = within("info", c.queue_info(&src)).await.expect("info");
    assert_eq!((info.messages_ready, info.messages_unacked), (0, 0));
    let status = within("status", c.status()).await.expect("status");
    let dead: u64 = status
        .counters
        .iter()
        .filter(|(k, _)| k.ends_with(".messages_dead_lettered"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(dead, 1);
}

#[tokio::test]
async fn expired_messages_of_a_queue_nobody_consumes_are_dead_lettered_with_their_own_key() {
    let (_broker, c) = setup("dlx-ttl").await;
    // A retry queue: messages wait 200 ms, then go back through the exchange by their own key
    // (the source's name, as the default exchange published them).
    let ttl = QueueArguments {
        message_ttl_ms: Some(200),
        ..QueueArguments::default()
    };
    let src = source(&c, 1, "retry", None, ttl).await;
    let dlq = queue_on(0, SHARDS, "retried");
    within("declare", c.declare(&dlq, QueueOptions::default()))
        .await
        .expect("declare");
    within("bind", c.bind(&dlq, "dlx", &src))
        .await
        .expect("bind");
    publish(&c, &src, &["r1", "r2", "r3"]).await;
    let got = take(&c, &dlq, 3).await;
    let bodies: Vec<&str> = got.iter().map(|(b, _, _)| b.as_str()).collect();
    assert_eq!(bodies, ["r1", "r2", "r3"]);
    assert!(
        got.iter().all(|(_, x, k)| x == "dlx" && *k == src),
        "{got:?}"
    );
    let info = within("info", c.queue_info(&src)).await.expect("info");
    assert_eq!(
        info.messages_ready, 0,
        "expired without anyone consuming it"
    );
}

#[tokio::test]
async fn poison_messages_and_overflow_are_dead_lettered_and_unroutable_ones_counted() {
    let (_broker, c) = setup("dlx-poison").await;
    let poison = QueueArguments {
        max_deliveries: Some(2),
        ..QueueArguments::default()
    };
    let src = source(&c, 0, "flaky", Some("poison"), poison).await;
    let dlq = dead_letter_queue(&c, 0, "poison").await;
    publish(&c, &src, &["p"]).await;
    let mut consumer = within("consume", c.consume(&src, ConsumeOptions::default()))
        .await
        .expect("consume");
    for attempt in 1..=2 {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        assert_eq!(d.delivery_count(), attempt);
        within("nack", d.nack(true))
            .await
            .expect("nack with requeue");
    }
    within("cancel", consumer.cancel()).await.expect("cancel");
    assert_eq!(take(&c, &dlq, 1).await[0].0, "p", "past max_deliveries");

    // Overflow: the oldest are pushed out into the dead-letter exchange.
    let bounded = QueueArguments {
        max_length: Some(2),
        overflow: Overflow::DropHead,
        ..QueueArguments::default()
    };
    let full = source(&c, 1, "bounded", Some("overflow"), bounded).await;
    let overflow = dead_letter_queue(&c, 1, "overflow").await;
    publish(&c, &full, &["o1", "o2", "o3", "o4"]).await;
    let pushed_out: Vec<String> = take(&c, &overflow, 2)
        .await
        .into_iter()
        .map(|g| g.0)
        .collect();
    assert_eq!(pushed_out, ["o1", "o2"]);

    // A dead-letter key nothing is bound to: the message is dropped and counted.
    let lost = source(&c, 0, "nowhere", Some("unbound"), QueueArguments::default()).await;
    publish(&c, &lost, &["x"]).await;
    let d = within("get", c.get(&lost, false))
        .await
        .expect("get")
        .expect("a message");
    within("reject", d.reject(false)).await.expect("reject");
    // The owner routes a dead letter while executing the settlement, before the reject's
    // answer (which waits for the settle record's commit): the count is there already.
    let status = within("status", c.status()).await.expect("status");
    let unroutable: u64 = status
        .counters
        .iter()
        .filter(|(k, _)| k.ends_with(".messages_unroutable"))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(unroutable, 1, "the unroutable dead letter is counted");
}

#[tokio::test]
async fn a_dead_letter_routing_key_needs_an_exchange() {
    let broker = Broker::start("dlx-args", &[]);
    let c = broker.client().await;
    let options = QueueOptions {
        arguments: QueueArguments {
            dead_letter_routing_key: Some("k".into()),
            ..QueueArguments::default()
        },
        ..QueueOptions::default()
    };
    let e = within("declare", c.declare("q", options))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    assert!(e.to_string().contains("dead_letter_exchange"), "{e}");
}

#[tokio::test]
async fn messages_out_of_memory_are_read_back_and_dead_lettered_through_the_default_exchange() {
    // 256 KiB of payloads in memory; 500 KiB published: the backlog's tail is only on disk
    // when it expires, and is read back to be dead-lettered.
    let toml = "cpus = [0]\n[limits]\nmessage_size_max = 65536\ncache_bytes_max = 262144\n";
    let broker = Broker::start_with_config("dlx-cold", toml, &[]);
    let c = broker.client().await;
    within("declare", c.declare("parking", QueueOptions::default()))
        .await
        .expect("declare");
    let options = QueueOptions {
        arguments: QueueArguments {
            message_ttl_ms: Some(300),
            dead_letter_exchange: Some(String::new()),
            dead_letter_routing_key: Some("parking".into()),
            ..QueueArguments::default()
        },
        ..QueueOptions::default()
    };
    within("declare", c.declare("waiting", options))
        .await
        .expect("declare");
    let bodies: Vec<String> = (0..500).map(|i| format!("{i:04}").repeat(256)).collect();
    for chunk in bodies.chunks(100) {
        let messages = chunk.iter().map(|b| Message::new(b.clone()));
        for f in within("publish", c.publish_batch("waiting", messages))
            .await
            .expect("queued")
        {
            within("confirm", f).await.expect("confirmed");
        }
    }
    let got: Vec<String> = take(&c, "parking", 500)
        .await
        .into_iter()
        .map(|(body, exchange, key)| {
            assert_eq!((exchange.as_str(), key.as_str()), ("", "parking"));
            body
        })
        .collect();
    assert_eq!(got, bodies, "every message, byte for byte, in order");
}
