//! Request-reply with weir: a responder serving requests from a queue bound to a direct
//! exchange, and a caller keeping many requests in flight.
//!
//! The responder consumes `rpc.upper` (bound to the exchange `rpc` with key `upper`), and for
//! each request publishes a reply to the request's `reply_to` queue carrying its
//! `correlation_id` untouched, then acks the request. The caller uses a `Requester`: a private,
//! server-named, exclusive reply queue, a correlation id per request, a timeout.
//!
//! ```text
//! cargo run --release --bin weir -- serve                       # a broker on 127.0.0.1:5680
//! cargo run -p weir-client --example responder -- serve         # terminal 1: the responder
//! cargo run -p weir-client --example responder -- call 1000     # terminal 2: 1000 requests
//! ```
//!
//! `call N [IN_FLIGHT]` sends N requests with IN_FLIGHT (default 100) outstanding at a time and
//! prints the round-trip time percentiles. `--addr HOST:PORT` before the mode picks the broker.

use std::time::{Duration, Instant};

use weir_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, ExchangeKind, ExchangeOptions, Message,
    QueueOptions,
};

const EXCHANGE: &str = "rpc";
const QUEUE: &str = "rpc.upper";
const KEY: &str = "upper";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), ClientError> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut addr = "127.0.0.1:5680".to_string();
    if args.first().map(String::as_str) == Some("--addr") && args.len() > 1 {
        addr = args.remove(1);
        args.remove(0);
    }
    let client = Client::connect(addr.as_str(), ClientOptions::default()).await?;
    // Both sides declare what they use: whoever starts first creates it, the other checks it.
    client
        .declare_exchange(EXCHANGE, ExchangeKind::Direct, ExchangeOptions::default())
        .await?;
    client.declare(QUEUE, QueueOptions::default()).await?;
    client.bind(QUEUE, EXCHANGE, KEY).await?;
    match args.first().map(String::as_str) {
        Some("serve") => serve(&client).await,
        Some("call") => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
            let in_flight = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
            call(&client, n, in_flight).await
        }
        _ => {
            eprintln!("usage: responder [--addr HOST:PORT] serve | call [N] [IN_FLIGHT]");
            std::process::exit(2);
        }
    }
}

/// Answers every request with its body upper-cased, until the connection ends.
async fn serve(client: &Client) -> Result<(), ClientError> {
    let options = ConsumeOptions {
        prefetch: 256,
        ..ConsumeOptions::default()
    };
    let mut requests = client.consume(QUEUE, options).await?;
    println!("serving requests on exchange '{EXCHANGE}', key '{KEY}' (queue '{QUEUE}')");
    // Answers are not waited for one by one: the ack and the reply's confirm of each request
    // are awaited by a second task, so the responder keeps many requests in flight.
    let (settled, mut to_settle) = tokio::sync::mpsc::unbounded_channel();
    let settler = tokio::spawn(async move {
        let mut served = 0u64;
        while let Some((ack, confirm)) = to_settle.recv().await {
            let ack: weir_client::SettleFuture = ack;
            let confirm: weir_client::PublishFuture = confirm;
            ack.await?;
            // A reply whose requester left meanwhile is refused (its queue is gone): not an
            // error for the responder.
            let _ = confirm.await;
            served += 1;
            if served.is_multiple_of(10_000) {
                println!("{served} requests served");
            }
        }
        Ok::<(), ClientError>(())
    });
    while let Some(request) = requests.recv().await {
        let request = request?;
        let (Some(reply_to), Some(id)) = (request.reply_to(), request.correlation_id()) else {
            // Not a request (no one to answer): settle it so it does not come back.
            request.reject(false).await?;
            continue;
        };
        let body = String::from_utf8_lossy(request.body()).to_uppercase();
        // Replies are not persistent: a requester that has gone has no queue to read them from.
        let reply = Message::new(body).correlation_id(id).persistent(false);
        // The reply goes through the default exchange to the requester's private queue.
        let confirm = client.publish(reply_to, reply).await?;
        if settled.send((request.ack(), confirm)).is_err() {
            break;
        }
    }
    drop(settled);
    settler.await.expect("the settling task")
}

/// Sends `n` requests, `in_flight` at a time, and prints round-trip percentiles.
async fn call(client: &Client, n: usize, in_flight: usize) -> Result<(), ClientError> {
    let requester = client
        .requester()
        .await?
        .with_timeout(Duration::from_secs(10));
    let started = Instant::now();
    let mut times = Vec::with_capacity(n);
    let mut next = 0;
    let mut running = tokio::task::JoinSet::new();
    while next < n || !running.is_empty() {
        while next < n && running.len() < in_flight {
            let r = requester.clone();
            let i = next;
            next += 1;
            running.spawn(async move {
                let t = Instant::now();
                let reply = r
                    .request(EXCHANGE, KEY, Message::new(format!("request {i}")))
                    .await?;
                let expected = format!("REQUEST {i}");
                assert_eq!(
                    reply.body(),
                    expected.as_bytes(),
                    "a reply for another request"
                );
                Ok::<Duration, ClientError>(t.elapsed())
            });
        }
        if let Some(done) = running.join_next().await {
            match done {
                Ok(result) => times.push(result?),
                Err(e) => panic!("a request task failed: {e}"),
            }
        }
    }
    let elapsed = started.elapsed();
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p) as usize];
    println!(
        "{n} requests, {in_flight} in flight: {:.0} requests/s; round trip p50 {:?} p99 {:?} max {:?}",
        n as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
