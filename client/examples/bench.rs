//! A simple end-to-end benchmark through the client: 1 producer and 1 consumer on one durable
//! queue, persistent messages, confirms pipelined, every delivery acked.
//!
//! It reports
//! - end-to-end throughput: messages consumed and acked (the ack answered by the broker) per
//!   second, from the first publish to the last ack answer;
//! - publish throughput: messages confirmed per second, from the first publish to the last confirm;
//! - confirm latency: from the moment each message's batch is handed to `publish_batch` to the
//!   moment its confirm is seen by the task awaiting confirms;
//! - delivery latency: from that same moment (a timestamp in the body) to the consumer taking
//!   the delivery from its stream.
//!
//! This is a closed loop: at most `--in-flight` messages are unconfirmed, and a message's clock
//! starts when the window lets it go, so time spent waiting for the window is not in the
//! latencies (the full open-loop load generator is `weir-loadgen`). Report the numbers with the
//! broker's configuration (shards, pinning, fsync policy) and the machine.
//!
//! ```text
//! cargo build --release --bin weir -p weir && cargo build --release -p weir-client --example bench
//! taskset -c 0 ./target/release/weir serve --config tuning/2core-loadgen.toml \
//!     --data-dir /tmp/weir-bench --listen 127.0.0.1:0 --shard-port-base 0
//! taskset -c 1 ./target/release/examples/bench --addr 127.0.0.1:PORT
//! ```
//!
//! Options: `--addr HOST:PORT` (127.0.0.1:5680), `--messages N` (200000), `--size BYTES` of body
//! (1024), `--batch N` messages per publish frame (64), `--in-flight N` unconfirmed messages at
//! most (1024), `--prefetch N` (2000), `--ack-batch N` (1: each delivery acked on its own), `--queue NAME` (a fresh `bench-PID`, deleted at the end),
//! `--threads N` tokio worker threads (1: a current-thread runtime, the default),
//! `--publish-only` (no consumer: isolates the publish path; the messages stay in the queue
//! until it is deleted at the end).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, Semaphore};
use weir_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Message, PublishFuture, QueueOptions,
    SettleFuture,
};

/// Bytes of the body that carry the message's index and send time.
const STAMP: usize = 16;

#[derive(Clone)]
struct Args {
    addr: String,
    messages: u64,
    size: usize,
    batch: usize,
    in_flight: usize,
    prefetch: u32,
    /// Deliveries acked per Ack frame (1: each acked on its own, with its own answer).
    ack_batch: usize,
    queue: Option<String>,
    threads: usize,
    publish_only: bool,
}

const USAGE: &str = "usage: bench [--addr HOST:PORT] [--messages N] [--size BYTES] [--batch N] \
                     [--in-flight N] [--prefetch N] [--ack-batch N] [--queue NAME] [--threads N] [--publish-only]";

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:5680".into(),
        messages: 200_000,
        size: 1024,
        batch: 64,
        in_flight: 1024,
        prefetch: 2000,
        ack_batch: 1,
        queue: None,
        threads: 1,
        publish_only: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--publish-only" {
            a.publish_only = true;
            continue;
        }
        let Some(value) = args.next() else { usage() };
        let number = || value.parse::<u64>().unwrap_or_else(|_| usage());
        match arg.as_str() {
            "--addr" => a.addr = value.clone(),
            "--messages" => a.messages = number(),
            "--size" => a.size = number() as usize,
            "--batch" => a.batch = number() as usize,
            "--in-flight" => a.in_flight = number() as usize,
            "--prefetch" => a.prefetch = number() as u32,
            "--ack-batch" => a.ack_batch = (number() as usize).max(1),
            "--queue" => a.queue = Some(value.clone()),
            "--threads" => a.threads = number() as usize,
            _ => usage(),
        }
    }
    if a.batch == 0 || a.in_flight < a.batch || a.size < STAMP || a.messages == 0 {
        eprintln!("bench: need 1 <= --batch <= --in-flight, --size >= {STAMP} and --messages >= 1");
        std::process::exit(2);
    }
    a
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

fn main() {
    let args = parse_args();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("histogram bounds")
}

/// What the producer side measured.
struct Produced {
    confirmed: u64,
    failed: u64,
    last_confirm: Instant,
    confirm_us: Histogram<u64>,
}

/// What the consumer side measured.
struct Consumed {
    received: u64,
    redelivered: u64,
    acked: u64,
    last_ack: Instant,
    deliver_us: Histogram<u64>,
}

async fn run(args: Args) -> Result<(), ClientError> {
    let client = Client::connect(
        args.addr.as_str(),
        ClientOptions {
            name: "bench".into(),
            ..ClientOptions::default()
        },
    )
    .await?;
    let server = client.server().clone();
    let queue = args
        .queue
        .clone()
        .unwrap_or_else(|| format!("bench-{}", std::process::id()));
    let info = client.declare(&queue, QueueOptions::default()).await?;
    if info.messages_ready + info.messages_unacked > 0 {
        eprintln!(
            "bench: queue '{queue}' already holds {} messages; use an empty queue",
            info.messages_ready + info.messages_unacked
        );
        std::process::exit(2);
    }

    // Every clock reading is relative to this instant, which the body's stamp carries.
    let base = Instant::now();
    let consuming = if args.publish_only {
        None
    } else {
        let consumer = client
            .consume(
                &queue,
                ConsumeOptions {
                    prefetch: args.prefetch,
                    ..ConsumeOptions::default()
                },
            )
            .await?;
        Some(tokio::spawn(consume(
            consumer,
            args.messages,
            base,
            args.ack_batch,
        )))
    };
    let started = Instant::now();
    let producing = tokio::spawn(produce(client.clone(), queue.clone(), args.clone(), base));
    let produced = producing.await.expect("the producer task")?;
    let consumed = match consuming {
        Some(task) => task.await.expect("the consumer task")?,
        None => Consumed {
            received: 0,
            redelivered: 0,
            acked: 0,
            last_ack: started,
            deliver_us: histogram(),
        },
    };
    client.delete(&queue, false, false).await?;
    client.close().await?;

    let secs = |end: Instant| end.duration_since(started).as_secs_f64().max(1e-9);
    let e2e_secs = if consumed.acked == 0 {
        f64::NAN
    } else {
        secs(consumed.last_ack)
    };
    let publish_secs = secs(produced.last_confirm);
    let mib = |n: u64, s: f64| n as f64 * args.size as f64 / s / (1 << 20) as f64;
    println!(
        "weir client bench: 1 producer, 1 consumer, 1 durable queue on shard {} of {}; {} x {} B \
         persistent; batch {}, in-flight {}, prefetch {}, ack batch {}; broker fsync {:?}; {} client thread(s){}",
        info.shard,
        server.shard_count,
        args.messages,
        args.size,
        args.batch,
        args.in_flight,
        args.prefetch,
        args.ack_batch,
        server.durability,
        args.threads.max(1),
        if args.publish_only {
            "; PUBLISH ONLY (no consumer)"
        } else {
            ""
        },
    );
    println!();
    println!(
        "| {:<28} | {:>9} | {:>8} | {:>10} | {:>8} |",
        "measure", "messages", "seconds", "msgs/s", "MiB/s"
    );
    println!(
        "|{:-<30}|{:->11}|{:->10}|{:->12}|{:->10}|",
        "", "", "", "", ""
    );
    for (name, n, s) in [
        ("published + confirmed", produced.confirmed, publish_secs),
        ("end to end (consumed+acked)", consumed.acked, e2e_secs),
    ] {
        println!(
            "| {name:<28} | {n:>9} | {s:>8.3} | {:>10.0} | {:>8.1} |",
            n as f64 / s,
            mib(n, s)
        );
    }
    println!();
    println!(
        "| {:<28} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "latency (µs)", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    println!(
        "|{:-<30}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", "", "", ""
    );
    for (name, h) in [
        ("confirm (send -> confirm)", &produced.confirm_us),
        ("delivery (send -> consumer)", &consumed.deliver_us),
    ] {
        println!(
            "| {name:<28} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.value_at_quantile(0.9999),
            h.max()
        );
    }
    println!();
    println!(
        "confirmed {}, publish failures {}, received {}, redelivered {}, acks answered {}",
        produced.confirmed,
        produced.failed,
        consumed.received,
        consumed.redelivered,
        consumed.acked
    );
    Ok(())
}

/// Publishes `args.messages` messages in batches, at most `args.in_flight` unconfirmed; a second
/// task awaits the confirms in publish order and records each one's latency.
async fn produce(
    client: Client,
    queue: String,
    args: Args,
    base: Instant,
) -> Result<Produced, ClientError> {
    let window = Arc::new(Semaphore::new(args.in_flight));
    let (batches, mut pending) = mpsc::unbounded_channel::<(Instant, Vec<PublishFuture>)>();
    let confirmer = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut p = Produced {
                confirmed: 0,
                failed: 0,
                last_confirm: Instant::now(),
                confirm_us: histogram(),
            };
            while let Some((sent, futures)) = pending.recv().await {
                let n = futures.len();
                for f in futures {
                    match f.await {
                        Ok(_) => {
                            let now = Instant::now();
                            p.confirm_us
                                .saturating_record(now.duration_since(sent).as_micros() as u64);
                            p.confirmed += 1;
                            p.last_confirm = now;
                        }
                        Err(e) => {
                            if p.failed == 0 {
                                eprintln!("bench: a publish failed: {e}");
                            }
                            p.failed += 1;
                        }
                    }
                }
                window.add_permits(n);
            }
            p
        })
    };

    let mut body = vec![b'x'; args.size];
    let mut next = 0u64;
    while next < args.messages {
        let n = (args.messages - next).min(args.batch as u64);
        window
            .acquire_many(n as u32)
            .await
            .expect("the window stays open")
            .forget();
        let sent = Instant::now();
        let stamp = sent.duration_since(base).as_nanos() as u64;
        let batch: Vec<Message> = (next..next + n)
            .map(|i| {
                body[..8].copy_from_slice(&i.to_le_bytes());
                body[8..STAMP].copy_from_slice(&stamp.to_le_bytes());
                Message::new(body.clone())
            })
            .collect();
        let futures = client.publish_batch(&queue, batch).await?;
        next += n;
        let _ = batches.send((sent, futures));
    }
    drop(batches);
    Ok(confirmer.await.expect("the confirm task"))
}

/// Takes `expected` deliveries, recording each one's latency from its send stamp, and acks
/// each; a second task awaits the ack answers.
async fn consume(
    mut consumer: weir_client::Consumer,
    expected: u64,
    base: Instant,
    ack_batch: usize,
) -> Result<Consumed, ClientError> {
    let (acks, mut answers) = mpsc::unbounded_channel::<(SettleFuture, u64)>();
    let acker = tokio::spawn(async move {
        let mut acked = 0u64;
        let mut last_ack = Instant::now();
        while let Some((answer, n)) = answers.recv().await {
            answer.await?;
            acked += n;
            last_ack = Instant::now();
        }
        Ok::<_, ClientError>((acked, last_ack))
    });
    let mut batch: Vec<weir_client::Delivery> = Vec::with_capacity(ack_batch);
    let mut deliver_us = histogram();
    let (mut received, mut redelivered) = (0u64, 0u64);
    while received < expected {
        let delivery = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(Some(d)) => d?,
            Ok(None) => break,
            Err(_) => {
                eprintln!("bench: no delivery for 30 s after {received}; giving up");
                break;
            }
        };
        let now = base.elapsed().as_nanos() as u64;
        let body = delivery.body();
        let stamp = u64::from_le_bytes(body[8..STAMP].try_into().expect("a stamped body"));
        deliver_us.saturating_record(now.saturating_sub(stamp) / 1000);
        received += 1;
        redelivered += u64::from(delivery.redelivered());
        if ack_batch <= 1 {
            let _ = acks.send((delivery.ack(), 1));
        } else {
            batch.push(delivery);
            if batch.len() >= ack_batch || received == expected {
                let _ = acks.send((weir_client::Delivery::ack_all(&batch), batch.len() as u64));
                batch.clear();
            }
        }
    }
    if !batch.is_empty() {
        let _ = acks.send((weir_client::Delivery::ack_all(&batch), batch.len() as u64));
    }
    drop(acks);
    let (acked, last_ack) = acker.await.expect("the ack task")?;
    consumer.cancel().await?;
    Ok(Consumed {
        received,
        redelivered,
        acked,
        last_ack,
        deliver_us,
    })
}
