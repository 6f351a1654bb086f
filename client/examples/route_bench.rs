//! Routing through an exchange versus publishing straight to a queue, measured in one run.
//!
//! Case `direct`: one producer publishes to one durable queue through the default exchange; one
//! consumer takes and acks. Case `topic`: the same producer publishes to a topic exchange
//! whose bindings route every message to 4 durable queues (placed 2 per shard on a 2-shard
//! broker), one consumer on each. Reported per case: messages delivered per second (all
//! consumers together, from the first publish to the last delivery), messages published per
//! second, and the publish -> delivery latency p50/p99/p99.9 (a timestamp in the body; the
//! clock starts when the message's batch is handed to the client, inside a window of
//! `--in-flight` unconfirmed messages: a closed loop, like `bench`).
//!
//! ```text
//! cargo build --release --bin weir && cargo build --release -p weir-client --example route_bench
//! ./target/release/weir serve --cpus 0,1 --data-dir /tmp/weir-route --listen 127.0.0.1:0 --shard-port-base 0
//! ./target/release/examples/route_bench --addr 127.0.0.1:PORT
//! ```
//!
//! Options: `--addr HOST:PORT`, `--messages N` per case (100000), `--size BYTES` (1024),
//! `--batch N` (64), `--in-flight N` (1024), `--prefetch N` (2000), `--ack-batch N` (64).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use weir_client::{
    placement, Client, ClientError, ClientOptions, ConsumeOptions, Delivery, ExchangeKind,
    ExchangeOptions, Message, PublishOptions, QueueOptions,
};

struct Args {
    addr: String,
    messages: u64,
    size: usize,
    batch: usize,
    in_flight: usize,
    prefetch: u32,
    ack_batch: usize,
}

fn args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:5680".into(),
        messages: 100_000,
        size: 1024,
        batch: 64,
        in_flight: 1024,
        prefetch: 2000,
        ack_batch: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n = || {
            value
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{flag} {value}: a number"))
        };
        match flag.as_str() {
            "--addr" => a.addr = value.clone(),
            "--messages" => a.messages = n(),
            "--size" => a.size = n() as usize,
            "--batch" => a.batch = n() as usize,
            "--in-flight" => a.in_flight = n() as usize,
            "--prefetch" => a.prefetch = n() as u32,
            "--ack-batch" => a.ack_batch = n() as usize,
            other => panic!("unknown option {other}"),
        }
    }
    a
}

struct Outcome {
    published: u64,
    delivered: u64,
    elapsed: Duration,
    publish_elapsed: Duration,
    latency: Histogram<u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), ClientError> {
    let a = args();
    let client = Client::connect(a.addr.as_str(), ClientOptions::default()).await?;
    let shards = client.server().shard_count;
    let run = std::process::id();
    println!(
        "{} shards; {} messages of {} B per case, batch {}, {} in flight, prefetch {}, acks in batches of {}",
        shards, a.messages, a.size, a.batch, a.in_flight, a.prefetch, a.ack_batch
    );

    let direct = format!("route-direct-{run}");
    client.declare(&direct, QueueOptions::default()).await?;
    let d = measure(&client, &a, "", &direct, std::slice::from_ref(&direct)).await?;
    client.delete(&direct, false, false).await?;
    report("direct: 1 queue", &d);

    let exchange = format!("route-topic-{run}");
    client
        .declare_exchange(&exchange, ExchangeKind::Topic, ExchangeOptions::default())
        .await?;
    // Two queues on each shard (by the broker's placement function).
    let queues: Vec<String> = (0..4u16)
        .map(|i| {
            (0..)
                .map(|n| format!("route-topic-{run}-{i}-{n}"))
                .find(|q| placement(q, shards) == i % shards.max(1))
                .expect("a name for every shard")
        })
        .collect();
    for (i, q) in queues.iter().enumerate() {
        client.declare(q, QueueOptions::default()).await?;
        let pattern = if i % 2 == 0 { "orders.#" } else { "*.created" };
        client.bind(q, &exchange, pattern).await?;
    }
    let t = measure(&client, &a, &exchange, "orders.created", &queues).await?;
    for q in &queues {
        client.delete(q, false, false).await?;
    }
    client.delete_exchange(&exchange, false).await?;
    report("topic: 4 queues on 2 shards", &t);
    println!(
        "ratio topic/direct: delivered msgs/s x{:.2}, published msgs/s x{:.2}, p99 x{:.2}",
        rate(t.delivered, t.elapsed) / rate(d.delivered, d.elapsed),
        rate(a.messages, t.publish_elapsed) / rate(a.messages, d.publish_elapsed),
        t.latency.value_at_quantile(0.99) as f64 / d.latency.value_at_quantile(0.99) as f64
    );
    client.close().await
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn report(name: &str, o: &Outcome) {
    let ms = |q: f64| o.latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name}: delivered {:.0} msgs/s ({} deliveries in {:.2} s); published {:.0} msgs/s; \
         publish->delivery p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        rate(o.delivered, o.elapsed),
        o.delivered,
        o.elapsed.as_secs_f64(),
        rate(o.published, o.publish_elapsed),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        o.latency.max() as f64 / 1000.0
    );
}

/// Publishes `a.messages` to `exchange` with `key` while one consumer per queue takes them.
async fn measure(
    client: &Client,
    a: &Args,
    exchange: &str,
    key: &str,
    queues: &[String],
) -> Result<Outcome, ClientError> {
    let epoch = Instant::now();
    let mut consumers = Vec::new();
    for q in queues {
        let options = ConsumeOptions {
            prefetch: a.prefetch,
            ..ConsumeOptions::default()
        };
        let mut stream = client.consume(q, options).await?;
        let (n, ack_batch) = (a.messages, a.ack_batch);
        consumers.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut held: Vec<Delivery> = Vec::with_capacity(ack_batch);
            // Acks are pipelined: each batch's answer is awaited at the end, not before the
            // next delivery is taken (an answer waits for the settle record's group commit).
            let mut acks = Vec::new();
            for _ in 0..n {
                let d = stream.recv().await.expect("stream open")?;
                let stamp = u64::from_le_bytes(d.body()[..8].try_into().expect("8 bytes"));
                let now = epoch.elapsed().as_micros() as u64;
                latency.saturating_record(now.saturating_sub(stamp).max(1));
                held.push(d);
                if held.len() >= ack_batch {
                    acks.push(Delivery::ack_all(&held));
                    held.clear();
                }
            }
            if !held.is_empty() {
                acks.push(Delivery::ack_all(&held));
            }
            for ack in acks {
                ack.await?;
            }
            stream.cancel().await?;
            Ok::<(Histogram<u64>, Instant), ClientError>((latency, Instant::now()))
        }));
    }
    let started = Instant::now();
    let window = Arc::new(Semaphore::new(a.in_flight));
    let options = PublishOptions {
        exchange: exchange.to_string(),
        mandatory: false,
    };
    let mut confirms = Vec::new();
    let mut sent = 0;
    while sent < a.messages {
        let n = (a.batch as u64).min(a.messages - sent) as usize;
        let permits = window
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .expect("open");
        let stamp = (epoch.elapsed().as_micros() as u64).to_le_bytes();
        let batch: Vec<Message> = (0..n)
            .map(|_| {
                let mut body = vec![0u8; a.size.max(8)];
                body[..8].copy_from_slice(&stamp);
                Message::new(body)
            })
            .collect();
        let futures = client.publish_batch_with(&options, key, batch).await?;
        confirms.push(tokio::spawn(async move {
            let _permits = permits;
            for f in futures {
                f.await?;
            }
            Ok::<(), ClientError>(())
        }));
        sent += n as u64;
    }
    for c in confirms {
        c.await.expect("confirm task")?;
    }
    let publish_elapsed = started.elapsed();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut last = started;
    for c in consumers {
        let (h, done) = c.await.expect("consumer task")?;
        latency.add(&h).expect("same bounds");
        last = last.max(done);
    }
    Ok(Outcome {
        published: a.messages,
        delivered: a.messages * queues.len() as u64,
        elapsed: last - started,
        publish_elapsed,
        latency,
    })
}
