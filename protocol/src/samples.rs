//! One fully populated frame of every body type, for tests, fuzzing seeds and benchmarks.
//!
//! Every field of every table is set to a value other than its default, so a round trip that
//! drops or confuses a field shows up as a difference (the tests check that every field is
//! present in the encoded bytes, against the schema). The object-API types are
//! `#[non_exhaustive]`, which is why these live in this crate rather than in its tests.

use crate::wire::*;

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

fn ranges() -> Vec<RangeT> {
    vec![
        RangeT { first: 1, last: 3 },
        RangeT { first: 7, last: 7 },
        RangeT {
            first: 9,
            last: u64::MAX,
        },
    ]
}

/// A message with every property set; `body_len` bytes of body.
pub fn message(body_len: usize) -> MessageT {
    MessageT {
        message_id: s("m-42"),
        correlation_id: s("c-7"),
        reply_to: s("replies.client-1"),
        content_type: s("application/json"),
        content_encoding: s("identity"),
        headers: Some(vec![
            HeaderT {
                key: "trace".into(),
                value: Some(vec![1, 2, 3]),
            },
            HeaderT {
                key: "tenant".into(),
                value: Some(b"acme".to_vec()),
            },
        ]),
        timestamp_ms: 1_795_000_000_123,
        expiration_ms: Some(60_000),
        priority: 5,
        deliver_at_ms: Some(1_795_000_060_000),
        persistent: false,
        body: Some((0..body_len).map(|i| (i * 31 % 251) as u8).collect()),
    }
}

/// The encoded bytes of `message(body_len)`.
pub fn message_bytes(body_len: usize) -> Vec<u8> {
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let root = message(body_len).pack(&mut fbb);
    fbb.finish(root, None);
    fbb.finished_data().to_vec()
}

fn arguments() -> QueueArgumentsT {
    QueueArgumentsT {
        max_length: Some(10_000),
        max_length_bytes: Some(1 << 30),
        overflow: Overflow::RejectPublish,
        message_ttl_ms: Some(30_000),
        dead_letter_exchange: s("dlx"),
        dead_letter_routing_key: s("orders.dead"),
        max_deliveries: Some(5),
        shard: Some(1),
        priority_max: 9,
        expires_ms: Some(3_600_000),
        single_active_consumer: true,
        retry_delays_ms: Some(vec![1_000, 5_000, 30_000]),
    }
}

fn queue_info(name: &str) -> QueueInfoT {
    QueueInfoT {
        name: s(name),
        durable: false,
        exclusive: true,
        auto_delete: true,
        arguments: Some(Box::new(arguments())),
        shard: 1,
        messages_ready: 1_000_000,
        messages_unacked: 17,
        messages_delayed: 3,
        bytes_ready: 1 << 33,
        consumers: 4,
        oldest_ready_age_ms: Some(1_500),
        messages_retrying: 2,
        expires_in_ms: Some(60_000),
        active_consumer: s("worker-1"),
        messages_published: 2_000_000,
        messages_delivered: 1_000_100,
        messages_redelivered: 100,
        messages_acked: 999_983,
        messages_nacked: 120,
        messages_dead_lettered: 20,
        messages_expired: 5,
        messages_dropped: 7,
        bytes_unacked: 17 << 10,
    }
}

fn delivery(tag: u64) -> DeliveryT {
    DeliveryT {
        delivery_tag: tag,
        redelivered: true,
        delivery_count: 2,
        exchange: s("orders"),
        routing_key: s("orders.eu.created"),
        message: message_bytes(100),
        deaths: Some(vec![DeathT {
            queue: s("orders.work"),
            reason: DeathReason::Expired,
            count: 3,
            exchange: s("orders"),
            routing_key: s("orders.eu.created"),
            first_time_ms: 1_700_000_000_000,
            last_time_ms: 1_700_000_060_000,
        }]),
    }
}

/// Every body type, each once, with every field set.
pub fn bodies() -> Vec<BodyT> {
    vec![
        BodyT::Hello(Box::new(HelloT {
            protocol_version: 1,
            client_name: s("orders-service"),
            client_version: s("0.1.0"),
        })),
        BodyT::Welcome(Box::new(WelcomeT {
            protocol_version: 1,
            broker_version: s("0.1.0"),
            shard_count: 2,
            shard: 1,
            shard_ports: Some(vec![5681, 5682]),
            limits: Some(Box::new(LimitsT {
                frame_size_max: 16 << 20,
                message_size_max: (16 << 20) - 65536,
                publish_batch_max: 4096,
                deliver_batch_max: 1024,
                publishes_in_flight_max: 65536,
                prefetch_max: 65535,
                name_length_max: 255,
                headers_max: 256,
            })),
            durability: Durability::Interval,
            connection_id: 99,
        })),
        BodyT::Ping(Box::new(PingT {
            payload: 123_456_789,
        })),
        BodyT::Pong(Box::new(PongT {
            payload: 987_654_321,
        })),
        BodyT::Close(Box::new(CloseT {
            code: ErrorCode::ShuttingDown,
            reason: s("deploying"),
        })),
        BodyT::Ok(Box::new(OkT {})),
        BodyT::Error(Box::new(ErrorT {
            code: ErrorCode::QueueFull,
            message: s("queue 'orders' is full (max_length 10000)"),
            sequences: Some(ranges()),
            close: true,
        })),
        BodyT::Blocked(Box::new(BlockedT {
            code: ErrorCode::DiskFull,
            message: s("disk full on shard 0"),
        })),
        BodyT::Unblocked(Box::new(UnblockedT {})),
        BodyT::DeclareQueue(Box::new(DeclareQueueT {
            name: s("orders"),
            passive: true,
            durable: false,
            exclusive: true,
            auto_delete: true,
            arguments: Some(Box::new(arguments())),
        })),
        BodyT::QueueInfo(Box::new(queue_info("orders"))),
        BodyT::DeleteQueue(Box::new(DeleteQueueT {
            name: "orders".into(),
            if_unused: true,
            if_empty: true,
        })),
        BodyT::QueueDeleted(Box::new(QueueDeletedT { messages: 12 })),
        BodyT::PurgeQueue(Box::new(PurgeQueueT {
            name: "orders".into(),
        })),
        BodyT::QueuePurged(Box::new(QueuePurgedT { messages: 34 })),
        BodyT::GetQueueInfo(Box::new(GetQueueInfoT {
            name: "orders".into(),
        })),
        BodyT::ListQueues(Box::new(ListQueuesT {
            prefix: s("ord"),
            after: s("orders.a"),
            limit: 50,
        })),
        BodyT::QueueList(Box::new(QueueListT {
            queues: Some(vec![queue_info("orders.b"), queue_info("orders.c")]),
            more: true,
        })),
        BodyT::DeclareExchange(Box::new(DeclareExchangeT {
            name: "events".into(),
            kind: ExchangeKind::Topic,
            passive: true,
            durable: false,
            auto_delete: true,
        })),
        BodyT::DeleteExchange(Box::new(DeleteExchangeT {
            name: "events".into(),
            if_unused: true,
        })),
        BodyT::Bind(Box::new(BindT {
            exchange: "events".into(),
            queue: "audit".into(),
            binding_key: s("orders.#"),
        })),
        BodyT::Unbind(Box::new(UnbindT {
            exchange: "events".into(),
            queue: "audit".into(),
            binding_key: s("*.eu"),
        })),
        BodyT::ListExchanges(Box::new(ListExchangesT {
            prefix: s("ev"),
            after: s("ev.a"),
            limit: 10,
        })),
        BodyT::ExchangeList(Box::new(ExchangeListT {
            exchanges: Some(vec![ExchangeInfoT {
                name: s("events"),
                kind: ExchangeKind::Fanout,
                durable: false,
                auto_delete: true,
                bindings: 3,
            }]),
            more: true,
        })),
        BodyT::ListBindings(Box::new(ListBindingsT {
            exchange: s("events"),
            queue: s("audit"),
        })),
        BodyT::BindingList(Box::new(BindingListT {
            bindings: Some(vec![BindingInfoT {
                exchange: s("events"),
                queue: s("audit"),
                binding_key: s("#"),
            }]),
        })),
        BodyT::Publish(Box::new(PublishT {
            producer_id: Some(77),
            confirm: false,
            entries: vec![
                PublishEntryT {
                    sequence: 1,
                    exchange: s("events"),
                    routing_key: s("orders.eu.created"),
                    mandatory: true,
                    message: message_bytes(1024),
                },
                PublishEntryT {
                    sequence: 2,
                    exchange: s("events"),
                    routing_key: s("orders.us.created"),
                    mandatory: true,
                    message: message_bytes(0),
                },
            ],
        })),
        BodyT::Confirm(Box::new(ConfirmT {
            ranges: ranges(),
            durability: Durability::Never,
            duplicates: Some(vec![RangeT { first: 2, last: 3 }]),
        })),
        BodyT::Return(Box::new(ReturnT {
            entries: vec![ReturnedT {
                sequence: 5,
                code: ErrorCode::NotFound,
                exchange: s("events"),
                routing_key: s("nobody.listens"),
                message: Some(message_bytes(10)),
            }],
        })),
        BodyT::Consume(Box::new(ConsumeT {
            queue: "orders".into(),
            consumer_tag: s("worker-1"),
            prefetch: 64,
            auto_ack: true,
            exclusive: true,
            priority: -3,
        })),
        BodyT::ConsumeOk(Box::new(ConsumeOkT {
            consumer_tag: s("worker-1"),
            shard: 1,
        })),
        BodyT::Cancel(Box::new(CancelT {
            consumer_tag: "worker-1".into(),
        })),
        BodyT::ConsumerCancelled(Box::new(ConsumerCancelledT {
            consumer_tag: s("worker-1"),
            code: ErrorCode::Deleted,
            message: s("queue 'orders' was deleted"),
        })),
        BodyT::SetPrefetch(Box::new(SetPrefetchT {
            consumer_tag: "worker-1".into(),
            prefetch: 128,
        })),
        BodyT::Deliver(Box::new(DeliverT {
            consumer_tag: s("worker-1"),
            deliveries: vec![delivery(41), delivery(42)],
        })),
        BodyT::Ack(Box::new(AckT { ranges: ranges() })),
        BodyT::Nack(Box::new(NackT {
            ranges: ranges(),
            requeue: false,
            delay_ms: Some(5_000),
        })),
        BodyT::Reject(Box::new(RejectT {
            delivery_tag: 43,
            requeue: false,
            delay_ms: Some(1_000),
        })),
        BodyT::Get(Box::new(GetT {
            queue: "orders".into(),
            auto_ack: true,
        })),
        BodyT::GetOk(Box::new(GetOkT {
            delivery: Some(Box::new(delivery(44))),
            messages_ready: 9,
        })),
        BodyT::GetStatus(Box::new(GetStatusT {})),
        BodyT::Status(Box::new(StatusT {
            broker_version: s("0.1.0"),
            shard_count: 2,
            uptime_ms: 3_600_000,
            connections: 12,
            queues: 40,
            counters: Some(vec![CounterT {
                name: "shard.1.cache_bytes".into(),
                value: 1 << 20,
                gauge: true,
            }]),
            histograms: Some(vec![HistogramT {
                name: "journal.commit_latency_us".into(),
                shard: 1,
                count: 1_000,
                sum: 250_000,
                bucket_le: Some(vec![100, 1_000, 10_000]),
                bucket_count: Some(vec![10, 990, 1_000]),
                p50: 240,
                p99: 900,
                p999: 4_000,
                max: 9_000,
            }]),
            shards_ready: 2,
        })),
        BodyT::ListConnections(Box::new(ListConnectionsT {
            after: Some(7),
            limit: 100,
        })),
        BodyT::ConnectionList(Box::new(ConnectionListT {
            connections: Some(vec![ConnectionInfoT {
                id: 8,
                shard: 1,
                peer: s("127.0.0.1:50412"),
                client_name: s("orders-service"),
                connected_ms: 60_000,
                consumers: 2,
                deliveries_unacked: 40,
                publishes_unconfirmed: 3,
                outbox_bytes: 4_096,
                bytes_received: 1 << 30,
                bytes_sent: 1 << 31,
            }]),
            more: true,
        })),
        BodyT::ListConsumers(Box::new(ListConsumersT {
            prefix: s("orders"),
            after_queue: s("orders.eu"),
            after_tag: s("worker-1"),
            limit: 100,
        })),
        BodyT::ConsumerList(Box::new(ConsumerListT {
            consumers: Some(vec![ConsumerInfoT {
                queue: s("orders.eu"),
                tag: s("worker-2"),
                shard: 1,
                connection: 8,
                prefetch: 128,
                unacked: 40,
                auto_ack: true,
                priority: 5,
                active: false,
            }]),
            more: true,
        })),
    ]
}

/// `bodies()` as frames, with distinct request ids.
pub fn frames() -> Vec<FrameT> {
    bodies()
        .into_iter()
        .enumerate()
        .map(|(i, body)| FrameT {
            request_id: 1000 + i as u64,
            body,
        })
        .collect()
}
