//! `GET /metrics`: the snapshot in the OpenMetrics text format (Prometheus scrapes it), encoded
//! by prometheus-client through a collector over the snapshot.
//!
//! Contract: on the admin thread; reads one shared snapshot (`link::Snapshot`) and keeps
//! nothing. Names follow Prometheus' conventions: `weir_` first, base units (seconds, bytes),
//! counters end in `_total`. Per queue, `{queue, shard}`-labelled series for at most
//! `admin_metrics_queues_max` queues, the first by name (the rest counted in
//! `weir_metrics_queues_omitted`). Per shard, every counter of `GetStatus` (`shard.N.what`)
//! becomes `weir_shard_what{shard}`, a gauge or a counter as the broker marks it, and
//! `shard.N.limit_hit.LIMIT` becomes `weir_limit_hits_total{limit, shard}`; every histogram
//! (`journal.commit_latency_us`) becomes `weir_journal_commit_latency_seconds{shard}`, its
//! buckets converted to seconds. A part the broker refuses (an older broker) is left out, and
//! `weir_up` says whether the broker answered at all.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use weir_client::{BrokerStatus, Histogram, QueueInfo};

use super::link::Snapshot;
use super::Admin;

/// The content type of what `encode` writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) async fn scrape(State(admin): State<Arc<Admin>>) -> Response {
    let snapshot = if admin.shards_ready.load(Ordering::Acquire) >= admin.shard_count {
        Some(admin.link.snapshot().await)
    } else {
        None
    };
    // A scrape of the snapshot the last one rendered gets the same text: a scrape storm costs
    // one rendering per snapshot, and the rest is HTTP.
    let mut rendered = admin.rendered.lock().await;
    if let (Some(s), Some((of, text))) = (&snapshot, rendered.as_ref()) {
        if Arc::ptr_eq(s, of) {
            return ([(header::CONTENT_TYPE, OPENMETRICS)], text.clone()).into_response();
        }
    }
    let view = View {
        snapshot: snapshot.as_deref(),
        shard_count: admin.shard_count,
        shards_ready: admin.shards_ready.load(Ordering::Acquire),
        uptime_s: admin.started.elapsed().as_secs_f64(),
        queues_max: admin.limits.admin_metrics_queues_max as usize,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Collected(render_all(&view))));
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => {
            let text = axum::body::Bytes::from(text);
            if let Some(s) = snapshot {
                *rendered = Some((s, text.clone()));
            }
            ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        )
            .into_response(),
    }
}

/// What one scrape renders from.
struct View<'a> {
    snapshot: Option<&'a Snapshot>,
    shard_count: u16,
    shards_ready: u16,
    uptime_s: f64,
    queues_max: usize,
}

/// One metric family: name (without `_total` or unit), help, type, unit, samples.
struct Family {
    name: String,
    help: String,
    kind: MetricType,
    unit: Option<Unit>,
    samples: Vec<(Labels, Value)>,
}

enum Value {
    Gauge(f64),
    Counter(u64),
    /// Sum, count, and per-bucket (not cumulative) counts by upper bound.
    Histogram(f64, u64, Vec<(f64, u64)>),
}

/// Labels in order; values are escaped as the text format requires.
#[derive(Clone, Debug, Default)]
struct Labels(Vec<(&'static str, String)>);

struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        for (k, v) in &self.0 {
            (*k, Escaped(v)).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Collected(Vec<Family>);

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)
    }
}

impl prometheus_client::collector::Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let mut metric = encoder.encode_descriptor(
                &family.name,
                &family.help,
                family.unit.as_ref(),
                family.kind,
            )?;
            for (labels, value) in &family.samples {
                let mut sample = metric.encode_family(labels)?;
                match value {
                    Value::Gauge(v) => sample.encode_gauge(v)?,
                    Value::Counter(v) => sample
                        .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
                            v, None,
                        )?,
                    Value::Histogram(sum, count, buckets) => {
                        sample.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            *sum, *count, buckets, None,
                        )?
                    }
                }
            }
        }
        Ok(())
    }
}

fn gauge(name: &str, help: &str, unit: Option<Unit>) -> Family {
    Family {
        name: name.to_string(),
        help: help.to_string(),
        kind: MetricType::Gauge,
        unit,
        samples: Vec::new(),
    }
}

fn counter(name: &str, help: &str) -> Family {
    Family {
        name: name.to_string(),
        help: help.to_string(),
        kind: MetricType::Counter,
        unit: None,
        samples: Vec::new(),
    }
}

fn render_all(view: &View<'_>) -> Vec<Family> {
    let mut out = Vec::new();
    let status = view.snapshot.and_then(|s| s.status.as_ref().ok());
    let mut up = gauge(
        "weir_up",
        "1 when the admin listener's broker answered this scrape's status request",
        None,
    );
    up.samples.push((
        Labels::default(),
        Value::Gauge(f64::from(u8::from(status.is_some()))),
    ));
    out.push(up);
    let mut ready = gauge(
        "weir_shards_ready",
        "Shards that have recovered their journals and accept",
        None,
    );
    ready.samples.push((
        Labels::default(),
        Value::Gauge(f64::from(view.shards_ready)),
    ));
    out.push(ready);
    let mut count = gauge("weir_shards", "Shards the broker runs", None);
    count
        .samples
        .push((Labels::default(), Value::Gauge(f64::from(view.shard_count))));
    out.push(count);
    let mut uptime = gauge(
        "weir_uptime",
        "Time since the broker process started",
        Some(Unit::Seconds),
    );
    uptime
        .samples
        .push((Labels::default(), Value::Gauge(view.uptime_s)));
    out.push(uptime);
    if let Some(status) = status {
        shard_families(status, &mut out);
        histogram_families(&status.histograms, &mut out);
    }
    if let Some(Ok(queues)) = view.snapshot.map(|s| &s.queues) {
        queue_families(queues, view.queues_max, &mut out);
    }
    out
}

/// Gauges among `GetStatus` counters, for a broker that does not mark them.
const KNOWN_GAUGES: &[&str] = &[
    "connections",
    "queues",
    "messages_ready",
    "messages_unacked",
    "consumers",
    "exchanges",
    "bindings",
    "cache_bytes",
    "cache_bytes_max",
    "journal.segments",
];

/// `[a-zA-Z0-9_]`, everything else `_`.
fn metric_name(parts: &str) -> String {
    parts
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn shard_families(status: &BrokerStatus, out: &mut Vec<Family>) {
    // name -> family, in name order so each family's samples stay together.
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (full, value) in &status.counters {
        let (shard, what) = match full.strip_prefix("shard.").and_then(|r| r.split_once('.')) {
            Some((n, what)) if n.parse::<u16>().is_ok() => (Some(n), what),
            _ => (None, full.as_str()),
        };
        let is_gauge = if status.gauges.is_empty() {
            KNOWN_GAUGES.contains(&what)
        } else {
            status.gauges.contains(full)
        };
        let mut labels = Labels::default();
        let name = if let Some(limit) = what
            .strip_prefix("limit_hit.")
            .or_else(|| what.strip_prefix("limit_hits."))
        {
            labels.0.push(("limit", limit.to_string()));
            "weir_limit_hits".to_string()
        } else {
            let base = metric_name(what);
            let base = base.strip_suffix("_total").unwrap_or(&base).to_string();
            match shard {
                Some(_) => format!("weir_shard_{base}"),
                None => format!("weir_{base}"),
            }
        };
        if let Some(n) = shard {
            labels.0.push(("shard", n.to_string()));
        }
        let family = families.entry(name.clone()).or_insert_with(|| {
            let help = format!("GetStatus counter shard.N.{what}");
            if is_gauge {
                gauge(&name, &help, None)
            } else {
                counter(&name, &help)
            }
        });
        let v = match family.kind {
            MetricType::Gauge => Value::Gauge(*value as f64),
            _ => Value::Counter(*value),
        };
        family.samples.push((labels, v));
    }
    out.extend(families.into_values());
}

/// `journal.commit_latency_us` -> (`weir_journal_commit_latency`, units per second). A divisor,
/// not a factor: 100 / 1e6 is 0.0001 exactly as printed, 100 * 1e-6 is not.
fn histogram_name(name: &str) -> (String, f64) {
    let (base, scale) = [("_ns", 1e9), ("_us", 1e6), ("_ms", 1e3), ("_s", 1.0)]
        .iter()
        .find_map(|(suffix, scale)| name.strip_suffix(suffix).map(|b| (b, *scale)))
        .unwrap_or((name, 1.0));
    (format!("weir_{}", metric_name(base)), scale)
}

fn histogram_families(histograms: &[Histogram], out: &mut Vec<Family>) {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for h in histograms {
        let (name, scale) = histogram_name(&h.name);
        let family = families.entry(name.clone()).or_insert_with(|| Family {
            help: format!("{} recorded by each shard, in seconds", h.name),
            name,
            kind: MetricType::Histogram,
            unit: Some(Unit::Seconds),
            samples: Vec::new(),
        });
        // The wire's buckets are cumulative; the encoder wants each bucket's own count, and
        // the last, +Inf, as f64::MAX.
        let mut buckets = Vec::with_capacity(h.buckets.len() + 1);
        let mut below = 0;
        for &(le, cumulative) in &h.buckets {
            buckets.push((le as f64 / scale, cumulative.saturating_sub(below)));
            below = below.max(cumulative);
        }
        buckets.push((f64::MAX, h.count.saturating_sub(below)));
        let labels = Labels(vec![("shard", h.shard.to_string())]);
        family.samples.push((
            labels,
            Value::Histogram(h.sum as f64 / scale, h.count, buckets),
        ));
    }
    out.extend(families.into_values());
}

fn queue_families(queues: &[QueueInfo], max: usize, out: &mut Vec<Family>) {
    let mut sorted: Vec<&QueueInfo> = queues.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let omitted = sorted.len().saturating_sub(max);
    sorted.truncate(max);
    let mut omitted_family = gauge(
        "weir_metrics_queues_omitted",
        "Queues left out of this scrape's per-queue series (past admin_metrics_queues_max, by name)",
        None,
    );
    omitted_family
        .samples
        .push((Labels::default(), Value::Gauge(omitted as f64)));
    out.push(omitted_family);
    type Get = fn(&QueueInfo) -> Option<f64>;
    let gauges: [(&str, &str, Option<Unit>, Get); 9] = [
        (
            "weir_queue_messages_ready",
            "Messages ready for delivery",
            None,
            |q| Some(q.messages_ready as f64),
        ),
        (
            "weir_queue_messages_unacked",
            "Messages delivered and not yet settled",
            None,
            |q| Some(q.messages_unacked as f64),
        ),
        (
            "weir_queue_messages_delayed",
            "Messages waiting for their delivery time",
            None,
            |q| Some(q.messages_delayed as f64),
        ),
        (
            "weir_queue_messages_retrying",
            "Messages waiting for a retry",
            None,
            |q| Some(q.messages_retrying as f64),
        ),
        (
            "weir_queue_bytes_ready",
            "Bytes of the ready messages",
            None,
            |q| Some(q.bytes_ready as f64),
        ),
        (
            "weir_queue_bytes_unacked",
            "Bytes of the unacked messages",
            None,
            |q| Some(q.bytes_unacked as f64),
        ),
        (
            "weir_queue_oldest_ready_age",
            "Age of the oldest ready message (absent: none ready)",
            Some(Unit::Seconds),
            |q| q.oldest_ready_age_ms.map(|ms| ms as f64 / 1000.0),
        ),
        (
            "weir_queue_consumers",
            "Consumers of the queue",
            None,
            |q| Some(f64::from(q.consumers)),
        ),
        (
            "weir_queue_up",
            "1 for every queue with series in this scrape",
            None,
            |_| Some(1.0),
        ),
    ];
    for (name, help, unit, get) in gauges {
        let mut family = gauge(name, help, unit);
        for q in &sorted {
            if let Some(v) = get(q) {
                family.samples.push((queue_labels(q), Value::Gauge(v)));
            }
        }
        out.push(family);
    }
    type Count = fn(&QueueInfo) -> u64;
    let counters: [(&str, &str, Count); 8] = [
        (
            "weir_queue_published",
            "Messages stored in the queue",
            |q| q.messages_published,
        ),
        (
            "weir_queue_delivered",
            "Deliveries to consumers and Gets",
            |q| q.messages_delivered,
        ),
        (
            "weir_queue_redelivered",
            "Deliveries of messages delivered before",
            |q| q.messages_redelivered,
        ),
        ("weir_queue_acked", "Messages acked", |q| q.messages_acked),
        ("weir_queue_nacked", "Messages nacked or rejected", |q| {
            q.messages_nacked
        }),
        ("weir_queue_dead_lettered", "Messages dead-lettered", |q| {
            q.messages_dead_lettered
        }),
        ("weir_queue_expired", "Messages expired (TTL)", |q| {
            q.messages_expired
        }),
        (
            "weir_queue_dropped",
            "Messages dropped (overflow, purge)",
            |q| q.messages_dropped,
        ),
    ];
    for (name, help, get) in counters {
        let mut family = counter(name, help);
        for q in &sorted {
            family
                .samples
                .push((queue_labels(q), Value::Counter(get(q))));
        }
        out.push(family);
    }
}

fn queue_labels(q: &QueueInfo) -> Labels {
    Labels(vec![
        ("queue", q.name.clone()),
        ("shard", q.shard.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(families: Vec<Family>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Collected(families)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn label_values_are_escaped() {
        let mut f = gauge("weir_x", "x", None);
        f.samples.push((
            Labels(vec![("queue", "a\"b\\c\nd".to_string())]),
            Value::Gauge(1.0),
        ));
        let text = encode(vec![f]);
        assert!(text.contains(r#"weir_x{queue="a\"b\\c\nd"} 1"#), "{text}");
    }

    #[test]
    fn histograms_are_converted_to_seconds_with_per_bucket_counts() {
        let h = Histogram {
            name: "journal.commit_latency_us".into(),
            shard: 1,
            count: 10,
            sum: 5000,
            buckets: vec![(100, 2), (1000, 9)],
            p50: 0,
            p99: 0,
            p999: 0,
            max: 0,
        };
        let mut out = Vec::new();
        histogram_families(&[h], &mut out);
        let text = encode(out);
        assert!(
            text.contains("# TYPE weir_journal_commit_latency_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                "weir_journal_commit_latency_seconds_bucket{le=\"0.0001\",shard=\"1\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("weir_journal_commit_latency_seconds_bucket{le=\"+Inf\",shard=\"1\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("weir_journal_commit_latency_seconds_sum{shard=\"1\"} 0.005"),
            "{text}"
        );
    }

    #[test]
    fn status_counters_become_shard_series_and_limit_hits() {
        let status = BrokerStatus {
            broker_version: "0".into(),
            shard_count: 2,
            uptime_ms: 1,
            connections: 0,
            queues: 0,
            counters: vec![
                ("shard.0.connections".into(), 3),
                ("shard.1.connections".into(), 4),
                ("shard.0.journal.commits".into(), 7),
                ("shard.1.limit_hit.outbox_bytes_max".into(), 2),
            ],
            gauges: ["shard.0.connections", "shard.1.connections"]
                .map(String::from)
                .into(),
            histograms: vec![],
            shards_ready: 2,
        };
        let mut out = Vec::new();
        shard_families(&status, &mut out);
        let text = encode(out);
        assert!(
            text.contains("# TYPE weir_shard_connections gauge"),
            "{text}"
        );
        assert!(
            text.contains("weir_shard_connections{shard=\"1\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("weir_shard_journal_commits_total{shard=\"0\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("weir_limit_hits_total{limit=\"outbox_bytes_max\",shard=\"1\"} 2"),
            "{text}"
        );
    }
}
