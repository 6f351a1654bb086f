//! Scenario files: what a workload is, parsed from TOML, checked, and turned into a schedule.
//!
//! Contract: pure data and arithmetic, no I/O beyond reading the file; called on the main thread
//! before any load thread starts. Every value that cannot be run is refused here with the file,
//! the key (`phases[1].rate`) and the reason, so a bad file never starts a broker. Unknown keys
//! are refused too (`deny_unknown_fields`): a misspelt `consumer_rate` must not silently mean
//! "unlimited".
//!
//! The rate schedule is a function `N(t)`: how many messages a phase has sent by `t` seconds into
//! it. Message `k` of a phase is intended at the `t` where `N(t) = k`; that is the clock every
//! latency is measured from (open loop: a stall delays sending, and the delay is in the numbers).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The bytes at the start of every body: magic, producer, sequence, intended send time, phase,
/// queue. Sizes below this are refused.
pub const HEADER_LEN: usize = 32;

/// What kind of workload a scenario is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Producers publish to queues on the default exchange; consumers take from them.
    #[default]
    Queue,
    /// One publish to a fanout exchange, delivered to every bound (server-named) queue.
    Fanout,
    /// Request-reply: producers are requesters, consumers are servers that reply.
    Rpc,
    /// Closed loop: producers publish as fast as their confirm window allows.
    Max,
    /// A backlog published with no consumer, drained hot; published again, the spawned broker
    /// restarted (SIGTERM, then the same data directory), drained cold from disk; and the
    /// journal's segment files read raw with O_DIRECT for comparison (`crate::restart`).
    #[serde(rename = "drain-after-restart")]
    DrainAfterRestart,
    /// Idempotent producers publish a backlog while the spawned broker is SIGKILLed and
    /// restarted `kills` times; then every queue is drained and each message counted: lost and
    /// duplicated must be 0 (`crate::exactly_once`).
    #[serde(rename = "exactly-once")]
    ExactlyOnce,
    /// Retries with backoff: a share of the messages (`fail_share`) fails and is nacked, each
    /// retried after the queue's `retry_delays_ms`; some fail after the last delay and are
    /// dead-lettered. Reports each retry's lateness against its schedule (`crate::retry`).
    Retry,
    /// A backlog of priority 0 drained by one consumer while a trickle of high priority (the
    /// first phase's rate) arrives, in one priority queue: each one's end-to-end latency
    /// (`crate::priority`).
    Priority,
}

impl Kind {
    /// As written in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Queue => "queue",
            Kind::Fanout => "fanout",
            Kind::Rpc => "rpc",
            Kind::Max => "max",
            Kind::DrainAfterRestart => "drain-after-restart",
            Kind::ExactlyOnce => "exactly-once",
            Kind::Retry => "retry",
            Kind::Priority => "priority",
        }
    }
}

/// How the load calls the client: the way a benchmark batches, or the way applications use a
/// broker (the speed issue's "per-message idiom").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Idiom {
    /// The messages due together go in one `publish_batch_with` call (up to `batch`); deliveries
    /// are acked `ack_batch` at a time with one `Delivery::ack_all` each.
    #[default]
    Batch,
    /// One `publish_with` call per message, its confirm future kept (pipelined: up to
    /// `in_flight` unconfirmed in a closed loop); one `Delivery::ack` per delivery, its future
    /// dropped (the ack is sent, its answer not awaited). Needs `batch = 1` and `ack_batch = 1`.
    PerMessage,
}

impl Idiom {
    /// As written in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            Idiom::Batch => "batch",
            Idiom::PerMessage => "per-message",
        }
    }
}

/// The message body size.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum Size {
    /// Every message this many bytes.
    Fixed(u32),
    /// Uniform between `min` and `max` bytes (inclusive).
    Uniform {
        /// Smallest body.
        min: u32,
        /// Largest body.
        max: u32,
    },
}

impl Size {
    /// The largest body this produces.
    pub fn max(&self) -> u32 {
        match *self {
            Size::Fixed(n) => n,
            Size::Uniform { max, .. } => max,
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Fixed(n) => write!(f, "{n} B"),
            Size::Uniform { min, max } => write!(f, "{min}..{max} B (uniform)"),
        }
    }
}

/// How a phase's publish rate moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// `rate` throughout (0: a quiet phase).
    #[default]
    Constant,
    /// From `rate` at the start to `rate_end` at the end, linearly.
    Ramp,
    /// From `rate_min` up to `rate` over each `period_s`, then back down at once.
    Sawtooth,
    /// `rate_min` at the start, `rate` half a period later, smoothly (a day compressed).
    Sine,
}

/// The kind of a scenario's own routing exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// Routing key equals binding key.
    Direct,
    /// Binding keys are patterns: `.`-separated words, `*` one word, `#` zero or more.
    Topic,
}

/// `[exchange]`: publish through a direct or topic exchange instead of straight to the queues.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSpec {
    /// Direct or topic.
    pub kind: ExchangeType,
    /// Queue `i` is bound with `binding_keys[i % len]`.
    pub binding_keys: Vec<String>,
    /// Producers cycle through these, one key per publish frame.
    pub routing_keys: Vec<String>,
}

impl ExchangeSpec {
    /// The queues (indices, of `queues`) a message with routing key `key` reaches.
    pub fn destinations(&self, key: &str, queues: u32) -> Vec<u16> {
        (0..queues)
            .filter(|q| {
                let binding = &self.binding_keys[*q as usize % self.binding_keys.len()];
                match self.kind {
                    ExchangeType::Direct => binding == key,
                    ExchangeType::Topic => topic_matches(binding, key),
                }
            })
            .map(|q| q as u16)
            .collect()
    }
}

/// Topic matching as the broker does it: `.`-separated words; `*` matches exactly one word, `#`
/// zero or more. The loss check needs to know where every message should land.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(w), Some(x)) if w == x => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

/// One phase of a scenario.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Shown in the report and used in file names.
    pub name: String,
    /// How long it lasts. A quiet phase after the last publishing one ends early once every
    /// queue is drained.
    pub duration_s: f64,
    /// How the rate moves.
    #[serde(default)]
    pub shape: Shape,
    /// Messages per second over all producers (see `Shape`); not used by `kind = "max"`.
    pub rate: Option<f64>,
    /// Ramp: the rate at the end.
    pub rate_end: Option<f64>,
    /// Sawtooth and sine: the lowest rate.
    pub rate_min: Option<f64>,
    /// Sawtooth and sine: seconds per cycle.
    pub period_s: Option<f64>,
}

fn default_one() -> u32 {
    1
}
fn default_prefetch() -> u32 {
    100
}
fn default_true() -> bool {
    true
}
fn default_size() -> Size {
    Size::Fixed(256)
}
fn default_in_flight() -> u32 {
    1024
}
fn default_drain_timeout() -> f64 {
    60.0
}
fn default_request_timeout() -> f64 {
    30.0
}

/// `drain-after-restart`: the backlog when the scenario gives none.
pub const DEFAULT_BACKLOG: u64 = 100_000;

/// A workload, as written in `loadgen/scenarios/*.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// One line saying what it shows.
    #[serde(default)]
    pub description: String,
    /// Queue (default), fanout, rpc, max or drain-after-restart.
    #[serde(default)]
    pub kind: Kind,
    /// How producers and consumers call the client: `batch` (default) or `per-message`.
    #[serde(default)]
    pub idiom: Idiom,
    /// Publishing clients (requesters for rpc); each its own connection.
    #[serde(default = "default_one")]
    pub producers: u32,
    /// Consuming clients (servers for rpc); each its own connection.
    #[serde(default = "default_one")]
    pub consumers: u32,
    /// Queues (fanout: subscriber queues, each gets every message). Producer `p` publishes to
    /// queue `p % queues`; consumer `c` takes from queue `c % queues`.
    #[serde(default = "default_one")]
    pub queues: u32,
    /// Body size: `256` or `{ min = 64, max = 4096 }`; at least the 32-byte loadgen header.
    #[serde(default = "default_size")]
    pub size: Size,
    /// Most messages per publish frame: the messages due at once go together.
    #[serde(default = "default_one")]
    pub batch: u32,
    /// Unacked deliveries a consumer may hold.
    #[serde(default = "default_prefetch")]
    pub prefetch: u32,
    /// Deliveries acked per Ack frame.
    #[serde(default = "default_one")]
    pub ack_batch: u32,
    /// Persistent messages (journaled on durable queues).
    #[serde(default = "default_true")]
    pub persistent: bool,
    /// Durable queues.
    #[serde(default = "default_true")]
    pub durable: bool,
    /// Most messages per second each consumer processes (absent: as fast as they come).
    pub consumer_rate: Option<f64>,
    /// Milliseconds of work per message per consumer (absent: none).
    pub process_ms: Option<f64>,
    /// Publish through a direct or topic exchange (kind = "queue" or "max").
    pub exchange: Option<ExchangeSpec>,
    /// Consumers start at the beginning of this phase (absent: with the first).
    pub consumers_start: Option<String>,
    /// `max`: most unconfirmed messages per producer.
    #[serde(default = "default_in_flight")]
    pub in_flight: u32,
    /// Longest wait for the queues to drain after the last publishing phase.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_s: f64,
    /// `rpc`: longest wait for one reply.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: f64,
    /// `drain-after-restart`: messages in the backlog (default `DEFAULT_BACKLOG`), all
    /// producers together; `--duration-scale` scales it.
    pub backlog: Option<u64>,
    /// The phases, in order (none for `drain-after-restart`: its steps are fixed).
    #[serde(default)]
    pub phases: Vec<Phase>,
    /// `exactly-once`: SIGKILLs of the broker while publishing (default 3).
    pub kills: Option<u32>,
    /// `retry`: the share of messages that fail (0 to 1).
    pub fail_share: Option<f64>,
    /// `retry`: the queue's retry policy, ms per failure in turn.
    pub retry_delays_ms: Option<Vec<u32>>,
}

/// A refused scenario: the file, the key and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError(pub String);

impl std::fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

/// Where the shipped scenarios live in the source tree.
pub fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// The shipped scenarios, built into the binary so that `--scenario spike` works wherever the
/// binary is; a copy on disk (`loadgen/scenarios/NAME.toml`) wins, so edits there apply.
pub const SHIPPED: &[(&str, &str)] = &[
    ("steady", include_str!("../scenarios/steady.toml")),
    ("spike", include_str!("../scenarios/spike.toml")),
    ("sawtooth", include_str!("../scenarios/sawtooth.toml")),
    ("diurnal", include_str!("../scenarios/diurnal.toml")),
    ("drain", include_str!("../scenarios/drain.toml")),
    ("fanout", include_str!("../scenarios/fanout.toml")),
    ("rpc", include_str!("../scenarios/rpc.toml")),
    ("max", include_str!("../scenarios/max.toml")),
    (
        "max-per-message",
        include_str!("../scenarios/max-per-message.toml"),
    ),
    ("max-batch", include_str!("../scenarios/max-batch.toml")),
    ("steady-5k", include_str!("../scenarios/steady-5k.toml")),
    ("steady-20k", include_str!("../scenarios/steady-20k.toml")),
    (
        "drain-after-restart",
        include_str!("../scenarios/drain-after-restart.toml"),
    ),
    ("topic", include_str!("../scenarios/topic.toml")),
    (
        "exactly-once",
        include_str!("../scenarios/exactly-once.toml"),
    ),
    ("retry", include_str!("../scenarios/retry.toml")),
    ("priority", include_str!("../scenarios/priority.toml")),
];

/// A scenario's text and what to call it.
#[derive(Debug, Clone)]
pub struct Found {
    /// The name (file stem), for queue names and the report.
    pub name: String,
    /// What errors call it ("spike.toml").
    pub label: String,
    /// The TOML.
    pub text: String,
}

/// Finds `--scenario`: a path to a file, or the name of a shipped scenario (on disk in
/// `./loadgen/scenarios` or this crate's source directory, else the built-in copy).
pub fn find(name_or_path: &str) -> Result<Found, ScenarioError> {
    let read = |p: &Path| -> Result<Found, ScenarioError> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| ScenarioError(format!("scenario {}: {e}", p.display())))?;
        Ok(Found {
            name: p.file_stem().map_or_else(
                || name_or_path.to_string(),
                |s| s.to_string_lossy().to_string(),
            ),
            label: p.file_name().map_or_else(
                || p.display().to_string(),
                |s| s.to_string_lossy().to_string(),
            ),
            text,
        })
    };
    let p = Path::new(name_or_path);
    if p.is_file() {
        return read(p);
    }
    let file = format!("{name_or_path}.toml");
    for dir in [PathBuf::from("loadgen/scenarios"), scenarios_dir()] {
        let candidate = dir.join(&file);
        if candidate.is_file() {
            return read(&candidate);
        }
    }
    if let Some((name, text)) = SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
        return Ok(Found {
            name: name.to_string(),
            label: format!("{name}.toml (built in)"),
            text: text.to_string(),
        });
    }
    let known: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
    Err(ScenarioError(format!(
        "scenario '{name_or_path}': no such file, and no shipped scenario of that name (shipped: {})",
        known.join(", ")
    )))
}

/// Reads and checks a scenario file.
#[cfg(test)]
pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let f = find(&path.display().to_string())?;
    parse(&f.label, &f.text)
}

/// Parses and checks scenario text; `label` names it in errors.
pub fn parse(label: &str, text: &str) -> Result<Scenario, ScenarioError> {
    let s: Scenario =
        toml::from_str(text).map_err(|e| ScenarioError(format!("scenario {label}: {e}")))?;
    s.check()
        .map_err(|(key, why)| ScenarioError(format!("scenario {label}: {key}: {why}")))?;
    Ok(s)
}

type Refusal = (String, String);

fn refuse<T>(key: impl Into<String>, why: impl Into<String>) -> Result<T, Refusal> {
    Err((key.into(), why.into()))
}

fn positive(key: &str, v: f64) -> Result<(), Refusal> {
    if !v.is_finite() || v <= 0.0 {
        return refuse(key, format!("must be > 0 (got {v})"));
    }
    Ok(())
}

fn non_negative(key: &str, v: f64) -> Result<(), Refusal> {
    if !v.is_finite() || v < 0.0 {
        return refuse(key, format!("must be >= 0 (got {v})"));
    }
    Ok(())
}

impl Scenario {
    /// Every rule a runnable scenario keeps; the first broken one as (key, reason).
    pub fn check(&self) -> Result<(), Refusal> {
        if self.producers == 0 {
            return refuse("producers", "must be >= 1");
        }
        if self.queues == 0 {
            return refuse("queues", "must be >= 1");
        }
        if self.consumers == 0 {
            return refuse("consumers", "must be >= 1 (nothing would drain the queues)");
        }
        if self.kind != Kind::Rpc && self.consumers < self.queues {
            return refuse(
                "consumers",
                format!(
                    "must be >= queues ({}) so that every queue has a consumer",
                    self.queues
                ),
            );
        }
        if let Some(x) = &self.exchange {
            if !matches!(self.kind, Kind::Queue | Kind::Max) {
                return refuse(
                    "exchange",
                    format!("not used by kind = \"{}\"", self.kind.name()),
                );
            }
            if x.binding_keys.is_empty() {
                return refuse("exchange.binding_keys", "at least one key is needed");
            }
            if x.binding_keys.len() > self.queues as usize {
                return refuse(
                    "exchange.binding_keys",
                    format!(
                        "{} keys for {} queue(s): queue i is bound with key i, so some keys \
                         would bind nothing",
                        x.binding_keys.len(),
                        self.queues
                    ),
                );
            }
            if x.routing_keys.is_empty() {
                return refuse("exchange.routing_keys", "at least one key is needed");
            }
            for (i, k) in x.routing_keys.iter().enumerate() {
                if x.destinations(k, self.queues).is_empty() {
                    return refuse(
                        format!("exchange.routing_keys[{i}]"),
                        format!(
                            "'{k}' reaches no queue (the broker would drop it, and the loss \
                             check could not tell that from a loss)"
                        ),
                    );
                }
            }
        }
        if self.kind == Kind::Queue && self.exchange.is_none() && self.producers < self.queues {
            return refuse(
                "producers",
                format!(
                    "must be >= queues ({}) so that every queue gets messages",
                    self.queues
                ),
            );
        }
        match self.size {
            Size::Fixed(n) if (n as usize) < HEADER_LEN => {
                return refuse(
                    "size",
                    format!("must be >= {HEADER_LEN} (the loadgen header), got {n}"),
                )
            }
            Size::Uniform { min, max } => {
                if (min as usize) < HEADER_LEN {
                    return refuse(
                        "size.min",
                        format!("must be >= {HEADER_LEN} (the loadgen header), got {min}"),
                    );
                }
                if max < min {
                    return refuse("size.max", format!("must be >= size.min ({min})"));
                }
            }
            _ => {}
        }
        if self.batch == 0 {
            return refuse("batch", "must be >= 1");
        }
        if self.prefetch == 0 {
            return refuse("prefetch", "must be >= 1");
        }
        if self.ack_batch == 0 {
            return refuse("ack_batch", "must be >= 1");
        }
        if self.ack_batch > self.prefetch {
            return refuse(
                "ack_batch",
                format!(
                    "must be <= prefetch ({}): a consumer would wait for deliveries the broker \
                     holds back until it acks",
                    self.prefetch
                ),
            );
        }
        if self.in_flight == 0 {
            return refuse("in_flight", "must be >= 1");
        }
        let closed_loop = matches!(self.kind, Kind::Max | Kind::DrainAfterRestart);
        if closed_loop && self.in_flight < self.batch {
            return refuse("in_flight", format!("must be >= batch ({})", self.batch));
        }
        if self.idiom == Idiom::PerMessage {
            if self.kind == Kind::Rpc {
                return refuse(
                    "idiom",
                    "not used by kind = \"rpc\" (requests are one call each already)",
                );
            }
            for (key, v) in [("batch", self.batch), ("ack_batch", self.ack_batch)] {
                if v != 1 {
                    return refuse(
                        "idiom",
                        format!(
                            "\"per-message\" is one publish call per message and one ack per \
                             delivery, so {key} must be 1 (got {v}); use idiom = \"batch\" to batch"
                        ),
                    );
                }
            }
        }
        if self.kind == Kind::DrainAfterRestart {
            return self.check_drain_after_restart();
        }
        if self.kind == Kind::ExactlyOnce {
            return self.check_exactly_once();
        }
        if let Some(k) = self.kills {
            return refuse(
                "kills",
                format!(
                    "not used by kind = \"{}\" (only by \"exactly-once\"; got {k})",
                    self.kind.name()
                ),
            );
        }
        if self.kind == Kind::Retry {
            return self.check_retry();
        }
        for (key, set) in [
            ("fail_share", self.fail_share.is_some()),
            ("retry_delays_ms", self.retry_delays_ms.is_some()),
        ] {
            if set {
                return refuse(
                    key,
                    format!(
                        "not used by kind = \"{}\" (only by \"retry\")",
                        self.kind.name()
                    ),
                );
            }
        }
        if self.kind == Kind::Priority {
            return self.check_priority();
        }
        if let Some(b) = self.backlog {
            return refuse(
                "backlog",
                format!(
                    "not used by kind = \"{}\" (only by \"drain-after-restart\" and \"exactly-once\"; got {b})",
                    self.kind.name()
                ),
            );
        }
        if let Some(r) = self.consumer_rate {
            positive("consumer_rate", r)?;
        }
        if let Some(ms) = self.process_ms {
            positive("process_ms", ms)?;
        }
        positive("drain_timeout_s", self.drain_timeout_s)?;
        positive("request_timeout_s", self.request_timeout_s)?;
        if self.phases.is_empty() {
            return refuse("phases", "at least one [[phases]] is needed");
        }
        for (i, p) in self.phases.iter().enumerate() {
            self.check_phase(i, p)?;
            if self.phases[..i].iter().any(|q| q.name == p.name) {
                return refuse(
                    format!("phases[{i}].name"),
                    format!("'{}' is used by an earlier phase", p.name),
                );
            }
        }
        if let Some(start) = &self.consumers_start {
            if !self.phases.iter().any(|p| &p.name == start) {
                return refuse("consumers_start", format!("no phase is named '{start}'"));
            }
        }
        if self.kind != Kind::Max && self.phases.iter().all(|p| p.mean_rate() == 0.0) {
            return refuse("phases", "no phase publishes anything (every rate is 0)");
        }
        Ok(())
    }

    /// `priority`'s own rules: one producer, consumer and queue, a backlog, and one phase (the
    /// high-priority trickle) that publishes.
    fn check_priority(&self) -> Result<(), Refusal> {
        let why = "kind = \"priority\" runs one producer, one consumer and one queue";
        for (key, n) in [
            ("producers", self.producers),
            ("consumers", self.consumers),
            ("queues", self.queues),
        ] {
            if n != 1 {
                return refuse(key, format!("{why} (got {n})"));
            }
        }
        for (key, set) in [
            ("exchange", self.exchange.is_some()),
            ("consumers_start", self.consumers_start.is_some()),
        ] {
            if set {
                return refuse(key, "not used by kind = \"priority\"");
            }
        }
        if self.backlog() == 0 {
            return refuse("backlog", "must be >= 1 (the low-priority backlog)");
        }
        if (self.size.max() as usize) < 9 {
            return refuse(
                "size",
                "must be >= 9 (send time and priority are in the body)",
            );
        }
        if let Some(r) = self.consumer_rate {
            positive("consumer_rate", r)?;
        }
        if let Some(ms) = self.process_ms {
            positive("process_ms", ms)?;
        }
        positive("drain_timeout_s", self.drain_timeout_s)?;
        match self.phases.as_slice() {
            [p] if p.shape == Shape::Constant && p.rate.is_some_and(|r| r > 0.0) => {
                positive("phases[0].duration_s", p.duration_s)
            }
            _ => refuse(
                "phases",
                "kind = \"priority\" needs one constant phase with rate > 0 (the trickle of \
                 high priority)",
            ),
        }
    }

    /// `drain-after-restart`'s own rules: a backlog that survives a restart, and nothing that
    /// its fixed steps (fill, drain, fill, restart, drain) would ignore.
    fn check_retry(&self) -> Result<(), Refusal> {
        let why = "not used by kind = \"retry\" (one producer, one consumer, one queue)";
        for (key, set) in [
            ("exchange", self.exchange.is_some()),
            ("consumers_start", self.consumers_start.is_some()),
            ("consumer_rate", self.consumer_rate.is_some()),
            ("process_ms", self.process_ms.is_some()),
            ("backlog", self.backlog.is_some()),
            ("producers", self.producers != 1),
            ("consumers", self.consumers != 1),
            ("queues", self.queues != 1),
        ] {
            if set {
                return refuse(key, why);
            }
        }
        let share = self.fail_share.unwrap_or(0.1);
        if !(share > 0.0 && share <= 1.0) {
            return refuse("fail_share", format!("must be in (0, 1] (got {share})"));
        }
        if self.retry_delays_ms.as_ref().is_some_and(|d| d.is_empty()) {
            return refuse("retry_delays_ms", "at least one delay is needed");
        }
        let [phase] = self.phases.as_slice() else {
            return refuse("phases", "kind = \"retry\" runs exactly one [[phases]]");
        };
        positive("phases[0].duration_s", phase.duration_s)?;
        positive("phases[0].rate", phase.rate.unwrap_or(0.0))?;
        positive("drain_timeout_s", self.drain_timeout_s)?;
        if (self.size.max() as usize) < HEADER_LEN {
            return refuse("size", format!("at least {HEADER_LEN} bytes"));
        }
        Ok(())
    }

    fn check_drain_after_restart(&self) -> Result<(), Refusal> {
        let why = "not used by kind = \"drain-after-restart\" (its steps are fixed: fill, drain, \
                   fill, restart, drain)";
        if !self.phases.is_empty() {
            return refuse("phases", why);
        }
        for (key, set) in [
            ("exchange", self.exchange.is_some()),
            ("consumers_start", self.consumers_start.is_some()),
            ("consumer_rate", self.consumer_rate.is_some()),
            ("process_ms", self.process_ms.is_some()),
        ] {
            if set {
                return refuse(key, why);
            }
        }
        if self.producers < self.queues {
            return refuse(
                "producers",
                format!(
                    "must be >= queues ({}) so that every queue gets a backlog",
                    self.queues
                ),
            );
        }
        for (key, on) in [("durable", self.durable), ("persistent", self.persistent)] {
            if !on {
                return refuse(
                    key,
                    "must be true: the backlog has to outlive the broker's restart",
                );
            }
        }
        positive("drain_timeout_s", self.drain_timeout_s)?;
        let backlog = self.backlog();
        if backlog < u64::from(self.producers) {
            return refuse(
                "backlog",
                format!("must be >= producers ({}), got {backlog}", self.producers),
            );
        }
        Ok(())
    }

    /// `exactly-once`'s own rules: durable, persistent, a backlog, no phases.
    fn check_exactly_once(&self) -> Result<(), Refusal> {
        let why = "not used by kind = \"exactly-once\" (its steps are fixed: publish through \
                   kills, then drain and count)";
        if !self.phases.is_empty() {
            return refuse("phases", why);
        }
        for (key, set) in [
            ("exchange", self.exchange.is_some()),
            ("consumers_start", self.consumers_start.is_some()),
            ("consumer_rate", self.consumer_rate.is_some()),
            ("process_ms", self.process_ms.is_some()),
        ] {
            if set {
                return refuse(key, why);
            }
        }
        for (key, on) in [("durable", self.durable), ("persistent", self.persistent)] {
            if !on {
                return refuse(
                    key,
                    "must be true: the messages have to outlive each SIGKILL",
                );
            }
        }
        if self.idiom != Idiom::PerMessage || self.batch != 1 {
            return refuse(
                "idiom",
                "must be \"per-message\" with batch = 1: an idempotent producer publishes one \
                 message per call",
            );
        }
        positive("drain_timeout_s", self.drain_timeout_s)?;
        if self.backlog() < u64::from(self.producers) {
            return refuse(
                "backlog",
                format!("must be >= producers ({})", self.producers),
            );
        }
        Ok(())
    }

    /// `exactly-once`: SIGKILLs while publishing.
    pub fn kills(&self) -> u32 {
        self.kills.unwrap_or(3)
    }

    /// `drain-after-restart`: messages in the backlog, all producers together.
    pub fn backlog(&self) -> u64 {
        self.backlog.unwrap_or(DEFAULT_BACKLOG)
    }

    fn check_phase(&self, i: usize, p: &Phase) -> Result<(), Refusal> {
        let key = |k: &str| format!("phases[{i}].{k}");
        if p.name.is_empty()
            || !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return refuse(
                key("name"),
                format!(
                    "'{}': use letters, digits, '-' and '_' (it names output files)",
                    p.name
                ),
            );
        }
        positive(&key("duration_s"), p.duration_s)?;
        if self.kind == Kind::Max {
            for (k, v) in [
                ("rate", p.rate),
                ("rate_end", p.rate_end),
                ("rate_min", p.rate_min),
                ("period_s", p.period_s),
            ] {
                if v.is_some() {
                    return refuse(
                        key(k),
                        "not used by kind = \"max\" (closed loop: as fast as confirms allow)",
                    );
                }
            }
            return Ok(());
        }
        let Some(rate) = p.rate else {
            return refuse(key("rate"), "missing (messages per second, all producers)");
        };
        let unused = |k: &str, v: Option<f64>, shape: &str| -> Result<(), Refusal> {
            if v.is_some() {
                return refuse(key(k), format!("not used by shape = \"{shape}\""));
            }
            Ok(())
        };
        match p.shape {
            Shape::Constant => {
                non_negative(&key("rate"), rate)?;
                unused("rate_end", p.rate_end, "constant")?;
                unused("rate_min", p.rate_min, "constant")?;
                unused("period_s", p.period_s, "constant")?;
            }
            Shape::Ramp => {
                non_negative(&key("rate"), rate)?;
                let Some(end) = p.rate_end else {
                    return refuse(key("rate_end"), "missing (shape = \"ramp\" ends there)");
                };
                non_negative(&key("rate_end"), end)?;
                if rate == 0.0 && end == 0.0 {
                    return refuse(key("rate_end"), "must be > 0 when rate is 0");
                }
                unused("rate_min", p.rate_min, "ramp")?;
                unused("period_s", p.period_s, "ramp")?;
            }
            Shape::Sawtooth | Shape::Sine => {
                let shape = if p.shape == Shape::Sine {
                    "sine"
                } else {
                    "sawtooth"
                };
                positive(&key("rate"), rate)?;
                let min = p.rate_min.unwrap_or(0.0);
                non_negative(&key("rate_min"), min)?;
                if min > rate {
                    return refuse(key("rate_min"), format!("must be <= rate ({rate})"));
                }
                let Some(period) = p.period_s else {
                    return refuse(key("period_s"), format!("missing (shape = \"{shape}\")"));
                };
                positive(&key("period_s"), period)?;
                unused("rate_end", p.rate_end, shape)?;
            }
        }
        Ok(())
    }

    /// Multiplies every publish rate and the consumers' cap by `f`, keeping the shape.
    pub fn scale_rates(&mut self, f: f64) {
        for p in &mut self.phases {
            for r in [&mut p.rate, &mut p.rate_end, &mut p.rate_min]
                .into_iter()
                .flatten()
            {
                *r *= f;
            }
        }
        if let Some(r) = &mut self.consumer_rate {
            *r *= f;
        }
    }

    /// Multiplies every phase's duration (and cycle period) by `f`; for `drain-after-restart`,
    /// its backlog (at least 1 message).
    pub fn scale_durations(&mut self, f: f64) {
        if matches!(self.kind, Kind::DrainAfterRestart | Kind::Priority) {
            self.backlog = Some(((self.backlog() as f64 * f).round() as u64).max(1));
        }
        for p in &mut self.phases {
            p.duration_s *= f;
            if let Some(t) = &mut p.period_s {
                *t *= f;
            }
        }
    }

    /// The index of the phase consumers start in.
    pub fn consumers_start_phase(&self) -> usize {
        self.consumers_start
            .as_ref()
            .and_then(|n| self.phases.iter().position(|p| &p.name == n))
            .unwrap_or(0)
    }

    /// The per-consumer pace: the shortest time between two messages it processes.
    pub fn consumer_interval_s(&self) -> Option<f64> {
        let by_rate = self.consumer_rate.map(|r| 1.0 / r);
        let by_work = self.process_ms.map(|ms| ms / 1000.0);
        match (by_rate, by_work) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Index of the last phase that publishes (rate > 0), or of the last phase for `max`.
    pub fn last_publishing_phase(&self) -> usize {
        if self.kind == Kind::Max {
            return self.phases.len() - 1;
        }
        self.phases
            .iter()
            .rposition(|p| p.mean_rate() > 0.0)
            .unwrap_or(0)
    }
}

impl Phase {
    fn rate(&self) -> f64 {
        self.rate.unwrap_or(0.0)
    }

    /// Messages sent by `t` seconds into the phase (all producers), `0 <= t <= duration_s`.
    pub fn cumulative(&self, t: f64) -> f64 {
        let r = self.rate();
        let d = self.duration_s;
        match self.shape {
            Shape::Constant => r * t,
            Shape::Ramp => {
                let end = self.rate_end.unwrap_or(r);
                r * t + (end - r) * t * t / (2.0 * d)
            }
            Shape::Sawtooth => {
                let m = self.rate_min.unwrap_or(0.0);
                let period = self.period_s.unwrap_or(d);
                let cycles = (t / period).floor();
                let u = t - cycles * period;
                cycles * (m + r) / 2.0 * period + m * u + (r - m) * u * u / (2.0 * period)
            }
            Shape::Sine => {
                let m = self.rate_min.unwrap_or(0.0);
                let period = self.period_s.unwrap_or(d);
                let w = 2.0 * std::f64::consts::PI / period;
                m * t + (r - m) / 2.0 * (t - (w * t).sin() / w)
            }
        }
    }

    /// The rate at `t` seconds into the phase.
    pub fn rate_at(&self, t: f64) -> f64 {
        let r = self.rate();
        match self.shape {
            Shape::Constant => r,
            Shape::Ramp => {
                let end = self.rate_end.unwrap_or(r);
                r + (end - r) * t / self.duration_s
            }
            Shape::Sawtooth => {
                let m = self.rate_min.unwrap_or(0.0);
                let period = self.period_s.unwrap_or(self.duration_s);
                let u = t - (t / period).floor() * period;
                m + (r - m) * u / period
            }
            Shape::Sine => {
                let m = self.rate_min.unwrap_or(0.0);
                let period = self.period_s.unwrap_or(self.duration_s);
                let w = 2.0 * std::f64::consts::PI / period;
                m + (r - m) * (1.0 - (w * t).cos()) / 2.0
            }
        }
    }

    /// Messages this phase sends in all.
    pub fn message_count(&self) -> u64 {
        self.cumulative(self.duration_s).max(0.0).ceil() as u64
    }

    /// The mean target rate.
    pub fn mean_rate(&self) -> f64 {
        self.cumulative(self.duration_s) / self.duration_s
    }

    /// When message `k` of this phase is intended, seconds into the phase: the `t` where
    /// `cumulative(t) = k`, found by bisection (cumulative is nondecreasing). `lo` is a known
    /// lower bound (the previous message's time), which keeps the search short.
    pub fn time_of(&self, k: u64, lo: f64) -> f64 {
        let target = k as f64;
        let (mut lo, mut hi) = (lo.max(0.0), self.duration_s);
        if self.cumulative(lo) >= target {
            return lo;
        }
        // 1 ns resolution is far below the timer's: stop there.
        while hi - lo > 1e-9 {
            let mid = (lo + hi) / 2.0;
            if self.cumulative(mid) >= target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    }
}

#[cfg(test)]
mod tests;
