//! Queue management over the client: declare (named, server-named, passive, mismatched),
//! describe, list, purge, delete.

mod common;

use common::{messages, within, Broker};
use weir_client::{ClientError, ErrorCode, QueueArguments, QueueOptions};

#[tokio::test]
async fn declare_describe_list_purge_delete() {
    let broker = Broker::start("queues", &[]);
    let client = broker.client().await;

    let info = within("declare", client.declare("orders", QueueOptions::default()))
        .await
        .expect("declare");
    assert_eq!(info.name, "orders");
    assert!(info.durable && !info.exclusive && !info.auto_delete);
    assert_eq!((info.messages_ready, info.consumers), (0, 0));
    assert_eq!(
        info.shard,
        weir_client::placement("orders", broker.shard_count())
    );
    // Redeclaring the same is fine; a different declaration is refused.
    within(
        "redeclare",
        client.declare("orders", QueueOptions::default()),
    )
    .await
    .expect("identical redeclare");
    let mismatch = QueueOptions {
        auto_delete: true,
        ..QueueOptions::default()
    };
    let err = within("mismatch", client.declare("orders", mismatch))
        .await
        .expect_err("a different declaration");
    assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{err:?}");

    let err = within(
        "passive",
        client.declare("missing", QueueOptions::passive()),
    )
    .await
    .expect_err("passive declare of nothing");
    assert!(
        matches!(&err, ClientError::Refused { code, message } if *code == ErrorCode::NotFound && message.contains("missing")),
        "{err:?}"
    );

    let named = within(
        "server-named",
        client.declare("", QueueOptions::transient()),
    )
    .await
    .expect("server-named queue");
    assert!(named.name.starts_with("weir.gen-"), "{}", named.name);
    assert!(!named.durable);

    let limited = QueueOptions {
        arguments: QueueArguments {
            max_length: Some(10),
            message_ttl_ms: Some(60_000),
            ..QueueArguments::default()
        },
        ..QueueOptions::default()
    };
    let l = within("declare", client.declare("orders-limited", limited))
        .await
        .expect("declare with arguments");
    assert_eq!(l.arguments.max_length, Some(10));
    assert_eq!(l.arguments.message_ttl_ms, Some(60_000));

    for confirm in within("publish", client.publish_batch("orders", messages("o", 3)))
        .await
        .expect("publish")
    {
        within("confirm", confirm).await.expect("confirmed");
    }
    let info = within("info", client.queue_info("orders"))
        .await
        .expect("info");
    assert_eq!(info.messages_ready, 3);
    assert!(info.bytes_ready > 0);

    let names: Vec<String> = within("list", client.list_queues("orders"))
        .await
        .expect("list")
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert_eq!(names, vec!["orders", "orders-limited"]);

    assert_eq!(
        within("purge", client.purge("orders"))
            .await
            .expect("purge"),
        3
    );
    assert_eq!(
        within("delete", client.delete("orders-limited", false, false))
            .await
            .expect("delete"),
        0
    );
    within("publish", client.publish("orders", "x"))
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let err = within("delete if empty", client.delete("orders", false, true))
        .await
        .expect_err("not empty");
    assert_eq!(err.code(), Some(ErrorCode::PreconditionFailed), "{err:?}");
    assert_eq!(
        within("delete", client.delete("orders", false, false))
            .await
            .expect("delete"),
        1
    );
    let err = within("info", client.queue_info("orders"))
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(within("list", client.list_queues("orders"))
        .await
        .expect("list")
        .is_empty());
}

#[tokio::test]
async fn names_over_the_limit_and_reserved_names_are_refused() {
    let broker = Broker::start("names", &[]);
    let client = broker.client().await;
    let long = "x".repeat(client.server().limits.name_length_max as usize + 1);
    let err = within("declare", client.declare(&long, QueueOptions::default()))
        .await
        .expect_err("too long");
    assert!(matches!(err, ClientError::LimitExceeded { .. }), "{err:?}");
    let err = within(
        "declare",
        client.declare("weir.mine", QueueOptions::default()),
    )
    .await
    .expect_err("reserved");
    assert_eq!(err.code(), Some(ErrorCode::AccessRefused));
}
