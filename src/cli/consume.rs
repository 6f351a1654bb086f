//! `weir consume --queue NAME [--count N] [--prefetch P] [--nack | --reject [--requeue]]`:
//! print each delivery, then ack it (or, to try failure paths from a shell, nack or reject it:
//! dead-lettered or dropped, or with `--requeue` back to the queue).
//!
//! Contract: tokio current-thread runtime; a shard-aware client, so deliveries come from the
//! queue's own shard. A delivery is acked only after its line has been written and flushed to
//! stdout, so nothing is lost if this process dies or stdout breaks: what was not printed stays
//! unacked and the broker redelivers it. Acks are sent as each line is written and their
//! answers awaited in groups, so they share the broker's group commits.
//!
//! With `--count N` the broker must not be led to send more than N: every delivery beyond N
//! would be requeued on cancel and come back marked redelivered. The broker keeps at most
//! `prefetch` deliveries unacked, so acks are held back once acked + prefetch would exceed N;
//! after the N-th line the consumer is cancelled and the held deliveries acked.
//!
//! Failures reported: missing queue, the consumer cancelled by the broker (queue deleted), a
//! lost connection, a refused ack, a stdout write error other than a closed pipe. Ctrl-C,
//! SIGTERM and a closed stdout end it normally (exit 0) after acking what was printed. A line
//! written into a pipe counts as printed: whether the reader read it cannot be known here.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use weir_client::{ConsumeOptions, Delivery, ErrorCode, SettleFuture};

use super::output::write_stdout;
use super::queue::close;
use super::{block_on, connect, describe, ClientArgs, Failure};

/// Ack answers awaited together: enough to fill a group commit, few enough to keep memory flat.
const ACKS_IN_FLIGHT: usize = 256;
/// Longest wait for the broker when finishing (cancel, last acks): an interrupted command must
/// end even if the broker stopped answering; what is left unacked is redelivered.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct ConsumeArgs {
    /// The queue to consume.
    #[arg(long, value_name = "NAME")]
    pub queue: String,
    /// Stop after this many messages (default: run until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Most deliveries the broker sends ahead of the acks (capped at --count).
    #[arg(long, value_name = "P", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub prefetch: u32,
    /// Consumer priority: while a higher-priority consumer has room in its prefetch, lower ones
    /// get nothing (default 0; may be negative).
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Nack each message after printing it instead of acking: without --requeue it is
    /// dead-lettered (to the queue's dead_letter_exchange) or dropped; with --requeue it goes
    /// back to the queue (redelivered, its failures counted: max_deliveries, retry_delays).
    #[arg(long, conflicts_with = "reject")]
    pub nack: bool,
    /// As --nack, by AMQP's name for one delivery (the broker treats it alike).
    #[arg(long)]
    pub reject: bool,
    /// With --nack or --reject: the message goes back to the queue instead of being
    /// dead-lettered or dropped.
    #[arg(long)]
    pub requeue: bool,
}

/// What becomes of a printed delivery.
#[derive(Clone, Copy)]
enum Settlement {
    Ack,
    Nack { requeue: bool },
    Reject { requeue: bool },
}

impl Settlement {
    fn of(args: &ConsumeArgs) -> Settlement {
        let requeue = args.requeue;
        if args.nack {
            Settlement::Nack { requeue }
        } else if args.reject {
            Settlement::Reject { requeue }
        } else {
            Settlement::Ack
        }
    }

    fn settle(self, d: &Delivery) -> SettleFuture {
        match self {
            Settlement::Ack => d.ack(),
            Settlement::Nack { requeue } => d.nack(requeue),
            Settlement::Reject { requeue } => d.reject(requeue),
        }
    }
}

pub fn run(args: ConsumeArgs) -> ExitCode {
    block_on("consume", consume(args))
}

async fn consume(args: ConsumeArgs) -> Result<(), Failure> {
    if args.requeue && !(args.nack || args.reject) {
        return Err(Failure::usage(
            "--requeue goes with --nack or --reject (an ack never requeues)",
        ));
    }
    let settlement = Settlement::of(&args);
    // Installed before connecting: from here on a signal ends the command in order (exit 0).
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| Failure::failed(format!("installing the Ctrl-C handler: {e}")))?;
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Failure::failed(format!("installing the SIGTERM handler: {e}")))?;

    let client = tokio::select! {
        c = connect(&args.client, true) => c?,
        _ = interrupt.recv() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
    };
    let prefetch = match args.count {
        Some(n) => u64::from(args.prefetch).min(n) as u32,
        None => args.prefetch,
    };
    let options = ConsumeOptions {
        prefetch,
        priority: args.priority,
        ..ConsumeOptions::default()
    };
    let mut consumer = tokio::select! {
        c = client.consume(&args.queue, options) => c
            .map_err(|e| Failure::client(&format!("consuming queue '{}'", args.queue), &e))?,
        _ = interrupt.recv() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
    };

    let mut printed = 0u64;
    let mut acked = 0u64;
    let mut held: Vec<Delivery> = Vec::new();
    let mut acks: Vec<SettleFuture> = Vec::new();
    let mut outcome: Result<(), Failure> = Ok(());
    loop {
        if args.count.is_some_and(|n| printed >= n) {
            break;
        }
        let next = tokio::select! {
            d = consumer.recv() => d,
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                outcome = Err(Failure::client(&format!("consuming '{}'", args.queue), &e));
                break;
            }
            None => {
                outcome = Err(Failure::failed(format!(
                    "consuming '{}': the consumer ended",
                    args.queue
                )));
                break;
            }
        };
        if let Err(e) = write_stdout(&line(&delivery, args.client.json)) {
            // Not printed, so not acked: back to the queue now rather than at disconnect.
            drop(delivery.nack(true));
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                outcome = Err(Failure::failed(format!("writing standard output: {e}")));
            }
            break;
        }
        printed += 1;
        let hold = args
            .count
            .is_some_and(|n| acked + 1 + u64::from(prefetch) > n);
        if hold {
            held.push(delivery);
        } else {
            acks.push(settlement.settle(&delivery));
            acked += 1;
            if acks.len() >= ACKS_IN_FLIGHT {
                if let Err(f) = settle(&mut acks, false).await {
                    outcome = Err(f);
                    break;
                }
            }
        }
    }

    // Cancel first so that acking the held deliveries gives the broker no credit to send more;
    // deliveries received but not printed go back to the queue with the cancel.
    let cancelled = tokio::time::timeout(FINISH_TIMEOUT, consumer.cancel()).await;
    let mut settled = settle(&mut acks, false).await;
    let mut late: Vec<SettleFuture> = held.drain(..).map(|d| settlement.settle(&d)).collect();
    // An auto-delete queue went with the cancel, and the held deliveries with it: a queue that
    // is gone cannot redeliver them, so their refused acks lose nothing.
    settled = settled.and(settle(&mut late, true).await);
    close(client).await;
    outcome?;
    settled?;
    match cancelled {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failure::failed(format!(
            "cancelling the consumer: {}",
            describe(&e)
        ))),
        Err(_) => Err(Failure::failed(
            "cancelling the consumer: no answer from the broker",
        )),
    }
}

/// One delivery as printed: its body and a newline, or with `--json` one JSON object.
fn line(d: &Delivery, json: bool) -> Vec<u8> {
    if json {
        let mut value = json!({
            "body": String::from_utf8_lossy(d.body()),
            "delivery_tag": d.delivery_tag(),
            "redelivered": d.redelivered(),
            "delivery_count": d.delivery_count(),
            "routing_key": d.routing_key(),
        });
        // Properties only where a publisher set them, so plain messages' lines stay as they were.
        let headers = d.headers();
        if !headers.is_empty() {
            let list: Vec<_> = headers
                .iter()
                .map(|(k, v)| json!([k, String::from_utf8_lossy(v)]))
                .collect();
            value["headers"] = json!(list);
        }
        if d.priority() > 0 {
            value["priority"] = json!(d.priority());
        }
        if let Some(ms) = d.expiration_ms() {
            value["expiration_ms"] = json!(ms);
        }
        if let Some(ms) = d.deliver_at_ms() {
            value["deliver_at_ms"] = json!(ms);
        }
        if !d.persistent() {
            value["persistent"] = json!(false);
        }
        // Only a dead letter has a history; other lines stay as they were.
        if !d.deaths().is_empty() {
            let deaths: Vec<_> = d
                .deaths()
                .iter()
                .map(|x| {
                    json!({
                        "queue": x.queue,
                        "reason": x.reason_name(),
                        "count": x.count,
                        "exchange": x.exchange,
                        "routing_key": x.routing_key,
                        "first_time_ms": x.first_time_ms,
                        "last_time_ms": x.last_time_ms,
                    })
                })
                .collect();
            value["deaths"] = json!(deaths);
        }
        format!("{value}\n").into_bytes()
    } else {
        let mut bytes = Vec::with_capacity(d.body().len() + 1);
        bytes.extend_from_slice(d.body());
        bytes.push(b'\n');
        bytes
    }
}

/// Awaits the answers to the acks sent so far; with `queue_may_be_gone`, a `NotFound`
/// refusal counts as settled.
async fn settle(acks: &mut Vec<SettleFuture>, queue_may_be_gone: bool) -> Result<(), Failure> {
    let all = async {
        let mut first_error = None;
        for ack in acks.drain(..) {
            match ack.await {
                Err(e) if queue_may_be_gone && e.code() == Some(ErrorCode::NotFound) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
                Ok(()) => {}
            }
        }
        first_error
    };
    match tokio::time::timeout(FINISH_TIMEOUT, all).await {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(Failure::failed(format!("acking: {}", describe(&e)))),
        Err(_) => Err(Failure::failed("acking: no answer from the broker")),
    }
}
