//! A worker: consumes a queue with a prefetch window, "works" on each message (optionally
//! sleeping `--work-ms` to simulate it), acks it, and prints progress once a second.
//!
//! Acks are sent as each message is done and their answers awaited by a second task, so many
//! acks share one group commit in the broker. Run several workers on one queue to see them share
//! it (competing consumers, round robin among those with prefetch credit).
//!
//! Run a broker (`cargo run --release --bin weir -- serve`), then:
//!
//! ```text
//! cargo run -p weir-client --example worker -- --queue jobs --prefetch 50 --work-ms 2
//! ```
//!
//! Options: `--addr HOST:PORT` (127.0.0.1:5680), `--queue NAME` (jobs), `--prefetch N` (100),
//! `--work-ms MS` per message (0), `--count N` (stop after N messages; default: run until the
//! stream ends or the process is interrupted), `--print` (print each body).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use weir_client::{Client, ClientError, ClientOptions, ConsumeOptions, QueueOptions, SettleFuture};

struct Args {
    addr: String,
    queue: String,
    prefetch: u32,
    work: Duration,
    count: Option<u64>,
    print: bool,
}

const USAGE: &str =
    "usage: worker [--addr HOST:PORT] [--queue NAME] [--prefetch N] [--work-ms MS] \
                     [--count N] [--print]";

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:5680".into(),
        queue: "jobs".into(),
        prefetch: 100,
        work: Duration::ZERO,
        count: None,
        print: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--print" {
            a.print = true;
            continue;
        }
        let Some(value) = args.next() else { usage() };
        match arg.as_str() {
            "--addr" => a.addr = value,
            "--queue" => a.queue = value,
            "--prefetch" => a.prefetch = value.parse().unwrap_or_else(|_| usage()),
            "--work-ms" => {
                a.work = Duration::from_millis(value.parse().unwrap_or_else(|_| usage()))
            }
            "--count" => a.count = Some(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    a
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run(parse_args()).await {
        eprintln!("worker: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), ClientError> {
    let client = Client::connect(
        args.addr.as_str(),
        ClientOptions {
            name: "worker example".into(),
            ..ClientOptions::default()
        },
    )
    .await?;
    let info = client.declare(&args.queue, QueueOptions::default()).await?;
    println!(
        "consuming '{}' (shard {}, {} ready), prefetch {}, {:?} of work per message",
        info.name, info.shard, info.messages_ready, args.prefetch, args.work
    );
    let mut consumer = client
        .consume(
            &args.queue,
            ConsumeOptions {
                prefetch: args.prefetch,
                ..ConsumeOptions::default()
            },
        )
        .await?;

    // The broker's answers to acks, awaited in order; the first failure is reported.
    let (acks, mut answers) = mpsc::unbounded_channel::<SettleFuture>();
    let acker = tokio::spawn(async move {
        let mut acked = 0u64;
        while let Some(answer) = answers.recv().await {
            answer.await?;
            acked += 1;
        }
        Ok::<u64, ClientError>(acked)
    });

    let started = Instant::now();
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.tick().await;
    let (mut done, mut redelivered, mut last_done) = (0u64, 0u64, 0u64);
    let mut stream_error = None;
    while args.count.is_none_or(|c| done < c) {
        tokio::select! {
            delivery = consumer.recv() => {
                let delivery = match delivery {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        stream_error = Some(e);
                        break;
                    }
                    None => break,
                };
                if !args.work.is_zero() {
                    tokio::time::sleep(args.work).await;
                }
                if args.print {
                    println!("{}", String::from_utf8_lossy(delivery.body()));
                }
                redelivered += u64::from(delivery.redelivered());
                // A failed send fails the answer too, which the acker reports.
                let _ = acks.send(delivery.ack());
                done += 1;
            }
            _ = progress.tick() => {
                println!(
                    "{done} done ({}/s), {redelivered} redelivered",
                    done - last_done
                );
                last_done = done;
            }
        }
    }
    drop(acks);
    let acked = acker.await.expect("the ack task")?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "done: {done} messages, {acked} acks answered, {redelivered} redelivered in {elapsed:.3} s \
         ({:.0} msgs/s)",
        done as f64 / elapsed.max(1e-9)
    );
    if let Some(e) = stream_error {
        return Err(e);
    }
    consumer.cancel().await?;
    client.close().await
}
