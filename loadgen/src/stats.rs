//! What a load thread measures: HDR histograms per phase, per-second counts and interval
//! histograms, and the ledger of which (producer, sequence) was confirmed and delivered.
//!
//! Contract: each load thread owns one `Recorder` (no sharing, no locks on the hot path); the
//! main thread merges them when the threads have ended. The message header is written and read
//! here: `MAGIC`, producer, sequence, intended send time (ns since the run's epoch, shared by
//! every thread), phase, routing key index. A body that does not start with the magic (someone else's
//! message in the queue) is counted as foreign, never trusted.

use std::collections::HashMap;

use hdrhistogram::Histogram;

use crate::scenario::HEADER_LEN;

/// "WLG1": marks a body as written by this load generator.
pub const MAGIC: u32 = 0x3147_4c57;

/// The histograms a phase has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Intended send -> the broker's confirm seen by the producer.
    Confirm,
    /// Intended send -> the consumer processing the message.
    EndToEnd,
    /// Intended send -> the reply seen by the requester.
    Rpc,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 3] = [Metric::Confirm, Metric::EndToEnd, Metric::Rpc];

    /// Used in file names and JSON keys.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Confirm => "confirm",
            Metric::EndToEnd => "end_to_end",
            Metric::Rpc => "rpc",
        }
    }

    /// Used in tables and pictures.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Confirm => "publish -> confirm",
            Metric::EndToEnd => "publish -> delivery",
            Metric::Rpc => "request -> reply",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Per-second counters of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Messages handed to the client to publish.
    Sent = 0,
    /// Confirms received.
    Confirmed = 1,
    /// Deliveries processed (rpc: replies received).
    Delivered = 2,
}

/// The header at the start of every body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Which producer sent it.
    pub producer: u32,
    /// That producer's sequence number, from 0.
    pub seq: u64,
    /// Intended send time, ns since the run's epoch.
    pub intended_ns: u64,
    /// The phase it was sent in.
    pub phase: u16,
    /// Which of its producer's routing keys it was published with (0 without an exchange).
    pub route: u16,
}

impl Header {
    /// Writes the header into the first `HEADER_LEN` bytes of `body`.
    pub fn write(&self, body: &mut [u8]) {
        body[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        body[4..8].copy_from_slice(&self.producer.to_le_bytes());
        body[8..16].copy_from_slice(&self.seq.to_le_bytes());
        body[16..24].copy_from_slice(&self.intended_ns.to_le_bytes());
        body[24..26].copy_from_slice(&self.phase.to_le_bytes());
        body[26..28].copy_from_slice(&self.route.to_le_bytes());
        body[28..32].fill(0);
    }

    /// Reads a header; `None` if the body is not one of ours.
    pub fn read(body: &[u8]) -> Option<Header> {
        if body.len() < HEADER_LEN {
            return None;
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if u32_at(0) != MAGIC {
            return None;
        }
        Some(Header {
            producer: u32_at(4),
            seq: u64_at(8),
            intended_ns: u64_at(16),
            phase: u16::from_le_bytes([body[24], body[25]]),
            route: u16::from_le_bytes([body[26], body[27]]),
        })
    }
}

/// Latency histograms in microseconds: 1 µs to 1 hour (a backlog can hold a message for minutes),
/// 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// Per-second interval histograms: 2 significant digits keep one second of one metric at about
/// 30 KB, so a minute of three metrics on several threads stays a few MB.
fn interval_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("constant histogram bounds are valid")
}

/// Which sequences of one producer were confirmed, and how often each was delivered, on one queue.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Index: sequence. 1 = confirmed.
    pub confirmed: Vec<u8>,
    /// Index: sequence. Deliveries seen (saturating at 255).
    pub delivered: Vec<u8>,
    /// Deliveries of this producer on this queue that came with the redelivered flag.
    pub redelivered: u64,
    /// Deliveries (not redelivered) whose sequence was lower than one seen before by the same
    /// consumer.
    pub out_of_order: u64,
}

fn bump(v: &mut Vec<u8>, i: u64) {
    let i = i as usize;
    if v.len() <= i {
        v.resize(i + 1, 0);
    }
    v[i] = v[i].saturating_add(1);
}

/// One load thread's measurements.
pub struct Recorder {
    /// [phase][metric].
    pub phases: Vec<[Histogram<u64>; 3]>,
    /// [second][metric], by when the event was observed.
    pub intervals: Vec<[Option<Histogram<u64>>; 3]>,
    /// [second][Count].
    pub per_second: Vec<[u64; 3]>,
    /// [phase][Count], by when the event was observed.
    pub per_phase: Vec<[u64; 3]>,
    /// (queue, producer) -> ledger. Producers mark confirms on every queue their message goes to.
    pub ledgers: HashMap<(u16, u32), Ledger>,
    /// Bodies without our header.
    pub foreign: u64,
    /// Publishes refused, returned or lost with their connection; requests that failed.
    pub publish_failures: u64,
    /// The first failure's text, for the report.
    pub first_failure: Option<String>,
    /// The last sequence each (consumer, queue, producer) saw, for the order check.
    last_seen: HashMap<(u32, u16, u32), u64>,
    /// Phase start times (s since epoch), to attribute events to phases.
    phase_starts: Vec<f64>,
}

impl Recorder {
    /// A recorder for `phase_starts.len()` phases.
    pub fn new(phase_starts: Vec<f64>) -> Recorder {
        let n = phase_starts.len();
        Recorder {
            phases: (0..n)
                .map(|_| [histogram(), histogram(), histogram()])
                .collect(),
            intervals: Vec::new(),
            per_second: Vec::new(),
            per_phase: vec![[0; 3]; n],
            ledgers: HashMap::new(),
            foreign: 0,
            publish_failures: 0,
            first_failure: None,
            last_seen: HashMap::new(),
            phase_starts,
        }
    }

    /// The phase running at `t_s` seconds since the epoch.
    pub fn phase_at(&self, t_s: f64) -> usize {
        self.phase_starts
            .iter()
            .rposition(|s| *s <= t_s)
            .unwrap_or(0)
    }

    /// Counts an event observed at `now_ns`.
    pub fn count(&mut self, what: Count, now_ns: u64, n: u64) {
        let sec = (now_ns / 1_000_000_000) as usize;
        if self.per_second.len() <= sec {
            self.per_second.resize(sec + 1, [0; 3]);
        }
        self.per_second[sec][what as usize] += n;
        let phase = self.phase_at(now_ns as f64 / 1e9);
        self.per_phase[phase][what as usize] += n;
    }

    /// Records a latency: from `intended_ns` to `now_ns`, for a message of `phase`.
    pub fn latency(&mut self, metric: Metric, phase: usize, intended_ns: u64, now_ns: u64) {
        let us = (now_ns.saturating_sub(intended_ns) / 1000).max(1);
        if let Some(h) = self.phases.get_mut(phase) {
            h[metric.index()].saturating_record(us);
        }
        let sec = (now_ns / 1_000_000_000) as usize;
        if self.intervals.len() <= sec {
            self.intervals.resize_with(sec + 1, || [None, None, None]);
        }
        self.intervals[sec][metric.index()]
            .get_or_insert_with(interval_histogram)
            .saturating_record(us);
    }

    /// Notes a confirmed message on the queues it was routed to.
    pub fn confirmed(&mut self, queues: &[u16], producer: u32, seq: u64) {
        for q in queues {
            bump(
                &mut self.ledgers.entry((*q, producer)).or_default().confirmed,
                seq,
            );
        }
    }

    /// Notes a failed publish or request.
    pub fn failed(&mut self, why: &dyn std::fmt::Display) {
        self.publish_failures += 1;
        if self.first_failure.is_none() {
            self.first_failure = Some(why.to_string());
        }
    }

    /// Notes an rpc reply to request `seq` of `producer` (no order check: replies race).
    pub fn replied(&mut self, queue: u16, producer: u32, seq: u64) {
        bump(
            &mut self.ledgers.entry((queue, producer)).or_default().delivered,
            seq,
        );
    }

    /// Notes a delivery to `consumer` from queue `queue` of a message with header `h`.
    pub fn delivered(&mut self, consumer: u32, queue: u16, h: &Header, redelivered: bool) {
        let ledger = self.ledgers.entry((queue, h.producer)).or_default();
        bump(&mut ledger.delivered, h.seq);
        if redelivered {
            ledger.redelivered += 1;
            return;
        }
        let last = self
            .last_seen
            .entry((consumer, queue, h.producer))
            .or_insert(0);
        if h.seq < *last {
            ledger.out_of_order += 1;
        } else {
            *last = h.seq;
        }
    }

    /// Adds another thread's measurements into this one.
    pub fn merge(&mut self, other: Recorder) {
        for (mine, theirs) in self.phases.iter_mut().zip(&other.phases) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                a.add(b).expect("histograms of the same bounds merge");
            }
        }
        if self.intervals.len() < other.intervals.len() {
            self.intervals
                .resize_with(other.intervals.len(), || [None, None, None]);
        }
        for (mine, theirs) in self.intervals.iter_mut().zip(other.intervals) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                match (a.as_mut(), b) {
                    (Some(a), Some(b)) => a.add(&b).expect("histograms of the same bounds merge"),
                    (None, Some(b)) => *a = Some(b),
                    _ => {}
                }
            }
        }
        if self.per_second.len() < other.per_second.len() {
            self.per_second.resize(other.per_second.len(), [0; 3]);
        }
        for (a, b) in self.per_second.iter_mut().zip(&other.per_second) {
            for i in 0..3 {
                a[i] += b[i];
            }
        }
        for (a, b) in self.per_phase.iter_mut().zip(&other.per_phase) {
            for i in 0..3 {
                a[i] += b[i];
            }
        }
        for (key, theirs) in other.ledgers {
            let mine = self.ledgers.entry(key).or_default();
            merge_counts(&mut mine.confirmed, &theirs.confirmed);
            merge_counts(&mut mine.delivered, &theirs.delivered);
            mine.redelivered += theirs.redelivered;
            mine.out_of_order += theirs.out_of_order;
        }
        self.foreign += other.foreign;
        self.publish_failures += other.publish_failures;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

fn merge_counts(a: &mut Vec<u8>, b: &[u8]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.saturating_add(*y);
    }
}

/// The loss check's verdict, over every (queue, producer).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// Messages confirmed, counted once per queue they were routed to.
    pub confirmed: u64,
    /// Distinct messages delivered (per queue).
    pub delivered_unique: u64,
    /// Every delivery, duplicates and redeliveries included.
    pub deliveries: u64,
    /// Confirmed but never delivered, once the queues had drained (so nowhere left to be).
    pub lost: u64,
    /// Confirmed and not delivered when the run ended without the queues draining: still
    /// queued, or lost; the check cannot tell, so these are not counted as lost.
    pub undelivered_not_drained: u64,
    /// Delivered more than once without the redelivered flag explaining it.
    pub duplicated: u64,
    /// Deliveries flagged redelivered (the broker says so: not a duplicate by mistake).
    pub redelivered: u64,
    /// Delivered but never confirmed (a publish whose confirm was lost with its connection).
    pub unconfirmed_delivered: u64,
    /// Deliveries out of publish order (per producer, per queue, per consumer).
    pub out_of_order: u64,
    /// Bodies without the loadgen header.
    pub foreign: u64,
    /// Per (queue, producer) with anything wrong: "q0/p1: lost 12, ...".
    pub details: Vec<String>,
}

/// Compares what was confirmed with what was delivered. `drained`: every queue was seen empty
/// at the end, so a confirmed message not delivered is nowhere.
pub fn check(r: &Recorder, queue_names: &[String], drained: bool) -> Check {
    let mut c = Check {
        foreign: r.foreign,
        ..Check::default()
    };
    let mut keys: Vec<_> = r.ledgers.keys().copied().collect();
    keys.sort();
    for key in keys {
        let l = &r.ledgers[&key];
        let n = l.confirmed.len().max(l.delivered.len());
        let (mut lost, mut dup, mut unconfirmed, mut uniq, mut all, mut confirmed) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for i in 0..n {
            let conf = l.confirmed.get(i).copied().unwrap_or(0) > 0;
            let d = u64::from(l.delivered.get(i).copied().unwrap_or(0));
            confirmed += u64::from(conf);
            all += d;
            if d > 0 {
                uniq += 1;
            }
            if conf && d == 0 {
                lost += 1;
            }
            if !conf && d > 0 {
                unconfirmed += 1;
            }
            if d > 1 {
                dup += d - 1;
            }
        }
        // Redeliveries account for some repeats: those are the broker keeping its promise.
        let dup = dup.saturating_sub(l.redelivered);
        c.confirmed += confirmed;
        c.delivered_unique += uniq;
        c.deliveries += all;
        if drained {
            c.lost += lost;
        } else {
            c.undelivered_not_drained += lost;
        }
        c.duplicated += dup;
        c.redelivered += l.redelivered;
        c.unconfirmed_delivered += unconfirmed;
        c.out_of_order += l.out_of_order;
        if (drained && lost > 0) || dup + l.out_of_order > 0 {
            let q = queue_names
                .get(usize::from(key.0))
                .cloned()
                .unwrap_or_else(|| format!("q{}", key.0));
            c.details.push(format!(
                "queue {q}, producer {}: confirmed {confirmed}, delivered {uniq}, lost {lost}, \
                 duplicated {dup}, out of order {}",
                key.1, l.out_of_order
            ));
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_foreign_bodies_are_refused() {
        let h = Header {
            producer: 7,
            seq: 123_456_789,
            intended_ns: 42,
            phase: 3,
            route: 2,
        };
        let mut body = vec![0u8; 64];
        h.write(&mut body);
        assert_eq!(Header::read(&body), Some(h));
        assert_eq!(
            Header::read(b"hello, this is not a loadgen body at all"),
            None
        );
        assert_eq!(Header::read(&body[..10]), None);
    }

    #[test]
    fn the_check_counts_loss_duplicates_and_disorder() {
        let mut r = Recorder::new(vec![0.0]);
        for seq in 0..10 {
            r.confirmed(&[0], 1, seq);
        }
        let h = |seq| Header {
            producer: 1,
            seq,
            intended_ns: 0,
            phase: 0,
            route: 0,
        };
        // 0..8 delivered, 8 and 9 lost; 3 twice (a duplicate); 2 after 5 (out of order);
        // 4 again flagged redelivered (not a duplicate).
        for seq in [0, 1, 3, 3, 4, 5, 2, 6, 7] {
            r.delivered(0, 0, &h(seq), false);
        }
        r.delivered(0, 0, &h(4), true);
        let c = check(&r, &["q".into()], true);
        assert_eq!(
            (
                c.confirmed,
                c.delivered_unique,
                c.lost,
                c.duplicated,
                c.redelivered,
                c.out_of_order
            ),
            (10, 8, 2, 1, 1, 1)
        );
        assert_eq!(c.details.len(), 1);
        // Not drained: the missing ones may still be queued, so they are not called lost.
        let c = check(&r, &["q".into()], false);
        assert_eq!((c.lost, c.undelivered_not_drained), (0, 2));
    }

    #[test]
    fn merging_adds_histograms_and_ledgers() {
        let mut a = Recorder::new(vec![0.0, 1.0]);
        let mut b = Recorder::new(vec![0.0, 1.0]);
        a.latency(Metric::Confirm, 0, 0, 2_000_000);
        b.latency(Metric::Confirm, 1, 0, 3_000_000_000);
        b.count(Count::Sent, 1_500_000_000, 5);
        b.confirmed(&[0], 0, 0);
        a.merge(b);
        assert_eq!(a.phases[0][0].len(), 1);
        assert_eq!(a.phases[1][0].len(), 1);
        assert_eq!(a.per_second[1][Count::Sent as usize], 5);
        assert_eq!(a.per_phase[1][Count::Sent as usize], 5);
        assert_eq!(a.ledgers[&(0, 0)].confirmed, vec![1]);
        assert!(a.intervals[3][0].is_some());
    }
}
