//! `kind = "retry"`: retries with backoff, natively: how late each retry comes against its
//! schedule, and how many messages end dead-lettered.
//!
//! Contract: `run` is called on the main thread (which owns a spawned broker, if any) and drives
//! one tokio current-thread runtime there: one connection for the producer, the consumer and the
//! dead-letter consumer together. The steps:
//!
//! 1. declare `PREFIX-retry` with the scenario's `retry_delays_ms` (default 200, 500, 1000 ms)
//!    and the default exchange as its dead-letter exchange, routing to `PREFIX-retry-dead`;
//! 2. the producer publishes the phase's `rate` for its `duration_s`, open loop, one publish per
//!    message (persistent unless the scenario says not);
//! 3. the consumer decides per message, from its sequence number (a hash, the same every run):
//!    a `fail_share` of them (default 10%) fail `f` times, `f` spread evenly over 1 ..= the
//!    number of delays + 1, so that a share of the failing ones fails after the last delay and
//!    is dead-lettered; a failure is `Delivery::nack(true)` (the queue's policy sets the delay),
//!    the rest are acked;
//! 4. every redelivery after a failure is measured against its schedule: the instant before the
//!    nack was sent plus the policy's delay for that failure. The broker computes its due time
//!    from its own clock after it received the nack, so `lateness >= 0` is the broker's promise
//!    (a negative one is counted as `early`, a fault), and what is measured is the broker's
//!    lateness plus the nack's and the redelivery's trips;
//! 5. the run ends when every published message was acked or dead-lettered, or
//!    `drain_timeout_s` after the producer stopped (incomplete).
//!
//! Faults handled: publishes refused (counted, not waited for), a redelivery with an unexpected
//! delivery count (counted), Ctrl-C (the run stops, the report says so).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir_client::{Client, ClientOptions, ConsumeOptions, Message, QueueArguments, QueueOptions};

use crate::run::RunConfig;
use crate::stats::histogram;

/// The policy when the scenario names none: short, so a run stays well under a minute.
pub const DEFAULT_DELAYS_MS: [u32; 3] = [200, 500, 1000];
/// The failing share when the scenario names none.
pub const DEFAULT_FAIL_SHARE: f64 = 0.1;

/// What a run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RetryReport {
    pub scenario: String,
    pub broker: String,
    pub rate: f64,
    pub duration_s: f64,
    pub size: u32,
    pub retry_delays_ms: Vec<u32>,
    pub fail_share: f64,
    pub published: u64,
    pub confirmed: u64,
    pub refused: u64,
    /// Messages chosen to fail at least once.
    pub failing: u64,
    /// Failures sent (nacks with requeue).
    pub failures: u64,
    /// Redeliveries after a failure, each measured against its schedule.
    pub retries: u64,
    pub lateness_p50_ms: f64,
    pub lateness_p99_ms: f64,
    pub lateness_p999_ms: f64,
    pub lateness_max_ms: f64,
    /// Redeliveries before their schedule: must be 0.
    pub early: u64,
    /// The earliest of those, ms before its schedule.
    pub early_max_ms: f64,
    /// Redeliveries whose delivery count was not the deliveries so far plus one.
    pub count_mismatches: u64,
    pub acked: u64,
    pub dead_lettered: u64,
    /// Messages that fail after the last delay: they should all be dead-lettered.
    pub dead_letters_expected: u64,
    pub complete: bool,
    pub seconds: f64,
}

impl RetryReport {
    pub fn summary(&self) -> String {
        format!(
            "retry: {} msgs/s for {} s, {} B, policy {:?} ms, {:.0}% failing\n\
             published {} (confirmed {}, refused {}), failing {}, failures sent {}\n\
             retries {}: lateness against schedule p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; early {} (by at most {:.3} ms)\n\
             acked {}, dead-lettered {} of {} expected; delivery count mismatches {}; {} in {:.1} s\n",
            self.rate,
            self.duration_s,
            self.size,
            self.retry_delays_ms,
            self.fail_share * 100.0,
            self.published,
            self.confirmed,
            self.refused,
            self.failing,
            self.failures,
            self.retries,
            self.lateness_p50_ms,
            self.lateness_p99_ms,
            self.lateness_p999_ms,
            self.lateness_max_ms,
            self.early,
            self.early_max_ms,
            self.acked,
            self.dead_lettered,
            self.dead_letters_expected,
            self.count_mismatches,
            if self.complete {
                "complete"
            } else {
                "INCOMPLETE"
            },
            self.seconds,
        )
    }
}

/// Times message `seq` fails before it is acked; `delays + 1` means it fails after the last
/// delay and is dead-lettered. The same every run.
pub fn failures_of(seq: u64, share: f64, delays: usize) -> u32 {
    let h = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    let u = h as f64 / (1u64 << 53) as f64;
    if u >= share {
        return 0;
    }
    1 + (h % (delays as u64 + 1)) as u32
}

/// One message's retry state at the consumer.
struct Seen {
    failed: u32,
    deliveries: u32,
    /// When the redelivery is due at the earliest (set by a failure).
    due: Option<Instant>,
}

pub fn run(
    config: &RunConfig,
    broker: &str,
    abort: Arc<AtomicBool>,
) -> Result<RetryReport, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(run_async(config, broker, abort))
}

async fn run_async(
    config: &RunConfig,
    broker: &str,
    abort: Arc<AtomicBool>,
) -> Result<RetryReport, String> {
    let s = &config.scenario;
    let phase = &s.phases[0];
    let rate = phase.rate.unwrap_or(0.0);
    let delays = s
        .retry_delays_ms
        .clone()
        .unwrap_or_else(|| DEFAULT_DELAYS_MS.to_vec());
    let share = s.fail_share.unwrap_or(DEFAULT_FAIL_SHARE);
    let size = s.size.max() as usize;
    let total = (rate * phase.duration_s).round() as u64;
    let client = Client::connect(&*config.addr, ClientOptions::default())
        .await
        .map_err(|e| format!("connecting to {}: {e}", config.addr))?;
    let queue = format!("{}-retry", config.prefix);
    let dead = format!("{}-retry-dead", config.prefix);
    let durable = |arguments| QueueOptions {
        durable: s.durable,
        arguments,
        ..QueueOptions::default()
    };
    client
        .declare(&dead, durable(QueueArguments::default()))
        .await
        .map_err(|e| format!("declaring {dead}: {e}"))?;
    let arguments = QueueArguments {
        retry_delays_ms: delays.clone(),
        dead_letter_exchange: Some(String::new()),
        dead_letter_routing_key: Some(dead.clone()),
        ..QueueArguments::default()
    };
    client
        .declare(&queue, durable(arguments))
        .await
        .map_err(|e| format!("declaring {queue}: {e}"))?;
    let consume = ConsumeOptions {
        prefetch: s.prefetch,
        ..ConsumeOptions::default()
    };
    let mut consumer = client
        .consume(&queue, consume.clone())
        .await
        .map_err(|e| format!("consuming {queue}: {e}"))?;
    let mut dead_consumer = client
        .consume(&dead, consume)
        .await
        .map_err(|e| format!("consuming {dead}: {e}"))?;

    let confirmed = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let producer = {
        let (client, queue, confirmed, refused, published, abort) = (
            client.clone(),
            queue.clone(),
            confirmed.clone(),
            refused.clone(),
            published.clone(),
            abort.clone(),
        );
        let persistent = s.persistent;
        tokio::spawn(async move {
            for seq in 0..total {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                let intended = start + Duration::from_secs_f64(seq as f64 / rate);
                tokio::time::sleep_until(intended.into()).await;
                let mut body = vec![0u8; size];
                body[..8].copy_from_slice(&seq.to_le_bytes());
                let message = Message::new(Bytes::from(body)).persistent(persistent);
                match client.publish(&queue, message).await {
                    Ok(f) => {
                        published.fetch_add(1, Ordering::Relaxed);
                        let (confirmed, refused) = (confirmed.clone(), refused.clone());
                        tokio::spawn(async move {
                            match f.await {
                                Ok(_) => confirmed.fetch_add(1, Ordering::Relaxed),
                                Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                            };
                        });
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let mut r = RetryReport {
        scenario: config.name.clone(),
        broker: broker.to_string(),
        rate,
        duration_s: phase.duration_s,
        size: size as u32,
        retry_delays_ms: delays.clone(),
        fail_share: share,
        ..RetryReport::default()
    };
    let mut lateness = histogram();
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    let drain = Duration::from_secs_f64(s.drain_timeout_s);
    let produce_for = Duration::from_secs_f64(phase.duration_s);
    let tick = Duration::from_millis(50);
    loop {
        let settled = r.acked + r.dead_lettered + refused.load(Ordering::Relaxed);
        if producer.is_finished() && settled >= published.load(Ordering::Relaxed) {
            r.complete = true;
            break;
        }
        if abort.load(Ordering::Relaxed) || start.elapsed() > produce_for + drain {
            break;
        }
        tokio::select! {
            d = consumer.recv() => {
                let Some(d) = d else { return Err("the consumer was cancelled".into()) };
                let d = d.map_err(|e| format!("consumer: {e}"))?;
                let now = Instant::now();
                let seq = u64::from_le_bytes(d.body()[..8].try_into().expect("8 bytes"));
                let e = seen.entry(seq).or_insert(Seen { failed: 0, deliveries: 0, due: None });
                e.deliveries += 1;
                if d.delivery_count() != e.deliveries {
                    r.count_mismatches += 1;
                }
                if let Some(due) = e.due.take() {
                    r.retries += 1;
                    match now.checked_duration_since(due) {
                        Some(late) => {
                            lateness.saturating_record((late.as_micros() as u64).max(1));
                        }
                        None => {
                            r.early += 1;
                            let by = (due - now).as_secs_f64() * 1000.0;
                            r.early_max_ms = r.early_max_ms.max(by);
                        }
                    }
                }
                let fails = failures_of(seq, share, delays.len());
                if fails > 0 && e.failed == 0 {
                    r.failing += 1;
                    if fails as usize > delays.len() {
                        r.dead_letters_expected += 1;
                    }
                }
                if e.failed < fails {
                    let delay = delays.get(e.failed as usize).copied();
                    e.failed += 1;
                    r.failures += 1;
                    e.due = delay.map(|d| Instant::now() + Duration::from_millis(u64::from(d)));
                    // No answer asked: the client coalesces it with its neighbours.
                    drop(d.nack(true));
                } else {
                    seen.remove(&seq);
                    r.acked += 1;
                    drop(d.ack());
                }
            }
            d = dead_consumer.recv() => {
                let Some(d) = d else { return Err("the dead-letter consumer was cancelled".into()) };
                let d = d.map_err(|e| format!("dead-letter consumer: {e}"))?;
                let seq = u64::from_le_bytes(d.body()[..8].try_into().expect("8 bytes"));
                seen.remove(&seq);
                r.dead_lettered += 1;
                drop(d.ack());
            }
            _ = tokio::time::sleep(tick) => {}
        }
    }
    r.seconds = start.elapsed().as_secs_f64();
    r.published = published.load(Ordering::Relaxed);
    r.confirmed = confirmed.load(Ordering::Relaxed);
    r.refused = refused.load(Ordering::Relaxed);
    let ms = |q: f64| lateness.value_at_quantile(q) as f64 / 1000.0;
    if r.retries > 0 {
        r.lateness_p50_ms = ms(0.5);
        r.lateness_p99_ms = ms(0.99);
        r.lateness_p999_ms = ms(0.999);
        r.lateness_max_ms = lateness.max() as f64 / 1000.0;
    }
    producer.abort();
    if !config.keep_queues {
        for q in [&queue, &dead] {
            let _ = client.delete(q, false, false).await;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failing_share_and_the_dead_lettered_share_are_as_asked() {
        let n = 100_000u64;
        let fails: Vec<u32> = (0..n).map(|s| failures_of(s, 0.1, 3)).collect();
        let failing = fails.iter().filter(|f| **f > 0).count() as f64 / n as f64;
        let dead = fails.iter().filter(|f| **f == 4).count() as f64 / n as f64;
        assert!((failing - 0.1).abs() < 0.01, "{failing}");
        assert!((dead - 0.025).abs() < 0.005, "{dead}");
        assert!(fails.iter().all(|f| *f <= 4));
    }
}
