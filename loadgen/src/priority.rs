//! `kind = "priority"`: what a priority queue buys a message of high priority stuck behind a
//! backlog of low ones: the end-to-end latency of each, side by side.
//!
//! Contract: `run` is called on the main thread and runs the load on one OS thread of its own
//! (pinned to the first load CPU given) with a current-thread tokio runtime. The steps:
//!
//! 1. declare one queue with `priority_max = HIGH` (fresh: a queue holding messages is refused);
//! 2. *fill*: publish `backlog` messages of priority 0 with no consumer, `in_flight` unconfirmed
//!    at most (one `publish` call each), and wait for every confirm;
//! 3. *drain and trickle*: one consumer (`prefetch`, one ack per delivery) takes the queue at
//!    `consumer_rate` messages a second (as fast as they come without one), and meanwhile one
//!    producer publishes the first phase's `rate` of priority `HIGH` messages for its
//!    `duration_s`, open loop (message `k` intended at `k / rate` seconds);
//! 4. the run ends when every message was delivered (or `drain_timeout_s` after the trickle),
//!    and the queue is deleted unless `--keep-queues`.
//!
//! A message's latency is from its intended send time (stamped in its body) to its delivery to
//! the consumer, before its processing pace; high and low are reported apart: p50, p99, max.
//! A low message's latency is its wait behind the backlog, so it grows with its place there; a
//! high one's should not, since it overtakes the backlog (it can still wait behind the
//! deliveries already in the consumer's prefetch window, `prefetch / consumer_rate`).
//!
//! Faults handled: a refused publish ends the run with its error; a drain that does not finish
//! in time is reported incomplete (exit status 4), with what was delivered; Ctrl-C stops it.

use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir_client::{ConsumeOptions, Message, QueueArguments, QueueOptions, SettleFuture};

use crate::run::{connect, BrokerFacts, RunConfig};

/// The priority of the trickle (and the queue's `priority_max`); the backlog is priority 0.
pub const HIGH: u8 = 9;
/// Bytes at the start of a body: the intended send time (µs since the run's start), priority.
const STAMP: usize = 9;

/// Latencies of one class of messages, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    pub messages: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut us: Vec<u64>) -> Latency {
        us.sort_unstable();
        let at = |q: f64| {
            if us.is_empty() {
                return 0.0;
            }
            let i = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1;
            us[i] as f64 / 1000.0
        };
        Latency {
            messages: us.len() as u64,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: us.last().map_or(0.0, |m| *m as f64 / 1000.0),
        }
    }
}

/// What a `priority` run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PriorityReport {
    pub scenario: String,
    pub description: String,
    pub broker: BrokerFacts,
    pub broker_setup: String,
    pub size: String,
    pub backlog: u64,
    /// Seconds the fill took (first publish to last confirm).
    pub fill_s: f64,
    /// Seconds from the consumer subscribing to the last delivery.
    pub drain_s: f64,
    pub consumer_rate: Option<f64>,
    pub prefetch: u32,
    pub high_rate: f64,
    pub high: Latency,
    pub low: Latency,
    pub drained: bool,
    pub aborted: bool,
}

impl PriorityReport {
    pub fn summary(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "=== {} ===", self.scenario);
        let _ = writeln!(t, "{}", self.description);
        let _ = writeln!(
            t,
            "broker {} ({} shard(s), fsync {}) at {}; {}",
            self.broker.version,
            self.broker.shards,
            self.broker.fsync,
            self.broker.addr,
            self.broker_setup
        );
        let pace = self
            .consumer_rate
            .map_or("as fast as they come".to_string(), |r| {
                format!("{r} msgs/s")
            });
        let _ = writeln!(
            t,
            "backlog {} x {} of priority 0 filled in {:.2} s, drained in {:.2} s by one consumer \
             (prefetch {}, {pace}); {} msgs/s of priority {HIGH} meanwhile",
            self.backlog, self.size, self.fill_s, self.drain_s, self.prefetch, self.high_rate
        );
        for (name, l) in [("high", &self.high), ("low", &self.low)] {
            let _ = writeln!(
                t,
                "{name:>4}: {:>7} msgs  latency p50 {:>9.2} ms  p99 {:>9.2} ms  max {:>9.2} ms",
                l.messages, l.p50_ms, l.p99_ms, l.max_ms
            );
        }
        if !self.drained {
            let _ = writeln!(t, "INCOMPLETE: not every message was delivered in time");
        }
        if self.aborted {
            let _ = writeln!(t, "stopped by a signal");
        }
        t
    }
}

fn body(start: Instant, priority: u8, len: usize) -> Bytes {
    let mut b = vec![b'.'; len.max(STAMP)];
    let us = start.elapsed().as_micros() as u64;
    b[..8].copy_from_slice(&us.to_le_bytes());
    b[8] = priority;
    Bytes::from(b)
}

/// Runs the scenario against `cfg.addr` (see the module header).
pub fn run(
    cfg: &RunConfig,
    broker_setup: &str,
    abort: Arc<AtomicBool>,
) -> Result<PriorityReport, String> {
    let cpu = cfg.thread_cpus.first().copied().flatten();
    std::thread::scope(|scope| {
        let h = std::thread::Builder::new()
            .name("load-0".into())
            .spawn_scoped(scope, move || {
                if let Some(id) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                        eprintln!("weir-loadgen: pinning the load thread to cpu {id} failed");
                    }
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("starting the load thread's runtime: {e}"))?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, load(cfg, broker_setup, abort))
            })
            .map_err(|e| format!("starting the load thread: {e}"))?;
        h.join()
            .map_err(|_| "the load thread panicked".to_string())?
    })
}

async fn load(
    cfg: &RunConfig,
    broker_setup: &str,
    abort: Arc<AtomicBool>,
) -> Result<PriorityReport, String> {
    let s = &cfg.scenario;
    let addr = cfg.addr.as_str();
    let admin = connect(addr, "weir-loadgen-admin").await?;
    let server = admin.server().clone();
    let broker = BrokerFacts {
        version: server.broker_version.clone(),
        shards: server.shard_count,
        fsync: format!("{:?}", server.durability).to_lowercase(),
        addr: addr.to_string(),
    };
    let queue = format!("{}-0", cfg.prefix);
    let options = QueueOptions {
        durable: s.durable,
        arguments: QueueArguments {
            priority_max: HIGH,
            ..QueueArguments::default()
        },
        ..QueueOptions::default()
    };
    let info = admin
        .declare(&queue, options)
        .await
        .map_err(|e| format!("declaring queue {queue}: {e}"))?;
    if info.messages_ready + info.messages_unacked > 0 {
        return Err(format!(
            "queue {queue} already holds messages: use another --queue-prefix, or purge it"
        ));
    }
    let start = Instant::now();
    let len = s.size.max() as usize;
    let backlog = s.backlog();
    let producer = connect(addr, "weir-loadgen-producer").await?;

    println!("fill: {backlog} messages of priority 0, no consumer");
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..backlog {
        if abort.load(Ordering::Relaxed) {
            break;
        }
        let m = Message::new(body(start, 0, len)).persistent(s.persistent);
        let f = producer
            .publish(&queue, m)
            .await
            .map_err(|e| format!("publishing the backlog: {e}"))?;
        pending.push_back(f);
        if pending.len() >= s.in_flight as usize {
            let f = pending.pop_front().expect("not empty");
            f.await
                .map_err(|e| format!("a backlog publish was refused: {e}"))?;
        }
    }
    for f in pending {
        f.await
            .map_err(|e| format!("a backlog publish was refused: {e}"))?;
    }
    let fill_s = start.elapsed().as_secs_f64();

    let phase = &s.phases[0];
    let high_rate = phase.rate.unwrap_or(0.0);
    let high_total = (high_rate * phase.duration_s).round() as u64;
    let expected = backlog + high_total;
    let consumer_client = connect(addr, "weir-loadgen-consumer").await?;
    let mut consumer = consumer_client
        .consume(
            &queue,
            ConsumeOptions {
                prefetch: s.prefetch,
                ..ConsumeOptions::default()
            },
        )
        .await
        .map_err(|e| format!("consuming {queue}: {e}"))?;
    let drain_start = Instant::now();
    println!(
        "drain, with {high_total} messages of priority {HIGH} at {high_rate} msgs/s meanwhile"
    );

    let trickle_done = Rc::new(std::cell::Cell::new(None::<Instant>));
    let trickle = {
        let (producer, queue, abort, done) = (&producer, &queue, &abort, trickle_done.clone());
        async move {
            let t0 = tokio::time::Instant::now();
            let mut confirms = Vec::new();
            for k in 0..high_total {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep_until(t0 + Duration::from_secs_f64(k as f64 / high_rate)).await;
                let m = Message::new(body(start, HIGH, len))
                    .priority(HIGH)
                    .persistent(s.persistent);
                match producer.publish(queue, m).await {
                    Ok(f) => confirms.push(f),
                    Err(e) => return Err(format!("publishing the trickle: {e}")),
                }
            }
            for f in confirms {
                f.await
                    .map_err(|e| format!("a trickle publish was refused: {e}"))?;
            }
            done.set(Some(Instant::now()));
            Ok::<(), String>(())
        }
    };
    let draining = async {
        let (mut high, mut low) = (Vec::new(), Vec::new());
        let interval = s.consumer_interval_s().map(Duration::from_secs_f64);
        let t0 = tokio::time::Instant::now();
        let mut acks: Vec<SettleFuture> = Vec::new();
        let mut last = drain_start;
        while ((high.len() + low.len()) as u64) < expected && !abort.load(Ordering::Relaxed) {
            let deadline = trickle_done
                .get()
                .map(|t| t + Duration::from_secs_f64(s.drain_timeout_s));
            if deadline.is_some_and(|d| Instant::now() > d) {
                break;
            }
            let next = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
            let d = match next {
                Err(_) => continue,
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(format!("consuming: {e}")),
                Ok(Some(Ok(d))) => d,
            };
            let b = d.body();
            let now_us = start.elapsed().as_micros() as u64;
            let sent = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
            let latency = now_us.saturating_sub(sent);
            if b[8] == HIGH {
                high.push(latency);
            } else {
                low.push(latency);
            }
            last = Instant::now();
            if let Some(i) = interval {
                let k = (high.len() + low.len()) as u32;
                tokio::time::sleep_until(t0 + i * k).await;
            }
            acks.push(d.ack());
            if acks.len() >= 1000 {
                for a in acks.drain(..) {
                    a.await.map_err(|e| format!("an ack was refused: {e}"))?;
                }
            }
        }
        for a in acks {
            a.await.map_err(|e| format!("an ack was refused: {e}"))?;
        }
        Ok((high, low, last))
    };
    let (trickled, drained) = tokio::join!(trickle, draining);
    trickled?;
    let (high, low, last) = drained?;
    let delivered = (high.len() + low.len()) as u64;
    let _ = consumer.cancel().await;
    if !cfg.keep_queues {
        let _ = admin.delete(&queue, false, false).await;
    }
    let _ = consumer_client.close().await;
    let _ = producer.close().await;
    let _ = admin.close().await;
    Ok(PriorityReport {
        scenario: cfg.name.clone(),
        description: s.description.clone(),
        broker,
        broker_setup: broker_setup.to_string(),
        size: s.size.to_string(),
        backlog,
        fill_s,
        drain_s: last.duration_since(drain_start).as_secs_f64(),
        consumer_rate: s.consumer_rate,
        prefetch: s.prefetch,
        high_rate,
        high: Latency::of(high),
        low: Latency::of(low),
        drained: delivered == expected,
        aborted: abort.load(Ordering::Relaxed),
    })
}
