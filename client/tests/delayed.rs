//! Delayed messages against the real broker: a message published with `deliver_at_ms` waits
//! outside the ready list (`messages_delayed`), is not delivered before its time, joins the
//! queue when its time comes, survives SIGKILL still delayed, and one too far ahead is refused.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{within, Broker};
use weir_client::{ConsumeOptions, ErrorCode, Message, QueueOptions};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

#[tokio::test]
async fn a_delayed_message_waits_for_its_time_then_is_delivered() {
    let broker = Broker::start("delayed", &[]);
    let c = broker.client().await;
    within("declare", c.declare("later", QueueOptions::default()))
        .await
        .expect("declare");
    let at = now_ms() + 400;
    let delayed = within(
        "publish",
        c.publish("later", Message::new("delayed").deliver_at_ms(at)),
    )
    .await
    .expect("queued");
    within("confirm", delayed).await.expect("confirmed");
    let now = within("publish", c.publish("later", Message::new("now")))
        .await
        .expect("queued");
    within("confirm", now).await.expect("confirmed");
    let info = within("info", c.queue_info("later")).await.expect("info");
    if now_ms() < at {
        assert_eq!((info.messages_ready, info.messages_delayed), (1, 1));
    }
    let mut consumer = within("consume", c.consume("later", ConsumeOptions::default()))
        .await
        .expect("consume");
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = within("delivery", consumer.recv())
            .await
            .expect("open")
            .expect("delivery");
        let body = String::from_utf8_lossy(d.body()).into_owned();
        if body == "delayed" {
            assert!(now_ms() >= at, "delivered before its time");
            assert_eq!(
                d.deliver_at_ms(),
                Some(at),
                "the message's bytes are untouched"
            );
        }
        within("ack", d.ack()).await.expect("ack");
        got.push(body);
    }
    assert_eq!(got, ["now", "delayed"]);
    let info = within("info", c.queue_info("later")).await.expect("info");
    assert_eq!((info.messages_ready, info.messages_delayed), (0, 0));
}

#[tokio::test]
async fn a_delayed_message_survives_a_crash_still_delayed_and_the_limit_holds() {
    let toml = "cpus = [0]\n[limits]\ndelay_ms_max = 60000\n";
    let broker = Broker::start_with_config("delayed-crash", toml, &[]);
    let c = broker.client().await;
    within("declare", c.declare("later", QueueOptions::default()))
        .await
        .expect("declare");
    let at = now_ms() + 30_000;
    let f = within(
        "publish",
        c.publish("later", Message::new("in 30 s").deliver_at_ms(at)),
    )
    .await
    .expect("queued");
    within("confirm", f).await.expect("confirmed");
    let too_far = within(
        "publish",
        c.publish(
            "later",
            Message::new("in 2 min").deliver_at_ms(now_ms() + 120_000),
        ),
    )
    .await
    .expect("queued");
    let e = within("refusal", too_far).await.expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    assert!(e.to_string().contains("delay_ms_max"), "{e}");
    drop(c);

    let broker = broker.restart();
    let c = broker.client().await;
    let info = within("info", c.queue_info("later")).await.expect("info");
    assert_eq!(
        (info.messages_ready, info.messages_delayed),
        (0, 1),
        "recovered as delayed, not ready"
    );
    assert!(
        within("get", c.get("later", true))
            .await
            .expect("get")
            .is_none(),
        "nothing to get before its time"
    );
}
