//! Shard awareness against a two-shard broker: the client's placement function agrees with the
//! broker's (`QueueInfo.shard`), each queue's traffic uses its owner's connection, and
//! publishing and consuming work the same in shard-aware and single-connection modes.

mod common;

use common::{bodies, messages, queue_on, within, Broker};
use weir_client::{placement, Client, ClientOptions, ConsumeOptions, QueueOptions};

const SHARDS: u16 = 2;

async fn round_trip(client: &Client, queue: &str, n: usize) {
    let futures = within("publish", client.publish_batch(queue, messages(queue, n)))
        .await
        .expect("queued");
    for f in futures {
        within("confirm", f).await.expect("confirmed");
    }
    let options = ConsumeOptions {
        prefetch: n as u32,
        ..ConsumeOptions::default()
    };
    let mut consumer = within("consume", client.consume(queue, options))
        .await
        .expect("consume");
    assert_eq!(
        consumer.shard(),
        placement(queue, SHARDS),
        "ConsumeOk names the owner"
    );
    let mut got = Vec::new();
    for _ in 0..n {
        let d = within("delivery", consumer.recv())
            .await
            .expect("stream open")
            .expect("a delivery");
        within("ack", d.ack()).await.expect("ack");
        got.push(d.body().to_vec());
    }
    assert_eq!(got, bodies(queue, n), "in publish order");
    within("cancel", consumer.cancel()).await.expect("cancel");
    let info = within("info", client.queue_info(queue))
        .await
        .expect("info");
    assert_eq!((info.messages_ready, info.messages_unacked), (0, 0));
}

#[tokio::test]
async fn placement_matches_the_broker_and_traffic_goes_to_the_owner() {
    let broker = Broker::start("shards", &["--cpus", "0,1"]);
    assert_eq!(broker.shard_count(), SHARDS);
    let aware = broker.client().await;
    let single = broker.client_with(ClientOptions::single_connection()).await;

    let mut names: Vec<String> = (0..SHARDS).map(|s| queue_on(s, SHARDS, "owned")).collect();
    names.extend(["orders", "payments", "q1", "q2", "emails", "a.b.c"].map(String::from));
    let mut seen = [false; SHARDS as usize];
    for name in &names {
        let info = within("declare", aware.declare(name, QueueOptions::default()))
            .await
            .expect("declare");
        assert_eq!(info.shard, placement(name, SHARDS), "placement of {name}");
        assert_eq!(aware.connection_shard_for(name), info.shard, "{name}");
        seen[usize::from(info.shard)] = true;
        // The single-connection client reaches it through the broker's mesh.
        let info = within("info", single.queue_info(name)).await.expect("info");
        assert_eq!(info.shard, placement(name, SHARDS));
    }
    assert_eq!(seen, [true; SHARDS as usize], "both shards own some queue");

    for s in 0..SHARDS {
        let queue = queue_on(s, SHARDS, "owned");
        round_trip(&aware, &queue, 20).await;
        round_trip(&single, &queue, 20).await;
    }
    let single_shard = single.connections()[0].0;
    for name in &names {
        assert_eq!(single.connection_shard_for(name), single_shard);
    }
}
