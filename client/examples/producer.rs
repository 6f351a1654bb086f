//! A producer: publishes N generated messages, or each line of standard input, to a durable
//! queue, persistent, with confirms pipelined (many unconfirmed at once; a second task awaits the
//! confirms in order), then prints the rate and how many were confirmed.
//!
//! Run a broker (`cargo run --release --bin weir -- serve`), then:
//!
//! ```text
//! cargo run -p weir-client --example producer -- --queue jobs --count 100000
//! printf 'one\ntwo\n' | cargo run -p weir-client --example producer -- --queue jobs --stdin
//! ```
//!
//! Options: `--addr HOST:PORT` (127.0.0.1:5680), `--queue NAME` (jobs), `--count N` (10000),
//! `--size BYTES` of generated bodies (128), `--batch N` messages per publish frame (64),
//! `--in-flight N` unconfirmed messages at most (4096), `--stdin` (publish lines of standard
//! input instead of generated bodies). Exits non-zero if any publish failed.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Semaphore};
use weir_client::{Client, ClientError, ClientOptions, Message, PublishFuture, QueueOptions};

struct Args {
    addr: String,
    queue: String,
    count: u64,
    size: usize,
    batch: usize,
    in_flight: usize,
    stdin: bool,
}

const USAGE: &str = "usage: producer [--addr HOST:PORT] [--queue NAME] [--count N] [--size BYTES] \
                     [--batch N] [--in-flight N] [--stdin]";

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:5680".into(),
        queue: "jobs".into(),
        count: 10_000,
        size: 128,
        batch: 64,
        in_flight: 4096,
        stdin: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--stdin" {
            a.stdin = true;
            continue;
        }
        let Some(value) = args.next() else { usage() };
        match arg.as_str() {
            "--addr" => a.addr = value,
            "--queue" => a.queue = value,
            "--count" => a.count = value.parse().unwrap_or_else(|_| usage()),
            "--size" => a.size = value.parse().unwrap_or_else(|_| usage()),
            "--batch" => a.batch = value.parse().unwrap_or_else(|_| usage()),
            "--in-flight" => a.in_flight = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if a.batch == 0 || a.in_flight < a.batch {
        eprintln!("producer: --batch must be at least 1 and at most --in-flight");
        std::process::exit(2);
    }
    a
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args();
    match run(args).await {
        Ok(0) => {}
        Ok(failed) => {
            eprintln!("producer: {failed} publishes failed");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("producer: {e}");
            std::process::exit(1);
        }
    }
}

/// Publishes everything; returns how many publishes failed.
async fn run(args: Args) -> Result<u64, ClientError> {
    let client = Client::connect(
        args.addr.as_str(),
        ClientOptions {
            name: "producer example".into(),
            ..ClientOptions::default()
        },
    )
    .await?;
    let info = client.declare(&args.queue, QueueOptions::default()).await?;
    println!(
        "publishing to '{}' (shard {} of {}, fsync policy {:?})",
        info.name,
        info.shard,
        client.server().shard_count,
        client.server().durability
    );

    // The confirm side: awaits each batch's futures in publish order and gives the window back.
    let window = Arc::new(Semaphore::new(args.in_flight));
    let (batches, mut pending) = mpsc::unbounded_channel::<Vec<PublishFuture>>();
    let confirmer = {
        let window = window.clone();
        tokio::spawn(async move {
            let (mut confirmed, mut failed) = (0u64, 0u64);
            while let Some(futures) = pending.recv().await {
                let n = futures.len();
                for f in futures {
                    match f.await {
                        Ok(_) => confirmed += 1,
                        Err(e) => {
                            if failed == 0 {
                                eprintln!("producer: a publish failed: {e}");
                            }
                            failed += 1;
                        }
                    }
                }
                window.add_permits(n);
            }
            (confirmed, failed)
        })
    };

    let started = Instant::now();
    let mut published = 0u64;
    let mut publish_error = None;
    let mut source = if args.stdin {
        Source::stdin()
    } else {
        Source::generated(args.count, args.size)
    };
    while let Some(batch) = source.next_batch(args.batch).await {
        let n = batch.len();
        window
            .acquire_many(n as u32)
            .await
            .expect("the window stays open")
            .forget();
        match client.publish_batch(&args.queue, batch).await {
            Ok(futures) => {
                published += n as u64;
                let _ = batches.send(futures);
            }
            Err(e) => {
                publish_error = Some(e);
                break;
            }
        }
    }
    drop(batches);
    let (confirmed, failed) = confirmer.await.expect("the confirm task");
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "published {published}, confirmed {confirmed}, failed {failed} in {elapsed:.3} s: {:.0} msgs/s",
        confirmed as f64 / elapsed.max(1e-9)
    );
    if let Some(e) = publish_error {
        return Err(e);
    }
    client.close().await?;
    Ok(failed)
}

/// Where bodies come from: generated, or lines of standard input (read by a plain thread, as
/// standard input is blocking).
enum Source {
    Generated { left: u64, next: u64, size: usize },
    Lines(mpsc::Receiver<String>),
}

impl Source {
    fn generated(count: u64, size: usize) -> Source {
        Source::Generated {
            left: count,
            next: 0,
            size,
        }
    }

    fn stdin() -> Source {
        let (tx, rx) = mpsc::channel(1024);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        Source::Lines(rx)
    }

    /// Up to `max` messages: as many as are at hand, at least one; `None` at the end.
    async fn next_batch(&mut self, max: usize) -> Option<Vec<Message>> {
        match self {
            Source::Generated { left, next, size } => {
                let n = (*left).min(max as u64);
                if n == 0 {
                    return None;
                }
                let batch = (*next..*next + n)
                    .map(|i| {
                        let mut body = format!("message {i} ").into_bytes();
                        body.resize((*size).max(body.len()), b'.');
                        Message::new(body)
                    })
                    .collect();
                *left -= n;
                *next += n;
                Some(batch)
            }
            Source::Lines(rx) => {
                let mut batch = vec![Message::new(rx.recv().await?)];
                while batch.len() < max {
                    match rx.try_recv() {
                        Ok(line) => batch.push(Message::new(line)),
                        Err(_) => break,
                    }
                }
                Some(batch)
            }
        }
    }
}
