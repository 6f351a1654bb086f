//! The report: the summary table, `results.json`, `.hgrm` percentile files and HdrHistogram
//! interval logs.
//!
//! Contract: runs on the main thread after the load threads have ended, from the merged
//! `Outcome`; pure formatting plus file writes into `--out DIR`. Every number carries what it
//! depends on (message size, batch, producers, consumers, queues, shards, pinning, fsync policy,
//! machine), as DESIGN.md §9 asks. File errors are returned with the path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

use crate::run::{BrokerFacts, Outcome, Sample};
use crate::scenario::{Kind, Scenario};
use crate::stats::{check, Check, Count, Metric};

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Percentiles.
    pub p50_us: u64,
    /// 90th.
    pub p90_us: u64,
    /// 99th.
    pub p99_us: u64,
    /// 99.9th.
    pub p999_us: u64,
    /// 99.99th.
    pub p9999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        Some(Latency {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            p9999_us: h.value_at_quantile(0.9999),
            max_us: h.max(),
        })
    }

    /// The report's columns: p50, p90, p99, p99.9, p99.99, max (µs).
    pub fn columns(&self) -> [u64; 6] {
        [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.p9999_us,
            self.max_us,
        ]
    }
}

/// One phase's numbers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PhaseResult {
    /// Its name.
    pub name: String,
    /// Start, s since the epoch.
    pub start_s: f64,
    /// How long it ran (a quiet phase that ended with the drain is shorter than planned).
    pub duration_s: f64,
    /// As written in the scenario.
    pub planned_duration_s: f64,
    /// Mean target publish rate (msgs/s); `None` for the closed loop.
    pub target_rate: Option<f64>,
    /// Messages handed to the client in this phase.
    pub sent: u64,
    /// Confirms received in this phase.
    pub confirmed: u64,
    /// Deliveries processed in this phase (rpc: replies).
    pub delivered: u64,
    /// sent / duration.
    pub sent_rate: f64,
    /// confirmed / duration.
    pub confirmed_rate: f64,
    /// delivered / duration.
    pub delivered_rate: f64,
    /// Per metric ("confirm", "end_to_end", "rpc"), for messages sent in this phase.
    pub latency: BTreeMap<String, Latency>,
}

/// Queue depth over the run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Backlog {
    /// Every queue was seen empty (nothing ready, nothing unacked) after publishing ended.
    pub drained: bool,
    /// From the end of the last publishing phase to that moment.
    pub drain_time_s: Option<f64>,
    /// End of the last publishing phase, s since the epoch.
    pub publishing_end_s: f64,
    /// The most messages ready at once (sampled).
    pub peak_ready: u64,
    /// When.
    pub peak_ready_at_s: f64,
    /// The oldest ready message's largest age seen.
    pub peak_oldest_ready_age_ms: u64,
    /// Once a second.
    pub samples: Vec<Sample>,
}

/// Messages per second, second by second.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Throughput {
    /// Second since the epoch.
    pub t_s: u64,
    /// Sent in that second.
    pub sent: u64,
    /// Confirmed in that second.
    pub confirmed: u64,
    /// Delivered in that second.
    pub delivered: u64,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    /// Scenario name.
    pub scenario: String,
    /// Its one-line description.
    pub description: String,
    /// The scenario as run (flags applied).
    pub settings: Scenario,
    /// The broker.
    pub broker: BrokerFacts,
    /// How the broker was started and pinned.
    pub broker_setup: String,
    /// Load threads and their pinning.
    pub loadgen_pinning: Vec<String>,
    /// The machine.
    pub machine: String,
    /// Per phase.
    pub phases: Vec<PhaseResult>,
    /// The loss check.
    pub check: Check,
    /// Publishes or requests that failed.
    pub publish_failures: u64,
    /// The first failure.
    pub first_failure: Option<String>,
    /// Queue depth.
    pub backlog: Backlog,
    /// Per-second throughput.
    pub throughput: Vec<Throughput>,
    /// Whole run, s.
    pub run_s: f64,
    /// Stopped by a signal.
    pub aborted: bool,
}

/// Builds the results from a finished run.
pub fn results(
    name: &str,
    s: &Scenario,
    o: &Outcome,
    broker_setup: &str,
    machine: &str,
) -> Results {
    let r = &o.recorder;
    let mut phases = Vec::new();
    for (i, p) in s.phases.iter().enumerate() {
        let start = o.phase_starts[i];
        let end = (start + p.duration_s).min(o.end_s).max(start);
        let dur = end - start;
        let counts = r.per_phase.get(i).copied().unwrap_or([0; 3]);
        let rate = |n: u64| if dur > 0.0 { n as f64 / dur } else { 0.0 };
        let mut latency = BTreeMap::new();
        for m in Metric::ALL {
            if let Some(l) = r.phases.get(i).and_then(|h| Latency::of(&h[m as usize])) {
                latency.insert(m.key().to_string(), l);
            }
        }
        phases.push(PhaseResult {
            name: p.name.clone(),
            start_s: start,
            duration_s: dur,
            planned_duration_s: p.duration_s,
            target_rate: (s.kind != Kind::Max).then(|| p.mean_rate()),
            sent: counts[Count::Sent as usize],
            confirmed: counts[Count::Confirmed as usize],
            delivered: counts[Count::Delivered as usize],
            sent_rate: rate(counts[Count::Sent as usize]),
            confirmed_rate: rate(counts[Count::Confirmed as usize]),
            delivered_rate: rate(counts[Count::Delivered as usize]),
            latency,
        });
    }
    let (mut peak_ready, mut peak_at, mut peak_age) = (0, 0.0, 0);
    for smp in &o.samples {
        if smp.ready > peak_ready {
            peak_ready = smp.ready;
            peak_at = smp.t_s;
        }
        peak_age = peak_age.max(smp.oldest_ready_age_ms.unwrap_or(0));
    }
    let throughput = r
        .per_second
        .iter()
        .enumerate()
        .map(|(t, c)| Throughput {
            t_s: t as u64,
            sent: c[0],
            confirmed: c[1],
            delivered: c[2],
        })
        .collect();
    Results {
        scenario: name.to_string(),
        description: s.description.clone(),
        settings: s.clone(),
        broker: o.broker.clone(),
        broker_setup: broker_setup.to_string(),
        loadgen_pinning: o.pinning.clone(),
        machine: machine.to_string(),
        phases,
        check: check(r, &o.queue_names, o.drained_at_s.is_some()),
        publish_failures: r.publish_failures,
        first_failure: r.first_failure.clone(),
        backlog: Backlog {
            drained: o.drained_at_s.is_some(),
            drain_time_s: o.drained_at_s.map(|t| (t - o.publishing_end_s).max(0.0)),
            publishing_end_s: o.publishing_end_s,
            peak_ready,
            peak_ready_at_s: peak_at,
            peak_oldest_ready_age_ms: peak_age,
            samples: o.samples.clone(),
        },
        throughput,
        run_s: o.end_s,
        aborted: o.aborted,
    }
}

fn ms(us: u64) -> String {
    let v = us as f64 / 1000.0;
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A description of the workload: what every number depends on.
pub fn workload_line(s: &Scenario) -> String {
    let mut w = format!(
        "kind {}, idiom {}, {} producer(s), {} consumer(s), {} queue(s), body {}, batch {}, \
         prefetch {}, ack batch {}, {} messages, {} queues",
        s.kind.name(),
        s.idiom.name(),
        s.producers,
        s.consumers,
        s.queues,
        s.size,
        s.batch,
        s.prefetch,
        s.ack_batch,
        if s.persistent {
            "persistent"
        } else {
            "transient"
        },
        if s.durable { "durable" } else { "transient" },
    );
    if let Some(x) = &s.exchange {
        let _ = write!(
            w,
            ", through a {} exchange (bindings {}; routing keys {})",
            format!("{:?}", x.kind).to_lowercase(),
            x.binding_keys.join(" "),
            x.routing_keys.join(" ")
        );
    }
    if let Some(r) = s.consumer_rate {
        let _ = write!(w, ", consumers capped at {r:.0} msgs/s each");
    }
    if let Some(p) = s.process_ms {
        let _ = write!(w, ", {p} ms of work per message");
    }
    if matches!(s.kind, Kind::Max | Kind::DrainAfterRestart) {
        let _ = write!(w, ", {} unconfirmed per producer", s.in_flight);
    }
    w
}

/// The summary printed at the end of a run.
pub fn summary(res: &Results) -> String {
    let mut out = String::new();
    let s = &res.settings;
    let _ = writeln!(out, "weir-loadgen: {}", res.scenario);
    if !res.description.is_empty() {
        let _ = writeln!(out, "  {}", res.description);
    }
    let _ = writeln!(
        out,
        "broker    weir {} at {}: {} shard(s), fsync {}; {}",
        res.broker.version, res.broker.addr, res.broker.shards, res.broker.fsync, res.broker_setup
    );
    let _ = writeln!(out, "loadgen   {}", res.loadgen_pinning.join("; "));
    let _ = writeln!(out, "workload  {}", workload_line(s));
    let _ = writeln!(out, "machine   {}", res.machine);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<10} {:>13} {:>9} {:>9} {:>11} {:>11}",
        "phase", "time (s)", "target/s", "sent/s", "confirmed/s", "delivered/s"
    );
    for p in &res.phases {
        let span = if p.duration_s + 1e-9 < p.planned_duration_s {
            format!("{:.1}-{:.1}*", p.start_s, p.start_s + p.duration_s)
        } else {
            format!("{:.1}-{:.1}", p.start_s, p.start_s + p.duration_s)
        };
        let _ = writeln!(
            out,
            "{:<10} {:>13} {:>9} {:>9.0} {:>11.0} {:>11.0}",
            p.name,
            span,
            p.target_rate
                .map_or("max".to_string(), |r| format!("{r:.0}")),
            p.sent_rate,
            p.confirmed_rate,
            p.delivered_rate
        );
    }
    if res
        .phases
        .iter()
        .any(|p| p.duration_s + 1e-9 < p.planned_duration_s)
    {
        let _ = writeln!(out, "  * ended early: the queues had drained");
    }
    let _ = writeln!(out);
    let clock = if s.kind == Kind::Max {
        "from the actual send (closed loop)"
    } else {
        "from the intended send time"
    };
    let _ = writeln!(
        out,
        "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        format!("latency (ms, {clock})"),
        "count",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "p99.99",
        "max"
    );
    for p in &res.phases {
        for m in Metric::ALL {
            let Some(l) = p.latency.get(m.key()) else {
                continue;
            };
            let c = l.columns();
            let _ = writeln!(
                out,
                "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                format!("{:<10} {}", p.name, m.label()),
                l.count,
                ms(c[0]),
                ms(c[1]),
                ms(c[2]),
                ms(c[3]),
                ms(c[4]),
                ms(c[5])
            );
        }
    }
    let _ = writeln!(out);
    let c = &res.check;
    let what = if s.kind == Kind::Rpc {
        "requests"
    } else if s.kind == Kind::Fanout || s.exchange.is_some() {
        "confirmed (per destination queue)"
    } else {
        "confirmed"
    };
    let delivered = if s.kind == Kind::Rpc {
        "replied"
    } else {
        "delivered"
    };
    let mut extra = String::new();
    if c.unconfirmed_delivered > 0 {
        let _ = write!(
            extra,
            ", delivered without a confirm {}",
            c.unconfirmed_delivered
        );
    }
    if c.undelivered_not_drained > 0 {
        let _ = write!(
            extra,
            ", not delivered {} (the queues had not drained: still queued or lost, not counted)",
            c.undelivered_not_drained
        );
    }
    if c.foreign > 0 {
        let _ = write!(extra, ", foreign bodies {}", c.foreign);
    }
    let _ = writeln!(
        out,
        "check     {what} {}, {delivered} {} (distinct; {} deliveries), lost {}, duplicated {}, \
         redelivered {}, out of order {}, publish failures {}{extra}",
        c.confirmed,
        c.delivered_unique,
        c.deliveries,
        c.lost,
        c.duplicated,
        c.redelivered,
        c.out_of_order,
        res.publish_failures,
    );
    for d in &c.details {
        let _ = writeln!(out, "          {d}");
    }
    if let Some(f) = &res.first_failure {
        let _ = writeln!(out, "          first failure: {f}");
    }
    let b = &res.backlog;
    let _ = writeln!(
        out,
        "backlog   peak {} ready at {:.0} s, oldest ready message up to {:.1} s old; {}",
        b.peak_ready,
        b.peak_ready_at_s,
        b.peak_oldest_ready_age_ms as f64 / 1000.0,
        match b.drain_time_s {
            Some(t) => format!(
                "drained {t:.2} s after the last publishing phase ended (at {:.1} s)",
                b.publishing_end_s
            ),
            None => "NOT drained when the run ended".to_string(),
        }
    );
    let _ = writeln!(
        out,
        "run       {:.1} s{}",
        res.run_s,
        if res.aborted {
            " (stopped by a signal)"
        } else {
            ""
        }
    );
    out
}

/// The same format as HdrHistogram's `outputPercentileDistribution` (5 ticks per half
/// distance), values in milliseconds: readable by HdrHistogram's plotter.
pub fn hgrm(h: &Histogram<u64>) -> String {
    const SCALE: f64 = 1000.0; // recorded in µs, written in ms
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / SCALE;
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value:12.3} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
        }
    }
    let sub_buckets = 2u64.pow((2.0 * 10f64.powi(i32::from(h.sigfig()))).log2().ceil() as u32);
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / SCALE,
        h.stdev() / SCALE
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / SCALE,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    out
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Writes `results.json`, `summary.txt`, the `.hgrm` files and the interval logs into `dir`;
/// returns the files written.
pub fn write_files(dir: &Path, res: &Results, o: &Outcome) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    let json = serde_json::to_vec_pretty(res).map_err(|e| format!("encoding results: {e}"))?;
    write(&dir.join("results.json"), &json)?;
    files.push("results.json".to_string());
    write(&dir.join("summary.txt"), summary(res).as_bytes())?;
    files.push("summary.txt".to_string());
    for (i, p) in res.phases.iter().enumerate() {
        for m in Metric::ALL {
            let h = &o.recorder.phases[i][m as usize];
            if h.is_empty() {
                continue;
            }
            let name = format!("{}-{}.hgrm", p.name, m.key());
            write(&dir.join(&name), hgrm(h).as_bytes())?;
            files.push(name);
        }
    }
    for m in Metric::ALL {
        if o.recorder.intervals.iter().all(|i| i[m as usize].is_none()) {
            continue;
        }
        let name = format!("{}.hlog", m.key());
        let mut buf = Vec::new();
        let mut serializer = V2DeflateSerializer::new();
        {
            let mut writer = IntervalLogWriterBuilder::new()
                .add_comment(&format!(
                    "weir-loadgen {}: {} ({}), values in microseconds, one interval per second",
                    res.scenario,
                    m.label(),
                    m.key()
                ))
                .with_start_time(o.started_at)
                .with_base_time(o.started_at)
                .with_max_value_divisor(1000.0)
                .begin_log_with(&mut buf, &mut serializer)
                .map_err(|e| format!("{name}: {e}"))?;
            for (sec, hs) in o.recorder.intervals.iter().enumerate() {
                if let Some(h) = &hs[m as usize] {
                    writer
                        .write_histogram(
                            h,
                            std::time::Duration::from_secs(sec as u64),
                            std::time::Duration::from_secs(1),
                            None,
                        )
                        .map_err(|e| format!("{name}: {e}"))?;
                }
            }
        }
        write(&dir.join(&name), &buf)?;
        files.push(name);
    }
    Ok(files)
}

/// Compare mode: two runs of one scenario, phase by phase, with B/A ratios.
pub fn compare(a_label: &str, a: &Results, b_label: &str, b: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compare   {}: A = {a_label}, B = {b_label}, run one after the other",
        a.scenario
    );
    let _ = writeln!(out, "A         {}", a.broker_setup);
    let _ = writeln!(out, "B         {}", b.broker_setup);
    let _ = writeln!(out, "workload  {}", workload_line(&a.settings));
    let _ = writeln!(out, "machine   {}", a.machine);
    let _ = writeln!(
        out,
        "fsync     A: {}, B: {}; shards A: {}, B: {}; loadgen {}",
        a.broker.fsync,
        b.broker.fsync,
        a.broker.shards,
        b.broker.shards,
        a.loadgen_pinning.join("; ")
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<42} {:>12} {:>12} {:>8}",
        "phase / measure", "A", "B", "B/A"
    );
    let ratio = |x: f64, y: f64| {
        if x > 0.0 {
            format!("{:.2}", y / x)
        } else {
            "-".to_string()
        }
    };
    for (pa, pb) in a.phases.iter().zip(&b.phases) {
        let _ = writeln!(out, "{}", pa.name);
        for (what, x, y) in [
            ("sent/s", pa.sent_rate, pb.sent_rate),
            ("confirmed/s", pa.confirmed_rate, pb.confirmed_rate),
            ("delivered/s", pa.delivered_rate, pb.delivered_rate),
        ] {
            let _ = writeln!(
                out,
                "  {:<40} {:>12.0} {:>12.0} {:>8}",
                what,
                x,
                y,
                ratio(x, y)
            );
        }
        for m in Metric::ALL {
            let (Some(la), Some(lb)) = (pa.latency.get(m.key()), pb.latency.get(m.key())) else {
                continue;
            };
            for (i, q) in ["p50", "p90", "p99", "p99.9", "p99.99", "max"]
                .iter()
                .enumerate()
            {
                let (x, y) = (la.columns()[i], lb.columns()[i]);
                let _ = writeln!(
                    out,
                    "  {:<40} {:>12} {:>12} {:>8}",
                    format!("{} {q} (ms)", m.label()),
                    ms(x),
                    ms(y),
                    ratio(x as f64, y as f64)
                );
            }
        }
    }
    let _ = writeln!(out);
    for (label, r) in [("A", a), ("B", b)] {
        let _ = writeln!(
            out,
            "{label}: lost {}, duplicated {}, out of order {}, publish failures {}; {}",
            r.check.lost,
            r.check.duplicated,
            r.check.out_of_order,
            r.publish_failures,
            match r.backlog.drain_time_s {
                Some(t) => format!("drained {t:.2} s after publishing ended"),
                None => "not drained".into(),
            }
        );
    }
    out
}
