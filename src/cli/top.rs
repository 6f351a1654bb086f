//! `weir top [--interval SECS] [--iterations N] [--prefix P] [--rows N]`: a live view of the
//! broker in the terminal, for servers without a browser: per shard the journal's commit,
//! record and byte rates, per queue its depths, consumers, oldest-ready age and how fast its
//! depths change, deepest first.
//!
//! Contract: tokio current-thread runtime, one connection, read-only, built only on
//! `Client::status` and `Client::list_queues` (what `weir status` uses). Every `--interval` it
//! takes a sample; a rate is the difference between two samples over the time between them (the
//! first frame has none yet, shown `-`). On a terminal each frame clears the screen and redraws
//! (ANSI `ESC[H ESC[2J`: two escapes do not earn a dependency); into a pipe or file the frames
//! follow one another, so `--iterations N` makes it a script's sampler, and `--json` writes one
//! JSON object per sample. Memory is two samples: the previous one is dropped when the next
//! arrives. Failures reported: unreachable broker, a lost connection, no answer within
//! `REQUEST_TIMEOUT` (exit 1); Ctrl-C and SIGTERM end it with exit 0.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use weir_client::{BrokerStatus, Client, QueueInfo};

use super::output::{age, write_stdout, Table};
use super::queue::close;
use super::{answer, block_on, connect, ClientArgs, Failure};

/// The shortest refresh: below it a sample would mostly measure its own round trips.
const INTERVAL_MIN_S: f64 = 0.05;

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Seconds between samples (and redraws); fractions allowed, at least 0.05.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub interval: f64,
    /// Stop after this many samples (default: run until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
    /// Only queues whose name starts with this.
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub prefix: String,
    /// Most queue rows shown, the deepest (ready + unacked + delayed) first.
    #[arg(long, value_name = "N", default_value_t = 40,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rows: u32,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(args: TopArgs) -> ExitCode {
    block_on("top", top(args))
}

/// One look at the broker.
struct Sample {
    at: Instant,
    status: Option<BrokerStatus>,
    queues: Vec<QueueInfo>,
}

impl Sample {
    fn counter(&self, name: &str) -> Option<u64> {
        let status = self.status.as_ref()?;
        status
            .counters
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }
}

async fn top(args: TopArgs) -> Result<(), Failure> {
    if !args.interval.is_finite() || args.interval < INTERVAL_MIN_S {
        return Err(Failure::usage(format!(
            "--interval {}: give at least {INTERVAL_MIN_S} seconds",
            args.interval
        )));
    }
    let interval = Duration::from_secs_f64(args.interval);
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| Failure::failed(format!("installing the Ctrl-C handler: {e}")))?;
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Failure::failed(format!("installing the SIGTERM handler: {e}")))?;
    let client = tokio::select! {
        c = connect(&args.client, false) => c?,
        _ = interrupt.recv() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
    };
    let terminal = !args.client.json && std::io::stdout().is_terminal();
    let mut previous: Option<Sample> = None;
    let mut taken = 0u64;
    let outcome = loop {
        let sample = tokio::select! {
            s = take(&client, &args.prefix) => s,
            _ = interrupt.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
        };
        let sample = match sample {
            Ok(s) => s,
            Err(f) => break Err(f),
        };
        taken += 1;
        let text = if args.client.json {
            format!("{}\n", sample_json(&args, previous.as_ref(), &sample))
        } else {
            let frame = render(&args, &client, previous.as_ref(), &sample, taken);
            if terminal {
                format!("\x1b[H\x1b[2J{frame}")
            } else {
                format!("{frame}\n")
            }
        };
        if let Err(e) = write_stdout(text.as_bytes()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break Ok(());
            }
            break Err(Failure::failed(format!("writing standard output: {e}")));
        }
        previous = Some(sample);
        if args.iterations.is_some_and(|n| taken >= n) {
            break Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = interrupt.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
        }
    };
    close(client).await;
    outcome
}

async fn take(client: &Client, prefix: &str) -> Result<Sample, Failure> {
    let queues = answer("listing queues", client.list_queues(prefix)).await?;
    // A broker that does not answer `GetStatus` still gets its queues shown.
    let status = answer("asking for status", client.status()).await.ok();
    Ok(Sample {
        at: Instant::now(),
        status,
        queues,
    })
}

fn depth(q: &QueueInfo) -> u64 {
    q.messages_ready + q.messages_unacked + q.messages_delayed
}

/// Per second, from `before` to `now` over `secs`; `None` without a `before`.
fn rate(before: Option<u64>, now: u64, secs: f64) -> Option<f64> {
    let before = before?;
    (secs > 0.0).then(|| (now as f64 - before as f64) / secs)
}

fn show_rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r.abs() >= 100.0 => format!("{r:+.0}"),
        Some(r) => format!("{r:+.1}"),
    }
}

fn show_unsigned_rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r >= 100.0 => format!("{r:.0}"),
        Some(r) => format!("{r:.1}"),
    }
}

/// The queues to show, deepest first (then by name, so equal depths keep their places).
fn ordered(queues: &[QueueInfo], rows: u32) -> Vec<&QueueInfo> {
    let mut sorted: Vec<&QueueInfo> = queues.iter().collect();
    sorted.sort_by(|a, b| depth(b).cmp(&depth(a)).then_with(|| a.name.cmp(&b.name)));
    sorted.truncate(rows as usize);
    sorted
}

/// The journal counters a shard row shows, as (column, counter suffix).
const SHARD_RATES: [(&str, &str); 4] = [
    ("COMMITS/S", "journal.commits"),
    ("RECORDS/S", "journal.records"),
    ("BYTES/S", "journal.bytes_written"),
    ("FDATASYNCS/S", "journal.fdatasyncs"),
];

fn render(
    args: &TopArgs,
    client: &Client,
    previous: Option<&Sample>,
    now: &Sample,
    taken: u64,
) -> String {
    let server = client.server();
    let secs = previous.map_or(0.0, |p| now.at.duration_since(p.at).as_secs_f64());
    let mut out = format!(
        "weir top: weir {} at {}, {} shards, durability {}, every {}s (sample {taken})\n",
        server.broker_version,
        args.client.server,
        server.shard_count,
        format!("{:?}", server.durability).to_lowercase(),
        args.interval,
    );
    if let Some(b) = &now.status {
        out.push_str(&format!(
            "uptime {:.1} s, {} connections, {} queues\n",
            b.uptime_ms as f64 / 1000.0,
            b.connections,
            b.queues
        ));
    }
    out.push('\n');
    if now.status.is_some() {
        let mut columns = vec![("SHARD", false)];
        columns.extend(SHARD_RATES.iter().map(|(c, _)| (*c, true)));
        columns.extend([("READY", true), ("UNACKED", true), ("CACHE BYTES", true)]);
        let mut t = Table::new(&columns);
        for shard in 0..server.shard_count {
            let name = |what: &str| format!("shard.{shard}.{what}");
            let mut row = vec![shard.to_string()];
            for (_, counter) in SHARD_RATES {
                let value = now.counter(&name(counter)).unwrap_or(0);
                let before = previous.and_then(|p| p.counter(&name(counter)));
                row.push(show_unsigned_rate(rate(before, value, secs)));
            }
            for what in ["messages_ready", "messages_unacked", "cache_bytes"] {
                row.push(now.counter(&name(what)).unwrap_or(0).to_string());
            }
            t.row(row);
        }
        out.push_str(&t.render());
        out.push('\n');
    }
    if now.queues.is_empty() {
        out.push_str("no queues\n");
        return out;
    }
    let before: HashMap<&str, &QueueInfo> = previous
        .map(|p| p.queues.iter().map(|q| (q.name.as_str(), q)).collect())
        .unwrap_or_default();
    let mut t = Table::new(&[
        ("QUEUE", false),
        ("SHARD", true),
        ("READY", true),
        ("UNACKED", true),
        ("DELAYED", true),
        ("CONSUMERS", true),
        ("OLDEST READY", true),
        ("READY/S", true),
        ("UNACKED/S", true),
    ]);
    let shown = ordered(&now.queues, args.rows);
    for q in &shown {
        let was = before.get(q.name.as_str());
        t.row(vec![
            q.name.clone(),
            q.shard.to_string(),
            q.messages_ready.to_string(),
            q.messages_unacked.to_string(),
            q.messages_delayed.to_string(),
            q.consumers.to_string(),
            age(q.oldest_ready_age_ms),
            show_rate(rate(was.map(|w| w.messages_ready), q.messages_ready, secs)),
            show_rate(rate(
                was.map(|w| w.messages_unacked),
                q.messages_unacked,
                secs,
            )),
        ]);
    }
    out.push_str(&t.render());
    let hidden = now.queues.len() - shown.len();
    if hidden > 0 {
        out.push_str(&format!("... and {hidden} more queues (--rows)\n"));
    }
    out
}

fn sample_json(args: &TopArgs, previous: Option<&Sample>, now: &Sample) -> serde_json::Value {
    let secs = previous.map_or(0.0, |p| now.at.duration_since(p.at).as_secs_f64());
    let before: HashMap<&str, &QueueInfo> = previous
        .map(|p| p.queues.iter().map(|q| (q.name.as_str(), q)).collect())
        .unwrap_or_default();
    let queues: Vec<_> = ordered(&now.queues, args.rows)
        .into_iter()
        .map(|q| {
            let was = before.get(q.name.as_str());
            json!({
                "name": q.name,
                "shard": q.shard,
                "messages_ready": q.messages_ready,
                "messages_unacked": q.messages_unacked,
                "messages_delayed": q.messages_delayed,
                "consumers": q.consumers,
                "oldest_ready_age_ms": q.oldest_ready_age_ms,
                "messages_ready_per_s": rate(was.map(|w| w.messages_ready), q.messages_ready, secs),
                "messages_unacked_per_s":
                    rate(was.map(|w| w.messages_unacked), q.messages_unacked, secs),
            })
        })
        .collect();
    let shards: Vec<_> = now
        .status
        .as_ref()
        .map(|b| {
            (0..b.shard_count)
                .map(|shard| {
                    let mut v = json!({ "shard": shard });
                    for (_, counter) in SHARD_RATES {
                        let name = format!("shard.{shard}.{counter}");
                        let before = previous.and_then(|p| p.counter(&name));
                        let value = now.counter(&name).unwrap_or(0);
                        v[format!("{}_per_s", counter.replace('.', "_"))] =
                            json!(rate(before, value, secs));
                    }
                    v
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "interval_s": args.interval,
        "uptime_ms": now.status.as_ref().map(|b| b.uptime_ms),
        "connections": now.status.as_ref().map(|b| b.connections),
        "shards": shards,
        "queues": queues,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_over_time_and_absent_without_a_first_sample() {
        assert_eq!(rate(None, 10, 1.0), None);
        assert_eq!(rate(Some(10), 30, 2.0), Some(10.0));
        assert_eq!(rate(Some(30), 10, 2.0), Some(-10.0));
        assert_eq!(show_rate(Some(-10.0)), "-10.0");
        assert_eq!(show_rate(Some(1234.0)), "+1234");
        assert_eq!(show_unsigned_rate(None), "-");
    }
}
