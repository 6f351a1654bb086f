//! Single active consumer against the real broker (two shards, the queue on the second, each
//! consumer on its own connection): only the first attached receives, whatever the others'
//! prefetch; when its connection dies its unacked messages go back and the next in order takes
//! over with them; a cancel hands over to the next as well.

mod common;

use common::{bodies_of, publish_numbered, queue_on, take, Broker};
use weir_client::{Client, ConsumeOptions, Consumer, Delivery, QueueArguments, QueueOptions};

async fn consumer(client: &Client, queue: &str, tag: &str) -> Consumer {
    let options = ConsumeOptions {
        tag: tag.into(),
        prefetch: 10,
        ..ConsumeOptions::default()
    };
    client.consume(queue, options).await.unwrap()
}

#[tokio::test]
async fn single_active_consumer_fails_over_in_order_with_the_unacked_messages() {
    let broker = Broker::start("single-active", &["--cpus", "0,1"]);
    let queue = queue_on(1, 2, "ordered");
    let admin = broker.client().await;
    let arguments = QueueArguments {
        single_active_consumer: true,
        ..QueueArguments::default()
    };
    let options = QueueOptions {
        arguments,
        ..QueueOptions::default()
    };
    admin.declare(&queue, options).await.unwrap();
    let (a, b, c) = (
        broker.client().await,
        broker.client().await,
        broker.client().await,
    );
    let mut first = consumer(&a, &queue, "first").await;
    let mut second = consumer(&b, &queue, "second").await;
    let mut third = consumer(&c, &queue, "third").await;

    publish_numbered(&admin, &queue, 0..20).await;
    let held = take(&mut first, 10).await;
    // The others have credit, yet the first one's full window leaves the rest ready.
    let info = admin.queue_info(&queue).await.unwrap();
    assert_eq!(info.active_consumer.as_deref(), Some("first"));
    assert_eq!((info.messages_ready, info.messages_unacked), (10, 10));

    // Its connection goes (the consumer not cancelled first): what it held goes back, and the
    // second takes over with it, those first.
    a.close().await.unwrap();
    let got = take(&mut second, 10).await;
    let redelivered: Vec<&Delivery> = got.iter().filter(|d| d.redelivered()).collect();
    assert_eq!(
        bodies_of(&got),
        bodies_of(&held),
        "the first one's unacked messages come first, in order"
    );
    assert_eq!(redelivered.len(), 10);
    Delivery::ack_all(&got).await.unwrap();
    let rest = take(&mut second, 10).await;
    assert_eq!(
        bodies_of(&rest),
        (10..20).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    Delivery::ack_all(&rest).await.unwrap();
    let info = admin.queue_info(&queue).await.unwrap();
    assert_eq!(info.active_consumer.as_deref(), Some("second"));

    // Cancelled: the next in order, the third, receives from then on.
    second.cancel().await.unwrap();
    publish_numbered(&admin, &queue, 20..23).await;
    let got = take(&mut third, 3).await;
    assert_eq!(
        bodies_of(&got),
        (20..23).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    let info = admin.queue_info(&queue).await.unwrap();
    assert_eq!(info.active_consumer.as_deref(), Some("third"));
    drop(first);
}
