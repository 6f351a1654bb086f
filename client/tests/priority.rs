//! Priority queues against the real broker: a queue declared with `priority_max` hands out the
//! ready message of the highest priority first (a message's priority capped at the maximum),
//! FIFO within one priority; a requeued message goes back to the front of its own priority; the
//! order survives SIGKILL with a backlog mostly on disk (cold, its priorities read back from the
//! journal's records, not from memory); and a queue on shard 1 of 2 orders the same.

mod common;

use common::{queue_on, within, Broker};
use weir_client::{Client, ConsumeOptions, Message, QueueArguments, QueueOptions};

fn priority_queue(priority_max: u8) -> QueueOptions {
    QueueOptions {
        arguments: QueueArguments {
            priority_max,
            ..QueueArguments::default()
        },
        ..QueueOptions::default()
    }
}

/// Message `i`: its number, then filler to `len` bytes.
fn body(i: usize, len: usize) -> Vec<u8> {
    let mut b = format!("{i:06}").into_bytes();
    b.resize(len.max(6), b'.');
    b
}

fn number(body: &[u8]) -> usize {
    std::str::from_utf8(&body[..6]).unwrap().parse().unwrap()
}

/// Publishes message `i` with priority `priority(i)` for every `i` in `range`, and waits for
/// every confirm.
async fn publish(
    c: &Client,
    queue: &str,
    range: std::ops::Range<usize>,
    len: usize,
    priority: impl Fn(usize) -> u8,
) {
    let mut confirms = Vec::new();
    for i in range {
        let m = Message::new(body(i, len)).priority(priority(i));
        confirms.push(within("publish", c.publish(queue, m)).await.expect("sent"));
    }
    for f in confirms {
        within("confirm", f).await.expect("confirmed");
    }
}

/// The order a priority queue owes: highest (capped) priority first, then publish order.
fn expected(
    range: std::ops::Range<usize>,
    priority: impl Fn(usize) -> u8,
    priority_max: u8,
) -> Vec<usize> {
    let mut v: Vec<usize> = range.collect();
    v.sort_by_key(|i| (std::cmp::Reverse(priority(*i).min(priority_max)), *i));
    v
}

/// Takes every ready message with `Get` (auto-ack), in the order the queue hands them out.
async fn drain_with_get(c: &Client, queue: &str) -> Vec<usize> {
    let mut got = Vec::new();
    while let Some(d) = within("get", c.get(queue, true)).await.expect("get") {
        got.push(number(d.body()));
    }
    got
}

/// Priorities 0 to 9 in a scrambled order: some above the queue's maximum of 5.
fn scrambled(i: usize) -> u8 {
    (i * 7 % 10) as u8
}

#[tokio::test]
async fn priority_queues_hand_out_higher_priorities_first_fifo_within_one_capped_at_the_max() {
    let broker = Broker::start("priority-order", &[]);
    let c = broker.client().await;
    let info = within("declare", c.declare("jobs", priority_queue(5)))
        .await
        .expect("a priority queue is served");
    assert_eq!(info.arguments.priority_max, 5);
    publish(&c, "jobs", 0..40, 16, scrambled).await;
    let got = drain_with_get(&c, "jobs").await;
    // 6 to 9 count as 5, so they come in publish order among the 5s.
    assert_eq!(got, expected(0..40, scrambled, 5));

    // A plain queue ignores priorities: publish order.
    within("declare", c.declare("plain", QueueOptions::default()))
        .await
        .expect("declare");
    publish(&c, "plain", 0..10, 16, scrambled).await;
    assert_eq!(
        drain_with_get(&c, "plain").await,
        (0..10).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn priority_requeued_messages_go_back_to_the_front_of_their_own_priority() {
    let broker = Broker::start("priority-requeue", &[]);
    let c = broker.client().await;
    within("declare", c.declare("jobs", priority_queue(3)))
        .await
        .expect("declare");
    // 0, 1, 2 of priority 2; 3 of priority 1.
    publish(&c, "jobs", 0..4, 16, |i| if i < 3 { 2 } else { 1 }).await;
    let a = within("get", c.get("jobs", false)).await.unwrap().unwrap();
    let b = within("get", c.get("jobs", false)).await.unwrap().unwrap();
    assert_eq!((number(a.body()), number(b.body())), (0, 1));
    within("nack", b.nack(true)).await.expect("requeued");
    within("nack", a.nack(true)).await.expect("requeued");
    // A newer message of the same priority, and one of a higher one.
    publish(&c, "jobs", 4..5, 16, |_| 2).await;
    publish(&c, "jobs", 5..6, 16, |_| 3).await;
    let mut order = Vec::new();
    while let Some(d) = within("get", c.get("jobs", true)).await.expect("get") {
        order.push((number(d.body()), d.redelivered()));
    }
    assert_eq!(
        order,
        [
            (5, false),
            (0, true),
            (1, true),
            (2, false),
            (4, false),
            (3, false)
        ]
    );
}

#[tokio::test]
async fn priority_order_survives_sigkill_with_a_backlog_mostly_on_disk() {
    // 128 KiB of journaled payloads stay in memory; the backlog is 600 KiB, so most of it is
    // cold before the crash, and all of it after.
    let toml = "cpus = [0]\n[limits]\nmessage_size_max = 65536\ncache_bytes_max = 262144\n";
    let broker = Broker::start_with_config("priority-restart", toml, &[]);
    let c = broker.client().await;
    within("declare", c.declare("jobs", priority_queue(4)))
        .await
        .expect("declare");
    const N: usize = 600;
    let priority = |i: usize| (i * 3 % 5) as u8;
    publish(&c, "jobs", 0..N, 1024, priority).await;
    let owed = expected(0..N, priority, 4);

    // Before the crash: the first 50, hot and cold, in priority order, acked.
    let mut consumer = within(
        "consume",
        c.consume(
            "jobs",
            ConsumeOptions {
                prefetch: 10,
                ..ConsumeOptions::default()
            },
        ),
    )
    .await
    .expect("consume");
    let mut got = Vec::new();
    while got.len() < 50 {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        got.push(number(d.body()));
        within("ack", d.ack()).await.expect("acked");
    }
    assert_eq!(got, owed[..50]);
    drop(consumer);
    drop(c);

    let broker = within(
        "SIGKILL and restart",
        tokio::task::spawn_blocking(move || broker.restart()),
    )
    .await
    .expect("restart");
    let c = broker.client().await;
    let info = within("info", c.queue_info("jobs")).await.expect("info");
    assert_eq!(info.arguments.priority_max, 4, "the declaration came back");
    let mut consumer = within("consume", c.consume("jobs", ConsumeOptions::default()))
        .await
        .expect("consume");
    let mut after = Vec::new();
    // Ones in flight at the crash may come back too (at least once); none was acked.
    while after.len() < N - 50 {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        after.push(number(d.body()));
        within("ack", d.ack()).await.expect("acked");
    }
    assert_eq!(after, owed[50..], "recovered in priority order");
}

#[tokio::test]
async fn priority_queues_on_shard_1_of_2_order_the_same() {
    let broker = Broker::start("priority-shards", &["--cpus", "0,1"]);
    let c = broker.client().await;
    let queue = queue_on(1, 2, "prio");
    let info = within("declare", c.declare(&queue, priority_queue(255)))
        .await
        .expect("declare");
    assert_eq!(info.shard, 1);
    let priority = |i: usize| (i * 37 % 256) as u8;
    publish(&c, &queue, 0..64, 16, priority).await;
    assert_eq!(
        drain_with_get(&c, &queue).await,
        expected(0..64, priority, 255)
    );
}
