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

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Semaphore};
use weir_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Consumer, Delivery, ExchangeKind,
    ExchangeOptions, Message, PublishFuture, PublishOptions, QueueOptions, Requester,
};

use crate::scenario::{ExchangeType, Kind, Scenario, Size, HEADER_LEN};
use crate::stats::{Count, Header, Metric, Recorder};

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
    local.block_on(&rt, coordinate(cfg, abort))
}

async fn coordinate(cfg: &RunConfig, abort: Arc<AtomicBool>) -> Result<Outcome, String> {
    let s = &cfg.scenario;
    let admin = Client::connect(
        cfg.addr.as_str(),
        ClientOptions {
            name: "weir-loadgen-admin".into(),
            ..ClientOptions::default()
        },
    )
    .await
    .map_err(|e| format!("connecting to the broker at {}: {e}", cfg.addr))?;
    let server = admin.server().clone();
    let broker = BrokerFacts {
        version: server.broker_version.clone(),
        shards: server.shard_count,
        fsync: format!("{:?}", server.durability).to_lowercase(),
        addr: cfg.addr.clone(),
    };
    if (s.size.max() as usize) + 512 > server.limits.message_size_max as usize {
        return Err(format!(
            "size {} does not fit the broker's message_size_max {}",
            s.size, server.limits.message_size_max
        ));
    }
    let (queue_names, exchange) = declare(&admin, cfg).await?;

    let mut phase_starts = Vec::new();
    let mut t = 0.0;
    for p in &s.phases {
        phase_starts.push(t);
        t += p.duration_s;
    }
    let last_pub = s.last_publishing_phase();
    let publishing_end_s = phase_starts[last_pub] + s.phases[last_pub].duration_s;
    let consumers_start_s = phase_starts[s.consumers_start_phase()];
    let shared = Arc::new(Shared {
        scenario: s.clone(),
        addr: cfg.addr.clone(),
        phase_starts: phase_starts.clone(),
        queue_names: queue_names.clone(),
        exchange: exchange.clone(),
        sent: AtomicU64::new(0),
        confirmed: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        producers_done: AtomicU32::new(0),
        abort: abort.clone(),
    });

    // Roles alternate producer, consumer, producer, ... over the threads, so each thread gets a
    // share of both when there are several.
    let threads = cfg.thread_cpus.len().max(1);
    let mut roles: Vec<Vec<Role>> = vec![Vec::new(); threads];
    let mut all = Vec::new();
    for i in 0..s.producers.max(s.consumers) {
        if i < s.producers {
            all.push(Role::Producer(i));
        }
        if i < s.consumers {
            all.push(Role::Consumer(i));
        }
    }
    for (i, r) in all.into_iter().enumerate() {
        roles[i % threads].push(r);
    }

    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, String>>();
    let mut handles = Vec::new();
    for (i, roles) in roles.into_iter().enumerate() {
        let cpu = cfg.thread_cpus.get(i).copied().flatten();
        let (sh, start, stop, ready) = (
            shared.clone(),
            start_rx.clone(),
            stop_rx.clone(),
            ready_tx.clone(),
        );
        let h = std::thread::Builder::new()
            .name(format!("load-{i}"))
            .spawn(move || load_thread(i, cpu, roles, sh, ready, start, stop))
            .map_err(|e| format!("starting load thread {i}: {e}"))?;
        handles.push(h);
    }
    drop(ready_tx);
    let mut pinning = Vec::new();
    let mut setup_error = None;
    for _ in 0..handles.len() {
        // Waiting on a std channel here blocks this (coordinator) thread: nothing else runs on it
        // yet, so that is what we want. A thread that panics drops its sender: recv fails.
        match ready_rx.recv() {
            Ok(Ok(line)) => pinning.push(line),
            Ok(Err(e)) => {
                setup_error.get_or_insert(e);
            }
            Err(_) => {
                setup_error.get_or_insert("a load thread ended during setup".to_string());
                break;
            }
        }
    }
    pinning.sort();
    if let Some(e) = setup_error {
        abort.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        drop(start_tx);
        for h in handles {
            let _ = h.join();
        }
        cleanup(&admin, cfg, &queue_names, &exchange).await;
        return Err(e);
    }

    // A little ahead, so that the first intended times are not already late.
    let epoch = Instant::now() + Duration::from_millis(20);
    let started_at = std::time::SystemTime::now() + Duration::from_millis(20);
    let _ = start_tx.send(Some(epoch));

    let progress = Progress::new(cfg.progress);
    let mut samples = Vec::new();
    let mut drained_at_s = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sample = 0.0;
    let mut phase_shown = usize::MAX;
    let mut last_depth = (0u64, 0u64, None);
    let mut aborted = false;
    loop {
        tick.tick().await;
        let now_s = epoch.elapsed().as_secs_f64();
        if abort.load(Ordering::Relaxed) {
            aborted = true;
            break;
        }
        let phase = phase_starts.iter().rposition(|p| *p <= now_s).unwrap_or(0);
        if phase != phase_shown && now_s >= 0.0 {
            phase_shown = phase;
            let p = &s.phases[phase];
            let what = if s.kind == Kind::Max {
                "closed loop".to_string()
            } else if p.mean_rate() == 0.0 {
                "quiet".to_string()
            } else {
                format!("{:.0} msgs/s mean", p.mean_rate())
            };
            progress.line(&format!(
                "phase {} ({}): {} for up to {:.1} s",
                phase, p.name, what, p.duration_s
            ));
        }
        let producers_done = shared.producers_done.load(Ordering::Relaxed) >= s.producers;
        let checking_drain =
            producers_done && now_s >= publishing_end_s && now_s >= consumers_start_s;
        if now_s >= next_sample || checking_drain {
            let d = depth(&admin, &queue_names).await;
            if let Some(d) = d {
                last_depth = d;
                if now_s >= next_sample {
                    samples.push(Sample {
                        t_s: now_s,
                        ready: d.0,
                        unacked: d.1,
                        oldest_ready_age_ms: d.2,
                    });
                    next_sample = (now_s.floor() + 1.0).max(next_sample + 1.0);
                }
                if checking_drain && d.0 == 0 && d.1 == 0 {
                    drained_at_s = Some(now_s);
                    samples.push(Sample {
                        t_s: now_s,
                        ready: 0,
                        unacked: 0,
                        oldest_ready_age_ms: None,
                    });
                    break;
                }
            }
        }
        progress.update(
            &s.phases[phase].name,
            now_s,
            shared.sent.load(Ordering::Relaxed),
            shared.confirmed.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
            last_depth,
        );
        if now_s > publishing_end_s.max(consumers_start_s) + s.drain_timeout_s {
            progress.line(&format!(
                "the queues did not drain within drain_timeout_s = {} s of the last publishing phase",
                s.drain_timeout_s
            ));
            break;
        }
    }
    let end_s = epoch.elapsed().as_secs_f64();
    progress.finish();
    let _ = stop_tx.send(true);
    let mut recorder = Recorder::new(phase_starts.clone());
    let mut thread_error = None;
    for (i, h) in handles.into_iter().enumerate() {
        let joined = tokio::task::spawn_blocking(move || h.join())
            .await
            .map_err(|e| format!("joining load thread {i}: {e}"))?;
        match joined {
            Ok(Ok(r)) => recorder.merge(r),
            Ok(Err(e)) => {
                thread_error.get_or_insert(format!("load thread {i}: {e}"));
            }
            Err(_) => {
                thread_error.get_or_insert(format!("load thread {i} panicked"));
            }
        }
    }
    cleanup(&admin, cfg, &queue_names, &exchange).await;
    let _ = admin.close().await;
    if let Some(e) = thread_error {
        return Err(e);
    }
    Ok(Outcome {
        recorder,
        phase_starts,
        end_s,
        publishing_end_s,
        drained_at_s,
        samples,
        queue_names,
        broker,
        aborted,
        started_at,
        pinning,
    })
}

/// Declares the scenario's queues (and fanout exchange); returns the queue names by index and
/// the exchange name ("" when there is none).
async fn declare(admin: &Client, cfg: &RunConfig) -> Result<(Vec<String>, String), String> {
    let s = &cfg.scenario;
    let options = QueueOptions {
        durable: s.durable,
        ..QueueOptions::default()
    };
    let mut names = Vec::new();
    match s.kind {
        Kind::Queue | Kind::Max => {
            for i in 0..s.queues {
                let name = format!("{}-{i}", cfg.prefix);
                let info = admin
                    .declare(&name, options.clone())
                    .await
                    .map_err(|e| format!("declaring queue {name}: {e}"))?;
                if info.messages_ready + info.messages_unacked > 0 {
                    return Err(format!(
                        "queue {name} already holds {} messages: the loss check needs fresh queues \
                         (use another --queue-prefix, or purge it)",
                        info.messages_ready + info.messages_unacked
                    ));
                }
                names.push(name);
            }
            let Some(x) = &s.exchange else {
                return Ok((names, String::new()));
            };
            let (kind, word) = match x.kind {
                ExchangeType::Direct => (ExchangeKind::Direct, "direct"),
                ExchangeType::Topic => (ExchangeKind::Topic, "topic"),
            };
            let exchange = format!("{}-{word}", cfg.prefix);
            admin
                .declare_exchange(
                    &exchange,
                    kind,
                    ExchangeOptions {
                        durable: s.durable,
                        ..ExchangeOptions::default()
                    },
                )
                .await
                .map_err(|e| format!("declaring exchange {exchange}: {e}"))?;
            for (i, name) in names.iter().enumerate() {
                let key = &x.binding_keys[i % x.binding_keys.len()];
                admin
                    .bind(name, &exchange, key)
                    .await
                    .map_err(|e| format!("binding {name} to {exchange} with '{key}': {e}"))?;
            }
            Ok((names, exchange))
        }
        Kind::Rpc => {
            let name = format!("{}-requests", cfg.prefix);
            admin
                .declare(&name, options)
                .await
                .map_err(|e| format!("declaring queue {name}: {e}"))?;
            Ok((vec![name], String::new()))
        }
        Kind::Fanout => {
            let exchange = format!("{}-fanout", cfg.prefix);
            admin
                .declare_exchange(
                    &exchange,
                    ExchangeKind::Fanout,
                    ExchangeOptions {
                        durable: s.durable,
                        ..ExchangeOptions::default()
                    },
                )
                .await
                .map_err(|e| format!("declaring exchange {exchange}: {e}"))?;
            for _ in 0..s.queues {
                // Server-named, as subscribers usually are.
                let name = admin
                    .declare("", options.clone())
                    .await
                    .map_err(|e| format!("declaring a server-named queue: {e}"))?
                    .name;
                admin
                    .bind(&name, &exchange, "")
                    .await
                    .map_err(|e| format!("binding {name} to {exchange}: {e}"))?;
                names.push(name);
            }
            Ok((names, exchange))
        }
    }
}

async fn cleanup(admin: &Client, cfg: &RunConfig, queues: &[String], exchange: &str) {
    if cfg.keep_queues {
        return;
    }
    for q in queues {
        if let Err(e) = admin.delete(q, false, false).await {
            eprintln!("weir-loadgen: deleting queue {q}: {e}");
        }
    }
    if !exchange.is_empty() {
        if let Err(e) = admin.delete_exchange(exchange, false).await {
            eprintln!("weir-loadgen: deleting exchange {exchange}: {e}");
        }
    }
}

/// (ready, unacked, oldest ready age) over the queues; `None` if the broker did not answer.
async fn depth(admin: &Client, queues: &[String]) -> Option<(u64, u64, Option<u64>)> {
    let (mut ready, mut unacked, mut oldest) = (0, 0, None::<u64>);
    for q in queues {
        let info = admin.queue_info(q).await.ok()?;
        ready += info.messages_ready;
        unacked += info.messages_unacked;
        if let Some(a) = info.oldest_ready_age_ms {
            oldest = Some(oldest.map_or(a, |o: u64| o.max(a)));
        }
    }
    Some((ready, unacked, oldest))
}

/// The live line (indicatif), or plain lines at phase changes when stdout is not a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        let bar = enabled.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stdout(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
                bar.set_style(style);
            }
            bar
        });
        Progress { bar }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn update(
        &self,
        phase: &str,
        t: f64,
        sent: u64,
        confirmed: u64,
        delivered: u64,
        depth: (u64, u64, Option<u64>),
    ) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "{t:6.1} s  {phase:<10} sent {sent:>9}  confirmed {confirmed:>9}  delivered {delivered:>9}  \
                 ready {:>8}  unacked {:>6}  oldest {}",
                depth.0,
                depth.1,
                depth
                    .2
                    .map_or("-".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0))
            ));
            bar.tick();
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load threads.

type Rec = Rc<RefCell<Recorder>>;

enum Prepared {
    Producer(u32, Client),
    Requester(u32, Client, Requester),
    Consumer(u32, Client, Option<Consumer>),
}

fn load_thread(
    index: usize,
    cpu: Option<usize>,
    roles: Vec<Role>,
    sh: Arc<Shared>,
    ready: std::sync::mpsc::Sender<Result<String, String>>,
    start: watch::Receiver<Option<Instant>>,
    stop: watch::Receiver<bool>,
) -> Result<Recorder, String> {
    let pinned = match cpu {
        Some(id) => {
            if core_affinity::set_for_current(core_affinity::CoreId { id }) {
                format!("thread {index}: pinned to cpu {id}")
            } else {
                format!("thread {index}: NOT pinned (setting affinity to cpu {id} failed)")
            }
        }
        None => format!("thread {index}: not pinned"),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = format!("thread {index}: starting its runtime: {e}");
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let prepared = match prepare(&roles, &sh).await {
            Ok(p) => p,
            Err(e) => {
                let e = format!("thread {index}: {e}");
                let _ = ready.send(Err(e.clone()));
                return Err(e);
            }
        };
        let _ = ready.send(Ok(pinned));
        let mut start = start;
        let epoch = loop {
            if let Some(e) = *start.borrow() {
                break e;
            }
            if start.changed().await.is_err() {
                // The coordinator gave up during setup.
                return Ok(Recorder::new(sh.phase_starts.clone()));
            }
        };
        let rec: Rec = Rc::new(RefCell::new(Recorder::new(sh.phase_starts.clone())));
        let mut tasks = Vec::new();
        for p in prepared {
            let (sh, rec, stop) = (sh.clone(), rec.clone(), stop.clone());
            tasks.push(tokio::task::spawn_local(async move {
                match p {
                    Prepared::Producer(id, client) => {
                        if sh.scenario.kind == Kind::Max {
                            closed_loop_producer(id, client, &sh, epoch, &rec).await
                        } else {
                            producer(id, client, &sh, epoch, &rec).await
                        }
                        sh.producers_done.fetch_add(1, Ordering::Relaxed);
                    }
                    Prepared::Requester(id, _client, requester) => {
                        requests(id, requester, sh.clone(), epoch, rec.clone()).await;
                        sh.producers_done.fetch_add(1, Ordering::Relaxed);
                    }
                    Prepared::Consumer(id, client, consumer) => {
                        consume(id, client, consumer, &sh, epoch, &rec, stop).await
                    }
                }
            }));
        }
        for t in tasks {
            if let Err(e) = t.await {
                return Err(format!("a load task failed: {e}"));
            }
        }
        let rec = Rc::try_unwrap(rec)
            .map_err(|_| "a load task still holds the recorder".to_string())?
            .into_inner();
        Ok(rec)
    })
}

/// Connects every role of this thread; consumers that start with the first phase subscribe now,
/// so that nothing is published before they listen.
async fn prepare(roles: &[Role], sh: &Shared) -> Result<Vec<Prepared>, String> {
    let s = &sh.scenario;
    let mut out = Vec::new();
    for role in roles {
        let name = match role {
            Role::Producer(i) => format!("weir-loadgen-producer-{i}"),
            Role::Consumer(i) => format!("weir-loadgen-consumer-{i}"),
        };
        let client = Client::connect(
            sh.addr.as_str(),
            ClientOptions {
                name: name.clone(),
                ..ClientOptions::default()
            },
        )
        .await
        .map_err(|e| format!("{name}: connecting: {e}"))?;
        out.push(match *role {
            Role::Producer(i) if s.kind == Kind::Rpc => {
                let r = client
                    .requester()
                    .await
                    .map_err(|e| format!("{name}: opening its reply queue: {e}"))?
                    .with_timeout(Duration::from_secs_f64(s.request_timeout_s));
                Prepared::Requester(i, client, r)
            }
            Role::Producer(i) => Prepared::Producer(i, client),
            Role::Consumer(i) => {
                let consumer = if s.consumers_start_phase() == 0 {
                    Some(
                        subscribe(&client, sh, i)
                            .await
                            .map_err(|e| format!("{name}: {e}"))?,
                    )
                } else {
                    None
                };
                Prepared::Consumer(i, client, consumer)
            }
        });
    }
    Ok(out)
}

async fn subscribe(client: &Client, sh: &Shared, id: u32) -> Result<Consumer, String> {
    let q = &sh.queue_names[id as usize % sh.queue_names.len()];
    client
        .consume(
            q,
            ConsumeOptions {
                prefetch: sh.scenario.prefetch,
                ..ConsumeOptions::default()
            },
        )
        .await
        .map_err(|e| format!("consuming {q}: {e}"))
}

/// One scheduled message: its phase and intended time (s since the epoch).
#[derive(Debug, Clone, Copy)]
struct Slot {
    phase: usize,
    t: f64,
}

/// Producer `p`'s share of the schedule: messages `p, p + P, p + 2P, ...` of every phase.
fn schedule(sh: &Shared, p: u32) -> impl Iterator<Item = Slot> + '_ {
    let n = u64::from(sh.scenario.producers);
    sh.scenario
        .phases
        .iter()
        .enumerate()
        .flat_map(move |(i, phase)| {
            let start = sh.phase_starts[i];
            let count = phase.message_count();
            let mut last = 0.0;
            (u64::from(p)..count).step_by(n as usize).map(move |k| {
                let t = phase.time_of(k, last);
                last = t;
                Slot {
                    phase: i,
                    t: start + t,
                }
            })
        })
}

/// A tiny PRNG for message sizes (xorshift64*): no dependency for one uniform draw.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn size(&mut self, s: Size) -> usize {
        match s {
            Size::Fixed(n) => n as usize,
            Size::Uniform { min, max } => {
                min as usize + (self.next() % (u64::from(max - min) + 1)) as usize
            }
        }
    }
}

fn body(h: &Header, len: usize) -> Bytes {
    let mut b = vec![0xa5u8; len.max(HEADER_LEN)];
    h.write(&mut b);
    Bytes::from(b)
}

fn now_ns(epoch: Instant) -> u64 {
    Instant::now().saturating_duration_since(epoch).as_nanos() as u64
}

/// What a producer hands its confirm task for one frame: the queues it routes to, and per
/// message (sequence, intended ns, phase) and its confirm.
type Pending = (Rc<[u16]>, Vec<(u64, u64, usize)>, Vec<PublishFuture>);

/// Awaits confirms in publish order and records each one's latency from its intended time.
async fn confirmer(
    p: u32,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    sh: &Shared,
    epoch: Instant,
    rec: &Rec,
    window: Option<Rc<Semaphore>>,
) {
    while let Some((queues, meta, futures)) = rx.recv().await {
        let n = futures.len();
        for ((seq, intended, phase), f) in meta.into_iter().zip(futures) {
            let outcome = f.await;
            let now = now_ns(epoch);
            let mut r = rec.borrow_mut();
            match outcome {
                Ok(_) => {
                    r.latency(Metric::Confirm, phase, intended, now);
                    r.count(Count::Confirmed, now, 1);
                    r.confirmed(&queues, p, seq);
                    sh.confirmed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => r.failed(&format!("producer {p}: publish: {e}")),
            }
        }
        if let Some(w) = &window {
            w.add_permits(n);
        }
    }
}

/// Where producer `p` publishes: the exchange, and the routing keys it cycles through (one per
/// frame), each with the queue indices it reaches (for the loss ledger).
struct Route {
    options: PublishOptions,
    keys: Vec<(String, Rc<[u16]>)>,
}

impl Route {
    fn new(sh: &Shared, p: u32) -> Route {
        let s = &sh.scenario;
        if s.kind == Kind::Fanout {
            return Route {
                options: PublishOptions {
                    exchange: sh.exchange.clone(),
                    mandatory: false,
                },
                keys: vec![(String::new(), (0..sh.queue_names.len() as u16).collect())],
            };
        }
        if let Some(x) = &s.exchange {
            // Producers start at different keys so that a short run still spreads over them.
            let n = x.routing_keys.len();
            return Route {
                options: PublishOptions {
                    exchange: sh.exchange.clone(),
                    mandatory: false,
                },
                keys: (0..n)
                    .map(|i| {
                        let k = &x.routing_keys[(i + p as usize) % n];
                        (k.clone(), x.destinations(k, s.queues).into())
                    })
                    .collect(),
            };
        }
        let q = p as usize % sh.queue_names.len();
        Route {
            options: PublishOptions::default(),
            keys: vec![(sh.queue_names[q].clone(), Rc::from([q as u16]))],
        }
    }

    /// The routing key and destinations of frame number `n`.
    fn frame(&self, n: u64) -> (&str, Rc<[u16]>) {
        let (k, q) = &self.keys[(n % self.keys.len() as u64) as usize];
        (k, q.clone())
    }
}

/// The open-loop producer: every message at its intended time (or at once when late), the
/// messages due together in one frame of at most `batch`.
async fn producer(p: u32, client: Client, sh: &Shared, epoch: Instant, rec: &Rec) {
    let s = &sh.scenario;
    let route = Route::new(sh, p);
    let mut frames = 0u64;
    let (tx, rx) = mpsc::unbounded_channel();
    let confirms = confirmer(p, rx, sh, epoch, rec, None);
    let sending = async {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(p) + 1));
        let mut slots = schedule(sh, p).peekable();
        let mut seq = 0u64;
        while let Some(first) = slots.peek().copied() {
            if sh.abort.load(Ordering::Relaxed) {
                break;
            }
            let due = epoch + Duration::from_secs_f64(first.t);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            let now_s = epoch.elapsed().as_secs_f64();
            let mut meta = Vec::new();
            let mut messages = Vec::new();
            while meta.len() < s.batch as usize {
                match slots.peek() {
                    Some(slot) if slot.t <= now_s || meta.is_empty() => {
                        let intended = (slot.t * 1e9) as u64;
                        let h = Header {
                            producer: p,
                            seq,
                            intended_ns: intended,
                            phase: slot.phase as u16,
                            route: (frames % route.keys.len() as u64) as u16,
                        };
                        messages.push(
                            Message::new(body(&h, rng.size(s.size))).persistent(s.persistent),
                        );
                        meta.push((seq, intended, slot.phase));
                        seq += 1;
                        slots.next();
                    }
                    _ => break,
                }
            }
            let n = meta.len() as u64;
            let (key, queues) = route.frame(frames);
            frames += 1;
            match client
                .publish_batch_with(&route.options, key, messages)
                .await
            {
                Ok(futures) => {
                    let now = now_ns(epoch);
                    rec.borrow_mut().count(Count::Sent, now, n);
                    sh.sent.fetch_add(n, Ordering::Relaxed);
                    let _ = tx.send((queues, meta, futures));
                }
                Err(e) => {
                    let dead = matches!(e, ClientError::Closed(_));
                    let mut r = rec.borrow_mut();
                    for _ in 0..n {
                        r.failed(&format!("producer {p}: publish: {e}"));
                    }
                    if dead {
                        break;
                    }
                }
            }
        }
        drop(tx);
    };
    tokio::join!(sending, confirms);
    let _ = client.close().await;
}

/// The closed-loop producer (`max`): a window of `in_flight` unconfirmed messages, refilled in
/// batches as confirms return, until the last phase ends. Latency counts from the actual send.
async fn closed_loop_producer(p: u32, client: Client, sh: &Shared, epoch: Instant, rec: &Rec) {
    let s = &sh.scenario;
    let route = Route::new(sh, p);
    let mut frames = 0u64;
    let window = Rc::new(Semaphore::new(s.in_flight as usize));
    let (tx, rx) = mpsc::unbounded_channel();
    let confirms = confirmer(p, rx, sh, epoch, rec, Some(window.clone()));
    let end = epoch + Duration::from_secs_f64(sh.total_s());
    let sending = async {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(p) + 1));
        let mut seq = 0u64;
        loop {
            if sh.abort.load(Ordering::Relaxed) || Instant::now() >= end {
                break;
            }
            let permit = tokio::select! {
                permit = window.acquire_many(s.batch) => permit,
                _ = tokio::time::sleep_until(end.into()) => break,
            };
            match permit {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
            let now = now_ns(epoch);
            let phase = rec.borrow().phase_at(now as f64 / 1e9);
            let mut meta = Vec::new();
            let mut messages = Vec::new();
            for _ in 0..s.batch {
                let h = Header {
                    producer: p,
                    seq,
                    intended_ns: now,
                    phase: phase as u16,
                    route: (frames % route.keys.len() as u64) as u16,
                };
                messages.push(Message::new(body(&h, rng.size(s.size))).persistent(s.persistent));
                meta.push((seq, now, phase));
                seq += 1;
            }
            let n = meta.len() as u64;
            let (key, queues) = route.frame(frames);
            frames += 1;
            match client
                .publish_batch_with(&route.options, key, messages)
                .await
            {
                Ok(futures) => {
                    rec.borrow_mut().count(Count::Sent, now, n);
                    sh.sent.fetch_add(n, Ordering::Relaxed);
                    let _ = tx.send((queues, meta, futures));
                }
                Err(e) => {
                    let dead = matches!(e, ClientError::Closed(_));
                    let mut r = rec.borrow_mut();
                    for _ in 0..n {
                        r.failed(&format!("producer {p}: publish: {e}"));
                    }
                    window.add_permits(n as usize);
                    if dead {
                        break;
                    }
                }
            }
        }
        drop(tx);
    };
    tokio::join!(sending, confirms);
    let _ = client.close().await;
}

/// The rpc requester: each request at its intended time, each its own task, so that a slow
/// reply never delays the next request (open loop).
async fn requests(p: u32, requester: Requester, sh: Arc<Shared>, epoch: Instant, rec: Rec) {
    let s = &sh.scenario;
    let queue = sh.queue_names[0].clone();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(p) + 1));
    let mut waiting = Vec::new();
    for (seq, slot) in schedule(&sh, p).enumerate() {
        let seq = seq as u64;
        if sh.abort.load(Ordering::Relaxed) {
            break;
        }
        let due = epoch + Duration::from_secs_f64(slot.t);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let intended = (slot.t * 1e9) as u64;
        let h = Header {
            producer: p,
            seq,
            intended_ns: intended,
            phase: slot.phase as u16,
            route: 0,
        };
        let message = Message::new(body(&h, rng.size(s.size))).persistent(s.persistent);
        {
            let now = now_ns(epoch);
            let mut r = rec.borrow_mut();
            r.count(Count::Sent, now, 1);
            // For rpc the ledger's "confirmed" is "requested": a request without a reply is lost.
            r.confirmed(&[0], p, seq);
        }
        sh.sent.fetch_add(1, Ordering::Relaxed);
        let (requester, rec, queue, sh) =
            (requester.clone(), rec.clone(), queue.clone(), sh.clone());
        let phase = slot.phase;
        waiting.push(tokio::task::spawn_local(async move {
            let outcome = requester.request("", &queue, message).await;
            let now = now_ns(epoch);
            let mut r = rec.borrow_mut();
            match outcome {
                Ok(_reply) => {
                    // For rpc, "confirmed" counts replies; "delivered", requests served.
                    r.latency(Metric::Rpc, phase, intended, now);
                    r.count(Count::Confirmed, now, 1);
                    r.replied(0, p, seq);
                    sh.confirmed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => r.failed(&format!("requester {p}: request {seq}: {e}")),
            }
        }));
    }
    for w in waiting {
        let _ = w.await;
    }
}

/// A consumer (or, for rpc, a server): takes deliveries, paced by `consumer_rate` /
/// `process_ms`, records end-to-end latency and the ledger, acks in groups of `ack_batch`.
async fn consume(
    id: u32,
    client: Client,
    consumer: Option<Consumer>,
    sh: &Shared,
    epoch: Instant,
    rec: &Rec,
    mut stop: watch::Receiver<bool>,
) {
    let s = &sh.scenario;
    let queue = (id as usize % sh.queue_names.len()) as u16;
    let mut consumer = match consumer {
        Some(c) => c,
        None => {
            let at = epoch + Duration::from_secs_f64(sh.phase_starts[s.consumers_start_phase()]);
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = stop.changed() => return,
            }
            match subscribe(&client, sh, id).await {
                Ok(c) => c,
                Err(e) => {
                    rec.borrow_mut().failed(&format!("consumer {id}: {e}"));
                    return;
                }
            }
        }
    };
    let interval = s.consumer_interval_s().map(Duration::from_secs_f64);
    // Acks are sent when `ack_all` is called; their answers are not awaited (dropping the future
    // forgoes the answer, not the ack): the queue's unacked count shows whether they landed.
    let mut next_at = Instant::now();
    let mut unacked: Vec<Delivery> = Vec::new();
    let flush_after = Duration::from_millis(5);
    loop {
        if *stop.borrow() {
            break;
        }
        let got = tokio::select! {
            d = consumer.recv() => d,
            _ = tokio::time::sleep(flush_after), if !unacked.is_empty() => {
                drop(Delivery::ack_all(&unacked));
                unacked.clear();
                continue;
            }
            _ = stop.changed() => break,
        };
        let d = match got {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                rec.borrow_mut().failed(&format!("consumer {id}: {e}"));
                break;
            }
            None => break,
        };
        if let Some(iv) = interval {
            let now = Instant::now();
            if next_at > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_at.into()) => {}
                    _ = stop.changed() => break,
                }
            }
            next_at = next_at.max(now) + iv;
        }
        let now = now_ns(epoch);
        {
            let mut r = rec.borrow_mut();
            match Header::read(d.body()) {
                Some(h) => {
                    r.latency(Metric::EndToEnd, usize::from(h.phase), h.intended_ns, now);
                    if s.kind != Kind::Rpc {
                        r.delivered(id, queue, &h, d.redelivered());
                    }
                }
                None => r.foreign += 1,
            }
            r.count(Count::Delivered, now, 1);
        }
        sh.delivered.fetch_add(1, Ordering::Relaxed);
        if s.kind == Kind::Rpc {
            reply(&client, &d).await;
        }
        unacked.push(d);
        if unacked.len() >= s.ack_batch as usize {
            drop(Delivery::ack_all(&unacked));
            unacked.clear();
        }
    }
    if !unacked.is_empty() {
        let _ = Delivery::ack_all(&unacked).await;
    }
    let _ = consumer.cancel().await;
    let _ = client.close().await;
}

/// The rpc server's answer: the request's body back, on its reply queue, with its correlation id.
async fn reply(client: &Client, request: &Delivery) {
    let (Some(to), Some(id)) = (request.reply_to(), request.correlation_id()) else {
        return;
    };
    let message = Message::new(Bytes::copy_from_slice(request.body()))
        .correlation_id(id)
        .persistent(false);
    // The confirm is not awaited: the requester's reply is what counts.
    let _ = client.publish(to, message).await;
}
