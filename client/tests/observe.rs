//! Observation against the real broker (two shards): each queue's counts in its `QueueInfo`,
//! the shards' status counters and histograms, and the listings of connections and consumers.

mod common;

use common::{publish_numbered, queue_on, take, within, Broker};
use weir_client::{ConsumeOptions, Message, Overflow, QueueArguments, QueueInfo, QueueOptions};

/// Polls `queue`'s info until `done` holds (the expiry timer and settlements run on the broker's
/// own time), bounded by the harness timeout.
async fn info_until(
    client: &weir_client::Client,
    queue: &str,
    done: impl Fn(&QueueInfo) -> bool,
) -> QueueInfo {
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        let info = client.queue_info(queue).await.unwrap();
        if done(&info) {
            return info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the queue's counts: {info:?}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_queue_counts_its_publishes_deliveries_acks_nacks_expiries_and_drops() {
    let broker = Broker::start("observe-queue-counts", &["--cpus", "0,1"]);
    let client = broker.client().await;
    let queue = queue_on(1, 2, "counted");
    client
        .declare(&queue, QueueOptions::default())
        .await
        .unwrap();
    publish_numbered(&client, &queue, 0..100).await;
    let info = client.queue_info(&queue).await.unwrap();
    assert_eq!((info.messages_published, info.messages_ready), (100, 100));
    assert_eq!((info.messages_delivered, info.messages_acked), (0, 0));

    let options = ConsumeOptions {
        prefetch: 50,
        ..ConsumeOptions::default()
    };
    let consumer_tag;
    let got = {
        let mut consumer = client.consume(&queue, options).await.unwrap();
        consumer_tag = consumer.tag().to_string();
        let got = take(&mut consumer, 50).await;
        // Its window is full: cancelled now, it shows nothing more, and what it got stays
        // with this connection to settle.
        consumer.cancel().await.unwrap();
        got
    };
    assert!(!consumer_tag.is_empty());
    let held = client.queue_info(&queue).await.unwrap();
    assert_eq!(held.messages_unacked, 50, "{held:?}");
    assert!(held.bytes_unacked >= 50 * 2, "{held:?}");
    for d in &got[..40] {
        d.ack().await.unwrap();
    }
    for d in &got[40..49] {
        d.nack(false).await.unwrap();
    }
    got[49].nack(true).await.unwrap();
    let again = within("a redelivery", async {
        loop {
            if let Some(d) = client.get(&queue, false).await.unwrap() {
                if d.redelivered() {
                    return d;
                }
                d.nack(true).await.unwrap();
            }
        }
    })
    .await;
    again.ack().await.unwrap();
    let info = info_until(&client, &queue, |i| i.messages_acked == 41).await;
    assert_eq!(info.messages_delivered, 51, "{info:?}");
    assert_eq!(info.messages_redelivered, 1, "{info:?}");
    assert_eq!(info.messages_nacked, 10, "{info:?}");
    assert_eq!(
        info.messages_dropped, 9,
        "rejected without a dead-letter exchange"
    );
    assert_eq!(
        (info.messages_unacked, info.bytes_unacked),
        (0, 0),
        "{info:?}"
    );
    assert_eq!(info.messages_ready, 50, "{info:?}");

    // A message's time to live runs out on the broker's expiry timer.
    let ttl = queue_on(0, 2, "expiring");
    client.declare(&ttl, QueueOptions::default()).await.unwrap();
    let m = Message::new("soon gone").expiration_ms(1);
    client.publish(&ttl, m).await.unwrap().await.unwrap();
    let info = info_until(&client, &ttl, |i| i.messages_expired == 1).await;
    assert_eq!((info.messages_published, info.messages_ready), (1, 0));

    // DropHead: the oldest goes to make room.
    let bounded = queue_on(1, 2, "bounded");
    let arguments = QueueArguments {
        max_length: Some(2),
        overflow: Overflow::DropHead,
        ..QueueArguments::default()
    };
    let options = QueueOptions {
        arguments,
        ..QueueOptions::default()
    };
    client.declare(&bounded, options).await.unwrap();
    publish_numbered(&client, &bounded, 0..3).await;
    let info = client.queue_info(&bounded).await.unwrap();
    assert_eq!(
        (
            info.messages_published,
            info.messages_dropped,
            info.messages_ready
        ),
        (3, 1, 2)
    );
    // The listing carries the same counts.
    let listed = client.list_queues(&bounded).await.unwrap();
    assert_eq!(listed[0].messages_dropped, 1);
}
