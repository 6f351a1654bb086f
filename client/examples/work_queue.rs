//! A work queue: declare a queue, publish 1000 messages with confirms, consume and ack them.
//!
//! Run a broker (`weir serve`), then: `cargo run -p weir-client --example work_queue -- --addr
//! 127.0.0.1:5680`.

use std::time::Instant;

use weir_client::{Client, ClientError, ClientOptions, ConsumeOptions, Message, QueueOptions};

const MESSAGES: usize = 1000;
const BATCH: usize = 100;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut addr = "127.0.0.1:5680".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--addr", Some(a)) => addr = a,
            _ => {
                eprintln!("usage: work_queue [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = run(&addr).await {
        eprintln!("work_queue: {e}");
        std::process::exit(1);
    }
}

async fn run(addr: &str) -> Result<(), ClientError> {
    let options = ClientOptions {
        name: "work_queue example".into(),
        ..ClientOptions::default()
    };
    let client = Client::connect(addr, options).await?;
    let server = client.server();
    println!(
        "connected to weir {} ({} shards, connections {:?})",
        server.broker_version,
        server.shard_count,
        client.connections()
    );
    let queue = "work_queue.example";
    let info = client.declare(queue, QueueOptions::default()).await?;
    println!(
        "queue '{}' on shard {}, {} ready",
        info.name, info.shard, info.messages_ready
    );
    let already = info.messages_ready as usize;

    // Publish in batches, every confirm awaited: the messages are the broker's now.
    let started = Instant::now();
    let mut pending = Vec::with_capacity(MESSAGES);
    for first in (0..MESSAGES).step_by(BATCH) {
        let batch = (first..(first + BATCH).min(MESSAGES))
            .map(|i| Message::new(format!("job {i}")).content_type("text/plain"));
        pending.extend(client.publish_batch(queue, batch).await?);
    }
    let mut confirmed = 0;
    for confirm in pending {
        confirm.await?;
        confirmed += 1;
    }
    println!(
        "published and confirmed {confirmed} in {:?}",
        started.elapsed()
    );

    // Consume everything that is there (including leftovers of an earlier run), acking each.
    let started = Instant::now();
    let mut consumer = client
        .consume(
            queue,
            ConsumeOptions {
                prefetch: 256,
                ..ConsumeOptions::default()
            },
        )
        .await?;
    let mut acks = Vec::with_capacity(confirmed + already);
    let mut redelivered = 0;
    while acks.len() < confirmed + already {
        let Some(delivery) = consumer.recv().await else {
            break;
        };
        let delivery = delivery?;
        redelivered += usize::from(delivery.redelivered());
        // Sent now; the broker's answers are awaited below, so acks share group commits
        // instead of waiting for one fdatasync each.
        acks.push(delivery.ack());
    }
    let mut acked = 0;
    for ack in acks {
        ack.await?;
        acked += 1;
    }
    consumer.cancel().await?;
    println!(
        "consumed and acked {acked} ({redelivered} redelivered) in {:?}",
        started.elapsed()
    );
    let info = client.queue_info(queue).await?;
    println!(
        "queue '{}': {} ready, {} unacked",
        info.name, info.messages_ready, info.messages_unacked
    );
    client.close().await
}
