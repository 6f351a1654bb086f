//! Connecting: the handshake, what `Welcome` tells, a refused protocol version, closing.

mod common;

use common::{within, Broker};
use weir_client::{Client, ClientError, ClientOptions, CloseReason, ErrorCode, QueueOptions};

#[tokio::test]
async fn the_handshake_reports_the_broker_and_its_limits() {
    let broker = Broker::start("handshake", &["--cpus", "0,1"]);
    let client = broker.client_with(ClientOptions::single_connection()).await;
    let s = client.server();
    assert_eq!(s.protocol_version, weir_client::protocol::PROTOCOL_VERSION);
    assert!(!s.broker_version.is_empty());
    assert_eq!(s.shard_count, 2);
    assert_eq!(s.shard_ports, broker.shard_ports);
    assert!(s.shard < 2);
    assert!(s.limits.publish_batch_max > 0 && s.limits.publishes_in_flight_max > 0);
    assert_eq!(client.connections().len(), 1);
    assert!(!client.is_shard_aware());

    let aware = broker.client().await;
    assert!(aware.is_shard_aware());
    let mut shards: Vec<u16> = aware.connections().iter().map(|(s, _)| *s).collect();
    shards.sort();
    assert_eq!(shards, vec![0, 1], "one connection per shard");
}

#[tokio::test]
async fn a_protocol_version_the_broker_does_not_speak_is_a_typed_error_with_its_sentence() {
    let broker = Broker::start("version", &[]);
    let options = ClientOptions {
        protocol_version: weir_client::protocol::PROTOCOL_VERSION + 1,
        ..ClientOptions::default()
    };
    let err = within("connect", Client::connect(broker.listen, options))
        .await
        .expect_err("the broker must refuse another protocol version");
    match &err {
        ClientError::ProtocolVersion { message } => {
            assert!(message.contains("protocol"), "{message}")
        }
        other => panic!("expected ProtocolVersion, got {other:?}"),
    }
    assert_eq!(err.code(), Some(ErrorCode::ProtocolVersion));
}

#[tokio::test]
async fn nothing_listening_is_an_io_error() {
    // Bind and drop: the port is free and nothing accepts on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port();
    let err = within(
        "connect",
        Client::connect(("127.0.0.1", port), ClientOptions::default()),
    )
    .await
    .expect_err("nothing listens there");
    assert!(matches!(err, ClientError::Io(_)), "{err:?}");
}

#[tokio::test]
async fn after_close_every_clone_fails_with_closed() {
    let broker = Broker::start("close", &[]);
    let client = broker.client().await;
    let other = client.clone();
    within("close", client.close())
        .await
        .expect("orderly close");
    let err = within("info", other.queue_info("anything"))
        .await
        .expect_err("the connection is closed");
    assert!(
        matches!(err, ClientError::Closed(CloseReason::Local)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_broker_that_dies_fails_pending_work_with_closed() {
    let broker = Broker::start("dies", &[]);
    let client = broker.client().await;
    within("declare", client.declare("q", QueueOptions::default()))
        .await
        .expect("declare");
    let mut consumer = within("consume", client.consume("q", Default::default()))
        .await
        .expect("consume");
    drop(broker); // SIGKILL
    match within("the stream to end", consumer.recv()).await {
        Some(Err(ClientError::Closed(reason))) => {
            assert!(
                matches!(reason, CloseReason::Eof | CloseReason::Io { .. }),
                "{reason:?}"
            )
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(within("the end", consumer.recv()).await.is_none());
    let err = within("declare", client.declare("q2", QueueOptions::default()))
        .await
        .expect_err("the broker is gone");
    assert!(matches!(err, ClientError::Closed(_)), "{err:?}");
}

#[tokio::test]
async fn a_broker_shutting_down_closes_with_its_reason() {
    let broker = Broker::start("shutdown", &[]);
    let client = broker.client().await;
    within("declare", client.declare("q", QueueOptions::default()))
        .await
        .expect("declare");
    let mut consumer = within("consume", client.consume("q", Default::default()))
        .await
        .expect("consume");
    broker.terminate();
    // The broker may cancel the consumer first; either way the stream ends with the broker's
    // reason for closing: an `Error { ShuttingDown, close: true }` frame.
    let reason = loop {
        match within("the stream to end", consumer.recv()).await {
            Some(Err(ClientError::ConsumerCancelled { .. })) => {}
            Some(Err(ClientError::Closed(reason))) => break reason,
            other => panic!("expected Closed, got {other:?}"),
        }
    };
    let shutting_down = |r: &CloseReason| matches!(r, CloseReason::Broker { code, .. } if *code == ErrorCode::ShuttingDown);
    assert!(shutting_down(&reason), "{reason:?}");
    match within("info", client.queue_info("q")).await {
        Err(ClientError::Closed(r)) => assert!(shutting_down(&r), "{r:?}"),
        other => panic!("expected Closed, got {other:?}"),
    }
}
