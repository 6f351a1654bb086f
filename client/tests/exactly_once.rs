//! Exactly-once publishing end to end: an `IdempotentProducer` publishes a few thousand messages
//! to queues on two shards (each queue directly, and a fanout to both) while the broker is
//! SIGKILLed and restarted on the same data directory; the producer reconnects and re-sends what
//! was unconfirmed by itself. Afterwards every message is in each of its queues exactly once:
//! none lost, none stored twice.
//!
//! The broker comes back on new ports, so the producer reaches it through a small TCP relay in
//! this test whose target follows the broker (one connection: the broker forwards to the owning
//! shards over its mesh). The kill is triggered by the number of confirms received, not a sleep.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{queue_on, within, Broker};
use tokio::net::{TcpListener, TcpStream};
use weir_client::{
    ClientOptions, ConsumeOptions, ExchangeKind, ExchangeOptions, IdempotentProducer, Message,
    ProducerOptions, PublishOptions, QueueOptions,
};

const MESSAGES: u64 = 3000;
const KILL_AFTER_CONFIRMS: u64 = 1000;

/// A TCP relay to wherever `target` points now; a connection whose target is down is dropped.
async fn relay(target: Arc<Mutex<SocketAddr>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let to = *target.lock().unwrap();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_an_idempotent_producer_survives_sigkill_without_loss_or_duplicates() {
    let broker = Broker::start("exactly-once", &["--cpus", "0,1"]);
    let (qa, qb) = (queue_on(0, 2, "eo-a"), queue_on(1, 2, "eo-b"));
    let admin = broker.client().await;
    for q in [&qa, &qb] {
        admin.declare(q, QueueOptions::default()).await.unwrap();
    }
    admin
        .declare_exchange("eo-fan", ExchangeKind::Fanout, ExchangeOptions::default())
        .await
        .unwrap();
    for q in [&qa, &qb] {
        admin.bind(q, "eo-fan", "").await.unwrap();
    }
    drop(admin);

    let target = Arc::new(Mutex::new(broker.listen));
    let via = relay(target.clone()).await;
    let options = ProducerOptions {
        client: ClientOptions::single_connection(),
        ..ProducerOptions::new(7)
    };
    let producer = within(
        "producer connect",
        IdempotentProducer::connect(via, options),
    )
    .await
    .unwrap();

    // Message i goes to qa (i % 3 == 0), qb (1), or the fanout to both (2).
    let confirmed = Arc::new(AtomicU64::new(0));
    let publishing = {
        let producer = producer.clone();
        let confirmed = confirmed.clone();
        let (qa, qb) = (qa.clone(), qb.clone());
        tokio::spawn(async move {
            let mut waiting = Vec::new();
            for i in 0..MESSAGES {
                let (options, key) = match i % 3 {
                    0 => (PublishOptions::default(), qa.as_str()),
                    1 => (PublishOptions::default(), qb.as_str()),
                    _ => (
                        PublishOptions {
                            exchange: "eo-fan".into(),
                            mandatory: false,
                        },
                        "",
                    ),
                };
                let future = producer
                    .publish(&options, key, Message::new(format!("m{i}")))
                    .await
                    .expect("publish");
                let confirmed = confirmed.clone();
                waiting.push(tokio::spawn(async move {
                    let c = future.await;
                    confirmed.fetch_add(1, Ordering::Relaxed);
                    c
                }));
            }
            let mut outcomes = Vec::new();
            for w in waiting {
                outcomes.push(w.await.expect("confirm task"));
            }
            outcomes
        })
    };

    // SIGKILL with publishes in flight, then the same data directory again.
    within("the first confirms", async {
        while confirmed.load(Ordering::Relaxed) < KILL_AFTER_CONFIRMS {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    })
    .await;
    let broker = broker.restart();
    *target.lock().unwrap() = broker.listen;

    let outcomes = within("every confirm, after the restart", publishing)
        .await
        .unwrap();
    let mut duplicates = 0;
    for (i, o) in outcomes.iter().enumerate() {
        let c = o
            .as_ref()
            .unwrap_or_else(|e| panic!("message {i} failed: {e}"));
        duplicates += u64::from(c.duplicate);
    }
    assert_eq!(duplicates, producer.duplicates());
    assert!(producer.reconnects() >= 1, "the producer never reconnected");
    eprintln!(
        "exactly-once: {MESSAGES} messages, {} re-sent after the restart, {duplicates} of them \
         confirmed as duplicates",
        producer.resent()
    );

    // Every message in each of its queues exactly once.
    let consumer = broker.client().await;
    for (queue, residue) in [(&qa, 0), (&qb, 1)] {
        let expected: Vec<u64> = (0..MESSAGES)
            .filter(|i| i % 3 == residue || i % 3 == 2)
            .collect();
        let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
        let options = ConsumeOptions {
            prefetch: 1000,
            ..ConsumeOptions::default()
        };
        let mut deliveries = consumer.consume(queue, options).await.unwrap();
        let mut acks = Vec::new();
        while seen.values().map(|n| *n as usize).sum::<usize>() < expected.len() {
            let d = within("deliveries", deliveries.recv())
                .await
                .expect("consumer open")
                .unwrap();
            let body = std::str::from_utf8(d.body()).unwrap().to_string();
            let i: u64 = body[1..].parse().unwrap();
            *seen.entry(i).or_default() += 1;
            acks.push(d.ack());
        }
        for a in acks {
            a.await.unwrap();
        }
        deliveries.cancel().await.unwrap();
        let twice: Vec<u64> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(i, _)| *i)
            .collect();
        assert!(twice.is_empty(), "{queue}: stored twice: {twice:?}");
        let got: Vec<u64> = seen.keys().copied().collect();
        assert_eq!(got, expected, "{queue}: not every message once");
        let info = consumer.queue_info(queue).await.unwrap();
        assert_eq!(info.messages_ready, 0, "{queue}: more than once");
    }
}
