//! The durability contract under fire: SIGKILL the broker while producers publish with confirms
//! pipelined, restart it on the same data directory, and check that every confirmed message
//! arrives (at least once), and that nothing arrives that was never published.
//!
//! Two shards, two durable queues (one owned by each shard, by the client's placement
//! function), one producer per queue. Each message body is `producer:sequence`; a producer id is
//! never reused across cycles, so a message from an earlier cycle that comes back is recognised
//! as a duplicate (it was consumed and acked before the later kill). The kill is triggered by the
//! number of confirms received, never by a sleep; three kill/restart cycles run in one test.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use common::{queue_on, within, Broker};
use tokio::sync::{mpsc, Semaphore};
use weir_client::{
    Client, ClientError, ConsumeOptions, Message, PublishFuture, QueueInfo, QueueOptions,
};

/// Kill/restart cycles in the test.
const CYCLES: u64 = 3;
/// Confirms (both producers together) after which the broker is killed, in the first cycle;
/// later cycles wait a little longer so the kill lands at a different point of the journal.
const KILL_AFTER_CONFIRMS: u64 = 3000;
/// Messages per `Publish` frame.
const BATCH: u64 = 32;
/// Unconfirmed messages a producer keeps in flight (pipelined confirms).
const IN_FLIGHT: usize = 1024;

/// What one producer did before the broker died.
struct ProducerRun {
    id: u64,
    queue: String,
    /// Sequences `0..published` were handed to the client to send.
    published: u64,
    /// Sequences whose confirm arrived, in confirm order.
    confirmed: Vec<u64>,
}

/// Publishes `id:seq` messages to `queue` until the connection dies; confirms are awaited by a
/// second task so that up to `IN_FLIGHT` messages are unconfirmed at any time. Each confirm
/// received is reported on `progress`.
async fn produce(
    client: Client,
    id: u64,
    queue: String,
    progress: mpsc::UnboundedSender<u64>,
) -> ProducerRun {
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let (batches, mut pending) = mpsc::unbounded_channel::<(u64, Vec<PublishFuture>)>();
    let collector = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut confirmed = Vec::new();
            let mut failure = None;
            while let Some((first, futures)) = pending.recv().await {
                let n = futures.len();
                let mut ok = 0;
                for (i, f) in futures.into_iter().enumerate() {
                    match f.await {
                        Ok(_) => {
                            confirmed.push(first + i as u64);
                            ok += 1;
                        }
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    }
                }
                window.add_permits(n);
                if ok > 0 {
                    let _ = progress.send(ok);
                }
            }
            (confirmed, failure)
        })
    };

    let mut published = 0u64;
    let stopped_by = loop {
        // The window closes only when the collector is gone, which cannot happen before this
        // loop ends; `forget` because the collector gives permits back per confirm.
        window
            .acquire_many(BATCH as u32)
            .await
            .expect("the window stays open")
            .forget();
        let first = published;
        let batch = (first..first + BATCH).map(|seq| Message::new(format!("{id}:{seq}")));
        match client.publish_batch(&queue, batch).await {
            Ok(futures) => {
                published += BATCH;
                batches.send((first, futures)).expect("the collector runs");
            }
            Err(e) => break e,
        }
    };
    drop(batches);
    let (confirmed, failure) = within("the confirm collector", collector)
        .await
        .expect("the confirm collector");
    // The broker was killed: nothing may fail any other way (a refusal would be a broker fault).
    for e in std::iter::once(&stopped_by).chain(failure.as_ref()) {
        assert!(
            matches!(e, ClientError::Closed(_)),
            "producer {id}: publishing failed with {e} rather than a closed connection"
        );
    }
    ProducerRun {
        id,
        queue,
        published,
        confirmed,
    }
}

/// Consumes and acks every message of `queue` (as many as the broker says are ready), returning
/// the bodies parsed as (producer, sequence), in delivery order.
async fn drain(client: &Client, queue: &str) -> (QueueInfo, Vec<(u64, u64)>) {
    let info = within("queue info", client.queue_info(queue))
        .await
        .expect("the durable queue is back after the restart");
    assert_eq!(
        info.messages_unacked, 0,
        "{queue}: nothing can be unacked right after a restart"
    );
    let options = ConsumeOptions {
        prefetch: 512,
        ..ConsumeOptions::default()
    };
    let mut consumer = within("consume", client.consume(queue, options))
        .await
        .expect("consume");
    let mut got = Vec::with_capacity(info.messages_ready as usize);
    let mut acks = Vec::with_capacity(info.messages_ready as usize);
    for _ in 0..info.messages_ready {
        let d = within("a delivery", consumer.recv())
            .await
            .expect("the consumer is open")
            .expect("a delivery");
        let text = std::str::from_utf8(d.body()).expect("a UTF-8 body");
        let (p, s) = text
            .split_once(':')
            .unwrap_or_else(|| panic!("{queue}: a body that was never published: {text:?}"));
        got.push((
            p.parse().expect("a producer id"),
            s.parse().expect("a sequence"),
        ));
        acks.push(d.ack());
    }
    for ack in acks {
        within("an ack", ack).await.expect("acked");
    }
    within("cancel", consumer.cancel()).await.expect("cancel");
    let after = within("queue info", client.queue_info(queue))
        .await
        .expect("queue info");
    assert_eq!(
        (
            after.messages_ready,
            after.messages_unacked,
            after.messages_delayed
        ),
        (0, 0, 0),
        "{queue}: everything that was ready was consumed and acked"
    );
    (info, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_message_survives_sigkill_mid_stream() {
    let started = Instant::now();
    let mut broker = Broker::start("crash", &["--cpus", "0,1"]);
    assert_eq!(broker.shard_count(), 2);
    let queues = [queue_on(0, 2, "crash"), queue_on(1, 2, "crash")];
    // Every producer ever run: id -> (queue, messages handed to the client).
    let mut producers: HashMap<u64, (String, u64)> = HashMap::new();

    for cycle in 0..CYCLES {
        let client = broker.client().await;
        for q in &queues {
            let info = within("declare", client.declare(q, QueueOptions::default()))
                .await
                .expect("declare a durable queue");
            assert!(info.durable);
        }
        assert_eq!(
            client.connection_shard_for(&queues[0]),
            0,
            "queues[0] is on shard 0"
        );
        assert_eq!(client.connection_shard_for(&queues[1]), 1);

        let (progress, mut confirms) = mpsc::unbounded_channel();
        let tasks: Vec<_> = (0..2u64)
            .map(|p| {
                let id = cycle * 2 + p;
                tokio::spawn(produce(
                    client.clone(),
                    id,
                    queues[p as usize].clone(),
                    progress.clone(),
                ))
            })
            .collect();
        drop(progress);

        // Kill once enough confirms have come back: the count triggers it, not a timer.
        let kill_after = KILL_AFTER_CONFIRMS + cycle * 1500;
        let t0 = Instant::now();
        let mut seen = 0;
        within("enough confirms before the kill", async {
            while seen < kill_after {
                seen += confirms.recv().await.expect("the producers are running");
            }
        })
        .await;
        let t1 = Instant::now();
        broker = within(
            "SIGKILL and restart",
            tokio::task::spawn_blocking(move || broker.restart()),
        )
        .await
        .expect("restart");
        let mut runs = Vec::new();
        for t in tasks {
            runs.push(
                within("a producer to stop", t)
                    .await
                    .expect("producer task"),
            );
        }
        drop(client);
        for r in &runs {
            producers.insert(r.id, (r.queue.clone(), r.published));
        }

        let t2 = Instant::now();
        let client = broker.client().await;
        let mut delivered: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let mut found = Vec::new();
        for q in &queues {
            let (info, got) = drain(&client, q).await;
            found.push(format!(
                "{q} (shard {}): {} ready after the restart",
                info.shard, info.messages_ready
            ));
            for (p, s) in got {
                let Some((queue, published)) = producers.get(&p) else {
                    panic!("{q}: message {p}:{s} from a producer that never ran");
                };
                assert_eq!(queue, q, "message {p}:{s} arrived on the wrong queue");
                assert!(
                    s < *published,
                    "{q}: message {p}:{s} was never published ({published} were)"
                );
                delivered.entry(p).or_default().push(s);
            }
        }
        drop(client);
        let drained = t2.elapsed();

        // Every confirmed message arrived; report what else did.
        let mut report = Vec::new();
        for r in &runs {
            let got = delivered.remove(&r.id).unwrap_or_default();
            let mut count: BTreeMap<u64, u32> = BTreeMap::new();
            for s in &got {
                *count.entry(*s).or_default() += 1;
            }
            let missing: Vec<u64> = r
                .confirmed
                .iter()
                .copied()
                .filter(|s| !count.contains_key(s))
                .collect();
            assert!(
                missing.is_empty(),
                "cycle {cycle}, producer {} on {}: {} confirmed messages lost (first {:?}, last \
                 {:?}) of {} confirmed (sequences {:?}..={:?}); delivered {} (sequences \
                 {:?}..={:?}); {}; data directory {}",
                r.id,
                r.queue,
                missing.len(),
                &missing[..missing.len().min(10)],
                missing.last(),
                r.confirmed.len(),
                r.confirmed.first(),
                r.confirmed.last(),
                got.len(),
                got.iter().min(),
                got.iter().max(),
                found.join("; "),
                broker.data_dir.display()
            );
            let duplicates: u32 = count.values().map(|c| c - 1).sum();
            let highest_confirmed = r.confirmed.iter().max().map_or(0, |s| s + 1);
            let unconfirmed_kept = count.keys().filter(|s| **s >= highest_confirmed).count();
            let distinct = count.len() as u64;
            // Survivors form a prefix of what was published (no holes): reported, not asserted,
            // as the client contract only promises the confirmed ones.
            let holes = count.keys().next_back().map_or(0, |last| last + 1) - distinct;
            let in_order = got.windows(2).all(|w| w[0] < w[1]);
            report.push(format!(
                "producer {}: published {}, confirmed {}, delivered {} ({} distinct, {} \
                 duplicates, {} beyond the last confirm, {} holes, {})",
                r.id,
                r.published,
                r.confirmed.len(),
                got.len(),
                distinct,
                duplicates,
                unconfirmed_kept,
                holes,
                if in_order { "in order" } else { "NOT in order" }
            ));
        }
        // Messages of earlier cycles were acked (the ack answered) before this kill.
        let old: usize = delivered.values().map(Vec::len).sum();
        println!(
            "cycle {cycle}: killed after {seen} confirms ({:?} publishing); restarted in {:?}; \
             drained in {:?}; {}; {old} messages of earlier cycles delivered again",
            t1 - t0,
            t2 - t1,
            drained,
            report.join("; ")
        );
    }
    println!("{CYCLES} kill/restart cycles in {:?}", started.elapsed());
    // Passed: the journal (preallocated segments) is not worth keeping. A failure keeps it, and
    // its message names the directory.
    let dir = broker.data_dir.clone();
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
