//! Consumer priorities against the real broker (two shards, the queue on the second, each
//! consumer on its own connection): a low-priority consumer attached first receives only once
//! the high-priority one's prefetch window is full; when the high one has room again, it is
//! served first.

mod common;

use common::{bodies_of, publish_numbered, queue_on, take, Broker};
use weir_client::{ConsumeOptions, QueueOptions};

#[tokio::test]
async fn consumer_priority_serves_the_low_one_only_once_the_high_one_is_full() {
    let broker = Broker::start("consumer-priority", &["--cpus", "0,1"]);
    let queue = queue_on(1, 2, "work");
    let admin = broker.client().await;
    admin
        .declare(&queue, QueueOptions::default())
        .await
        .unwrap();
    let (lo, hi) = (broker.client().await, broker.client().await);
    let low = ConsumeOptions {
        tag: "low".into(),
        prefetch: 100,
        priority: -1,
        ..ConsumeOptions::default()
    };
    let mut low = lo.consume(&queue, low).await.unwrap();
    let high = ConsumeOptions {
        tag: "high".into(),
        prefetch: 3,
        priority: 10,
        ..ConsumeOptions::default()
    };
    let mut high = hi.consume(&queue, high).await.unwrap();

    // One at a time: each is dispatched on its own, so round robin would alternate.
    publish_numbered(&admin, &queue, 0..5).await;
    let held = take(&mut high, 3).await;
    assert_eq!(bodies_of(&held), ["m0", "m1", "m2"]);
    assert_eq!(bodies_of(&take(&mut low, 2).await), ["m3", "m4"]);

    // Room again in the high one's window: it is served first, though the low one has room.
    held[0].ack().await.unwrap();
    publish_numbered(&admin, &queue, 5..6).await;
    assert_eq!(bodies_of(&take(&mut high, 1).await), ["m5"]);
    let info = admin.queue_info(&queue).await.unwrap();
    assert_eq!((info.messages_ready, info.messages_unacked), (0, 5));
}
