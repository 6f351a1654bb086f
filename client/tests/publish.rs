//! Publishing: confirms for one message and for a batch, refusals by sequence, mandatory
//! returns, and the limits the client enforces before sending.

mod common;

use std::future::Future;

use common::{messages, within, Broker};
use weir_client::{ClientError, Durability, ErrorCode, Message, PublishOptions, QueueOptions};

#[tokio::test]
async fn one_message_and_a_batch_are_confirmed_in_sequence_order() {
    let broker = Broker::start("publish", &[]);
    let client = broker.client().await;
    within("declare", client.declare("work", QueueOptions::default()))
        .await
        .expect("declare");

    let one = within("publish", client.publish("work", Message::new("first")))
        .await
        .expect("queued");
    let c = within("confirm", one).await.expect("confirmed");
    assert_eq!(c.sequence, 1);
    assert!(!c.duplicate);
    // A persistent message on a durable queue is journaled under the broker's fsync policy.
    assert_eq!(c.durability, client.server().durability);
    assert_eq!(c.durability, Durability::Always, "the default policy");
    let c = within(
        "publish",
        client.publish("work", Message::new("memory only").persistent(false)),
    )
    .await
    .expect("queued")
    .await
    .expect("confirmed");
    assert_eq!((c.sequence, c.durability), (2, Durability::Transient));

    let batch = within("publish", client.publish_batch("work", messages("m", 100)))
        .await
        .expect("queued");
    assert_eq!(batch.len(), 100);
    let mut sequences = Vec::new();
    for f in batch {
        sequences.push(within("confirm", f).await.expect("confirmed").sequence);
    }
    assert_eq!(sequences, (3..=102).collect::<Vec<u64>>());

    // Many publishes in flight at once: queued back to back, confirmed as they come.
    let mut pending = Vec::new();
    for i in 0..500 {
        pending.push(
            within("publish", client.publish("work", format!("p{i}").as_str()))
                .await
                .expect("queued"),
        );
    }
    for f in pending {
        within("confirm", f).await.expect("confirmed");
    }
    let info = within("info", client.queue_info("work"))
        .await
        .expect("info");
    assert_eq!(info.messages_ready, 602);
}

#[tokio::test]
async fn publishing_to_an_unknown_queue_is_refused_and_mandatory_ones_come_back() {
    let broker = Broker::start("publish-unknown", &[]);
    let client = broker.client().await;

    let futures = within("publish", client.publish_batch("nowhere", messages("x", 2)))
        .await
        .expect("queued");
    for f in futures {
        let err = within("refusal", f).await.expect_err("no such queue");
        match err {
            ClientError::Refused { code, message } => {
                assert_eq!(code, ErrorCode::NotFound);
                assert!(message.contains("nowhere"), "{message}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    let mandatory = PublishOptions {
        mandatory: true,
        ..PublishOptions::default()
    };
    let f = within(
        "publish",
        client.publish_with(
            &mandatory,
            "nowhere",
            Message::new("back").message_id("m-1"),
        ),
    )
    .await
    .expect("queued");
    match within("return", f).await {
        Err(ClientError::Returned(r)) => {
            assert_eq!(r.code, ErrorCode::NoRoute);
            assert_eq!(r.routing_key, "nowhere");
            let m = weir_client::protocol::verify_message(
                &r.message,
                &weir_client::protocol::WireLimits::DEFAULT,
            )
            .expect("the returned message is the published one");
            assert_eq!(m.message_id(), Some("m-1"));
            assert_eq!(m.body().map(|b| b.bytes()), Some(&b"back"[..]));
        }
        other => panic!("expected Returned, got {other:?}"),
    }

    // Exchanges are part of the API; this broker does not serve them yet and refuses by name.
    let to_exchange = PublishOptions {
        exchange: "events".into(),
        mandatory: false,
    };
    let f = within("publish", client.publish_with(&to_exchange, "k", "x"))
        .await
        .expect("queued");
    let err = within("refusal", f).await.expect_err("no such exchange");
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");

    // The connection goes on after refusals.
    within(
        "declare",
        client.declare("somewhere", QueueOptions::default()),
    )
    .await
    .expect("declare");
    within("publish", client.publish("somewhere", "y"))
        .await
        .expect("queued")
        .await
        .expect("confirmed");
}

#[tokio::test]
async fn limits_from_welcome_are_enforced_before_sending() {
    let broker = Broker::start("publish-limits", &[]);
    let client = broker.client().await;
    within("declare", client.declare("big", QueueOptions::default()))
        .await
        .expect("declare");
    let limits = client.server().limits;

    let huge = Message::new(vec![0u8; limits.message_size_max as usize + 1]);
    let err = within("publish", client.publish("big", huge))
        .await
        .expect_err("too large");
    assert!(
        matches!(
            err,
            ClientError::LimitExceeded {
                what: "message_size_max",
                ..
            }
        ),
        "{err:?}"
    );

    let too_many = messages("b", limits.publish_batch_max as usize + 1);
    let err = within("publish", client.publish_batch("big", too_many))
        .await
        .expect_err("batch too large");
    assert!(matches!(err, ClientError::LimitExceeded { .. }), "{err:?}");

    let headers =
        (0..=limits.headers_max).fold(Message::new("h"), |m, i| m.header(format!("h{i}"), "v"));
    let err = within("publish", client.publish("big", headers))
        .await
        .expect_err("too many headers");
    assert!(matches!(err, ClientError::LimitExceeded { .. }), "{err:?}");

    // Nothing reached the broker, and the connection is fine.
    let c = within("publish", client.publish("big", "fits"))
        .await
        .expect("queued")
        .await
        .expect("confirmed");
    assert_eq!(c.sequence, 1, "refused publishes used no sequence number");
}

#[tokio::test]
async fn unconfirmed_publishes_are_bounded_by_publishes_in_flight_max() {
    let broker = Broker::start_with_config(
        "publish-window",
        "[limits]\npublishes_in_flight_max = 4\npublish_batch_max = 8\n",
        &[],
    );
    let client = broker.client().await;
    let limits = client.server().limits;
    assert_eq!(
        (limits.publishes_in_flight_max, limits.publish_batch_max),
        (4, 8)
    );
    within("declare", client.declare("window", QueueOptions::default()))
        .await
        .expect("declare");

    // A batch that could never fit the window is refused, not left waiting forever.
    let err = within("publish", client.publish_batch("window", messages("w", 5)))
        .await
        .expect_err("5 > publishes_in_flight_max");
    assert!(
        matches!(
            err,
            ClientError::LimitExceeded {
                value: 5,
                max: 4,
                ..
            }
        ),
        "{err:?}"
    );

    // A full window: the fifth publish waits for a permit, which only a confirm gives back.
    // (The test's runtime has one thread: the connection's task cannot run, so cannot confirm
    // anything, until this task waits.)
    let mut window = Vec::new();
    for i in 0..4 {
        window.push(
            within(
                "publish",
                client.publish("window", format!("f{i}").as_str()),
            )
            .await
            .expect("queued"),
        );
    }
    assert_eq!(client.unconfirmed_publishes(), 4);
    let mut fifth = std::pin::pin!(client.publish("window", "f4"));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(
        fifth.as_mut().poll(&mut cx).is_pending(),
        "a fifth unconfirmed publish was let through"
    );
    let fifth = within("a publish permit", fifth).await.expect("queued");
    window.push(fifth);
    for f in window {
        within("confirm", f).await.expect("confirmed");
    }
    assert_eq!(client.unconfirmed_publishes(), 0);

    // Far more publishes than the window, none of their confirms awaited by the publisher:
    // each `publish` waits for a permit that a confirm gives back, so this ends, and the broker
    // is never sent more than 4 unconfirmed (it would stop reading, or refuse, beyond that).
    let mut pending = Vec::new();
    for i in 0..200 {
        pending.push(
            within(
                "a publish permit",
                client.publish("window", format!("w{i}").as_str()),
            )
            .await
            .expect("queued"),
        );
    }
    for f in pending {
        within("confirm", f).await.expect("confirmed");
    }
    let info = within("info", client.queue_info("window"))
        .await
        .expect("info");
    assert_eq!(info.messages_ready, 205);
}
