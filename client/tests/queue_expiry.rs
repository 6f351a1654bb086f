//! Queue expiry (`expires_ms`) against the real broker on two shards: an unused queue is deleted
//! with its messages, one with a consumer is not, a `get` renews it, and a durable one keeps its
//! clock across a SIGKILL: the time it was unused before the crash counts, and it is never
//! deleted before `expires_ms` after its last use (measured from the test's own clock, which is
//! a lower bound on the broker's).
//!
//! "Not deleted" is shown against a witness: a queue declared after it with the same
//! `expires_ms` and left unused; once the witness is gone, the other one's time would have been
//! up too.

mod common;

use std::time::{Duration, Instant};

use common::{queue_on, within, Broker};
use weir_client::{
    Client, ClientError, ConsumeOptions, ErrorCode, Message, QueueArguments, QueueOptions,
};

fn expiring(expires_ms: u32, durable: bool) -> QueueOptions {
    QueueOptions {
        durable,
        arguments: QueueArguments {
            expires_ms: Some(expires_ms),
            ..QueueArguments::default()
        },
        ..QueueOptions::default()
    }
}

async fn exists(client: &Client, queue: &str) -> bool {
    match client.queue_info(queue).await {
        Ok(_) => true,
        Err(e) if e.code() == Some(ErrorCode::NotFound) => false,
        Err(e) => panic!("queue info of '{queue}': {e}"),
    }
}

/// Polls until `queue` is gone; returns when it was first seen gone.
async fn gone(client: &Client, queue: &str) -> Instant {
    within(&format!("queue '{queue}' to expire"), async {
        while exists(client, queue).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Instant::now()
    })
    .await
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[tokio::test]
async fn queue_expiry_deletes_an_unused_queue_with_its_messages_but_not_one_in_use() {
    const E: u32 = 600;
    let broker = Broker::start("queue-expiry", &["--cpus", "0,1"]);
    let client = broker.client().await;
    for shard in 0..2 {
        let unused = queue_on(shard, 2, "unused");
        let used = queue_on(shard, 2, "used");
        let witness = queue_on(shard, 2, "witness");
        let t0 = Instant::now();
        client.declare(&unused, expiring(E, true)).await.unwrap();
        // Publishing is no use: the queue goes with its messages.
        client
            .publish(&unused, Message::new("m").persistent(true))
            .await
            .unwrap()
            .await
            .unwrap();
        client.declare(&used, expiring(E, true)).await.unwrap();
        let consumer = client
            .consume(&used, ConsumeOptions::default())
            .await
            .unwrap();
        let info = client.queue_info(&used).await.unwrap();
        assert_eq!(info.expires_in_ms, None, "in use: no time left to show");
        let left = client.queue_info(&unused).await.unwrap().expires_in_ms;
        assert!(left.is_some_and(|l| l <= u64::from(E)), "{left:?}");
        client.declare(&witness, expiring(E, false)).await.unwrap();

        let at = gone(&client, &unused).await;
        assert!(ms(at - t0) >= u64::from(E), "deleted {:?} after", at - t0);
        gone(&client, &witness).await;
        assert!(
            exists(&client, &used).await,
            "deleted with a consumer attached"
        );

        // Its consumer gone, it is unused from then on.
        let cancelled = Instant::now();
        consumer.cancel().await.unwrap();
        let at = gone(&client, &used).await;
        assert!(ms(at - cancelled) >= u64::from(E));
        // A queue declared again under the name is a new one.
        client
            .declare(&unused, QueueOptions::default())
            .await
            .unwrap();
        assert_eq!(client.queue_info(&unused).await.unwrap().messages_ready, 0);
    }
}

#[tokio::test]
async fn queue_expiry_is_renewed_by_get_and_refused_at_zero() {
    const E: u32 = 800;
    let broker = Broker::start("queue-expiry-get", &["--cpus", "0,1"]);
    let client = broker.client().await;
    let queue = queue_on(1, 2, "polled");
    let witness = queue_on(1, 2, "witness");
    client.declare(&queue, expiring(E, true)).await.unwrap();
    client.declare(&witness, expiring(E, true)).await.unwrap();
    let mut last_get = Instant::now();
    within("the witness to expire", async {
        while exists(&client, &witness).await {
            assert!(client.get(&queue, true).await.unwrap().is_none());
            last_get = Instant::now();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(exists(&client, &queue).await, "expired while polled by get");
    let at = gone(&client, &queue).await;
    assert!(ms(at - last_get) >= u64::from(E));

    let refused = client.declare("zero", expiring(0, true)).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused { code: ErrorCode::InvalidArgument, message } if message.contains("expires_ms")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn queue_expiry_survives_sigkill_and_counts_the_time_unused_before_it() {
    const E: u32 = 5_000;
    /// Waited before the kill: more than a restart takes, so a timer started again at recovery
    /// would show more time left than the assertion allows.
    const BEFORE_KILL: Duration = Duration::from_millis(2_500);
    let broker = Broker::start("queue-expiry-crash", &["--cpus", "0,1"]);
    let client = broker.client().await;
    let unused: Vec<String> = (0..2).map(|s| queue_on(s, 2, "unused")).collect();
    let used: Vec<String> = (0..2).map(|s| queue_on(s, 2, "used")).collect();
    let t0 = Instant::now();
    for q in &unused {
        client.declare(q, expiring(E, true)).await.unwrap();
    }
    let declared = Instant::now();
    let mut consumers = Vec::new();
    for q in &used {
        client.declare(q, expiring(E, true)).await.unwrap();
        consumers.push(client.consume(q, ConsumeOptions::default()).await.unwrap());
    }
    tokio::time::sleep(BEFORE_KILL).await;
    let killed = Instant::now();
    drop(consumers);
    drop(client);
    let broker = broker.restart();
    let client = broker.client().await;

    for q in &unused {
        let left = client.queue_info(q).await.unwrap().expires_in_ms.unwrap();
        // The broker stamped the declaration before the test had its answer: at most this left.
        let most = u64::from(E) - ms(killed - declared);
        assert!(
            left <= most,
            "'{q}': {left} ms left, at most {most} (the clock restarted?)"
        );
    }
    for q in &unused {
        let at = gone(&client, q).await;
        assert!(
            ms(at - t0) >= u64::from(E),
            "'{q}' deleted {:?} after",
            at - t0
        );
    }
    // In use until the crash: its time counts from then, at the earliest.
    for q in &used {
        let at = gone(&client, q).await;
        assert!(
            ms(at - killed) >= u64::from(E),
            "'{q}' deleted {:?} after the kill",
            at - killed
        );
    }
}
