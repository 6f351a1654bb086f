//! What the client commands print: aligned tables and key/value blocks for people, JSON
//! values for scripts, and stdout writes that fail with a `Failure` instead of panicking
//! (`println!` panics when stdout is closed).
//!
//! Contract: pure formatting plus `write_stdout`; no runtime, no client calls. JSON field names
//! are the schema's (`messages_ready`, `oldest_ready_age_ms`, ...) so scripts can read the
//! protocol's documentation for their meaning.

use std::io::Write;

use serde_json::{json, Value};
use weir_client::QueueInfo;

use super::Failure;

/// Writes `text` to stdout and flushes, so that what the caller does next (an ack) happens
/// only once the text has left this process.
pub(crate) fn write_stdout(text: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text)?;
    out.flush()
}

/// Prints a result: the text for a person, or the JSON value on one line.
pub(crate) fn print(json: bool, human: &str, value: &Value) -> Result<(), Failure> {
    let text = if json {
        format!("{value}\n")
    } else {
        human.to_string()
    };
    write_stdout(text.as_bytes())
        .map_err(|e| Failure::failed(format!("writing standard output: {e}")))
}

/// Columns separated by two spaces, each as wide as its widest cell; numeric columns are
/// right-aligned so that digits line up.
pub(crate) struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `columns`: (header, right-aligned).
    pub(crate) fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            header: columns.iter().map(|c| c.0).collect(),
            right: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                if self.right[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The queue-list table: one row per queue.
pub(crate) fn queue_table(queues: &[QueueInfo]) -> String {
    let mut t = Table::new(&[
        ("NAME", false),
        ("SHARD", true),
        ("DURABLE", false),
        ("READY", true),
        ("UNACKED", true),
        ("CONSUMERS", true),
        ("OLDEST READY", true),
    ]);
    for q in queues {
        t.row(vec![
            q.name.clone(),
            q.shard.to_string(),
            yes_no(q.durable).into(),
            q.messages_ready.to_string(),
            q.messages_unacked.to_string(),
            q.consumers.to_string(),
            age(q.oldest_ready_age_ms),
        ]);
    }
    t.render()
}

/// One queue as `key  value` lines.
pub(crate) fn queue_block(q: &QueueInfo) -> String {
    let mut flags = Vec::new();
    if q.exclusive {
        flags.push("exclusive");
    }
    if q.auto_delete {
        flags.push("auto-delete");
    }
    let kind = format!(
        "{}{}{}",
        if q.durable { "durable" } else { "transient" },
        if flags.is_empty() { "" } else { ", " },
        flags.join(", ")
    );
    let mut lines = vec![
        ("queue", q.name.clone()),
        ("kind", kind),
        ("shard", q.shard.to_string()),
        ("ready", q.messages_ready.to_string()),
        ("unacked", q.messages_unacked.to_string()),
    ];
    if q.messages_delayed > 0 {
        lines.push(("delayed", q.messages_delayed.to_string()));
    }
    if q.messages_retrying > 0 || !q.arguments.retry_delays_ms.is_empty() {
        lines.push(("retrying", q.messages_retrying.to_string()));
    }
    lines.push(("ready bytes", q.bytes_ready.to_string()));
    lines.push(("consumers", q.consumers.to_string()));
    lines.push(("oldest ready", age(q.oldest_ready_age_ms)));
    let a = &q.arguments;
    let optional = [
        ("message ttl", a.message_ttl_ms.map(|v| format!("{v}ms"))),
        ("max length", a.max_length.map(|v| v.to_string())),
        (
            "max length bytes",
            a.max_length_bytes.map(|v| v.to_string()),
        ),
        ("max deliveries", a.max_deliveries.map(|v| v.to_string())),
        (
            "dead letters",
            a.dead_letter_exchange.as_ref().map(|x| {
                let key = a
                    .dead_letter_routing_key
                    .as_deref()
                    .map_or("their own key".to_string(), |k| format!("key '{k}'"));
                format!("exchange '{x}', {key}")
            }),
        ),
        (
            "expires",
            a.expires_ms.map(|v| format!("after {v}ms unused")),
        ),
        (
            "expires in",
            q.expires_in_ms.map(|v| format!("{v}ms unless used")),
        ),
        (
            "single active",
            a.single_active_consumer.then(|| {
                q.active_consumer
                    .as_ref()
                    .map_or("no consumer".to_string(), |t| {
                        format!("active consumer '{t}'")
                    })
            }),
        ),
        (
            "retry delays",
            (!a.retry_delays_ms.is_empty()).then(|| {
                let ms: Vec<String> = a.retry_delays_ms.iter().map(|d| format!("{d}ms")).collect();
                ms.join(", ")
            }),
        ),
        (
            "priority max",
            (a.priority_max > 0).then(|| a.priority_max.to_string()),
        ),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            lines.push((k, v));
        }
    }
    if a.max_length.is_some() || a.max_length_bytes.is_some() {
        let overflow = match a.overflow {
            weir_client::Overflow::DropHead => "drop-head",
            weir_client::Overflow::RejectPublish => "reject-publish",
        };
        lines.push(("overflow", overflow.to_string()));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    lines
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

pub(crate) fn queue_json(q: &QueueInfo) -> Value {
    json!({
        "name": q.name,
        "shard": q.shard,
        "durable": q.durable,
        "exclusive": q.exclusive,
        "auto_delete": q.auto_delete,
        "messages_ready": q.messages_ready,
        "messages_unacked": q.messages_unacked,
        "messages_delayed": q.messages_delayed,
        "bytes_ready": q.bytes_ready,
        "consumers": q.consumers,
        "oldest_ready_age_ms": q.oldest_ready_age_ms,
        "message_ttl_ms": q.arguments.message_ttl_ms,
        "max_length": q.arguments.max_length,
        "max_length_bytes": q.arguments.max_length_bytes,
        "max_deliveries": q.arguments.max_deliveries,
        "dead_letter_exchange": q.arguments.dead_letter_exchange,
        "dead_letter_routing_key": q.arguments.dead_letter_routing_key,
        "expires_ms": q.arguments.expires_ms,
        "single_active_consumer": q.arguments.single_active_consumer,
        "expires_in_ms": q.expires_in_ms,
        "active_consumer": q.active_consumer,
        "messages_retrying": q.messages_retrying,
        "retry_delays_ms": q.arguments.retry_delays_ms,
        "priority_max": q.arguments.priority_max,
    })
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// An age in the largest unit that keeps it short: `850ms`, `12.3s`, `4m05s`, `3h20m`; `-` for
/// none.
pub(crate) fn age(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return "-".into();
    };
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}.{}s", ms / 1000, (ms % 1000) / 100),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(None), "-");
        assert_eq!(age(Some(850)), "850ms");
        assert_eq!(age(Some(12_345)), "12.3s");
        assert_eq!(age(Some(245_000)), "4m05s");
        assert_eq!(age(Some(12_000_000)), "3h20m");
    }

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let mut t = Table::new(&[("NAME", false), ("READY", true)]);
        t.row(vec!["orders".into(), "7".into()]);
        t.row(vec!["a".into(), "12345".into()]);
        assert_eq!(t.render(), "NAME    READY\norders      7\na       12345\n");
    }
}
