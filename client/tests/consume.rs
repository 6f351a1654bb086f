//! Consuming: a stream in publish order, prefetch, ack, nack with requeue, reject, get,
//! cancel, competing consumers, redelivery when a consumer's client goes away, and a consumer
//! whose queue is deleted, and an exclusive consumer keeping others out.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use common::{bodies, messages, within, Broker};
use futures_core::Stream;
use weir_client::{
    Client, ClientError, ConsumeOptions, Consumer, Delivery, ErrorCode, Message, QueueOptions,
};

/// A delivery already received, without waiting: `None` when nothing is buffered.
fn buffered(consumer: &mut Consumer) -> Option<Result<Delivery, ClientError>> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(consumer).poll_next(&mut cx) {
        Poll::Ready(item) => item,
        Poll::Pending => None,
    }
}

async fn next(consumer: &mut Consumer) -> Delivery {
    within("a delivery", consumer.recv())
        .await
        .expect("the stream ended")
        .expect("a delivery, not an error")
}

async fn publish_all(client: &Client, queue: &str, msgs: Vec<Message>) {
    let futures = within("publish", client.publish_batch(queue, msgs))
        .await
        .expect("queued");
    for f in futures {
        within("confirm", f).await.expect("confirmed");
    }
}

fn prefetch(n: u32) -> ConsumeOptions {
    ConsumeOptions {
        prefetch: n,
        ..ConsumeOptions::default()
    }
}

#[tokio::test]
async fn deliveries_stream_in_order_within_prefetch_and_acks_free_credit() {
    let broker = Broker::start("consume", &[]);
    let client = broker.client().await;
    within("declare", client.declare("work", QueueOptions::default()))
        .await
        .expect("declare");
    publish_all(&client, "work", messages("m", 10)).await;
    let expected = bodies("m", 10);

    let mut consumer = within("consume", client.consume("work", prefetch(4)))
        .await
        .expect("consume");
    assert_eq!(consumer.queue(), "work");
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(next(&mut consumer).await);
    }
    assert_eq!(
        first.iter().map(|d| d.body().to_vec()).collect::<Vec<_>>(),
        expected[..4].to_vec()
    );
    assert!(first
        .iter()
        .all(|d| !d.redelivered() && d.delivery_count() == 1 && d.routing_key() == "work"));

    // The info reply travels behind any delivery sent before it on the same connection: if
    // nothing is buffered once it is here, the broker held back the fifth.
    let info = within("info", client.queue_info("work"))
        .await
        .expect("info");
    assert_eq!((info.messages_ready, info.messages_unacked), (6, 4));
    assert_eq!(info.consumers, 1);
    assert!(
        buffered(&mut consumer).is_none(),
        "a delivery beyond prefetch"
    );

    for d in &first {
        within("ack", d.ack()).await.expect("ack");
    }
    let mut rest = Vec::new();
    for _ in 0..6 {
        let d = next(&mut consumer).await;
        within("ack", d.ack()).await.expect("ack");
        rest.push(d.body().to_vec());
    }
    assert_eq!(rest, expected[4..].to_vec());
    let info = within("info", client.queue_info("work"))
        .await
        .expect("info");
    assert_eq!((info.messages_ready, info.messages_unacked), (0, 0));

    // Acking twice names a tag the broker no longer holds.
    let err = within("ack", first[0].ack())
        .await
        .expect_err("acked already");
    assert_eq!(err.code(), Some(ErrorCode::UnknownDeliveryTag), "{err:?}");

    within("cancel", consumer.cancel()).await.expect("cancel");
    let info = within("info", client.queue_info("work"))
        .await
        .expect("info");
    assert_eq!(info.consumers, 0);
}

#[tokio::test]
async fn properties_travel_untouched() {
    let broker = Broker::start("properties", &[]);
    let client = broker.client().await;
    within("declare", client.declare("props", QueueOptions::default()))
        .await
        .expect("declare");
    let m = Message::new("payload")
        .message_id("id-1")
        .correlation_id("corr-1")
        .reply_to("replies")
        .content_type("text/plain")
        .content_encoding("identity")
        .header("tenant", "acme")
        .header("trace", vec![1u8, 2, 3])
        .timestamp_ms(1_795_000_000_000)
        .priority(7)
        .persistent(false);
    publish_all(&client, "props", vec![m]).await;
    let d = within("get", client.get("props", true))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(d.body(), b"payload");
    assert_eq!(d.message_id(), Some("id-1"));
    assert_eq!(d.correlation_id(), Some("corr-1"));
    assert_eq!(d.reply_to(), Some("replies"));
    assert_eq!(d.content_type(), Some("text/plain"));
    assert_eq!(d.content_encoding(), Some("identity"));
    assert_eq!(
        d.headers(),
        vec![("tenant", &b"acme"[..]), ("trace", &[1u8, 2, 3][..])]
    );
    assert_eq!(d.header("trace"), Some(&[1u8, 2, 3][..]));
    assert_eq!(d.timestamp_ms(), 1_795_000_000_000);
    assert_eq!(d.priority(), 7);
    assert!(!d.persistent());
    assert!(d.is_auto_acked());
    within("ack", d.ack()).await.expect("a no-op for auto-ack");
    assert!(within("get", client.get("props", false))
        .await
        .expect("get")
        .is_none());
}

#[tokio::test]
async fn nack_with_requeue_redelivers_and_reject_drops() {
    let broker = Broker::start("nack", &[]);
    let client = broker.client().await;
    within("declare", client.declare("retry", QueueOptions::default()))
        .await
        .expect("declare");
    publish_all(&client, "retry", messages("r", 2)).await;

    let mut consumer = within("consume", client.consume("retry", prefetch(1)))
        .await
        .expect("consume");
    let d = next(&mut consumer).await;
    assert_eq!(d.body(), b"r 0");
    within("nack", d.nack(true)).await.expect("nack");
    let again = next(&mut consumer).await;
    assert_eq!(
        again.body(),
        b"r 0",
        "the requeued message comes back first"
    );
    assert!(again.redelivered());
    assert_eq!(again.delivery_count(), 2);
    within("reject", again.reject(false)).await.expect("reject");
    let second = next(&mut consumer).await;
    assert_eq!(second.body(), b"r 1");
    within("ack", second.ack()).await.expect("ack");
    let info = within("info", client.queue_info("retry"))
        .await
        .expect("info");
    assert_eq!(
        (info.messages_ready, info.messages_unacked),
        (0, 0),
        "the rejected message is gone"
    );

    // `get` without auto-ack holds the message until it is settled.
    publish_all(&client, "retry", messages("g", 1)).await;
    within("cancel", consumer.cancel()).await.expect("cancel");
    let got = within("get", client.get("retry", false))
        .await
        .expect("get")
        .expect("a message");
    let info = within("info", client.queue_info("retry"))
        .await
        .expect("info");
    assert_eq!((info.messages_ready, info.messages_unacked), (0, 1));
    within("nack", got.nack(true)).await.expect("nack");
    let got = within("get", client.get("retry", false))
        .await
        .expect("get")
        .expect("requeued");
    assert!(got.redelivered());
    within("ack", got.ack()).await.expect("ack");
}

#[tokio::test]
async fn competing_consumers_share_and_a_dropped_clients_deliveries_go_to_the_other() {
    let broker = Broker::start("compete", &[]);
    let producer = broker.client().await;
    within("declare", producer.declare("jobs", QueueOptions::default()))
        .await
        .expect("declare");
    let a = broker.client().await;
    let b = broker.client().await;
    let mut ca = within("consume", a.consume("jobs", prefetch(2)))
        .await
        .expect("consume a");
    let mut cb = within("consume", b.consume("jobs", prefetch(2)))
        .await
        .expect("consume b");
    publish_all(&producer, "jobs", messages("j", 4)).await;

    let got_a = [next(&mut ca).await, next(&mut ca).await];
    let got_b = [next(&mut cb).await, next(&mut cb).await];
    let mut all: Vec<Vec<u8>> = got_a
        .iter()
        .chain(&got_b)
        .map(|d| d.body().to_vec())
        .collect();
    all.sort();
    assert_eq!(all, bodies("j", 4), "each message to exactly one consumer");

    // A's client goes away holding two unacked deliveries: its stream ends, and the broker
    // hands them to B, marked redelivered, as B frees credit.
    let mut bodies_a: Vec<Vec<u8>> = got_a.iter().map(|d| d.body().to_vec()).collect();
    drop(a);
    match within("a's stream to end", ca.recv()).await {
        Some(Err(ClientError::Closed(_))) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    let err = within("ack", got_a[0].ack())
        .await
        .expect_err("its connection is gone");
    assert!(matches!(err, ClientError::Closed(_)), "{err:?}");
    for d in &got_b {
        within("ack", d.ack()).await.expect("ack");
    }
    let again = [next(&mut cb).await, next(&mut cb).await];
    let mut bodies_again: Vec<Vec<u8>> = again.iter().map(|d| d.body().to_vec()).collect();
    bodies_a.sort();
    bodies_again.sort();
    assert_eq!(bodies_again, bodies_a);
    assert!(
        again
            .iter()
            .all(|d| d.redelivered() && d.delivery_count() == 2),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_cancelled_consumers_unseen_deliveries_go_back_and_a_deleted_queue_ends_the_stream() {
    let broker = Broker::start("cancel", &[]);
    let client = broker.client().await;
    within("declare", client.declare("c", QueueOptions::default()))
        .await
        .expect("declare");
    publish_all(&client, "c", messages("c", 3)).await;
    let mut consumer = within("consume", client.consume("c", prefetch(3)))
        .await
        .expect("consume");
    let taken = next(&mut consumer).await;
    // Make sure the other two have arrived (buffered, never handed out) before cancelling.
    within("info", client.queue_info("c")).await.expect("info");
    within("cancel", consumer.cancel()).await.expect("cancel");
    let info = within("info", client.queue_info("c")).await.expect("info");
    assert_eq!(
        (info.messages_ready, info.messages_unacked, info.consumers),
        (2, 1, 0),
        "the two never handed out are back; the one taken waits for its settlement"
    );
    within("ack", taken.ack()).await.expect("ack after cancel");

    let mut consumer = within("consume", client.consume("c", prefetch(1)))
        .await
        .expect("consume");
    let d = next(&mut consumer).await;
    within("ack", d.ack()).await.expect("ack");
    within("delete", client.delete("c", false, false))
        .await
        .expect("delete");
    loop {
        match within("the stream to end", consumer.recv()).await {
            Some(Ok(d)) => drop(d), // delivered before the delete
            Some(Err(ClientError::ConsumerCancelled { tag, code, .. })) => {
                assert_eq!(tag, consumer.tag());
                assert_eq!(code, ErrorCode::Deleted);
                break;
            }
            other => panic!("expected ConsumerCancelled, got {other:?}"),
        }
    }
    assert!(within("the end", consumer.recv()).await.is_none());
}

#[tokio::test]
async fn a_dropped_consumers_unseen_deliveries_go_to_another_consumer() {
    let broker = Broker::start("drop-consumer", &[]);
    let a = broker.client().await;
    let b = broker.client().await;
    within("declare", a.declare("d", QueueOptions::default()))
        .await
        .expect("declare");
    let consumer = within("consume", a.consume("d", prefetch(2)))
        .await
        .expect("consume");
    publish_all(&a, "d", messages("d", 2)).await;
    // Both are in the consumer's buffer once the broker counts them unacked: the info reply
    // travels behind the deliveries on the same connection.
    within("both deliveries", async {
        while within("info", a.queue_info("d"))
            .await
            .expect("info")
            .messages_unacked
            < 2
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    drop(consumer);
    let mut other = within("consume", b.consume("d", prefetch(2)))
        .await
        .expect("consume");
    let got = [next(&mut other).await, next(&mut other).await];
    let mut seen: Vec<Vec<u8>> = got.iter().map(|d| d.body().to_vec()).collect();
    seen.sort();
    assert_eq!(seen, bodies("d", 2));
    assert!(got.iter().all(|d| d.redelivered()), "{got:?}");
    for d in &got {
        within("ack", d.ack()).await.expect("ack");
    }
    let info = within("info", a.queue_info("d")).await.expect("info");
    assert_eq!(
        (info.messages_ready, info.messages_unacked, info.consumers),
        (0, 0, 1)
    );
}

#[tokio::test]
async fn ack_all_settles_many_deliveries_in_one_frame() {
    let broker = Broker::start("consume-ack-all", &[]);
    let client = broker.client().await;
    within("declare", client.declare("batch", QueueOptions::default()))
        .await
        .expect("declare");
    publish_all(&client, "batch", messages("m", 20)).await;
    let mut consumer = within("consume", client.consume("batch", prefetch(20)))
        .await
        .expect("consume");
    let mut got: Vec<Delivery> = Vec::new();
    for _ in 0..20 {
        got.push(next(&mut consumer).await);
    }
    // Ack the even ones in one frame: the odd ones stay outstanding.
    let mut evens: Vec<Delivery> = Vec::new();
    let mut _odds: Vec<Delivery> = Vec::new(); // held, unacked, until the end of the test
    for (i, d) in got.into_iter().enumerate() {
        if i % 2 == 0 {
            evens.push(d)
        } else {
            _odds.push(d)
        }
    }
    within("ack_all", Delivery::ack_all(&evens))
        .await
        .expect("ack_all");
    let info = within("info", client.queue_info("batch"))
        .await
        .expect("info");
    assert_eq!((info.messages_ready, info.messages_unacked), (0, 10));
    // Acking one of them again is refused: each tag is settled once.
    let again = within("ack again", Delivery::ack_all(&evens[..1])).await;
    assert!(again.is_err(), "a second ack of the same tag was accepted");
    assert!(matches!(
        within("ack_all of nothing", Delivery::ack_all(&[])).await,
        Ok(())
    ));
}

#[tokio::test]
async fn widening_a_running_consumers_prefetch_lets_more_deliveries_come() {
    let broker = Broker::start("consume-set-prefetch", &[]);
    let client = broker.client().await;
    within("declare", client.declare("window", QueueOptions::default()))
        .await
        .expect("declare");
    for f in within("publish", client.publish_batch("window", messages("w", 5)))
        .await
        .expect("queued")
    {
        within("confirm", f).await.expect("confirmed");
    }
    let options = ConsumeOptions {
        prefetch: 1,
        ..ConsumeOptions::default()
    };
    let mut consumer = within("consume", client.consume("window", options))
        .await
        .expect("consume");
    let first = next(&mut consumer).await;
    // A window of 1, unacked: the broker holds the rest back.
    let info = within("info", client.queue_info("window"))
        .await
        .expect("info");
    assert_eq!((info.messages_ready, info.messages_unacked), (4, 1));
    assert!(buffered(&mut consumer).is_none());
    within("set prefetch", consumer.set_prefetch(5))
        .await
        .expect("set prefetch");
    let mut held = vec![first];
    for _ in 0..4 {
        held.push(next(&mut consumer).await);
    }
    let got: Vec<Vec<u8>> = held.iter().map(|d| d.body().to_vec()).collect();
    assert_eq!(got, bodies("w", 5));
    let e = consumer.set_prefetch(0).await.expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    within("ack", Delivery::ack_all(&held)).await.expect("ack");
}

#[tokio::test]
async fn an_exclusive_consumer_keeps_the_queue_until_it_is_cancelled() {
    let broker = Broker::start("consume-exclusive", &[]);
    let (owner, other) = (broker.client().await, broker.client().await);
    within("declare", owner.declare("solo", QueueOptions::default()))
        .await
        .expect("declare");
    let exclusive = ConsumeOptions {
        exclusive: true,
        ..ConsumeOptions::default()
    };
    let solo = within("consume", owner.consume("solo", exclusive.clone()))
        .await
        .expect("the first, exclusive consumer");
    // Anyone else, exclusive or not, is refused while it runs, naming the queue.
    for options in [ConsumeOptions::default(), exclusive.clone()] {
        let e = within("refused consume", other.consume("solo", options))
            .await
            .expect_err("refused while an exclusive consumer runs");
        assert_eq!(e.code(), Some(ErrorCode::ResourceLocked), "{e}");
        assert!(e.to_string().contains("'solo'"), "{e}");
    }
    let info = within("info", owner.queue_info("solo"))
        .await
        .expect("info");
    assert_eq!(info.consumers, 1);
    within("cancel", solo.cancel()).await.expect("cancel");
    within("consume", other.consume("solo", ConsumeOptions::default()))
        .await
        .expect("others may consume once it is cancelled");
}

#[tokio::test]
async fn a_backlog_larger_than_a_frame_is_delivered_whole_across_several_frames() {
    // 20 messages of 900 KB: each under the broker's message_size_max (960 KiB), together over
    // the 16 MiB frame_size_max, so the one push that hands them all to a new consumer must
    // leave in more than one Deliver frame.
    const COUNT: usize = 20;
    const BODY_BYTES: usize = 900 * 1000;
    let broker = Broker::start("consume-large-backlog", &[]);
    let client = broker.client().await;
    within("declare", client.declare("large", QueueOptions::default()))
        .await
        .expect("declare");
    let body = |i: usize| vec![b'a' + i as u8; BODY_BYTES];
    let mut confirms = Vec::new();
    for i in 0..COUNT {
        let f = within("publish", client.publish("large", Message::new(body(i))))
            .await
            .expect("queued");
        confirms.push(f);
    }
    for f in confirms {
        within("confirm", f).await.expect("confirmed");
    }
    let info = within("info", client.queue_info("large"))
        .await
        .expect("info");
    assert_eq!(info.messages_ready, COUNT as u64);

    // Consumed only now, so the broker pushes the whole backlog at once.
    let mut consumer = within("consume", client.consume("large", prefetch(COUNT as u32)))
        .await
        .expect("consume");
    let mut got = Vec::new();
    for i in 0..COUNT {
        let d = match tokio::time::timeout(common::TIMEOUT, consumer.recv()).await {
            Ok(d) => d
                .expect("the stream ended")
                .expect("a delivery, not an error"),
            Err(_) => panic!(
                "delivery {i} of {COUNT} never came within {:?}: deliveries over frame_size_max \
                 together were not split into frames",
                common::TIMEOUT
            ),
        };
        assert_eq!(d.body().len(), BODY_BYTES, "delivery {i}");
        assert!(
            d.body().iter().all(|&b| b == b'a' + i as u8),
            "delivery {i} out of order"
        );
        got.push(d);
    }
    within("ack", Delivery::ack_all(&got)).await.expect("ack");
    let info = within("info", client.queue_info("large"))
        .await
        .expect("info");
    assert_eq!((info.messages_ready, info.messages_unacked), (0, 0));
}
