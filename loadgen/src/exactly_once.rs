//! `kind = "exactly-once"`: idempotent producers publish while the spawned broker is SIGKILLed
//! and restarted on the same data directory; afterwards every queue is drained and each message
//! counted. The report says how many were lost (confirmed, never delivered) and duplicated
//! (stored more than once): both must be 0.
//!
//! Contract: `run` is called on the main thread, which owns the spawned broker (its
//! `PR_SET_PDEATHSIG` ties it to the thread that started it, so the restarts happen here). The
//! load runs on one OS thread with a tokio current-thread runtime: `producers`
//! `weir_client::IdempotentProducer`s (ids 1..=producers, one connection each), producer `p`
//! publishing its share of `backlog` messages to queue `p % queues` (durable, persistent; the
//! queues' names place them on every shard there is), `in_flight` unconfirmed each. The broker
//! comes back on new ports, so the producers reach it through a TCP relay on the load thread
//! whose target the main thread moves after each restart (one connection per producer: the
//! broker forwards to the owning shard over its mesh). The main thread kills the broker `kills`
//! times, when the confirms reach each k/(kills+1) of the backlog: a kill lands with every
//! producer's window of publishes in flight. Once every publish is confirmed, one consumer per
//! queue takes everything (acking), until the queue is empty.
//!
//! Faults handled: a broker that does not come back (the error ends the run), a publish the
//! broker refuses (counted as a failure: its message is expected nowhere), a drain that does not
//! finish within `drain_timeout_s` (what is missing is reported lost), Ctrl-C (stops waiting).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use weir_client::{
    Client, ClientOptions, ConsumeOptions, IdempotentProducer, Message, ProducerOptions,
    PublishOptions, QueueOptions,
};

use crate::broker::SpawnedBroker;
use crate::run::RunConfig;

/// What an exactly-once run found; `results.json` with `--out`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExactlyOnceReport {
    pub scenario: String,
    pub description: String,
    pub broker: String,
    pub producers: u32,
    pub queues: u32,
    pub body_bytes: u32,
    /// Messages published (every one confirmed, or counted in `failed`).
    pub published: u64,
    pub confirmed: u64,
    /// Publishes the broker refused (or the producer gave up on).
    pub failed: u64,
    /// Confirms that were an idempotent producer's duplicates (a re-send the broker had).
    pub confirmed_as_duplicates: u64,
    /// Messages the producers sent again after reconnecting.
    pub resent: u64,
    /// Reconnects, all producers together.
    pub reconnects: u64,
    /// SIGKILL and restart of the broker.
    pub kills: u32,
    /// SIGKILL to the ready line, each restart, ms.
    pub recovery_ms: Vec<u64>,
    /// Distinct messages delivered.
    pub delivered_unique: u64,
    /// Confirmed messages never delivered.
    pub lost: u64,
    /// Deliveries of a message beyond its first (stored more than once).
    pub duplicated: u64,
    /// Publish start to last confirm, s.
    pub publish_seconds: f64,
}

impl ExactlyOnceReport {
    pub fn summary(&self) -> String {
        let recovery = if self.recovery_ms.is_empty() {
            String::new()
        } else {
            let mut r = self.recovery_ms.clone();
            r.sort_unstable();
            format!(
                " (SIGKILL to ready: p50 {} ms, max {} ms)",
                r[r.len() / 2],
                r[r.len() - 1]
            )
        };
        format!(
            "weir-loadgen: {}\n  {}\nbroker    {}\nworkload  kind exactly-once, {} idempotent producer(s), {} queue(s), \
             body {} B, persistent messages, durable queues\nrestarts  {} SIGKILL and restart(s) \
             while publishing{recovery}\nproducers published {}, confirmed {} in {:.1} s, failed {}; \
             re-sent {} after reconnecting ({} reconnects), {} confirmed as duplicates\ncheck     \
             delivered {} distinct, lost {}, duplicates {}\n",
            self.scenario,
            self.description,
            self.broker,
            self.producers,
            self.queues,
            self.body_bytes,
            self.kills,
            self.published,
            self.confirmed,
            self.publish_seconds,
            self.failed,
            self.resent,
            self.reconnects,
            self.confirmed_as_duplicates,
            self.delivered_unique,
            self.lost,
            self.duplicated,
        )
    }
}

/// What the load thread and the main thread share.
struct Shared {
    confirmed: AtomicU64,
    /// Where the relay connects.
    target: Mutex<SocketAddr>,
    /// Set by the load thread once every publish is answered.
    published: AtomicBool,
}

/// The run: see the module header. `kills` restarts while publishing.
pub fn run(
    config: &RunConfig,
    broker: &mut SpawnedBroker,
    kills: u32,
    abort: Arc<AtomicBool>,
) -> Result<ExactlyOnceReport, String> {
    let s = &config.scenario;
    let total = s.backlog();
    let shared = Arc::new(Shared {
        confirmed: AtomicU64::new(0),
        target: Mutex::new(parse(&broker.listen)?),
        published: AtomicBool::new(false),
    });
    let queues: Vec<String> = (0..s.queues)
        .map(|q| format!("{}-{q}", config.prefix))
        .collect();
    let mut report = ExactlyOnceReport {
        scenario: config.name.clone(),
        description: s.description.clone(),
        broker: broker.ready_line.clone(),
        producers: s.producers,
        queues: s.queues,
        body_bytes: s.size.max(),
        published: total,
        kills,
        ..ExactlyOnceReport::default()
    };

    let load = {
        let shared = shared.clone();
        let queues = queues.clone();
        let scenario = s.clone();
        std::thread::Builder::new()
            .name("exactly-once".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(publish_all(&scenario, &queues, shared))
            })
            .map_err(|e| e.to_string())?
    };

    // The kills, each when the confirms reach its share of the backlog.
    for k in 1..=kills {
        let at = total * u64::from(k) / u64::from(kills + 1);
        while shared.confirmed.load(Ordering::Relaxed) < at
            && !shared.published.load(Ordering::Relaxed)
            && !abort.load(Ordering::Relaxed)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        if shared.published.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed) {
            break;
        }
        let t = Instant::now();
        broker.kill_and_restart()?;
        report.recovery_ms.push(t.elapsed().as_millis() as u64);
        *shared.target.lock().map_err(|e| e.to_string())? = parse(&broker.listen)?;
    }
    report.kills = report.recovery_ms.len() as u32;
    let published = load
        .join()
        .map_err(|_| "the load thread panicked".to_string())??;
    report.confirmed = published.confirmed;
    report.failed = published.failed;
    report.confirmed_as_duplicates = published.duplicates;
    report.resent = published.resent;
    report.reconnects = published.reconnects;
    report.publish_seconds = published.seconds;

    // Drain every queue and count each message.
    let addr = broker.listen.clone();
    let timeout = Duration::from_secs_f64(s.drain_timeout_s);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let seen = rt.block_on(drain(&addr, &queues, timeout))?;
    let mut lost = 0;
    for body in &published.expected {
        if !seen.contains_key(body) {
            lost += 1;
        }
    }
    report.lost = lost;
    report.delivered_unique = seen.len() as u64;
    report.duplicated = seen.values().map(|n| n - 1).sum();
    Ok(report)
}

fn parse(addr: &str) -> Result<SocketAddr, String> {
    addr.parse()
        .map_err(|e| format!("broker address '{addr}': {e}"))
}

/// What the producers did.
struct Published {
    /// The bodies of the confirmed messages: each must be delivered exactly once.
    expected: Vec<String>,
    confirmed: u64,
    failed: u64,
    duplicates: u64,
    resent: u64,
    reconnects: u64,
    seconds: f64,
}

/// The relay, then every producer's share, every confirm awaited.
async fn publish_all(
    s: &crate::scenario::Scenario,
    queues: &[String],
    shared: Arc<Shared>,
) -> Result<Published, String> {
    let via = relay(shared.clone()).await?;
    let target = *shared.target.lock().map_err(|e| e.to_string())?;
    let admin = Client::connect(target, ClientOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    for q in queues {
        admin
            .declare(q, QueueOptions::default())
            .await
            .map_err(|e| format!("declaring {q}: {e}"))?;
    }
    admin.close().await.map_err(|e| e.to_string())?;
    let start = Instant::now();
    let total = s.backlog();
    let mut tasks = Vec::new();
    for p in 0..s.producers {
        let mut options = ProducerOptions::new(u64::from(p) + 1);
        options.client = ClientOptions::single_connection();
        options.unconfirmed_max = s.in_flight as usize;
        let producer = IdempotentProducer::connect(via, options)
            .await
            .map_err(|e| format!("producer {}: {e}", p + 1))?;
        let queue = queues[p as usize % queues.len()].clone();
        let share = total / u64::from(s.producers)
            + u64::from(u64::from(p) < total % u64::from(s.producers));
        let size = s.size.max() as usize;
        let shared = shared.clone();
        // The confirms are awaited by a task of their own while publishing goes on (the
        // producer's window bounds how far ahead it runs), so progress is seen as it happens.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let publisher = producer.clone();
        tokio::spawn(async move {
            for i in 0..share {
                let mut body = format!("{}:{i}:", p + 1);
                while body.len() < size {
                    body.push('.');
                }
                let f = publisher
                    .publish(
                        &PublishOptions::default(),
                        &queue,
                        Message::new(body.clone()),
                    )
                    .await;
                if tx.send((f, body)).is_err() {
                    return;
                }
            }
        });
        tasks.push(tokio::spawn(async move {
            let (mut expected, mut failed, mut duplicates) = (Vec::new(), 0u64, 0u64);
            while let Some((f, body)) = rx.recv().await {
                let outcome = match f {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(c) => {
                        duplicates += u64::from(c.duplicate);
                        expected.push(body);
                    }
                    Err(e) => {
                        failed += 1;
                        if failed == 1 {
                            eprintln!("weir-loadgen: producer {}: {e}", p + 1);
                        }
                    }
                }
                shared.confirmed.fetch_add(1, Ordering::Relaxed);
            }
            (
                expected,
                failed,
                duplicates,
                producer.resent(),
                producer.reconnects(),
            )
        }));
    }
    let mut out = Published {
        expected: Vec::new(),
        confirmed: 0,
        failed: 0,
        duplicates: 0,
        resent: 0,
        reconnects: 0,
        seconds: 0.0,
    };
    for t in tasks {
        let (expected, failed, duplicates, resent, reconnects) =
            t.await.map_err(|e| e.to_string())?;
        out.confirmed += expected.len() as u64;
        out.expected.extend(expected);
        out.failed += failed;
        out.duplicates += duplicates;
        out.resent += resent;
        out.reconnects += reconnects;
    }
    out.seconds = start.elapsed().as_secs_f64();
    shared.published.store(true, Ordering::Relaxed);
    Ok(out)
}

/// A TCP relay to wherever the broker is now; a connection made while it is down is dropped.
async fn relay(shared: Arc<Shared>) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let Ok(to) = shared.target.lock().map(|t| *t) else {
                return;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Takes everything from every queue (acking) until each is empty, or `timeout`; each body's
/// delivery count.
async fn drain(
    addr: &str,
    queues: &[String],
    timeout: Duration,
) -> Result<HashMap<String, u64>, String> {
    let client = Client::connect(addr, ClientOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut seen: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + timeout;
    for q in queues {
        let options = ConsumeOptions {
            prefetch: 1000,
            ..ConsumeOptions::default()
        };
        let mut consumer = client
            .consume(q, options)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            // Deliveries as they come; when none came for a while, is the queue empty?
            let next = tokio::time::timeout(Duration::from_millis(200), consumer.recv());
            match next.await {
                Ok(Some(Ok(d))) => {
                    let body = String::from_utf8_lossy(d.body()).into_owned();
                    *seen.entry(body).or_default() += 1;
                    drop(d.ack()); // sent; its answer not awaited
                }
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => break,
                Err(_) => {
                    let info = client.queue_info(q).await.map_err(|e| e.to_string())?;
                    let empty = info.messages_ready == 0 && info.messages_unacked == 0;
                    if empty || Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        let _ = consumer.cancel().await;
    }
    let _ = client.close().await;
    Ok(seen)
}
