//! Exchanges, bindings, pub/sub and request-reply against the real broker (two shards): each
//! exchange kind routes as AMQP says, a bind made through one shard routes publishes made on
//! another at once, a message routed to queues on two shards reaches each once, durable
//! exchanges and bindings survive SIGKILL, unroutable messages are returned or counted, and
//! request-reply round trips with many requests in flight.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{queue_on, within, Broker};
use weir_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Delivery, ErrorCode, ExchangeKind,
    ExchangeOptions, Message, PublishOptions, QueueOptions,
};

const SHARDS: u16 = 2;

fn two_shards(name: &str) -> Broker {
    Broker::start(name, &["--cpus", "0,1"])
}

/// A client whose one connection is served by `shard` (its own port).
async fn on_shard(broker: &Broker, shard: usize) -> Client {
    let addr = SocketAddr::from(([127, 0, 0, 1], broker.shard_ports[shard]));
    within(
        "connect",
        Client::connect(addr, ClientOptions::single_connection()),
    )
    .await
    .expect("connect to a shard")
}

async fn declare_exchange(client: &Client, name: &str, kind: ExchangeKind) {
    within(
        "declare exchange",
        client.declare_exchange(name, kind, ExchangeOptions::default()),
    )
    .await
    .expect("declare exchange");
}

async fn declare_queue(client: &Client, name: &str) {
    within("declare", client.declare(name, QueueOptions::default()))
        .await
        .expect("declare queue");
}

async fn bind(client: &Client, queue: &str, exchange: &str, key: &str) {
    within("bind", client.bind(queue, exchange, key))
        .await
        .expect("bind");
}

/// Publishes `body` to `exchange` with `key` and waits for its confirm.
async fn publish(client: &Client, exchange: &str, key: &str, body: &str) {
    let options = PublishOptions {
        exchange: exchange.into(),
        mandatory: false,
    };
    let confirm = within(
        "publish",
        client.publish_with(&options, key, Message::new(body.to_string())),
    )
    .await
    .expect("queued");
    within("confirm", confirm).await.expect("confirmed");
}

/// Takes every ready message of `queue` (with `get`, acked), as strings.
async fn drain(client: &Client, queue: &str) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(d) = within("get", client.get(queue, true)).await.expect("get") {
        got.push(String::from_utf8_lossy(d.body()).into_owned());
    }
    got
}

#[tokio::test]
async fn each_exchange_kind_routes_as_amqp_says() {
    let broker = two_shards("routing-kinds");
    let c = broker.client().await;
    declare_exchange(&c, "direct-x", ExchangeKind::Direct).await;
    declare_exchange(&c, "topic-x", ExchangeKind::Topic).await;
    declare_exchange(&c, "fanout-x", ExchangeKind::Fanout).await;

    // Direct: exact keys only; a queue bound with two keys gets each.
    for q in ["d-error", "d-all"] {
        declare_queue(&c, q).await;
    }
    bind(&c, "d-error", "direct-x", "error").await;
    bind(&c, "d-all", "direct-x", "error").await;
    bind(&c, "d-all", "direct-x", "info").await;
    for key in ["error", "info", "warning", "error.x", ""] {
        publish(&c, "direct-x", key, key).await;
    }
    assert_eq!(drain(&c, "d-error").await, ["error"]);
    assert_eq!(drain(&c, "d-all").await, ["error", "info"]);

    // Fanout: every bound queue, whatever the key.
    for q in ["f-1", "f-2"] {
        declare_queue(&c, q).await;
        bind(&c, q, "fanout-x", "ignored").await;
    }
    publish(&c, "fanout-x", "any.key", "m1").await;
    publish(&c, "fanout-x", "", "m2").await;
    for q in ["f-1", "f-2"] {
        assert_eq!(drain(&c, q).await, ["m1", "m2"], "{q}");
    }

    // Topic, with RabbitMQ's edge cases: the pattern, then the keys it must match (every
    // other key of the list must not).
    let keys = [
        "", "a", "b", "a.b", "a.x.b", "a.x.y.b", "a..b", "x.y.b", ".", "a.", "c.a.b", "a.b.c",
    ];
    let patterns: [(&str, &[&str]); 8] = [
        ("#", &keys),
        ("a.#.#.b", &["a.b", "a.x.b", "a.x.y.b", "a..b"]),
        (
            "#.b",
            &["b", "a.b", "a.x.b", "a.x.y.b", "a..b", "x.y.b", "c.a.b"],
        ),
        ("a.*.b", &["a.x.b", "a..b"]),
        ("*", &["a", "b"]),
        (
            "a.#",
            &["a", "a.b", "a.x.b", "a.x.y.b", "a..b", "a.", "a.b.c"],
        ),
        ("", &[""]),
        ("*.*", &["a.b", ".", "a."]),
    ];
    let mut queues = Vec::new();
    for (i, (pattern, _)) in patterns.iter().enumerate() {
        let q = format!("t-{i}");
        declare_queue(&c, &q).await;
        bind(&c, &q, "topic-x", pattern).await;
        queues.push(q);
    }
    for key in keys {
        publish(&c, "topic-x", key, &format!("key '{key}'")).await;
    }
    for (q, (pattern, matching)) in queues.iter().zip(patterns) {
        let got: BTreeSet<String> = drain(&c, q).await.into_iter().collect();
        let want: BTreeSet<String> = matching.iter().map(|k| format!("key '{k}'")).collect();
        assert_eq!(got, want, "pattern '{pattern}'");
    }

    // The default exchange still routes by queue name.
    publish(&c, "", "f-1", "direct to f-1").await;
    assert_eq!(drain(&c, "f-1").await, ["direct to f-1"]);
}

#[tokio::test]
async fn a_bind_through_one_shard_routes_publishes_on_the_other_at_once() {
    let broker = two_shards("routing-shards");
    let on0 = on_shard(&broker, 0).await;
    let on1 = on_shard(&broker, 1).await;
    declare_exchange(&on0, "events", ExchangeKind::Topic).await;
    let queue = queue_on(0, SHARDS, "bound-late");
    declare_queue(&on1, &queue).await;
    // Bound through shard 1's connection, published through shard 0's (and the other way),
    // each right after the bind's answer: no waiting, no retry.
    for (i, (binder, publisher)) in [(&on1, &on0), (&on0, &on1)].into_iter().enumerate() {
        let key = format!("k{i}");
        bind(binder, &queue, "events", &key).await;
        let options = PublishOptions {
            exchange: "events".into(),
            mandatory: true,
        };
        let confirm = within(
            "publish",
            publisher.publish_with(&options, &key, Message::new(key.clone())),
        )
        .await
        .expect("queued");
        within("confirm", confirm)
            .await
            .expect("routed (mandatory: a miss would come back)");
    }
    assert_eq!(drain(&on0, &queue).await, ["k0", "k1"]);
}

#[tokio::test]
async fn a_message_for_queues_on_two_shards_reaches_each_once() {
    let broker = two_shards("routing-split");
    let c = broker.client().await;
    declare_exchange(&c, "orders", ExchangeKind::Topic).await;
    // Two queues on each shard; one of them bound twice with overlapping patterns.
    let queues: Vec<String> = (0..4)
        .map(|i| queue_on(i % SHARDS, SHARDS, &format!("split{i}")))
        .collect();
    for q in &queues {
        declare_queue(&c, q).await;
        bind(&c, q, "orders", "order.#").await;
    }
    bind(&c, &queues[0], "orders", "*.created").await;
    let n = 50;
    let options = PublishOptions {
        exchange: "orders".into(),
        mandatory: true,
    };
    let messages: Vec<Message> = (0..n).map(|i| Message::new(format!("o{i}"))).collect();
    let confirms = within(
        "publish",
        c.publish_batch_with(&options, "order.created", messages),
    )
    .await
    .expect("queued");
    for confirm in confirms {
        within("confirm", confirm).await.expect("confirmed");
    }
    let want: Vec<String> = (0..n).map(|i| format!("o{i}")).collect();
    for q in &queues {
        let mut consumer = within("consume", c.consume(q, ConsumeOptions::default()))
            .await
            .expect("consume");
        let mut got = Vec::new();
        for _ in 0..n {
            let d: Delivery = within("delivery", consumer.recv())
                .await
                .expect("open")
                .expect("delivery");
            assert_eq!(d.exchange(), "orders");
            assert_eq!(d.routing_key(), "order.created");
            got.push(String::from_utf8_lossy(d.body()).into_owned());
            within("ack", d.ack()).await.expect("ack");
        }
        assert_eq!(got, want, "{q}: each message once, in order");
        within("cancel", consumer.cancel()).await.expect("cancel");
        let info = within("info", c.queue_info(q)).await.expect("info");
        assert_eq!(info.messages_ready, 0, "{q}: no duplicate left behind");
    }
}

#[tokio::test]
async fn many_subscribers_each_get_every_message_of_a_fanout() {
    let broker = two_shards("routing-pubsub");
    let publisher = broker.client().await;
    declare_exchange(&publisher, "news", ExchangeKind::Fanout).await;
    let subscribers = 8;
    let n = 100;
    let mut streams = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..subscribers {
        let c = broker.client().await;
        // Pub/sub: a server-named, exclusive, auto-delete queue per subscriber.
        let options = QueueOptions {
            durable: false,
            exclusive: true,
            auto_delete: true,
            ..QueueOptions::default()
        };
        let q = within("declare", c.declare("", options))
            .await
            .expect("declare")
            .name;
        assert!(!q.is_empty(), "the broker names the queue");
        bind(&c, &q, "news", "").await;
        let options = ConsumeOptions {
            auto_ack: true,
            ..ConsumeOptions::default()
        };
        streams.push(
            within("consume", c.consume(&q, options))
                .await
                .expect("consume"),
        );
        clients.push(c);
    }
    let names: BTreeSet<String> = streams.iter().map(|s| s.queue().to_string()).collect();
    assert_eq!(
        names.len(),
        subscribers,
        "every subscriber has its own queue"
    );
    let options = PublishOptions {
        exchange: "news".into(),
        mandatory: false,
    };
    let messages: Vec<Message> = (0..n).map(|i| Message::new(format!("n{i}"))).collect();
    for confirm in within(
        "publish",
        publisher.publish_batch_with(&options, "", messages),
    )
    .await
    .expect("queued")
    {
        within("confirm", confirm).await.expect("confirmed");
    }
    let want: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
    for s in &mut streams {
        let mut got = Vec::new();
        for _ in 0..n {
            let d = within("delivery", s.recv())
                .await
                .expect("open")
                .expect("delivery");
            got.push(String::from_utf8_lossy(d.body()).into_owned());
        }
        assert_eq!(got, want, "subscriber {}", s.queue());
    }
    // A subscriber that leaves takes its queue and binding with it.
    let leaving = streams.pop().expect("a subscriber").queue().to_string();
    let c = clients.pop().expect("its client");
    within("close", c.close()).await.expect("close");
    let bound = |list: Vec<weir_client::BindingInfo>| list.iter().any(|b| b.queue == leaving);
    let mut tries = 0;
    // The queue goes with its connection, then its binding through the control plane: poll
    // the broker's own answer (bounded), never sleep blind.
    while bound(
        within("list", publisher.list_bindings(Some("news"), None))
            .await
            .expect("list"),
    ) {
        tries += 1;
        assert!(tries < 200, "the leaving subscriber's binding stayed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = within("list", publisher.list_bindings(Some("news"), None))
        .await
        .expect("list");
    assert_eq!(left.len(), subscribers - 1);
}

#[tokio::test]
async fn exchanges_and_bindings_survive_sigkill_and_transient_ones_do_not() {
    let broker = two_shards("routing-durable");
    let c = broker.client().await;
    declare_exchange(&c, "durable-x", ExchangeKind::Topic).await;
    within(
        "declare",
        c.declare_exchange(
            "transient-x",
            ExchangeKind::Direct,
            ExchangeOptions {
                durable: false,
                ..ExchangeOptions::default()
            },
        ),
    )
    .await
    .expect("declare");
    let durable_qs: Vec<String> = (0..2).map(|s| queue_on(s, SHARDS, "keep")).collect();
    for q in &durable_qs {
        declare_queue(&c, q).await;
        bind(&c, q, "durable-x", "a.*").await;
        bind(&c, q, "transient-x", "k").await;
    }
    let transient_q = "gone-after-restart";
    within(
        "declare",
        c.declare(
            transient_q,
            QueueOptions {
                durable: false,
                ..QueueOptions::default()
            },
        ),
    )
    .await
    .expect("declare");
    bind(&c, transient_q, "durable-x", "#").await;
    // A binding made and removed, and a deleted queue's bindings, stay gone too.
    bind(&c, &durable_qs[0], "durable-x", "removed.#").await;
    within("unbind", c.unbind(&durable_qs[0], "durable-x", "removed.#"))
        .await
        .expect("unbind");
    declare_queue(&c, "deleted-q").await;
    bind(&c, "deleted-q", "durable-x", "#").await;
    within("delete", c.delete("deleted-q", false, false))
        .await
        .expect("delete");
    // The delete's answer comes after its bindings are gone.
    let left = within("list", c.list_bindings(None, Some("deleted-q")))
        .await
        .expect("list");
    assert!(left.is_empty(), "{left:?}");
    drop(c);

    let broker = broker.restart();
    let c = broker.client().await;
    let exchanges: Vec<String> = within("list", c.list_exchanges(""))
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(exchanges, ["durable-x"]);
    let bindings: Vec<(String, String)> = within("list", c.list_bindings(None, None))
        .await
        .expect("list")
        .into_iter()
        .map(|b| (b.queue, b.binding_key))
        .collect();
    let mut want: Vec<(String, String)> = durable_qs
        .iter()
        .map(|q| (q.clone(), "a.*".to_string()))
        .collect();
    want.sort();
    assert_eq!(bindings, want);
    // And they route, from both shards, from the first publish.
    for shard in 0..2 {
        let p = on_shard(&broker, shard).await;
        publish(&p, "durable-x", "a.b", &format!("after restart {shard}")).await;
    }
    for q in &durable_qs {
        assert_eq!(
            drain(&c, q).await,
            ["after restart 0", "after restart 1"],
            "{q}"
        );
    }
}

#[tokio::test]
async fn unroutable_messages_are_returned_if_mandatory_else_dropped_and_counted() {
    let broker = two_shards("routing-unroutable");
    let c = broker.client().await;
    declare_exchange(&c, "empty-x", ExchangeKind::Direct).await;
    let options = PublishOptions {
        exchange: "empty-x".into(),
        mandatory: true,
    };
    let returned = within(
        "publish",
        c.publish_with(&options, "nobody", Message::new("m")),
    )
    .await
    .expect("queued");
    match within("return", returned).await {
        Err(ClientError::Returned(r)) => {
            assert_eq!(
                (r.exchange.as_str(), r.routing_key.as_str()),
                ("empty-x", "nobody")
            );
            assert_eq!(r.code, ErrorCode::NoRoute);
        }
        other => panic!("expected a return, got {other:?}"),
    }
    let dropped = |status: weir_client::BrokerStatus| -> u64 {
        status
            .counters
            .iter()
            .filter(|(name, _)| name.ends_with(".messages_unroutable"))
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(
        dropped(within("status", c.status()).await.expect("status")),
        0
    );
    for i in 0..3 {
        publish(&c, "empty-x", "nobody", &format!("dropped {i}")).await;
    }
    assert_eq!(
        dropped(within("status", c.status()).await.expect("status")),
        3
    );
    // An exchange that does not exist is an error for the publish, not a drop.
    let options = PublishOptions {
        exchange: "no-such-x".into(),
        mandatory: false,
    };
    let confirm = within("publish", c.publish_with(&options, "k", Message::new("m")))
        .await
        .expect("queued");
    let err = within("refusal", confirm).await.expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
}

#[tokio::test]
async fn mismatched_redeclares_and_reserved_names_are_refused_with_reasons() {
    let broker = two_shards("routing-errors");
    let c = broker.client().await;
    declare_exchange(&c, "logs", ExchangeKind::Topic).await;
    // Idempotent: the same declare again is fine.
    declare_exchange(&c, "logs", ExchangeKind::Topic).await;
    let expect = |r: Result<(), ClientError>, code: ErrorCode, words: &[&str]| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), Some(code), "{e}");
        let text = e.to_string();
        for w in words {
            assert!(text.contains(w), "'{text}' does not say '{w}'");
        }
    };
    expect(
        c.declare_exchange("logs", ExchangeKind::Fanout, ExchangeOptions::default())
            .await,
        ErrorCode::PreconditionFailed,
        &["logs", "fanout", "topic"],
    );
    let transient = ExchangeOptions {
        durable: false,
        ..ExchangeOptions::default()
    };
    expect(
        c.declare_exchange("logs", ExchangeKind::Topic, transient)
            .await,
        ErrorCode::PreconditionFailed,
        &["logs", "durable"],
    );
    expect(
        c.declare_exchange(
            "weir.mine",
            ExchangeKind::Direct,
            ExchangeOptions::default(),
        )
        .await,
        ErrorCode::AccessRefused,
        &["weir."],
    );
    expect(
        c.declare_exchange("", ExchangeKind::Direct, ExchangeOptions::default())
            .await,
        ErrorCode::AccessRefused,
        &["default exchange"],
    );
    let passive = ExchangeOptions {
        passive: true,
        ..ExchangeOptions::default()
    };
    expect(
        c.declare_exchange("missing", ExchangeKind::Direct, passive)
            .await,
        ErrorCode::NotFound,
        &["missing"],
    );
    expect(
        c.bind("no-such-queue", "logs", "#").await,
        ErrorCode::NotFound,
        &["no-such-queue"],
    );
    declare_queue(&c, "q").await;
    expect(
        c.bind("q", "no-such-x", "#").await,
        ErrorCode::NotFound,
        &["no-such-x"],
    );
    bind(&c, "q", "logs", "#").await;
    expect(
        c.delete_exchange("logs", true).await,
        ErrorCode::PreconditionFailed,
        &["logs", "binding"],
    );
    // Unbinding what is not bound is not an error; then if-unused deletion succeeds.
    within("unbind", c.unbind("q", "logs", "never.bound"))
        .await
        .expect("unbind");
    within("unbind", c.unbind("q", "logs", "#"))
        .await
        .expect("unbind");
    within("delete", c.delete_exchange("logs", true))
        .await
        .expect("unused now");
    expect(
        c.delete_exchange("logs", false).await,
        ErrorCode::NotFound,
        &["logs"],
    );
}

#[tokio::test]
async fn request_reply_round_trips_with_100_requests_in_flight() {
    let broker = two_shards("routing-rpc");
    let server = broker.client().await;
    declare_exchange(&server, "rpc", ExchangeKind::Direct).await;
    declare_queue(&server, "rpc.upper").await;
    bind(&server, "rpc.upper", "rpc", "upper").await;
    // The responder: upper-cases each request's body and replies to its reply-to with its
    // correlation id, untouched.
    let responder = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut requests = server
                .consume("rpc.upper", ConsumeOptions::default())
                .await
                .expect("consume");
            while let Some(Ok(req)) = requests.recv().await {
                let reply_to = req.reply_to().expect("reply_to carried").to_string();
                let correlation = req
                    .correlation_id()
                    .expect("correlation carried")
                    .to_string();
                let body = String::from_utf8_lossy(req.body()).to_uppercase();
                let reply = Message::new(body).correlation_id(correlation);
                let confirm = server
                    .publish(&reply_to, reply)
                    .await
                    .expect("reply queued");
                let _ = req.ack().await;
                let _ = confirm.await;
            }
        })
    };
    let client = broker.client().await;
    let requester = within("requester", client.requester())
        .await
        .expect("requester")
        .with_timeout(Duration::from_secs(20));
    let calls = (0..100).map(|i| {
        let r = requester.clone();
        async move {
            let reply = r
                .request("rpc", "upper", Message::new(format!("request {i}")))
                .await
                .expect("a reply");
            (i, String::from_utf8_lossy(reply.body()).into_owned())
        }
    });
    let replies = within("100 replies", futures_join_all(calls)).await;
    for (i, body) in replies {
        assert_eq!(
            body,
            format!("REQUEST {i}"),
            "each reply matches its request"
        );
    }
    // A request nobody is bound to receive fails at once, and one nobody answers times out.
    let err = requester
        .request("rpc", "nobody", Message::new("x"))
        .await
        .expect_err("returned");
    assert!(matches!(err, ClientError::Returned(_)), "{err}");
    declare_queue(&server, "rpc.silent").await;
    bind(&server, "rpc.silent", "rpc", "silent").await;
    let err = requester
        .clone()
        .with_timeout(Duration::from_millis(300))
        .request("rpc", "silent", Message::new("x"))
        .await
        .expect_err("timed out");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    responder.abort();
}

/// Runs futures concurrently on this task (no extra dependency for `join_all`).
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}

/// `shard.N.journal.records` summed over shards.
async fn journal_records(c: &Client) -> u64 {
    within("status", c.status())
        .await
        .expect("status")
        .counters
        .iter()
        .filter(|(name, _)| name.ends_with(".journal.records"))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn a_message_for_two_queues_of_one_shard_is_stored_once_and_survives_in_both() {
    let broker = Broker::start("routing-once", &["--cpus", "0"]);
    let c = broker.client().await;
    declare_exchange(&c, "twice", ExchangeKind::Fanout).await;
    for q in ["left", "right"] {
        declare_queue(&c, q).await;
        bind(&c, q, "twice", "").await;
    }
    let n = 200u64;
    let before = journal_records(&c).await;
    let options = PublishOptions {
        exchange: "twice".into(),
        mandatory: true,
    };
    let messages: Vec<Message> = (0..n).map(|i| Message::new(format!("m{i}"))).collect();
    for confirm in within("publish", c.publish_batch_with(&options, "", messages))
        .await
        .expect("queued")
    {
        within("confirm", confirm).await.expect("confirmed");
    }
    let written = journal_records(&c).await - before;
    // One message record per message, naming both queues; a copy per queue would be 2n.
    assert_eq!(written, n, "records for {n} messages routed to 2 queues");
    drop(c);

    // After a crash both queues have every message; acking them in one leaves the other whole,
    // across another crash.
    let broker = broker.restart();
    let c = broker.client().await;
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(drain(&c, "left").await, want, "left after a crash");
    drop(c);
    let broker = broker.restart();
    let c = broker.client().await;
    assert!(
        drain(&c, "left").await.is_empty(),
        "acked in left stays acked"
    );
    assert_eq!(drain(&c, "right").await, want, "right keeps its reference");
}

#[tokio::test]
async fn a_fanout_past_targets_per_message_max_is_stored_in_parts_and_confirmed_once() {
    let toml = "cpus = [0]\n[limits]\ntargets_per_message_max = 2\n";
    let broker = Broker::start_with_config("routing-parts", toml, &[]);
    let c = broker.client().await;
    declare_exchange(&c, "wide", ExchangeKind::Fanout).await;
    let queues: Vec<String> = (0..5).map(|i| format!("wide-{i}")).collect();
    for q in &queues {
        declare_queue(&c, q).await;
        bind(&c, q, "wide", "").await;
    }
    let before = journal_records(&c).await;
    publish(&c, "wide", "", "to all five").await;
    let written = journal_records(&c).await - before;
    assert_eq!(written, 3, "5 targets, 2 per record: 3 message records");
    for q in &queues {
        assert_eq!(drain(&c, q).await, ["to all five"], "{q}");
    }
}
