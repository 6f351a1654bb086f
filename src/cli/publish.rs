//! `weir publish (--queue NAME | --exchange NAME [--routing-key KEY] [--mandatory])
//! [--message TEXT] [--producer-id N [--sequence-start SEQ]] [--priority P] [--header K=V]...
//! [--expiration-ms MS] [--delay-ms MS] [--non-persistent]`: stdin lines (or one message) as
//! messages (persistent unless `--non-persistent`), pipelined, every confirm awaited; with
//! `--producer-id`, as an idempotent producer (exactly once: re-sent after a lost connection,
//! re-runs confirmed as duplicates).
//!
//! Contract: tokio current-thread runtime; a shard-aware client, so the messages go straight to
//! the queue's shard. A thread reads stdin (blocking reads must not stall the connection's
//! driver task on the runtime's one thread) and hands lines over a bounded channel; the
//! publisher takes what has arrived, up to a batch, and sends it as one `Publish` frame, so a
//! pipe is published in large batches and an interactive line leaves at once. Confirms are
//! awaited by a second task while publishing goes on; the client's in-flight limit bounds
//! how far ahead the publisher runs. The queue (or exchange) is checked first, so a missing one
//! fails before any input is read. Failures reported: missing queue, each refused message (counted by
//! reason), a lost connection (messages without an answer are counted as unconfirmed), a
//! stdin read error; any of them exits 1 after the summary.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::ExitCode;

use serde_json::json;
use tokio::sync::mpsc;
use weir_client::{
    Client, ClientError, Durability, ExchangeKind, ExchangeOptions, IdempotentProducer, Message,
    ProducerFuture, ProducerOptions, PublishFuture, PublishOptions,
};

use super::output::print;
use super::queue::close;
use super::{answer, block_on, connect, describe, ClientArgs, Failure};

/// Most messages per `Publish` frame (further capped by the broker's announced limits): large
/// enough to amortise a frame and a group commit, small enough to keep confirms flowing.
const BATCH_MAX: usize = 256;
/// Lines read ahead of the publisher.
const READ_AHEAD: usize = 4096;
/// Frame bytes per message beside its body (flatbuffer tables, routing key): generous, so a
/// batch stays well under `frame_size_max` and only an oversized line is refused alone.
const PER_MESSAGE_OVERHEAD: usize = 512;

#[derive(clap::Args, Debug)]
#[group(id = "target", required = true, multiple = false, args = ["queue", "exchange"])]
pub struct PublishArgs {
    /// The queue (the default exchange routes by queue name).
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// An exchange: its bindings route each message by --routing-key.
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
    /// The routing key, with --exchange.
    #[arg(long, value_name = "KEY", default_value = "", requires = "exchange")]
    pub routing_key: String,
    /// With --exchange: a message that routes to no queue comes back (counted as refused)
    /// instead of being dropped.
    #[arg(long, requires = "exchange")]
    pub mandatory: bool,
    /// Publish this one message instead of reading standard input.
    #[arg(long, value_name = "TEXT")]
    pub message: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Publish as idempotent producer N (exactly once): the messages are numbered from
    /// --sequence-start, a lost connection is re-made and what was unconfirmed re-sent, and the
    /// broker stores each (N, sequence) at most once per queue. Running the same command again
    /// stores nothing twice: its messages are confirmed as duplicates.
    #[arg(long, value_name = "N")]
    pub producer_id: Option<u64>,
    /// With --producer-id: the first message's sequence (the next run of the same producer
    /// goes on above the last one it used, or its messages count as duplicates).
    #[arg(
        long,
        value_name = "SEQ",
        default_value_t = 1,
        requires = "producer_id"
    )]
    pub sequence_start: u64,
    /// Every message's priority, 0 (the default, lowest) to 255: a priority queue (declared
    /// with --priority-max) delivers higher ones first, capping this at its maximum.
    #[arg(long, value_name = "P", default_value_t = 0)]
    pub priority: u8,
    /// An application header on every message, KEY=VALUE; repeat for more (order kept).
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Every message's time to live, ms from when a queue accepts it (from its delivery time
    /// with --delay-ms): unconsumed after that, it expires (dead-lettered or dropped).
    #[arg(long, value_name = "MS")]
    pub expiration_ms: Option<u32>,
    /// Not delivered before this many ms from now (a delayed message; at most the broker's
    /// delay_ms_max ahead).
    #[arg(long, value_name = "MS")]
    pub delay_ms: Option<u64>,
    /// Kept in memory only, even on a durable queue: not journaled, gone after a restart.
    #[arg(long)]
    pub non_persistent: bool,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

pub fn run(args: PublishArgs) -> ExitCode {
    block_on("publish", publish(args))
}

/// Where the messages go: an exchange (empty: the default one) and the routing key, and what
/// every message carries.
struct Target {
    options: PublishOptions,
    key: String,
    priority: u8,
    headers: Vec<(String, String)>,
    expiration_ms: Option<u32>,
    delay_ms: Option<u64>,
    persistent: bool,
}

impl Target {
    fn message(&self, body: Vec<u8>) -> Message {
        let mut m = Message::new(body)
            .priority(self.priority)
            .persistent(self.persistent);
        for (k, v) in &self.headers {
            m = m.header(k.clone(), v.clone().into_bytes());
        }
        if let Some(ms) = self.expiration_ms {
            m = m.expiration_ms(ms);
        }
        if let Some(delay) = self.delay_ms {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            m = m.deliver_at_ms(now.saturating_add(delay.min(i64::MAX as u64) as i64));
        }
        m
    }
}

/// What became of the messages, as the confirm task saw them.
#[derive(Default)]
struct Tally {
    confirmed: u64,
    /// Reason -> count.
    refused: BTreeMap<String, u64>,
    /// Sent, but the connection died before the broker answered: maybe stored, maybe not.
    unconfirmed: u64,
    lost: Option<String>,
    durability: BTreeMap<String, u64>,
    /// Confirmed as an idempotent producer's duplicates (stored before, not again).
    duplicates: u64,
}

impl Tally {
    fn refused(&self) -> u64 {
        self.refused.values().sum()
    }
}

enum Outcome {
    Pending(PublishFuture),
    /// An idempotent producer's publish (`--producer-id`).
    Idempotent(ProducerFuture),
    /// Refused by the client before sending (a line over the broker's message size limit).
    Refused(String),
}

async fn publish(args: PublishArgs) -> Result<(), Failure> {
    let client = connect(&args.client, true).await?;
    // Publishing to a missing queue or exchange is refused message by message; asking once
    // first turns that into one clear error before any input is consumed.
    let target = match (&args.queue, &args.exchange) {
        (Some(queue), _) => {
            answer(
                &format!("checking queue '{queue}'"),
                client.queue_info(queue),
            )
            .await?;
            Target {
                options: PublishOptions::default(),
                key: queue.clone(),
                priority: args.priority,
                headers: args.headers.clone(),
                expiration_ms: args.expiration_ms,
                delay_ms: args.delay_ms,
                persistent: !args.non_persistent,
            }
        }
        (None, Some(exchange)) => {
            // A passive declare checks existence; the kind it names is not the point, so a
            // kind mismatch (the only other refusal) also means it exists.
            let passive = ExchangeOptions {
                passive: true,
                ..ExchangeOptions::default()
            };
            let check = client.declare_exchange(exchange, ExchangeKind::Direct, passive);
            match tokio::time::timeout(std::time::Duration::from_secs(30), check).await {
                Ok(Err(ClientError::Refused { code, .. }))
                    if code == weir_client::ErrorCode::PreconditionFailed => {}
                Ok(Err(e)) => {
                    return Err(Failure::client(
                        &format!("checking exchange '{exchange}'"),
                        &e,
                    ))
                }
                Ok(Ok(())) => {}
                Err(_) => {
                    return Err(Failure::failed(format!(
                        "checking exchange '{exchange}': no answer from the broker"
                    )))
                }
            }
            Target {
                options: PublishOptions {
                    exchange: exchange.clone(),
                    mandatory: args.mandatory,
                },
                key: args.routing_key.clone(),
                priority: args.priority,
                headers: args.headers.clone(),
                expiration_ms: args.expiration_ms,
                delay_ms: args.delay_ms,
                persistent: !args.non_persistent,
            }
        }
        (None, None) => return Err(Failure::usage("give --queue or --exchange")),
    };

    let (outcomes, rx) = mpsc::unbounded_channel();
    let confirms = tokio::spawn(await_confirms(rx));
    let producer = match args.producer_id {
        None => None,
        Some(id) => {
            let mut options = ProducerOptions::new(id);
            options.first_sequence = args.sequence_start;
            options.client.name = format!("weir-cli/{}", std::process::id());
            let connecting = IdempotentProducer::connect(args.client.server.as_str(), options);
            Some(
                connecting
                    .await
                    .map_err(|e| Failure::client(&format!("connecting producer {id}"), &e))?,
            )
        }
    };
    let sender = Sender {
        client: &client,
        producer: producer.as_ref(),
    };

    let limits = client.server().limits;
    let batch_max = BATCH_MAX
        .min(limits.publish_batch_max as usize)
        .min(limits.publishes_in_flight_max as usize)
        .max(1);
    let batch_bytes = (limits.frame_size_max as usize / 2).max(1);

    let mut published = 0u64;
    let mut fatal: Option<String> = None;
    let mut input_error: Option<String> = None;
    match &args.message {
        Some(text) => {
            published = 1;
            if let Err(e) = send(&sender, &target, vec![text.as_bytes().to_vec()], &outcomes).await
            {
                fatal = Some(e);
            }
        }
        None => {
            let mut lines = read_lines();
            'input: loop {
                let Some(first) = lines.recv().await else {
                    break;
                };
                let mut batch = Vec::new();
                let mut bytes = 0;
                let mut next = Some(first);
                while let Some(line) = next.take() {
                    match line {
                        Ok(body) => {
                            bytes += body.len() + PER_MESSAGE_OVERHEAD;
                            batch.push(body);
                        }
                        Err(e) => {
                            input_error = Some(e.to_string());
                            break;
                        }
                    }
                    if batch.len() >= batch_max || bytes >= batch_bytes {
                        break;
                    }
                    next = lines.try_recv().ok();
                }
                published += batch.len() as u64;
                if !batch.is_empty() {
                    if let Err(e) = send(&sender, &target, batch, &outcomes).await {
                        fatal = Some(e);
                        break 'input;
                    }
                }
                if input_error.is_some() {
                    break;
                }
            }
        }
    }
    drop(outcomes);
    let tally = match confirms.await {
        Ok(t) => t,
        Err(e) => return Err(Failure::failed(format!("awaiting confirms: {e}"))),
    };
    close(client).await;
    report(&args, published, &tally, fatal, input_error)
}

/// What publishes: the client, or an idempotent producer (`--producer-id`).
struct Sender<'a> {
    client: &'a Client,
    producer: Option<&'a IdempotentProducer>,
}

/// Sends one batch; the outcome of each message goes to the confirm task. `Err` is a failure
/// that ends publishing (the connection is gone).
async fn send(
    sender: &Sender<'_>,
    target: &Target,
    batch: Vec<Vec<u8>>,
    outcomes: &mpsc::UnboundedSender<Outcome>,
) -> Result<(), String> {
    let client = sender.client;
    let messages: Vec<Message> = batch.into_iter().map(|b| target.message(b)).collect();
    if let Some(producer) = sender.producer {
        // One sequence each, in order; the producer keeps them until confirmed.
        for m in messages {
            match producer.publish(&target.options, &target.key, m).await {
                Ok(f) => {
                    let _ = outcomes.send(Outcome::Idempotent(f));
                }
                Err(e @ ClientError::LimitExceeded { .. }) => {
                    let _ = outcomes.send(Outcome::Refused(describe(&e)));
                }
                Err(e) => return Err(describe(&e)),
            }
        }
        return Ok(());
    }
    let (options, key) = (&target.options, target.key.as_str());
    match client
        .publish_batch_with(options, key, messages.clone())
        .await
    {
        Ok(futures) => {
            for f in futures {
                let _ = outcomes.send(Outcome::Pending(f));
            }
            Ok(())
        }
        // One line over a limit refuses its whole batch: send them one by one so that only
        // that line is refused.
        Err(ClientError::LimitExceeded { .. }) if messages.len() > 1 => {
            for m in messages {
                match client.publish_with(options, key, m).await {
                    Ok(f) => {
                        let _ = outcomes.send(Outcome::Pending(f));
                    }
                    Err(e @ ClientError::LimitExceeded { .. }) => {
                        let _ = outcomes.send(Outcome::Refused(describe(&e)));
                    }
                    Err(e) => return Err(describe(&e)),
                }
            }
            Ok(())
        }
        Err(e @ ClientError::LimitExceeded { .. }) => {
            let _ = outcomes.send(Outcome::Refused(describe(&e)));
            Ok(())
        }
        Err(e) => Err(describe(&e)),
    }
}

/// Awaits confirms in publish order (the broker confirms in about that order, so waiting on
/// the oldest first costs nothing) until the publisher is done.
async fn await_confirms(mut rx: mpsc::UnboundedReceiver<Outcome>) -> Tally {
    let mut tally = Tally::default();
    while let Some(outcome) = rx.recv().await {
        let result = match outcome {
            Outcome::Pending(f) => f.await,
            Outcome::Idempotent(f) => f.await,
            Outcome::Refused(reason) => {
                *tally.refused.entry(reason).or_default() += 1;
                continue;
            }
        };
        match result {
            Ok(c) => {
                tally.confirmed += 1;
                tally.duplicates += u64::from(c.duplicate);
                *tally
                    .durability
                    .entry(durability(c.durability))
                    .or_default() += 1;
            }
            Err(e @ ClientError::Closed(_)) => {
                tally.unconfirmed += 1;
                tally.lost.get_or_insert_with(|| describe(&e));
            }
            Err(e) => *tally.refused.entry(describe(&e)).or_default() += 1,
        }
    }
    tally
}

fn durability(d: Durability) -> String {
    format!("{d:?}").to_lowercase()
}

/// Standard input, one message per line, from a thread of its own.
fn read_lines() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    std::thread::spawn(move || {
        let mut input = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    if tx.blocking_send(Ok(line)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

fn report(
    args: &PublishArgs,
    published: u64,
    tally: &Tally,
    fatal: Option<String>,
    input_error: Option<String>,
) -> Result<(), Failure> {
    let refused = tally.refused();
    // Messages never handed to the broker because the connection died mid-batch.
    let unconfirmed = published.saturating_sub(tally.confirmed + refused);
    let durability = match tally.durability.len() {
        0 => None,
        1 => tally.durability.keys().next().cloned(),
        _ => Some("mixed".to_string()),
    };
    let mut human = format!(
        "published {published}, confirmed {}, refused {refused}",
        tally.confirmed
    );
    if unconfirmed > 0 {
        human.push_str(&format!(", unconfirmed {unconfirmed}"));
    }
    if let Some(id) = args.producer_id {
        human.push_str(&format!(
            ", duplicates {} (producer {id}, sequences {}..{})",
            tally.duplicates,
            args.sequence_start,
            args.sequence_start + published
        ));
    }
    match (&args.queue, &args.exchange) {
        (Some(queue), _) => human.push_str(&format!(" (queue '{queue}'")),
        (None, exchange) => human.push_str(&format!(
            " (exchange '{}', routing key '{}'",
            exchange.as_deref().unwrap_or(""),
            args.routing_key
        )),
    }
    if let Some(d) = &durability {
        human.push_str(&format!(", durability {d}"));
    }
    human.push_str(")\n");
    for (reason, count) in &tally.refused {
        human.push_str(&format!("  refused {count}: {reason}\n"));
    }
    let refusals: Vec<_> = tally
        .refused
        .iter()
        .map(|(reason, count)| json!({"reason": reason, "count": count}))
        .collect();
    let mut value = json!({
        "published": published,
        "confirmed": tally.confirmed,
        "refused": refused,
        "unconfirmed": unconfirmed,
        "durability": durability,
        "refusals": refusals,
    });
    if let Some(id) = args.producer_id {
        value["producer_id"] = json!(id);
        value["sequence_start"] = json!(args.sequence_start);
        value["duplicates"] = json!(tally.duplicates);
    }
    match (&args.queue, &args.exchange) {
        (Some(queue), _) => value["queue"] = json!(queue),
        (None, exchange) => {
            value["exchange"] = json!(exchange);
            value["routing_key"] = json!(args.routing_key);
        }
    }
    print(args.client.json, &human, &value)?;

    if let Some(e) = input_error {
        return Err(Failure::failed(format!("reading standard input: {e}")));
    }
    if let Some(e) = fatal.or_else(|| tally.lost.clone()) {
        return Err(Failure::failed(format!(
            "{unconfirmed} of {published} messages unconfirmed: {e}"
        )));
    }
    if refused > 0 {
        let first = tally.refused.keys().next().cloned().unwrap_or_default();
        return Err(Failure::failed(format!(
            "{refused} of {published} messages refused: {first}"
        )));
    }
    Ok(())
}
