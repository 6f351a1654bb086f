//! Observation against the real broker (two shards): each queue's counts in its `QueueInfo`,
//! the shards' status counters and histograms, and the listings of connections and consumers.

mod common;

use common::{publish_numbered, queue_on, take, within, Broker};
use std::collections::BTreeMap;

use weir_client::{
    BrokerStatus, ClientOptions, ConsumeOptions, ErrorCode, Message, Overflow, QueueArguments,
    QueueInfo, QueueOptions,
};

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

fn counters_of(status: &BrokerStatus) -> BTreeMap<String, u64> {
    status.counters.iter().cloned().collect()
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
    // The owner counts them too, and the shard serving the publishing connection (the client
    // is shard-aware: the owner's) counts their confirms.
    let status = client.status().await.unwrap();
    let counters = counters_of(&status);
    assert_eq!(counters["shard.1.messages_published"], 100, "{counters:?}");
    assert_eq!(counters["shard.1.messages_confirmed"], 100, "{counters:?}");
    assert_eq!(counters["shard.0.messages_published"], 0, "{counters:?}");

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
    let counters = counters_of(&client.status().await.unwrap());
    assert_eq!(counters["shard.1.messages_delivered"], 51, "{counters:?}");
    assert_eq!(counters["shard.1.messages_acked"], 41, "{counters:?}");
    assert_eq!(counters["shard.1.messages_nacked"], 10, "{counters:?}");
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
    // A deleted queue's counts stay in its shard's totals.
    client.delete(&ttl, false, false).await.unwrap();
    let counters = counters_of(&client.status().await.unwrap());
    assert_eq!(counters["shard.0.messages_expired"], 1, "{counters:?}");
    assert_eq!(counters["shard.0.messages_published"], 1, "{counters:?}");

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

#[tokio::test]
async fn status_marks_its_gauges_and_carries_every_shards_commit_latencies() {
    let broker = Broker::start("observe-status", &["--cpus", "0,1"]);
    let client = broker.client().await;
    for shard in 0..2 {
        let queue = queue_on(shard, 2, "latency");
        client
            .declare(&queue, QueueOptions::default())
            .await
            .unwrap();
        publish_numbered(&client, &queue, 0..20).await;
    }
    let status = client.status().await.unwrap();
    assert_eq!(status.shards_ready, 2);
    let counters = counters_of(&status);
    for shard in 0..2 {
        for gauge in [
            "connections",
            "messages_ready",
            "cache_bytes",
            "journal.disk_bytes",
            "work_bytes",
            "mesh_outgoing_bytes",
        ] {
            let name = format!("shard.{shard}.{gauge}");
            assert!(status.gauges.contains(&name), "{name} is a gauge");
        }
        for count in [
            "messages_published",
            "journal.commits",
            "messages_unroutable",
            "journal.segments_reclaimed",
        ] {
            let name = format!("shard.{shard}.{count}");
            assert!(counters.contains_key(&name), "{name} reported");
            assert!(!status.gauges.contains(&name), "{name} is a count");
        }
        assert!(counters[&format!("shard.{shard}.journal.disk_bytes")] > 0);
        let commits = counters[&format!("shard.{shard}.journal.commits")];
        assert!(commits >= 20, "a commit per confirmed publish: {commits}");
        for name in ["journal.commit_latency_us", "journal.fdatasync_latency_us"] {
            let h = status
                .histograms
                .iter()
                .find(|h| h.shard == shard && h.name == name)
                .unwrap_or_else(|| panic!("shard {shard} reports {name}"));
            assert!(
                h.count >= commits,
                "{name}: {} values for {commits} commits",
                h.count
            );
            let counts: Vec<u64> = h.buckets.iter().map(|b| b.1).collect();
            assert!(counts.windows(2).all(|w| w[0] <= w[1]), "cumulative: {h:?}");
            assert_eq!(
                h.buckets.last(),
                Some(&(u64::MAX, h.count)),
                "ends at the count"
            );
            assert!(
                h.p50 <= h.p99 && h.p99 <= h.p999 && h.p999 <= h.max,
                "{h:?}"
            );
            assert!(h.sum >= h.count, "at least 1 µs each: {h:?}");
        }
    }
}

#[tokio::test]
async fn a_refusal_over_a_limit_is_counted_under_that_limits_name() {
    let toml = "[limits]\nconsumers_per_connection_max = 1\n";
    let broker = Broker::start_with_config("observe-limit-hit", toml, &["--cpus", "0,1"]);
    let client = broker.client_with(ClientOptions::single_connection()).await;
    client
        .declare("hits", QueueOptions::default())
        .await
        .unwrap();
    let _first = client
        .consume("hits", ConsumeOptions::default())
        .await
        .unwrap();
    let refused = client.consume("hits", ConsumeOptions::default()).await;
    match refused {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}"),
        Ok(_) => panic!("a second consumer past consumers_per_connection_max = 1"),
    }
    let status = client.status().await.unwrap();
    let hits: u64 = status
        .counters
        .iter()
        .filter(|(n, _)| n.ends_with(".limit_hit.consumers_per_connection_max"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(hits, 1, "{:?}", status.counters);
    assert!(
        !status
            .counters
            .iter()
            .any(|(n, _)| n.contains(".limit_hit.other")),
        "named, not other"
    );
}

#[tokio::test]
async fn consumers_are_listed_with_their_credit_and_a_waiting_single_active_one_is_inactive() {
    let broker = Broker::start("observe-consumers", &["--cpus", "0,1"]);
    let named = |name: &str| ClientOptions {
        name: name.into(),
        ..ClientOptions::default()
    };
    let a = broker.client_with(named("consumer-a")).await;
    let b = broker.client_with(named("consumer-b")).await;
    let work = queue_on(0, 2, "obs-work");
    a.declare(&work, QueueOptions::default()).await.unwrap();
    let single = queue_on(1, 2, "obs-single");
    let options = QueueOptions {
        arguments: QueueArguments {
            single_active_consumer: true,
            ..QueueArguments::default()
        },
        ..QueueOptions::default()
    };
    a.declare(&single, options).await.unwrap();
    publish_numbered(&a, &work, 0..10).await;
    let options = ConsumeOptions {
        tag: "holder".into(),
        prefetch: 7,
        priority: 3,
        ..ConsumeOptions::default()
    };
    let mut holder = a.consume(&work, options).await.unwrap();
    let _held = take(&mut holder, 7).await;
    let sac = |tag: &str| ConsumeOptions {
        tag: tag.into(),
        ..ConsumeOptions::default()
    };
    let _first = a.consume(&single, sac("first")).await.unwrap();
    let _second = b.consume(&single, sac("second")).await.unwrap();

    let listed = b.list_consumers("obs-").await.unwrap();
    let keys: Vec<(&str, &str)> = listed
        .iter()
        .map(|c| (c.queue.as_str(), c.tag.as_str()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "in (queue, tag) order");
    assert_eq!(listed.len(), 3, "{listed:?}");
    let find = |tag: &str| listed.iter().find(|c| c.tag == tag).unwrap();
    let h = find("holder");
    assert_eq!((h.queue.as_str(), h.shard), (work.as_str(), 0));
    assert_eq!((h.prefetch, h.unacked, h.priority), (7, 7, 3), "{h:?}");
    assert!(h.active && !h.auto_ack);
    assert!(find("first").active, "the single active consumer");
    assert!(!find("second").active, "waiting behind it");
    assert_eq!(find("second").shard, 1);
    // Each consumer names its connection, as the connection listing does.
    let connections = b.list_connections().await.unwrap();
    let of = |name: &str| {
        connections
            .iter()
            .filter(|c| c.client_name.as_deref() == Some(name))
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };
    assert!(of("consumer-a").contains(&h.connection), "{connections:?}");
    assert!(of("consumer-b").contains(&find("second").connection));
    let holding = connections.iter().find(|c| c.id == h.connection).unwrap();
    assert_eq!(holding.consumers, 1, "the holder's connection: {holding:?}");
    assert_eq!(holding.deliveries_unacked, 7, "{holding:?}");
    assert_eq!(
        of("consumer-a").len(),
        2,
        "a shard-aware client: one per shard"
    );
    assert!(b.list_consumers("nothing-").await.unwrap().is_empty());
}
