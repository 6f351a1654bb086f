//! Many tasks on one client at once (a multi-threaded runtime): publishers sharing connections,
//! a consumer acking meanwhile. Every message arrives exactly once, each producer's in order.

mod common;

use std::collections::HashMap;

use common::{within, Broker};
use weir_client::{ConsumeOptions, Message, QueueOptions};

const PRODUCERS: usize = 4;
const PER_PRODUCER: usize = 500;
const BATCH: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_and_a_consumer_share_a_client() {
    let broker = Broker::start("concurrency", &["--cpus", "0,1"]);
    let client = broker.client().await;
    let queues = ["shared-a", "shared-b"];
    for q in queues {
        within("declare", client.declare(q, QueueOptions::default()))
            .await
            .expect("declare");
    }

    let mut consumers = Vec::new();
    for q in queues {
        let options = ConsumeOptions {
            prefetch: 100,
            ..ConsumeOptions::default()
        };
        let mut consumer = within("consume", client.consume(q, options))
            .await
            .expect("consume");
        consumers.push(tokio::spawn(async move {
            let mut seen: HashMap<usize, Vec<usize>> = HashMap::new();
            // Acks are sent as they are made and answered later: many share a group commit.
            let mut acks = Vec::new();
            for _ in 0..PRODUCERS / 2 * PER_PRODUCER {
                let d = within("a delivery", consumer.recv())
                    .await
                    .expect("open")
                    .expect("a delivery");
                let text = std::str::from_utf8(d.body()).expect("utf-8").to_string();
                let (p, i) = text.split_once(':').expect("p:i");
                seen.entry(p.parse().expect("producer"))
                    .or_default()
                    .push(i.parse().expect("index"));
                acks.push(d.ack());
            }
            for ack in acks {
                within("ack", ack).await.expect("ack");
            }
            seen
        }));
    }

    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let client = client.clone();
        let queue = queues[p % 2];
        producers.push(tokio::spawn(async move {
            let mut confirms = Vec::new();
            for first in (0..PER_PRODUCER).step_by(BATCH) {
                let batch = (first..first + BATCH).map(|i| Message::new(format!("{p}:{i}")));
                confirms.extend(
                    within("publish", client.publish_batch(queue, batch))
                        .await
                        .expect("queued"),
                );
            }
            let mut sequences = Vec::new();
            for c in confirms {
                sequences.push(within("confirm", c).await.expect("confirmed").sequence);
            }
            sequences
        }));
    }
    for p in producers {
        let sequences = within("producer", p).await.expect("producer task");
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "sequence numbers increase in publish order"
        );
    }
    for c in consumers {
        let seen = within("consumer", c).await.expect("consumer task");
        assert_eq!(seen.len(), PRODUCERS / 2);
        for (p, indexes) in seen {
            assert_eq!(
                indexes,
                (0..PER_PRODUCER).collect::<Vec<_>>(),
                "producer {p}: every message once, in order"
            );
        }
    }
    assert_eq!(client.unconfirmed_publishes(), 0);
}
