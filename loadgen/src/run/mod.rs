//! Running a scenario: the load threads, the open-loop schedule, and the coordinator.
//!
//! Contract: `run` is called on the main thread. It declares the scenario's queues (and
//! exchange) with its own client, then starts one OS thread per load thread, each pinned to its
//! CPU when one is given, each with its own tokio current-thread runtime, its own `Client`
//! connections (one per producer and per consumer) and its own `Recorder`: nothing measured is
//! shared between threads except a few relaxed counters for the progress line. Every thread
//! connects and subscribes first; then the main thread fixes the run's epoch (one `Instant`, so
//! every intended time and every latency is on one clock) and the threads start. The main
//! thread then samples queue depths once a second, updates the progress line, decides when the
//! run is over (every producer done and confirmed, then every queue drained: nothing ready and
//! nothing unacked), stops the consumers, joins the threads and merges their recorders.
//!
//! Open loop: a producer sends each message at its intended time from the schedule, or at once
//! if it is late; its latencies count from the intended time, so a stall that delays sending is
//! in the numbers (coordinated omission corrected). Messages already due are sent together, up
//! to `batch` per frame. tokio's timer has 1 ms granularity: that much of any latency may be the
//! load generator's own.
//!
//! Faults handled: a thread that cannot connect or subscribe aborts the run before it starts
//! (the error names the thread); publish refusals and dead connections are counted as failures
//! with the first one's text kept; Ctrl-C/SIGTERM (the `abort` flag) stops producers at once
//! and ends the run with what was measured; queues that never drain end the run after
//! `drain_timeout_s` (reported, not hidden).
//!
//! Files, one phase each: this one (what a run takes and gives back, what its threads share),
//! `setup` (declaring the queues and exchange, and deleting them at the end), `coordinator`
//! (the main thread's run: threads, the epoch, joining and merging), `sampling` (depth samples,
//! the drain check and the progress line), `threads` (one load thread: its runtime, its
//! connections, its tasks), `producers` (the schedule, open- and closed-loop producers, rpc
//! requesters, confirm tracking), `consumers` (consumers and the rpc server's replies).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;

use crate::scenario::Scenario;
use crate::stats::Recorder;

mod consumers;
mod coordinator;
mod producers;
mod sampling;
mod setup;
mod threads;

pub(crate) use setup::{cleanup, declare};

/// What to run, and where.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The scenario's name (file stem), for queue names and the report.
    pub name: String,
    /// The checked scenario, flags applied.
    pub scenario: Scenario,
    /// The broker's address.
    pub addr: String,
    /// One entry per load thread: the CPU to pin it to, if any.
    pub thread_cpus: Vec<Option<usize>>,
    /// Queue and exchange names start with this.
    pub prefix: String,
    /// Leave the queues (and exchange) on the broker at the end.
    pub keep_queues: bool,
    /// Draw the progress line.
    pub progress: bool,
}

/// One queue-depth sample.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    /// Seconds since the epoch.
    pub t_s: f64,
    /// Ready messages, all scenario queues.
    pub ready: u64,
    /// Delivered, not yet acked, all scenario queues.
    pub unacked: u64,
    /// The oldest ready message's age, the worst queue; `None` when none is ready.
    pub oldest_ready_age_ms: Option<u64>,
}

/// What the broker said about itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerFacts {
    /// Its version.
    pub version: String,
    /// Shards it runs.
    pub shards: u16,
    /// Its fsync policy, as the Welcome said.
    pub fsync: String,
    /// The address used.
    pub addr: String,
}

/// A finished run.
pub struct Outcome {
    /// Every thread's recorder, merged.
    pub recorder: Recorder,
    /// Phase start times, s since the epoch.
    pub phase_starts: Vec<f64>,
    /// When the run ended, s since the epoch.
    pub end_s: f64,
    /// End of the last publishing phase, s since the epoch.
    pub publishing_end_s: f64,
    /// When every queue was first seen empty after publishing ended.
    pub drained_at_s: Option<f64>,
    /// Queue depth once a second.
    pub samples: Vec<Sample>,
    /// The queues, by index.
    pub queue_names: Vec<String>,
    /// The broker.
    pub broker: BrokerFacts,
    /// Stopped by Ctrl-C/SIGTERM.
    pub aborted: bool,
    /// Wall-clock start (for interval logs).
    pub started_at: std::time::SystemTime,
    /// Load threads and where they ran: "thread 0: cpu 1" or "thread 0: not pinned (...)".
    pub pinning: Vec<String>,
}

struct Shared {
    scenario: Scenario,
    addr: String,
    phase_starts: Vec<f64>,
    queue_names: Vec<String>,
    exchange: String,
    sent: AtomicU64,
    confirmed: AtomicU64,
    delivered: AtomicU64,
    producers_done: AtomicU32,
    abort: Arc<AtomicBool>,
}

impl Shared {
    fn total_s(&self) -> f64 {
        self.phase_starts.last().copied().unwrap_or(0.0)
            + self.scenario.phases.last().map_or(0.0, |p| p.duration_s)
    }
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Producer(u32),
    Consumer(u32),
}

/// Runs `cfg` to the end; `abort` is set by the signal handler.
pub fn run(cfg: &RunConfig, abort: Arc<AtomicBool>) -> Result<Outcome, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the coordinator's runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, coordinator::coordinate(cfg, abort))
}

/// A named client connection to `addr` (the name shows in the broker's log); the error names
/// the connection and the address.
pub(crate) async fn connect(addr: &str, name: &str) -> Result<weir_client::Client, String> {
    weir_client::Client::connect(
        addr,
        weir_client::ClientOptions {
            name: name.to_string(),
            ..weir_client::ClientOptions::default()
        },
    )
    .await
    .map_err(|e| format!("{name}: connecting to {addr}: {e}"))
}
