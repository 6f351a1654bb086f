//! Coalescing: one `publish` call per message and one `ack` per delivery cost far fewer frames
//! than calls when they are queued together, keep wire order, ask the broker for no answer that
//! nobody awaits, and still give every awaited settlement its own exact answer; `recv_many`
//! takes every delivery already arrived in one call.
//!
//! Every test runs on tokio's current-thread runtime (`#[tokio::test]`): the connection's driver
//! runs only when the test yields, so calls made without awaiting in between are all queued when
//! it next drains its commands. That is what the assertions on frame counts rely on, not time.

mod common;

use common::{within, Broker};
use weir_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Consumer, Delivery, ErrorCode, Message,
    QueueOptions,
};

fn prefetch(n: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch: n,
        ..ConsumeOptions::default()
    }
}

/// Takes deliveries until `n` have come, with `recv_many`; returns them and the largest number
/// one call returned.
async fn take(consumer: &mut Consumer, n: usize) -> (Vec<Delivery>, usize) {
    let mut all = Vec::new();
    let mut largest = 0;
    while all.len() < n {
        let want = n - all.len();
        let got = within("deliveries", consumer.recv_many(&mut all, want))
            .await
            .expect("deliveries, not an error");
        assert!(got > 0, "the stream ended after {} deliveries", all.len());
        largest = largest.max(got);
    }
    (all, largest)
}

/// Declares queue `name` and publishes `n` messages to it ("NAME 0", "NAME 1", ...), confirmed.
async fn publish_confirmed(client: &Client, name: &str, n: usize) {
    within("declare", client.declare(name, QueueOptions::default()))
        .await
        .expect("declare");
    let messages = (0..n).map(|i| Message::new(format!("{name} {i}")));
    let futures = within("publish", client.publish_batch(name, messages))
        .await
        .expect("queued");
    for f in futures {
        within("confirm", f).await.expect("confirmed");
    }
}

/// `n` confirmed messages on queue `name`, delivered to one consumer with `prefetch` and held.
async fn held(
    client: &Client,
    name: &str,
    n: usize,
    prefetch_max: u32,
) -> (Consumer, Vec<Delivery>) {
    publish_confirmed(client, name, n).await;
    let mut consumer = within("consume", client.consume(name, prefetch(prefetch_max)))
        .await
        .expect("consume");
    let (d, _) = take(&mut consumer, n).await;
    (consumer, d)
}

fn body_str(d: &Delivery) -> String {
    String::from_utf8_lossy(d.body()).into_owned()
}

/// Waits until the broker counts no unacked delivery on `queue`; returns the `queue_info`
/// requests it took.
async fn until_settled(client: &Client, queue: &str) -> u64 {
    let mut asked = 0;
    loop {
        asked += 1;
        let info = within("queue info", client.queue_info(queue))
            .await
            .expect("queue info");
        if info.messages_unacked == 0 && info.messages_ready == 0 {
            return asked;
        }
        // Each round trip is a request answered after the broker handled what came before it.
    }
}

#[tokio::test]
async fn publishes_queued_together_leave_as_few_frames_and_are_confirmed_and_delivered_in_order() {
    const N: usize = 2000;
    let broker = Broker::start("coalesce-publish", &[]);
    let client = broker.client().await;
    within("declare", client.declare("pm", QueueOptions::default()))
        .await
        .expect("declare");

    let before = client.frames_sent();
    let mut confirms = Vec::with_capacity(N);
    for i in 0..N {
        // One call per message; nothing awaited but the queueing itself.
        let f = within(
            "publish",
            client.publish("pm", Message::new(format!("m {i}"))),
        )
        .await
        .expect("queued");
        confirms.push(f);
    }
    let mut last = 0;
    for f in confirms {
        let c = within("confirm", f).await.expect("confirmed");
        assert!(c.sequence > last, "confirm sequences follow call order");
        last = c.sequence;
    }
    let frames = client.frames_sent() - before;
    assert!(
        frames < (N / 4) as u64,
        "{N} publish calls queued together took {frames} frames"
    );

    let mut consumer = within("consume", client.consume("pm", prefetch(N as u32)))
        .await
        .expect("consume");
    let (deliveries, _) = take(&mut consumer, N).await;
    let got: Vec<String> = deliveries.iter().map(body_str).collect();
    let want: Vec<String> = (0..N).map(|i| format!("m {i}")).collect();
    assert_eq!(got, want, "delivered in publish order");
    within("ack", Delivery::ack_all(&deliveries))
        .await
        .expect("acked");
}

#[tokio::test]
async fn per_delivery_acks_whose_futures_are_dropped_merge_into_few_frames_that_ask_no_answer() {
    const N: usize = 1000;
    let broker = Broker::start("coalesce-ack", &[]);
    let client = broker.client().await;
    let (_consumer, deliveries) = held(&client, "acks", N, N as u32).await;

    let (frames, answers) = (client.frames_sent(), client.answers_asked());
    for d in &deliveries {
        // The AMQP idiom: ack each delivery, wait for nothing.
        drop(d.ack());
    }
    let queue_infos = until_settled(&client, "acks").await;
    let frames = client.frames_sent() - frames - queue_infos;
    let answers = client.answers_asked() - answers - queue_infos;
    assert!(
        frames < (N / 4) as u64,
        "{N} acks queued together took {frames} frames"
    );
    assert_eq!(
        answers, 0,
        "acks nobody awaits ask the broker for no answer"
    );
}

#[tokio::test]
async fn awaited_acks_each_get_their_own_answer_even_when_merged_with_a_bad_one() {
    let broker = Broker::start("coalesce-exact", &[]);
    let client = broker.client().await;
    let (_consumer, d) = held(&client, "exact", 6, 10).await;

    // One at a time: resolves once the broker says the ack is durable.
    within("ack", d[0].ack()).await.expect("acked");

    // Queued together: d[1] and d[2] merge; d[1] again is a double ack and d[0] was acked
    // above, so those two name tags the broker no longer holds; d[3] comes after them.
    let good = [d[1].ack(), d[2].ack()];
    let double = d[1].ack();
    let stale = d[0].ack();
    let after = d[3].ack();
    for f in good {
        within("ack", f).await.expect("a good ack is Ok");
    }
    for (what, f) in [("double", double), ("stale", stale)] {
        match within("ack", f).await {
            Err(ClientError::Refused { code, .. }) if code == ErrorCode::UnknownDeliveryTag => {}
            other => panic!("the {what} ack answered {other:?}"),
        }
    }
    within("ack", after)
        .await
        .expect("an ack after a bad one is Ok");

    // Awaited acks kept together share one frame and one answer, each told Ok.
    let (frames, answers) = (client.frames_sent(), client.answers_asked());
    let kept = [d[4].ack(), d[5].ack()];
    for f in kept {
        within("ack", f).await.expect("acked");
    }
    assert_eq!(
        (
            client.frames_sent() - frames,
            client.answers_asked() - answers
        ),
        (1, 1),
        "two awaited acks queued together: one frame, one answer for both"
    );
    let info = within("queue info", client.queue_info("exact"))
        .await
        .expect("queue info");
    assert_eq!((info.messages_ready, info.messages_unacked), (0, 0));
}

#[tokio::test]
async fn interleaved_routing_keys_keep_call_order_on_the_wire() {
    const N: usize = 400;
    let broker = Broker::start("coalesce-routes", &[]);
    // One connection for both queues, so their publishes share one sequence.
    let client = broker.client_with(ClientOptions::single_connection()).await;
    for q in ["ra", "rb"] {
        within("declare", client.declare(q, QueueOptions::default()))
            .await
            .expect("declare");
    }
    // Runs of 7 to one queue, then 7 to the other.
    let route = |i: usize| {
        if (i / 7).is_multiple_of(2) {
            "ra"
        } else {
            "rb"
        }
    };
    let before = client.frames_sent();
    let mut confirms = Vec::with_capacity(N);
    for i in 0..N {
        let f = within(
            "publish",
            client.publish(route(i), Message::new(i.to_string())),
        )
        .await
        .expect("queued");
        confirms.push(f);
    }
    let mut last = 0;
    for f in confirms {
        let c = within("confirm", f).await.expect("confirmed");
        assert!(
            c.sequence > last,
            "sequences follow call order across routes"
        );
        last = c.sequence;
    }
    let frames = client.frames_sent() - before;
    assert!(
        frames < (N / 4) as u64,
        "runs of 7 per route took {frames} frames for {N} calls"
    );
    for q in ["ra", "rb"] {
        let want: Vec<String> = (0..N)
            .filter(|&i| route(i) == q)
            .map(|i| i.to_string())
            .collect();
        let mut consumer = within("consume", client.consume(q, prefetch(N as u32)))
            .await
            .expect("consume");
        let (deliveries, _) = take(&mut consumer, want.len()).await;
        let got: Vec<String> = deliveries.iter().map(body_str).collect();
        assert_eq!(got, want, "queue {q} receives its messages in call order");
        within("ack", Delivery::ack_all(&deliveries))
            .await
            .expect("acked");
    }
}

#[tokio::test]
async fn recv_many_takes_every_delivery_already_arrived_then_the_ending_error() {
    const N: usize = 50;
    let broker = Broker::start("coalesce-recv-many", &[]);
    let client = broker.client().await;
    publish_confirmed(&client, "many", N).await;
    let mut consumer = within("consume", client.consume("many", prefetch(100)))
        .await
        .expect("consume");
    // Until the broker has handed out all of them; the answer to a request sent after that
    // comes behind their `Deliver` frames on the same connection.
    loop {
        let info = within("queue info", client.queue_info("many"))
            .await
            .expect("queue info");
        if info.messages_unacked == N as u64 {
            break;
        }
    }
    within("queue info", client.queue_info("many"))
        .await
        .expect("queue info");

    let mut buf = Vec::new();
    let got = within("recv_many", consumer.recv_many(&mut buf, 100))
        .await
        .expect("deliveries");
    assert_eq!(got, N, "every delivery already arrived, in one call");
    let bodies: Vec<String> = buf.iter().map(body_str).collect();
    let want: Vec<String> = (0..N).map(|i| format!("many {i}")).collect();
    assert_eq!(bodies, want);
    // A limit is a limit.
    assert_eq!(
        within("recv_many", consumer.recv_many(&mut buf, 0))
            .await
            .ok(),
        Some(0)
    );

    within("ack", Delivery::ack_all(&buf)).await.expect("acked");
    within("delete", client.delete("many", false, false))
        .await
        .expect("deleted");
    match within("recv_many", consumer.recv_many(&mut buf, 100)).await {
        Err(ClientError::ConsumerCancelled { .. }) => {}
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    assert_eq!(
        within("recv_many", consumer.recv_many(&mut buf, 100))
            .await
            .ok(),
        Some(0),
        "the stream has ended"
    );
}

#[tokio::test]
async fn a_stale_ack_nobody_awaits_does_not_keep_the_good_ones_queued_with_it_from_settling() {
    let broker = Broker::start("coalesce-stale", &[]);
    let client = broker.client().await;
    let (_consumer, d) = held(&client, "stale", 5, 10).await;
    within("ack", d[0].ack()).await.expect("acked");
    within("ack", d[1].ack()).await.expect("acked");

    // The broker refuses a whole frame that names a tag it no longer holds (d[0], acked above):
    // merged with it, the acks of d[2..] would be refused with it, and nobody would know.
    drop(d[2].ack());
    drop(d[0].ack());
    drop(d[3].ack());
    drop(d[4].ack());
    within("every good ack settled", until_settled(&client, "stale")).await;
}

#[tokio::test]
async fn retry_nacks_merge_only_with_nacks_of_the_same_delay() {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64
    };
    let broker = Broker::start("coalesce-retry", &[]);
    let client = broker.client().await;
    let (mut consumer, deliveries) = held(&client, "retries", 4, 10).await;
    let frames = client.frames_sent();
    let before = now_ms();
    let (short, long) = (Duration::from_millis(300), Duration::from_millis(600));
    for (d, delay) in deliveries.iter().zip([short, short, long, long]) {
        drop(d.nack_with_delay(delay));
    }
    let info = within("queue info", client.queue_info("retries"))
        .await
        .expect("queue info");
    assert_eq!(
        client.frames_sent() - frames,
        3,
        "two nack frames, one per delay, and the queue info"
    );
    if now_ms() < before + 300 {
        assert_eq!(info.messages_retrying, 4);
    }
    let (again, _) = take(&mut consumer, 4).await;
    for d in &again {
        let i: usize = body_str(d)["retries ".len()..].parse().expect("a number");
        let delay = if i < 2 { 300 } else { 600 };
        // Taken in one call when the last came, so the bound holds for each.
        assert!(
            now_ms() >= before + delay,
            "message {i} back before {delay} ms"
        );
        assert_eq!(d.delivery_count(), 2);
    }
}
