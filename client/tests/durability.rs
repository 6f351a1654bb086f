//! The delivery contract through the client: what a confirm promised survives SIGKILL, and so
//! does an ack the broker answered.

mod common;

use common::{bodies, messages, within, Broker};
use weir_client::{ConsumeOptions, Durability, QueueOptions};

#[tokio::test]
async fn confirmed_messages_and_answered_acks_survive_a_kill() {
    let broker = Broker::start("durable", &[]);
    let client = broker.client().await;
    within("declare", client.declare("kept", QueueOptions::default()))
        .await
        .expect("declare");
    for f in within("publish", client.publish_batch("kept", messages("k", 20)))
        .await
        .expect("queued")
    {
        let c = within("confirm", f).await.expect("confirmed");
        assert_eq!(c.durability, Durability::Always);
    }
    let options = ConsumeOptions {
        prefetch: 5,
        ..ConsumeOptions::default()
    };
    let mut consumer = within("consume", client.consume("kept", options.clone()))
        .await
        .expect("consume");
    for _ in 0..5 {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("a delivery");
        within("ack", d.ack()).await.expect("ack");
    }

    let broker = broker.restart();
    let client = broker.client().await;
    let info = within("info", client.queue_info("kept"))
        .await
        .expect("the durable queue is back");
    assert_eq!((info.messages_ready, info.messages_unacked), (15, 0));
    let mut consumer = within("consume", client.consume("kept", options))
        .await
        .expect("consume");
    let mut got = Vec::new();
    for _ in 0..15 {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("a delivery");
        within("ack", d.ack()).await.expect("ack");
        got.push(d.body().to_vec());
    }
    assert_eq!(got, bodies("k", 20)[5..].to_vec());
}
